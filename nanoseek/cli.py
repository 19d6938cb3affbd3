"""`nanoseek <command>`: thin argument parsing over functions callable from Python."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from nanoseek.config import PRESETS, ModelConfig, get_preset
from nanoseek.errors import NanoseekError


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


def plan(args: argparse.Namespace) -> None:
    from nanoseek.parallel.plan import Cluster, PlanLayout, Workload, format_plan
    from nanoseek.parallel.plan import plan as run

    config = ModelConfig.load(args.config) if args.config else get_preset(args.preset)
    print(f"model {args.config or args.preset}")
    print(format_plan(run(config, _from_args(Cluster, args), _from_args(PlanLayout, args), _from_args(Workload, args))))


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                           defaults=None) -> None:
    """One --option per field of a config dataclass, typed and defaulted from the field (one source of truth),
    or from a `defaults` instance where a stage's defaults differ."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", default=default)
        else:
            parser.add_argument(flag, type=kind, default=default, metavar=kind.__name__.upper())


def _from_args(cls: type, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in names})


def pretrain(args: argparse.Namespace) -> None:
    from nanoseek.train.loop import TrainConfig
    from nanoseek.train.pretrain import DataConfig
    from nanoseek.train.pretrain import pretrain as run

    report = run(_from_args(DataConfig, args), _from_args(TrainConfig, args), resume=args.resume)
    if report.get("task_accuracy"):
        print(f"held-out loss {report['heldout_loss']:.3f} (unigram baseline {report['unigram_loss']:.3f}); "
              f"greedy accuracy on easy problems {100 * report['task_accuracy']['mean']:.0f}%; "
              f"report: {args.out_dir}/report.md")
    elif report.get("stopped") is not None:
        print(f"stopped at step {report['step']}; resume with: nanoseek pretrain --resume --out-dir {args.out_dir}")


def grpo(args: argparse.Namespace) -> None:
    from nanoseek.train.grpo import GRPOConfig, GRPOLossConfig, run_grpo
    from nanoseek.train.loop import TrainConfig

    loss = _from_args(GRPOLossConfig, args)
    settings = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(GRPOConfig)}}
    result = run_grpo(args.model, _from_args(TrainConfig, args), GRPOConfig(**{**settings, "loss": loss}),
                      resume=args.resume)
    print(f"stopped at step {result['step']}" if result["stopped"] is not None else
          f"finished {result['step']} steps; checkpoints in {args.out_dir}/checkpoints, plots in {args.out_dir}/plots")


def pipeline(args: argparse.Namespace) -> None:
    from nanoseek.pipeline import run_pipeline

    report = run_pipeline(args.out_dir, resume=args.resume, eval_problems=args.problems)
    before, after = report["base"]["overall"], report["r1_zero"]["overall"]
    print(f"held-out pass@1 {100 * before['pass@1']:.1f}% -> {100 * after['pass@1']:.1f}%, format rate "
          f"{100 * before['format']:.1f}% -> {100 * after['format']:.1f}%, {report['minutes']['total']:.1f} min; "
          f"report: {args.out_dir}/report.md")


def tokenizer_train(args: argparse.Namespace) -> None:
    from nanoseek.data.shards import read_documents
    from nanoseek.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(read_documents(args.files), args.vocab_size)
    tokenizer.save(args.out)
    print(f"wrote {args.out} ({tokenizer.vocab_size} tokens)")


def data_prepare(args: argparse.Namespace) -> None:
    from nanoseek.data.shards import prepare_files
    from nanoseek.data.tokenizer import Tokenizer

    meta = prepare_files(args.files, Tokenizer.load(args.tokenizer), args.out, fim_rate=args.fim_rate,
                         heldout_fraction=args.heldout_fraction, seed=args.seed)
    print(json.dumps(meta, indent=2))


def _load_for_inference(args: argparse.Namespace):
    """-> (engine, tokenizer) for --model: a checkpoint directory, or a run directory (its latest checkpoint)."""
    import torch

    import nanoseek
    from nanoseek.checkpoint import resolve_checkpoint
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.infer.engine import Engine

    path = resolve_checkpoint(args.model)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; pass a checkpoint directory that holds one "
                                "(the `model/` of a nanoseek checkpoint does)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.load(path)
    model = nanoseek.from_pretrained(path, device=device)
    return Engine(model, max_batch=args.max_batch, max_len=args.max_len, tokenizer=tokenizer), tokenizer


def _sampling(args: argparse.Namespace, tokenizer):
    from nanoseek.infer.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop_ids=(tokenizer.eos_id,),
                          stop_strings=tuple(args.stop))


def generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from nanoseek.infer.chat import generate_file, read_prompts

    engine, tokenizer = _load_for_inference(args)
    prompts = read_prompts(Path(args.prompts))
    generate_file(engine, tokenizer, prompts, Path(args.out), args.template, _sampling(args, tokenizer))
    print(f"wrote {len(prompts)} completions to {args.out}")


def chat(args: argparse.Namespace) -> None:
    from nanoseek.infer.chat import chat as run

    engine, tokenizer = _load_for_inference(args)
    run(engine, tokenizer, args.template, _sampling(args, tokenizer))


def evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from nanoseek.eval import EvalConfig, format_table, heldout_problems
    from nanoseek.eval import evaluate as run

    engine, tokenizer = _load_for_inference(args)
    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, greedy=not args.no_greedy)
    report = run(engine.model, tokenizer, heldout_problems(args.problems, args.difficulty, args.seed), cfg,
                 max_batch=args.max_batch)
    print(format_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _add_inference_options(parser: argparse.ArgumentParser, temperature: float) -> None:
    from nanoseek.infer.chat import TEMPLATES

    parser.add_argument("--model", default="runs/pretrain", help="a checkpoint directory, or a run directory")
    parser.add_argument("--template", default="question", choices=TEMPLATES,
                        help="how a message becomes a prompt (`question` is the built-in corpus's format)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", nargs="*", default=[], help="stop strings (the eos token always stops)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (cache slots)")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per sequence the cache holds")
    parser.add_argument("--device", default="auto")


def main(argv: list[str] | None = None) -> int:
    from nanoseek.train.loop import TrainConfig
    from nanoseek.train.pretrain import DataConfig

    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 + R1 in one PyTorch package")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a model's shape and parameter counts (no memory used)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="small", choices=list(PRESETS))
    src.add_argument("--config", help="a config.json or a checkpoint directory")
    p.set_defaults(func=info)

    from nanoseek.parallel.plan import Cluster, PlanLayout, Workload

    p = sub.add_parser("plan", help="plan a cluster run on paper: memory per GPU, pipeline bubbles, all-to-all "
                       "traffic, GPU-hours per trillion tokens", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="v3-671b", choices=list(PRESETS))
    src.add_argument("--config", help="a config.json or a checkpoint directory")
    _add_dataclass_options(p, Cluster)
    _add_dataclass_options(p, PlanLayout)
    _add_dataclass_options(p, Workload)
    p.set_defaults(func=plan)

    p = sub.add_parser("pipeline", help="the whole embedded pipeline: pretrain -> evaluate -> R1-Zero -> evaluate, "
                       "with a before/after report", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default="runs", help="one directory per stage under it; finished stages are reused")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its latest checkpoint")
    p.add_argument("--problems", type=int, default=30, help="distinct held-out problems per task in the evaluations")
    p.set_defaults(func=pipeline)

    p = sub.add_parser("pretrain", help="pretrain a model (no arguments: `small` on the built-in corpus)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    _add_dataclass_options(p, DataConfig)
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=pretrain)

    from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, GRPOLossConfig

    p = sub.add_parser("grpo", help="R1-Zero: GRPO with rule-based rewards on the built-in tasks, from a base model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="runs/pretrain", help="the base model: a checkpoint or a run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    _add_dataclass_options(p, GRPOConfig, skip=("loss",))
    _add_dataclass_options(p, GRPOLossConfig)
    _add_dataclass_options(p, TrainConfig, defaults=GRPO_TRAIN_DEFAULTS)
    p.set_defaults(func=grpo)

    p = sub.add_parser("generate", help="complete a file of prompts (.txt lines or .jsonl \"prompt\") into JSONL",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts")
    p.add_argument("--out", default="completions.jsonl")
    _add_inference_options(p, temperature=0.0)
    p.set_defaults(func=generate)

    p = sub.add_parser("chat", help="talk to a model in the terminal; its thinking is shown apart from the answer",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_inference_options(p, temperature=0.6)
    p.set_defaults(func=chat)

    p = sub.add_parser("eval", help="pass@1 over k samples, cons@k, greedy accuracy and format rate on held-out "
                       "built-in problems", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_inference_options(p, temperature=0.6)
    p.add_argument("--k", type=int, default=8, help="samples per problem")
    p.add_argument("--problems", type=int, default=30, help="distinct held-out problems per task")
    p.add_argument("--difficulty", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--out", help="write the report as JSON")
    p.set_defaults(func=evaluate, max_new_tokens=160, max_batch=64)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a byte-level BPE with DeepSeek's special tokens")
    t.add_argument("files", nargs="+", help="text, JSONL (`text` field) or Parquet files, or directories")
    t.add_argument("--vocab-size", type=int, default=32768)
    t.add_argument("--out", default="tokenizer.json")
    t.set_defaults(func=tokenizer_train)

    p = sub.add_parser("data", help="data tools")
    data = p.add_subparsers(dest="action", required=True)
    d = data.add_parser("prepare", help="tokenize files into packed binary shards (with FIM and a held-out split)")
    d.add_argument("files", nargs="+")
    d.add_argument("--tokenizer", required=True, help="a tokenizer.json")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--fim-rate", type=float, default=0.1)
    d.add_argument("--heldout-fraction", type=float, default=0.01)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=data_prepare)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (NanoseekError, FileNotFoundError) as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
