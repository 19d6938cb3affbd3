"""`nanoseek <command>`: thin argument parsing over functions callable from Python."""

from __future__ import annotations

import argparse
import sys

from nanoseek.config import PRESETS, ConfigError, ModelConfig, get_preset


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def info(args: argparse.Namespace) -> None:
    from nanoseek.model.params import count_parameters

    config = ModelConfig.load(args.config) if args.config else get_preset(args.preset)
    counts = count_parameters(config)
    name = args.config or args.preset
    moe = (f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}, {config.n_group} groups, "
           f"top-{config.topk_group} groups) + {config.n_shared_experts} shared, {config.scoring_func}"
           if config.n_routed_experts else "none (dense)")
    rows = [
        ("model", name),
        ("layers", f"{config.num_hidden_layers} ({config.first_k_dense_replace} dense), hidden {config.hidden_size}, "
                   f"{config.num_attention_heads} heads"),
        ("MLA", f"q_lora_rank {config.q_lora_rank}, kv_lora_rank {config.kv_lora_rank}, "
                f"latent cache {config.kv_lora_rank + config.qk_rope_head_dim} values/token/layer"),
        ("experts", moe),
        ("total params", f"{_human(counts.total)} ({counts.total:,})"),
        ("activated/token", f"{_human(counts.activated)} ({counts.activated:,})"),
        ("MTP params", f"{_human(counts.mtp)} ({counts.mtp:,}; depth {config.num_nextn_predict_layers}, "
                       "embedding and head shared)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 + R1 in one PyTorch package")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print a model's shape and parameter counts (no memory used)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small", choices=list(PRESETS))
    src.add_argument("--config", help="a config.json or a checkpoint directory")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
