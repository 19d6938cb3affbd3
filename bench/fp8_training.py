"""FP8 vs BF16 pretraining: same model init, data and seed; held-out loss, tokens/s, peak memory -> a result JSON.

Acceptance of the FP8 recipe (GPU): held-out loss within 0.25% of BF16 after 1000 steps, and FP8 at >= 1.3x BF16's
tokens/s on a wide config. The JSON records which GEMMs ran in torch._scaled_mm's FP8 kernel and which in the
quantize-dequantize reference (the routed experts always do: torch has no block-wise grouped FP8 GEMM on Hopper).

    python bench/fp8_training.py                                   # GPU parity: bench-1b, 1000 steps x 8 x 2048
    python bench/fp8_training.py --steps 60 --set hidden_size=4096 intermediate_size=16384 num_hidden_layers=4 \\
        n_routed_experts=0 n_group=1 topk_group=1 q_lora_rank=1536 kv_lora_rank=512   # GPU speed: wide, dense
    python bench/fp8_training.py --preset tiny --steps 20 --seq-len 64 --batch-size 4 --micro-batch-size 4 \\
        --builtin-docs 2000 --eval-batches 2                     # CPU smoke (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import get_preset
from nanoseek.data import tasks
from nanoseek.data.shards import TokenLoader, prepare_documents
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import DeepSeekV3
from nanoseek.model.fp8 import GEMM_PATHS
from nanoseek.provenance import device_name, git_commit, write_result
from nanoseek.train.loop import TrainConfig, Trainer
from nanoseek.train.pretrain import LanguageModelStage, PretrainConfig


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["hidden_size=4096", "q_lora_rank=null"] -> {"hidden_size": 4096, "q_lora_rank": None} (values as JSON)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def prepare_data(args: argparse.Namespace, vocab_size: int, work: Path) -> Path:
    if args.data:
        return Path(args.data)
    docs = list(tasks.corpus(args.builtin_docs, seed=args.seed))
    prepare_documents(docs, Tokenizer.train(docs, vocab_size), work / "data", heldout_fraction=0.02, seed=args.seed)
    return work / "data"


def run(precision: str, args: argparse.Namespace, data: Path, overrides: dict[str, Any], work: Path) -> dict:
    tokenizer = Tokenizer.load(data)
    config = get_preset(args.preset).replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                             eos_token_id=tokenizer.eos_id, **overrides)
    torch.manual_seed(args.seed)
    model = DeepSeekV3(config)
    cfg = TrainConfig(out_dir=str(work / precision), max_steps=args.steps, lr=args.lr,
                      warmup_steps=max(1, args.steps // 20), eval_every=0, save_every=0, tensorboard=False,
                      seed=args.seed, precision=precision, recompute=args.recompute)
    batches = PretrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                             eval_batches=args.eval_batches)
    stage = LanguageModelStage(TokenLoader(data, "train", seq_len=args.seq_len, seed=args.seed), batches, config,
                               heldout_data=data)
    trainer = Trainer(model, stage, cfg)
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    paths_before = Counter(GEMM_PATHS)
    start = time.perf_counter()
    records = [trainer.train_step() for _ in range(args.steps)]
    minutes = (time.perf_counter() - start) / 60
    timed = records[min(args.timing_skip, len(records) - 1):]
    tail = records[-max(1, len(records) // 10):]
    result = {
        "precision": precision, "params": sum(p.numel() for p in model.parameters()),
        "heldout_loss": stage.evaluate(trainer)["loss"],
        "train_lm_loss_last_10pct": sum(r["lm_loss"] for r in tail) / len(tail),
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time"] for r in timed) / sum(r["step_time"] for r in timed),
        "mfu": sum(r.get("mfu", 0.0) for r in timed) / len(timed) if "mfu" in timed[0] else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None,
        "skipped_steps": sum(r["skipped"] for r in records), "minutes": minutes,
        "gemm_paths": dict(Counter(GEMM_PATHS) - paths_before),
    }
    print(precision, json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model config overrides")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["auto", "bf16", "fp32", "fp8"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--timing-skip", type=int, default=10, help="warm-up steps left out of tokens/s")
    parser.add_argument("--data", help="a prepared shard directory (with tokenizer.json); default: built-in corpus")
    parser.add_argument("--builtin-docs", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", help="result JSON (default bench/results/fp8_training-<device>.json)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = device_name("cuda" if cuda else "cpu")
    overrides = parse_overrides(args.set)
    with tempfile.TemporaryDirectory(prefix="fp8-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(args, get_preset(args.preset).vocab_size, work)
        runs = {p: run(p, args, data, overrides, work) for p in args.precisions}
    summary: dict[str, Any] = {}
    if "bf16" in runs and "fp8" in runs:
        bf16, fp8 = runs["bf16"], runs["fp8"]
        summary = {"heldout_loss_rel_diff": fp8["heldout_loss"] / bf16["heldout_loss"] - 1,
                   "speedup": fp8["tokens_per_s"] / bf16["tokens_per_s"]}
        summary["parity_within_0.25pct"] = abs(summary["heldout_loss_rel_diff"]) <= 0.0025
        summary["speedup_at_least_1.3x"] = summary["speedup"] >= 1.3
    report = {"bench": "fp8_training", "device": device, "gpu": cuda, "torch": torch.__version__,
              "git_commit": git_commit(), "preset": args.preset, "overrides": overrides,
              "args": {k: v for k, v in vars(args).items() if k not in ("set", "result")},
              "runs": runs, "summary": summary,
              "note": None if cuda else "CPU smoke run: tokens/s and parity at this size say nothing about the GPU"}
    slug = device.replace(" ", "-").lower() if cuda else "cpu-smoke"
    path = Path(args.result or Path(__file__).parent / "results" / f"fp8_training-{slug}.json")
    print(json.dumps(summary))
    write_result(path, report)


if __name__ == "__main__":
    main()
