"""Load on `nanoseek serve`: concurrent streaming clients for a while, against the same requests sent one at a time.

Starts `nanoseek serve` on --model in a subprocess, then --clients threads each send streamed chat completions
(a built-in arithmetic question each, sampled with its own seed) back to back for --seconds; a request counts as
an error unless it answers 200 and its stream ends with `data: [DONE]`. Reports the aggregate generated tokens/s
(the usage's completion tokens of every request finished, over the phase's wall time), p50/p95 time to first token
(the first reasoning or answer delta, as the client sees it), the largest batch one engine step ran (the server's
/metrics), then sends the first --baseline-requests of the same requests one at a time for the tokens/s of no
batching. Writes bench/results/serve-load-<device>.json with the torch version and the commit.

    nanoseek pretrain --max-steps 20 --out-dir /tmp/serve_base     # a default-shaped model, if none is trained
    OMP_NUM_THREADS=1 python bench/serve_load.py --model /tmp/serve_base
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from nanoseek.provenance import git_commit, write_result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_request(port: int, body: dict) -> dict:
    """One streamed chat completion -> {ok, ttft, tokens, seconds, error}."""
    start = time.perf_counter()
    ttft, usage, done = None, None, False
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"ok": False, "error": f"{response.status}: {response.read()[:200]!r}"}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return {"ok": False, "error": event["error"]["message"]}
            if event.get("usage"):
                usage = event["usage"]
            delta = event["choices"][0]["delta"] if event["choices"] else {}
            if ttft is None and (delta.get("reasoning_content") or delta.get("content")):
                ttft = time.perf_counter() - start
        connection.close()
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not done or usage is None:
        return {"ok": False, "error": "the stream ended without usage and [DONE]"}
    return {"ok": True, "ttft": ttft, "tokens": usage["completion_tokens"], "seconds": time.perf_counter() - start}


def make_requests(n: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}?"}],
             "max_tokens": max_tokens, "temperature": 0.6, "top_p": 0.95, "seed": i, "stream": True,
             "stream_options": {"include_usage": True}} for i in range(n)]


def concurrent_phase(port: int, requests: list[dict], clients: int, seconds: float) -> tuple[list[dict], float]:
    """clients threads take requests in order until `seconds` have passed -> (results, wall seconds)."""
    results: list[dict] = []
    lock = threading.Lock()
    next_request = iter(range(len(requests)))
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            result = chat_request(port, requests[i])
            with lock:
                results.append({"request": i, **result})

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise KeyError(name)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/pretrain", help="checkpoint or run directory (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    parser.add_argument("--seconds", type=float, default=120, help="length of the concurrent phase (default: 120)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default: 128)")
    parser.add_argument("--baseline-requests", type=int, default=16,
                        help="the first N requests sent again one at a time (default: 16)")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/serve-load-<device>.json)")
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", args.model, "--port",
                               str(port), "--max-batch", str(args.clients), "--max-queue", str(args.clients),
                               "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{server.stderr.read()}") from None
                time.sleep(0.5)
        requests = make_requests(100_000, args.max_tokens, seed=0)
        chat_request(port, {**requests[0], "max_tokens": 4})  # warm-up
        print(f"{args.clients} clients for {args.seconds:.0f} s ...", file=sys.stderr)
        results, wall = concurrent_phase(port, requests, args.clients, args.seconds)
        largest_batch = metric(port, "nanoseek_batch_size_max")
        ok = [r for r in results if r["ok"]]
        errors = [r for r in results if not r["ok"]]
        ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
        concurrent_tokens = sum(r["tokens"] for r in ok)
        print(f"one at a time: the first {args.baseline_requests} requests ...", file=sys.stderr)
        start = time.perf_counter()
        baseline = [chat_request(port, requests[i]) for i in range(args.baseline_requests)]
        baseline_wall = time.perf_counter() - start
        baseline_ok = [r for r in baseline if r["ok"]]
    finally:
        server.terminate()
        server.wait(120)

    result = {
        "benchmark": "serve_load",
        "model": args.model,
        "torch": torch.__version__,
        "commit": git_commit(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpu_count": os.cpu_count(),
        "clients": args.clients,
        "seconds": round(wall, 1),
        "max_tokens": args.max_tokens,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": [r["error"] for r in errors[:5]],
        "concurrent": {"tokens": concurrent_tokens, "tokens_per_s": round(concurrent_tokens / wall, 1),
                       "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p95_s": round(percentile(ttfts, 95), 3),
                       "largest_batch": int(largest_batch)},
        "one_at_a_time": {"requests": len(baseline), "errors": len(baseline) - len(baseline_ok),
                          "tokens": sum(r["tokens"] for r in baseline_ok),
                          "tokens_per_s": round(sum(r["tokens"] for r in baseline_ok) / baseline_wall, 1),
                          "ttft_p50_s": round(percentile([r["ttft"] for r in baseline_ok], 50), 3)},
    }
    result["speedup"] = round(result["concurrent"]["tokens_per_s"] / result["one_at_a_time"]["tokens_per_s"], 2)
    device = "cpu"
    write_result(args.out or Path(__file__).parent / "results" / f"serve-load-{device}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
