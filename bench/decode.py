"""Decode speed: nanoseek's engine against Hugging Face transformers on the same weights, in the same run.

The issue's setting: the `bench-1b` config with random weights, prompts of 128 tokens, 256 new tokens, greedy,
batch 1 and 32. nanoseek runs with its default on the device (CUDA graphs on CUDA) and eagerly; transformers
with its dynamic cache and with its fastest mode (static cache + torch.compile, CUDA only). Tokens/s counts
every generated token of the batch over the whole generate call (prefill included, as in the anchor). Also the
cache memory per token. On a CPU use a small preset to check the script: `python bench/decode.py --preset tiny`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import nanoseek
from nanoseek.config import get_preset
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.provenance import device_name, git_commit, write_result


def timed(fn, device: torch.device, repeats: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn."""
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def result(prompts: list[list[int]], new_tokens: int, seconds: list[float], tokens: list[list[int]]) -> dict:
    """tokens/s of the median call (every generated token of the batch over the whole call)."""
    return {"tok_s": len(prompts) * new_tokens / statistics.median(seconds), "seconds": seconds, "tokens": tokens}


def bench_nanoseek(model, prompts: list[list[int]], new_tokens: int, static: bool | None, device,
                   repeats: int = 1, compile_decode: bool = False) -> dict:
    engine = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + new_tokens, static_decode=static,
                    compile_decode=compile_decode)
    params = SamplingParams(max_new_tokens=new_tokens)
    warm_up = timed(lambda: engine.generate(prompts, SamplingParams(max_new_tokens=min(16, new_tokens))), device)[0]
    seconds = timed(lambda: engine.generate(prompts, params), device, repeats)
    return result(prompts, new_tokens, seconds, [c.tokens for c in engine.generate(prompts, params)]) | {
        "warm_up_seconds": warm_up}


def bench_hf(hf, prompts: list[list[int]], new_tokens: int, compiled: bool, device, repeats: int = 1) -> dict:
    ids = torch.tensor(prompts, device=device)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
          "attention_mask": torch.ones_like(ids), "pad_token_id": hf.config.eos_token_id}
    if compiled:
        kw |= {"cache_implementation": "static", "compile_config": None}
    with torch.no_grad():
        hf.generate(ids, **{**kw, "max_new_tokens": 16, "min_new_tokens": 16})  # warm-up (and compile)
        hf.generate(ids, **kw)
        seconds = timed(lambda: hf.generate(ids, **kw), device, repeats)
        tokens = hf.generate(ids, **kw)[:, ids.shape[1]:].tolist()
    return result(prompts, new_tokens, seconds, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/decode-<device>.json)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = get_preset(args.preset)
    torch.manual_seed(0)
    model = nanoseek.DeepSeekV3(config).to(device=device, dtype=dtype).eval()
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:  # the same weights, through nanoseek's HF export
            nanoseek.save_pretrained(model, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        hf.generation_config.pad_token_id = 0

    c = config
    result = {
        "preset": args.preset, "device": device_name(device), "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "commit": git_commit(),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "cache_values_per_token_per_layer": {"nanoseek": c.kv_lora_rank + c.qk_rope_head_dim,
                                             "hf": c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim
                                                                            + c.v_head_dim)},
        "runs": [],
    }
    modes = [("nanoseek", "default", lambda p: bench_nanoseek(model, p, args.new_tokens, None, device)),
             ("nanoseek", "eager", lambda p: bench_nanoseek(model, p, args.new_tokens, False, device))]
    if device.type != "cuda":
        modes = modes[1:]  # on the CPU the default is the eager path
    if hf is not None:
        modes.append(("hf", "dynamic cache", lambda p: bench_hf(hf, p, args.new_tokens, False, device)))
        if device.type == "cuda":
            modes.append(("hf", "static cache + torch.compile", lambda p: bench_hf(hf, p, args.new_tokens, True,
                                                                                     device)))
    for batch in args.batches:
        prompts = torch.randint(0, c.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(
            batch)).tolist()
        tokens = {}
        for library, mode, run in modes:
            try:
                r = run(prompts)
            except Exception as e:  # one mode failing (e.g. compile) must not lose the others' numbers
                result["runs"].append({"library": library, "mode": mode, "batch": batch, "error": repr(e)[:300]})
                continue
            tokens[(library, mode)] = r.pop("tokens")
            result["runs"].append({"library": library, "mode": mode, "batch": batch, **r})
            print(f"batch {batch:3d}  {library:8s} {mode:30s} {r['tok_s']:10.1f} tok/s", flush=True)
        reference = tokens.get(("nanoseek", "eager"))
        for run in result["runs"]:
            key = (run["library"], run["mode"])
            if run["batch"] == batch and key in tokens and reference is not None:
                same = [a == b for ra, rb in zip(tokens[key], reference) for a, b in zip(ra, rb)]
                run["tokens_equal_to_nanoseek_eager"] = sum(same) / len(same)
    write_result(args.out or f"bench/results/decode-{device.type}.json", result)


if __name__ == "__main__":
    main()
