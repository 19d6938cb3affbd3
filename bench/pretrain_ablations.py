"""Pretraining ablations with equal tokens and seed: load balancing (aux-loss-free vs aux loss vs neither) and
MTP (on vs off). Reports held-out next-token loss and MaxVio for each, and writes a result JSON.

MaxVio (DeepSeek-V3 paper): max over experts of load / mean load - 1, here averaged over the main model's MoE
layers and over the training steps.

    python bench/pretrain_ablations.py                       # GPU: `small` preset, 2000 steps per run
    python bench/pretrain_ablations.py --preset tiny --max-steps 60 --seq-len 128 --batch-size 8   # CPU smoke size
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from nanoseek.config import get_preset
from nanoseek.provenance import device_name, git_commit, write_result
from nanoseek.train.loop import TrainConfig
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig, pretrain

VARIANTS = {
    # name: (bias update speed gamma, sequence-wise balance loss alpha, MTP weight)
    "aux-free": dict(bias_update_speed=None, aux_alpha=0.0, mtp_weight=0.3, mtp_weight_late=0.1),
    "aux-loss": dict(bias_update_speed=0.0, aux_alpha=0.01, mtp_weight=0.3, mtp_weight_late=0.1),
    "no-balancing": dict(bias_update_speed=0.0, aux_alpha=0.0, mtp_weight=0.3, mtp_weight_late=0.1),
    "aux-free-no-mtp": dict(bias_update_speed=None, aux_alpha=0.0, mtp_weight=0.0, mtp_weight_late=0.0),
}


def summarize(out_dir: Path, n_moe_layers: int) -> dict:
    records = read_metrics(out_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    heldout = [r for r in records if r["kind"] == "heldout"]
    maxvio = [sum(r["max_violation"][:n_moe_layers]) / n_moe_layers for r in train]
    return {"heldout_loss": heldout[-1]["loss"], "final_train_lm_loss": train[-1]["lm_loss"],
            "maxvio_mean": sum(maxvio) / len(maxvio), "maxvio_last_10pct": sum(maxvio[-len(maxvio) // 10:]) /
            max(1, len(maxvio) // 10), "tokens": train[-1]["tokens"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--builtin-docs", type=int, default=400_000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out-dir", default="runs/ablations")
    parser.add_argument("--result", default=None, help="result JSON (default bench/results/ablations-<device>.json)")
    args = parser.parse_args()

    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset)
    base = TrainConfig(max_steps=args.max_steps, eval_every=max(1, args.max_steps // 4), save_every=args.max_steps,
                       keep_last=1, tensorboard=False, warmup_steps=max(1, args.max_steps // 20))
    data = PretrainConfig(preset=args.preset, builtin_docs=args.builtin_docs, eval_problems=0, seq_len=args.seq_len,
                          batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, eval_batches=16)
    shared_data = Path(args.out_dir) / "data"
    results = {}
    for name in args.variants:
        out = Path(args.out_dir) / name
        train_options = {k: v for k, v in VARIANTS[name].items() if k in ("bias_update_speed", "aux_alpha")}
        train = replace(base, out_dir=str(out), **train_options)
        setup = replace(data, **{k: v for k, v in VARIANTS[name].items() if k not in train_options})
        setup = replace(setup, data=(str(shared_data),)) if (shared_data / "meta.json").is_file() else setup
        start = time.perf_counter()
        pretrain(setup, train, progress=True)
        if not (shared_data / "meta.json").is_file():
            (out / "data").rename(shared_data)  # every later variant trains on exactly these shards
        results[name] = {**summarize(out, preset.num_moe_layers), **VARIANTS[name],
                         "minutes": (time.perf_counter() - start) / 60}
        print(name, json.dumps(results[name]))

    report = {"benchmark": "pretrain_ablations", "device": device, "torch": torch.__version__, "git_commit": git_commit(),
              "preset": args.preset, "max_steps": args.max_steps, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "seed": base.seed, "results": results}
    slug = device.replace(" ", "-").lower() if torch.cuda.is_available() else "cpu-smoke"
    write_result(args.result or f"bench/results/ablations-{slug}.json", report)


if __name__ == "__main__":
    main()
