"""Training stages under torchrun: `torchrun --nproc-per-node N -m nanoseek.parallel.train {pretrain,grpo} ...`.

The same stages, data and options as `nanoseek pretrain` and `nanoseek grpo`, on the shared step of
ParallelTrainer:
  pretrain  a (pp, dp, ep) mesh with dp = N / (pp * ep). Rank 0 prepares the data (the built-in corpus by
            default) while the others wait; every rank builds the model from the same seed and keeps its part.
  grpo      data parallel over all N ranks: every rank generates the completions of its share of each step's
            prompts, and the gradients are all-reduced.
Checkpoints are distributed (checkpoints/step_N; any layout resumes them with --resume, with the run's own
saved settings); metrics and plots come from rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint, tokenizer_files
from nanoseek.config import get_preset
from nanoseek.data.shards import TokenLoader
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.model import DeepSeekV3
from nanoseek.options import HelpFormatter, positive_int
from nanoseek.parallel.mesh import Layout, init_parallel
from nanoseek.parallel.trainer import ParallelTrainer
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, GRPOStage, problem_source, write_report
from nanoseek.train.grpo import add_options as grpo_options
from nanoseek.train.grpo import arguments as grpo_arguments
from nanoseek.train.loop import TrainConfig, run_settings
from nanoseek.train.pretrain import LanguageModelStage, PretrainConfig, prepare_data
from nanoseek.train.pretrain import add_options as pretrain_options
from nanoseek.train.pretrain import arguments as pretrain_arguments


def _init_process_group(device: str) -> None:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")


def run_pretrain(layout: Layout, config: PretrainConfig | None = None, train: TrainConfig | None = None,
                 resume: bool = False, changes: dict[str, Any] | None = None) -> dict:
    config, train = run_settings("pretrain", PretrainConfig, config, train, resume, changes)
    preset = get_preset(config.preset)
    out = Path(train.out_dir)
    _init_process_group(train.device)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        prepare_data(config, out / "data", preset.vocab_size, train.seed)
    dist.barrier()
    data_dir = Path(config.data[0]) if len(config.data) == 1 and (Path(config.data[0]) / "meta.json").is_file() \
        else out / "data"
    tokenizer = Tokenizer.load(data_dir)
    model_config = preset.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                  eos_token_id=tokenizer.eos_id)
    ctx = init_parallel(layout, model_config, train.device)
    torch.manual_seed(train.seed)
    with torch.device(ctx.device):
        model = DeepSeekV3(model_config)
    loader = TokenLoader(data_dir, "train", seq_len=config.seq_len, seed=train.seed,
                         align_token=tokenizer.bos_id if config.align_windows else None)
    # The held-out loss runs the whole model's forward, which a pipeline rank does not hold.
    stage = LanguageModelStage(loader, config, model_config, heldout_data=data_dir if layout.pp == 1 else None)
    trainer = ParallelTrainer(model, stage, train, ctx, model_files={"tokenizer.json": data_dir / "tokenizer.json"},
                              seq_len=config.seq_len, micro_batch_size=config.micro_batch_size)
    return _fit(trainer, resume, f"{layout} on {dist.get_world_size()} ranks")


def run_grpo(grpo: GRPOConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
             changes: dict[str, Any] | None = None) -> dict:
    grpo, train = run_settings("grpo", GRPOConfig, grpo, train, resume, changes, defaults=GRPO_TRAIN_DEFAULTS)
    problems = problem_source(grpo, train.seed)  # every rank reads the user's problems, the same order
    _init_process_group(train.device)
    path = resolve_checkpoint(grpo.model)
    tokenizer = Tokenizer.load(path)
    model = load_pretrained(path)
    ctx = init_parallel(Layout(dp=dist.get_world_size()), model.config, train.device)
    stage = GRPOStage(tokenizer, problems, grpo)
    trainer = ParallelTrainer(model, stage, train, ctx, model_files=tokenizer_files(path))
    result = _fit(trainer, resume, f"GRPO, {ctx.layout.dp} data-parallel ranks")
    if trainer.is_main and result["stopped"] is None:
        write_report(trainer.out_dir, path, result["step"], result["minutes"], train.seed, grpo.problems)
    return result


def _fit(trainer: ParallelTrainer, resume: bool, what: str) -> dict:
    result = trainer.fit(progress=trainer.is_main, resume=resume)
    if trainer.is_main:
        held = result["heldout"]
        print(f"{what} ({trainer.device.type}): {trainer.step} steps, {trainer.tokens:,} tokens"
              + (f", held-out loss {held['loss']:.3f}" if held else "")
              + f"; checkpoints in {trainer.out_dir}/checkpoints")
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun ... -m nanoseek.parallel.train",
                                     description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    p = stages.add_parser("pretrain", help="pretraining on a (pp, dp, ep) mesh", formatter_class=HelpFormatter)
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline ranks (2*pp DualPipeV chunks)")
    p.add_argument("--ep", type=positive_int, default=1, help="expert-parallel ranks")
    pretrain_options(p)
    g = stages.add_parser("grpo", help="GRPO (R1-Zero) with data-parallel rollouts and updates",
                          formatter_class=HelpFormatter)
    grpo_options(g)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what was typed: a resume applies only that
    try:
        if args.stage == "pretrain":
            world = int(os.environ.get("WORLD_SIZE", "1"))
            layout = Layout(pp=args.pp, ep=args.ep, dp=max(1, world // (args.pp * args.ep)))
            run_pretrain(layout=layout, **pretrain_arguments(args))
        else:
            run_grpo(**grpo_arguments(args))
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
