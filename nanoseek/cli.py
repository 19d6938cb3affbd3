"""`nanoseek <command>`: thin argument parsing over functions callable from Python."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nanoseek.config import DENSE_PRESETS, PRESETS, ModelConfig, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.options import (HelpFormatter, add_dataclass_options, fraction, from_args, non_negative_float,
                              non_negative_int, positive_int, probability)


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def info(args: argparse.Namespace) -> None:
    from nanoseek.config import DenseConfig, load_config
    from nanoseek.model.params import count_parameters

    config = load_config(args.config) if args.config else get_preset(args.preset)
    counts = count_parameters(config)  # from the module tree on the meta device
    name = args.config or args.preset
    if isinstance(config, DenseConfig):
        _dense_info(name, config, counts)
        return
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


def _dense_info(name: str, config, counts) -> None:
    """`nanoseek info` of a dense student (a Qwen2 or Llama DenseConfig)."""
    c = config
    rope = (f"llama3 scaling x{c.rope_scaling.factor:g} from {c.rope_scaling.original_max_position_embeddings} "
            f"(low/high freq factors {c.rope_scaling.low_freq_factor:g}/{c.rope_scaling.high_freq_factor:g})"
            if c.rope_scaling else "unscaled")
    biases = ("q/k/v/o" if c.o_proj_bias else "q/k/v") if c.attention_bias else "none"
    rows = [
        ("model", f"{name} ({c.architecture}, dense)"),
        ("layers", f"{c.num_hidden_layers}, hidden {c.hidden_size}, FFN {c.intermediate_size} (SwiGLU)"),
        ("attention", f"{c.num_attention_heads} query heads, {c.num_key_value_heads} key/value heads of "
                      f"{c.head_dim} (GQA groups of {c.kv_groups}); biases: {biases}; "
                      f"KV cache {2 * c.num_key_value_heads * c.head_dim} values/token/layer"),
        ("positions", f"{c.max_position_embeddings}, RoPE theta {c.rope_theta:g}, {rope}"),
        ("vocabulary", f"{c.vocab_size}, output head {'tied to' if c.tie_word_embeddings else 'separate from'} "
                       "the embedding"),
        ("total params", f"{_human(counts.total)} ({counts.total:,}; all activated, no MTP)"),
        ("embedding", f"{_human(counts.embedding)} ({counts.embedding:,})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def plan(args: argparse.Namespace) -> None:
    from nanoseek.parallel.plan import Cluster, PlanLayout, Workload, format_plan
    from nanoseek.parallel.plan import plan as run

    config = ModelConfig.load(args.config) if args.config else get_preset(args.preset)
    print(f"model {args.config or args.preset}")
    print(format_plan(run(config, from_args(Cluster, args), from_args(PlanLayout, args), from_args(Workload, args))))


def pretrain(args: argparse.Namespace) -> None:
    from nanoseek.train.pretrain import arguments, pretrain

    report = pretrain(**arguments(args))
    if report.get("stopped") is not None:
        print(f"stopped at step {report['step']}; resume with: nanoseek pretrain --resume --out-dir {args.out_dir}")
        return
    accuracy = report["task_accuracy"]
    print(f"held-out loss {report['heldout_loss']:.3f} (unigram baseline {report['unigram_loss']:.3f})"
          + (f"; greedy accuracy on easy problems {100 * accuracy['mean']:.0f}%" if accuracy else "")
          + f"; {report['steps']} steps in {report['minutes']:.1f} min; report: {args.out_dir}/report.md")


def grpo(args: argparse.Namespace) -> None:
    from nanoseek.train.grpo import arguments, run_grpo

    result = run_grpo(**arguments(args))
    if result["stopped"] is not None:
        print(f"stopped at step {result['step']}; resume with: nanoseek grpo --resume --out-dir {args.out_dir}")
    else:
        print(f"finished {result['step']} steps; report: {args.out_dir}/report.md, checkpoints in "
              f"{args.out_dir}/checkpoints, plots in {args.out_dir}/plots")


def sft(args: argparse.Namespace) -> None:
    from nanoseek.train.sft import arguments, run_sft

    result = run_sft(**arguments(args))
    if result.get("stopped") is not None:
        print(f"stopped at step {result['step']}; resume with: nanoseek sft --resume --out-dir {args.out_dir}")
        return
    loss, accuracy = result["heldout_loss"], result["chat_accuracy"]
    print(f"finished {result['steps']} steps"
          + (f"; held-out loss {loss['before']:.3f} -> {loss['after']:.3f}" if loss["after"] is not None else "")
          + (f"; greedy chat-format accuracy {100 * accuracy['before']['mean']:.0f}% -> "
             f"{100 * accuracy['after']['mean']:.0f}%" if accuracy else "")
          + f"; report: {args.out_dir}/report.md, checkpoints in {args.out_dir}/checkpoints")


def distill(args: argparse.Namespace) -> None:
    from nanoseek.train.distill import arguments, run_distill

    result = run_distill(**arguments(args))
    if result.get("stopped") is not None:
        print(f"stopped at step {result['step']}; resume with: nanoseek distill --resume --out-dir {args.out_dir}")
        return
    first, last = result["train_first_steps"]["loss"], result["train_last_steps"]["loss"]
    accuracy = result["accuracy"]
    print(f"finished {result['steps']} steps of {result['method']} distillation; training loss {first:.3f} -> "
          f"{last:.3f}" + (f"; greedy accuracy {100 * accuracy['before']['mean']:.0f}% -> "
                           f"{100 * accuracy['after']['mean']:.0f}%" if accuracy else "")
          + f"; report: {args.out_dir}/report.md, checkpoints in {args.out_dir}/checkpoints")


def rm(args: argparse.Namespace) -> None:
    from nanoseek.train.reward_model import arguments, run_rm

    result = run_rm(**arguments(args))
    if result.get("stopped") is not None:
        print(f"stopped at step {result['step']}; resume with: nanoseek rm --resume --out-dir {args.out_dir}")
        return
    heldout = result["heldout"]
    if heldout is not None:
        after = heldout["after"]
        kinds = ", ".join(f"{kind} {100 * a:.0f}%" for kind, a in after["per_kind"].items())
        accuracy = (f"; held-out pairwise accuracy {100 * heldout['before']['accuracy']:.0f}% -> "
                    f"{100 * after['accuracy']:.0f}%" + (f" ({kinds})" if kinds else ""))
    else:
        accuracy = "; no held-out pairs"
    print(f"finished {result['steps']} steps in {result['minutes_this_run']:.1f} min{accuracy}; report: "
          f"{args.out_dir}/report.md, reward model in {result['checkpoint']}")


def sample(args: argparse.Namespace) -> None:
    from nanoseek.sample import SampleConfig, run_sample

    s = run_sample(from_args(SampleConfig, args))
    rejected = ", ".join(f"{reason} {n}" for reason, n in s["rejected"].items() if n) or "none"
    print(f"kept {s['kept']} of {s['samples']} samples ({100 * s['kept_rate']:.1f}%; rejected: {rejected}); "
          f"{s['prompts_with_a_kept_sample']} of {s['prompts']} prompts have one; wrote {s['rows_written']} "
          f"conversations ({s['kept']} sampled, {s['instructions']} instructions, {s['copied']['conversations']} "
          f"copied) to {args.out_dir}/data.jsonl; summary: {args.out_dir}/summary.md")


def pipeline(args: argparse.Namespace) -> None:
    from nanoseek.pipeline import run_pipeline

    report = run_pipeline(args.out_dir, resume=args.resume, eval_problems=args.problems_per_task, seed=args.seed)
    before, after = report["base"]["overall"], report["r1_zero"]["overall"]
    print(f"held-out pass@1 {100 * before['pass@1']:.1f}% -> {100 * after['pass@1']:.1f}%, format rate "
          f"{100 * before['format']:.1f}% -> {100 * after['format']:.1f}%, {report['minutes']['total']:.1f} min "
          f"(seed {report['seed']}); report: {args.out_dir}/report.md")


def r1(args: argparse.Namespace) -> None:
    from nanoseek.r1 import R1Config, run_r1

    report = run_r1(from_args(R1Config, args), resume=args.resume)
    rows = report["stages"]
    print("held-out pass@1: " + ", ".join(f"{row['label']} {100 * row['pass@1']:.1f}%" for row in rows.values())
          + f"; {report['minutes']['total']:.1f} min (seed {report['seed']}); report: {args.out_dir}/report.md")


def distill_vs_rl(args: argparse.Namespace) -> None:
    from nanoseek.distill_vs_rl import DistillVsRLConfig, run_distill_vs_rl

    report = run_distill_vs_rl(from_args(DistillVsRLConfig, args), resume=args.resume)
    rows, budget = report["models"], report["budget"]
    print("held-out pass@1: " + ", ".join(f"{row['label']} {100 * row['pass@1']:.1f}%" for row in rows.values())
          + f"; arms: {budget['distill']['tokens']:,} / {budget['grpo']['tokens']:,} tokens in "
          f"{budget['distill']['steps']} / {budget['grpo']['steps']} steps (budget: {budget['rule']}); "
          f"{report['minutes']['total']:.1f} min; report: {args.out_dir}/report.md")


def tokenizer_train(args: argparse.Namespace) -> None:
    from nanoseek.data.shards import read_documents
    from nanoseek.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(read_documents(args.files), args.vocab_size)
    tokenizer.save(args.out)
    if tokenizer.vocab_size < args.vocab_size:
        print(f"nanoseek: warning: the corpus supports only {tokenizer.vocab_size} tokens; asked for "
              f"{args.vocab_size} (byte-pair merges ran out: more text makes more tokens)", file=sys.stderr)
    print(f"wrote {args.out} ({tokenizer.vocab_size} tokens)")


def data_prepare(args: argparse.Namespace) -> None:
    from nanoseek.data.shards import prepare_files
    from nanoseek.data.tokenizer import Tokenizer

    meta = prepare_files(args.files, Tokenizer.load(args.tokenizer), args.out, fim_rate=args.fim_rate,
                         heldout_fraction=args.heldout_fraction, seed=args.seed)
    print(json.dumps(meta, indent=2))


def _load_for_inference(args: argparse.Namespace):
    """-> (model, tokenizer) for --model: a checkpoint directory, or a run directory (its latest checkpoint)."""
    import torch

    import nanoseek
    from nanoseek.checkpoint import resolve_checkpoint
    from nanoseek.data.tokenizer import Tokenizer

    path = resolve_checkpoint(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: pass --model a checkpoint directory or a training run's "
                                "directory (`nanoseek pretrain` writes runs/pretrain)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; pass a checkpoint directory that holds one "
                                "(the `model/` of a nanoseek checkpoint does)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.load(path)
    model = nanoseek.from_pretrained(path, device=device)
    params = sum(p.numel() for p in model.parameters())
    print(f"loaded {path} ({_human(params)} parameters, {device})", file=sys.stderr)
    return model, tokenizer


def _engine(args: argparse.Namespace):
    """-> (engine, tokenizer) for generate and chat."""
    from nanoseek.infer.engine import Engine

    model, tokenizer = _load_for_inference(args)
    return Engine(model, max_batch=args.max_batch, max_len=args.max_len, tokenizer=tokenizer,
                  compile_decode=args.compile_decode), tokenizer


def _sampling(args: argparse.Namespace, tokenizer):
    from nanoseek.infer.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop_ids=tokenizer.stop_ids,
                          stop_strings=tuple(args.stop))


def generate(args: argparse.Namespace) -> None:
    from nanoseek.infer.chat import generate_file, read_prompts

    if Path(args.out).exists() and not args.overwrite:
        raise NanoseekError(f"{args.out} already exists; pass --overwrite to replace it, or --out another file")
    engine, tokenizer = _engine(args)
    prompts = read_prompts(Path(args.prompts))
    generate_file(engine, tokenizer, prompts, Path(args.out), args.template, _sampling(args, tokenizer))
    print(f"wrote {len(prompts)} completions to {args.out}")


def chat(args: argparse.Namespace) -> None:
    from nanoseek.infer.chat import chat as run

    engine, tokenizer = _engine(args)
    run(engine, tokenizer, args.template, _sampling(args, tokenizer))


def serve(args: argparse.Namespace) -> None:
    from nanoseek.infer.server import Server, ServerSettings, run_server

    engine, tokenizer = _engine(args)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model, template=args.template, max_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
        thinking_budget=args.thinking_budget, max_queue=args.max_queue, api_key=args.api_key)
    print(f"serving {settings.model_name} at http://{args.host}:{args.port}/ (web chat) and /v1 (OpenAI API)",
          file=sys.stderr)
    run_server(Server(engine, tokenizer, settings), args.host, args.port)


def evaluate(args: argparse.Namespace) -> None:
    from nanoseek.data.problems import read_problems
    from nanoseek.eval import EvalConfig, check_template, format_table, heldout_problems
    from nanoseek.eval import evaluate as run

    # The user's problems are read (and checked) before the model is loaded.
    problems = (read_problems(args.problems) if args.problems else
                heldout_problems(args.problems_per_task, args.difficulty, args.seed))
    model, tokenizer = _load_for_inference(args)
    check_template(tokenizer, args.template)
    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, greedy=not args.no_greedy, template=args.template, language=args.language)
    report = run(model, tokenizer, problems, cfg, max_batch=args.max_batch, progress=True)
    print(format_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _add_model_source(parser: argparse.ArgumentParser, preset: str, presets=PRESETS) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=preset, choices=list(presets), help="a model preset")
    source.add_argument("--config", help="a config.json, or a checkpoint directory holding one (instead of --preset)")


def _add_inference_options(parser: argparse.ArgumentParser, temperature: float, prompts: bool = True) -> None:
    """The options of the commands that sample from a model; prompts: also those of free-form prompts (the
    template, stop strings, top-k, the cache length), which `eval` sets itself."""
    from nanoseek.infer.chat import TEMPLATES

    parser.add_argument("--model", default="runs/pretrain",
                        help="a checkpoint directory, or a training run's directory (its latest checkpoint)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens generated per completion, "
                        "at most")
    parser.add_argument("--temperature", type=non_negative_float, default=temperature,
                        help="sampling temperature (0 is greedy)")
    parser.add_argument("--top-p", type=probability, default=0.95,
                        help="nucleus sampling: keep the most likely tokens up to this probability (1 keeps all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the i-th completion samples with seed + i)")
    parser.add_argument("--max-batch", type=positive_int, default=32, help="sequences decoded together (cache slots)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    if not prompts:
        return
    parser.add_argument("--template", default="question", choices=TEMPLATES,
                        help="how a message becomes a prompt: question (the built-in corpus's format), chat "
                             "(DeepSeek's chat format), r1-zero (the R1-Zero prompt), raw (the text as it is)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0 keeps all)")
    parser.add_argument("--stop", nargs="*", default=[], metavar="TEXT",
                        help="strings that end a completion (the end-of-sentence token always does)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="tokens per sequence the cache holds, prompt included (None: the model's context "
                             "length, at most 4096)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="run each decode step as one torch.compile'd graph: more tokens/s on the CPU after a "
                             "one-time compilation of 20-40 s in the first steps (docs/performance.md); CPU only "
                             "(on CUDA the engine replays CUDA graphs)")


def problem_file(text: str) -> str:
    """argparse `type=` of `--problems FILE`: a count, what the option took before it took files, is refused with the
    option that now takes it."""
    if text.strip().lstrip("+-").isdigit() and not Path(text).exists():
        raise argparse.ArgumentTypeError(f"takes problem files (JSONL) now, not a count ({text!r}); the number of "
                                         "held-out problems per task is --problems-per-task")
    return text


def _os_error_message(e: OSError) -> str:
    """An OSError as one line that names its path (and, where a directory was needed, the file in the way)."""
    if e.filename is None:
        return str(e)
    path = Path(os.fsdecode(e.filename))
    if isinstance(e, FileExistsError) and path.exists() and not path.is_dir():  # mkdir of an existing file
        return f"{path} is a file, not a directory"
    if isinstance(e, NotADirectoryError):  # a path through a file
        in_the_way = next((p for p in path.parents if p.exists()), None)
        if in_the_way is not None and not in_the_way.is_dir():
            return f"{path}: {in_the_way} is a file, not a directory"
    target = f"{path} -> {os.fsdecode(e.filename2)}" if e.filename2 is not None else str(path)
    return f"{target}: {e.strerror or e}"


def build_parser() -> argparse.ArgumentParser:
    """The `nanoseek` parser: a subcommand per stage, each option with its help, default and choices."""
    from nanoseek.eval import PROBLEM_TEMPLATES, EvalConfig
    from nanoseek.train import grpo as grpo_stage
    from nanoseek.train import pretrain as pretrain_stage
    from nanoseek.train import reward_model as rm_stage
    from nanoseek.train import sft as sft_stage

    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 + R1 in one PyTorch package",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(group, name: str, about: str) -> argparse.ArgumentParser:
        return group.add_parser(name, help=about, description=about, formatter_class=HelpFormatter)

    p = command(sub, "info", "print a model's shape and parameter counts (no memory used)")
    _add_model_source(p, "small", {**PRESETS, **DENSE_PRESETS})  # DeepSeek's and the dense students
    p.set_defaults(func=info)

    from nanoseek.parallel.plan import Cluster, PlanLayout, Workload

    p = command(sub, "plan", "plan a cluster run on paper: memory per GPU, pipeline bubbles, all-to-all traffic, "
                "GPU-hours per trillion tokens")
    _add_model_source(p, "v3-671b")
    add_dataclass_options(p, Cluster)
    add_dataclass_options(p, PlanLayout)
    add_dataclass_options(p, Workload)
    p.set_defaults(func=plan)

    p = command(sub, "pipeline", "the whole embedded pipeline: pretrain -> evaluate -> R1-Zero -> evaluate, with a "
                "before/after report")
    p.add_argument("--out-dir", default="runs", help="one directory per stage under it; finished stages are reused")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its latest checkpoint")
    p.add_argument("--problems-per-task", type=positive_int, default=30,
                   help="distinct held-out problems per task in the evaluations")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of both training stages: the built-in corpus's problems (so also the tokenizer "
                        "trained on them) and held-out and FIM draws, the model's initialisation, the order of the "
                        "pretraining data and of the R1-Zero problems, R1-Zero's sampling; the evaluations keep "
                        f"seed {EvalConfig().seed} for their held-out problems and sampling, so that seeds compare")
    p.set_defaults(func=pipeline)

    from nanoseek.r1 import R1Config

    p = command(sub, "r1", "DeepSeek-R1's recipe from a pretrained base: cold-start SFT -> reasoning RL -> rejection "
                "sampling -> SFT of the base -> reward model -> all-scenario RL, each stage evaluated, with R1-Zero "
                "from the same base, in one report")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its latest checkpoint")
    add_dataclass_options(p, R1Config)
    p.set_defaults(func=r1)

    from nanoseek import distill_vs_rl as comparison

    p = command(sub, "distill-vs-rl", "DeepSeek-R1's finding at this scale: from one teacher, distill into a small "
                "dense student (arm a) and run GRPO on the same student (arm b) for the same student-side budget, "
                "evaluate the student, both arms and the teacher alike, in one report")
    comparison.add_options(p)
    p.set_defaults(func=distill_vs_rl)

    p = command(sub, "pretrain", "pretrain a model (no arguments: `small` on the built-in corpus)")
    pretrain_stage.add_options(p)
    p.set_defaults(func=pretrain)

    p = command(sub, "sft", "supervised fine-tuning on chat conversations (DeepSeek-R1's cold start; no data: the "
                "built-in cold-start conversations), loss on the assistant's tokens only")
    sft_stage.add_options(p)
    p.set_defaults(func=sft)

    from nanoseek.train import distill as distill_stage

    p = command(sub, "distill", "distill a teacher into a student (DeepSeek-R1's method: SFT on the teacher's "
                "rejection-filtered samples; or logit distillation, or on-policy distillation with a shared tokenizer)")
    distill_stage.add_options(p)
    p.set_defaults(func=distill)

    p = command(sub, "rm", "train a reward model on preference pairs (DeepSeek-R1's helpfulness reward model: a "
                "scalar head on the model, Bradley-Terry loss; no data: built-in pairs), reporting held-out "
                "pairwise accuracy")
    rm_stage.add_options(p)
    p.set_defaults(func=rm)

    from nanoseek.sample import SampleConfig

    p = command(sub, "sample", "rejection sampling (DeepSeek-R1): k samples per prompt from a checkpoint, the right "
                "and clean ones kept as chat JSONL for `nanoseek sft --data`, with a summary of the rejections")
    add_dataclass_options(p, SampleConfig)
    p.set_defaults(func=sample)

    p = command(sub, "grpo", "R1-Zero: GRPO with rule-based rewards on the built-in tasks or your problems "
                "(--problems), from a base model")
    grpo_stage.add_options(p)
    p.set_defaults(func=grpo)

    p = command(sub, "generate", "complete a file of prompts (.txt lines or .jsonl \"prompt\") into JSONL: per prompt "
                "its reasoning_content (before </think>) and content (the answer after it)")
    p.add_argument("prompts", help="a .txt file (a prompt per line) or .jsonl (a \"prompt\" field per line)")
    p.add_argument("--out", default="completions.jsonl", help="the JSONL file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_inference_options(p, temperature=0.0)
    p.set_defaults(func=generate)

    p = command(sub, "chat", "talk to a model in the terminal; its thinking is shown apart from the answer")
    _add_inference_options(p, temperature=0.6)
    p.set_defaults(func=chat)

    p = command(sub, "serve", "an OpenAI-compatible HTTP server (chat completions with the reasoning in "
                "reasoning_content, completions, /metrics) and a web chat page at /")
    _add_inference_options(p, temperature=0.6)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8000, help="the port to listen on")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ (None: no key)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (None: the --model value)")
    p.add_argument("--max-queue", type=non_negative_int, default=64,
                   help="requests that may wait for a cache slot when all --max-batch are busy; more answer 429")
    p.add_argument("--thinking-budget", type=non_negative_int, default=None,
                   help="reasoning tokens at most for a request that sets no thinking_budget or reasoning_effort; "
                        "then </think> is appended and the model answers (None: no cap)")
    p.set_defaults(func=serve)

    defaults = EvalConfig()
    p = command(sub, "eval", "pass@1 over k samples, cons@k, greedy accuracy and format rate, per task, on held-out "
                "built-in problems or your problems (--problems)")
    _add_inference_options(p, temperature=defaults.temperature, prompts=False)
    p.add_argument("--k", type=positive_int, default=defaults.k, help="samples per problem")
    p.add_argument("--problems", nargs="+", type=problem_file, default=None, metavar="FILE",
                   help="problems JSONL files or directories of them to evaluate on ({\"question\", \"answer\", "
                        "optional \"task\"} per line; `####` or \\boxed{} answers; checked by the task's checker, else "
                        "math-verify); none: the built-in tasks' held-out problems")
    p.add_argument("--problems-per-task", type=positive_int, default=30,
                   help="distinct held-out problems per built-in task (without --problems)")
    p.add_argument("--difficulty", type=int, default=1, choices=(1, 2, 3),
                   help="level of the built-in problems (without --problems)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--template", default=defaults.template, choices=PROBLEM_TEMPLATES,
                   help="how a problem becomes a prompt: question (the built-in corpus's format: pretrained and "
                        "R1-Zero models), chat (DeepSeek's chat format: models fine-tuned by `nanoseek sft`), "
                        "r1-zero (the R1-Zero prompt)")
    p.add_argument("--language", choices=("en", "zh"), default=None,
                   help="also report the language consistency of the reasoning: the share of its words in this "
                        "language (R1's language reward; default: not reported)")
    p.add_argument("--out", help="also write the report to this JSON file")
    p.set_defaults(func=evaluate, max_new_tokens=defaults.max_new_tokens, top_p=defaults.top_p, max_batch=64)

    p = command(sub, "tokenizer", "tokenizer tools")
    t = command(p.add_subparsers(dest="action", required=True), "train",
                "train a byte-level BPE with DeepSeek's special tokens")
    t.add_argument("files", nargs="+", help="text, JSONL (`text` field) or Parquet files, or directories")
    t.add_argument("--vocab-size", type=positive_int, default=32768,
                   help="tokens wanted (a small corpus may support fewer)")
    t.add_argument("--out", default="tokenizer.json", help="the tokenizer.json to write (or a directory)")
    t.set_defaults(func=tokenizer_train)

    p = command(sub, "data", "data tools")
    d = command(p.add_subparsers(dest="action", required=True), "prepare",
                "tokenize files into packed binary shards (with FIM and a held-out split)")
    d.add_argument("files", nargs="+", help="text, JSONL (`text` field) or Parquet files, or directories")
    d.add_argument("--tokenizer", required=True, help="a tokenizer.json, or a directory holding one")
    d.add_argument("--out", required=True, help="the output directory (replaced whole when done)")
    d.add_argument("--fim-rate", type=fraction, default=0.1,
                   help="share of training documents rearranged for fill-in-the-middle")
    d.add_argument("--heldout-fraction", type=fraction, default=0.01,
                   help="share of documents held out (at least one when there are two or more; 0: none)")
    d.add_argument("--seed", type=int, default=0, help="seed of the held-out and FIM draws")
    d.set_defaults(func=data_prepare)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command -> its exit status: 0; 2 for bad input, with one line `nanoseek: error: ...` on stderr (or
    argparse's usage message); 130 when interrupted."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)  # what was typed: a resume applies only that
    except SystemExit as e:  # argparse has printed the usage error (status 2) or the help (0)
        return int(e.code or 0)
    try:
        args.func(args)
    except NanoseekError as e:
        return _error(str(e))
    except OSError as e:
        return _error(_os_error_message(e))
    except KeyboardInterrupt:
        print("\nnanoseek: interrupted", file=sys.stderr)
        return 130
    return 0


def _error(message: str) -> int:
    print(f"nanoseek: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
