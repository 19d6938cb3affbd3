"""Parallel pretraining under torchrun: `torchrun --nproc-per-node N -m nanoseek.parallel.train --pp P --ep E ...`.

The same data, model and options as `nanoseek pretrain` (every TrainConfig field is a flag), on a
(pp, dp, ep) mesh with dp = N / (pp * ep). Rank 0 prepares the data (the built-in corpus by default) while
the others wait; every rank builds the model from the same seed and keeps its part. Checkpoints are
distributed (checkpoints/step_N, any layout resumes them with --resume); metrics and plots come from rank 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.cli import _add_dataclass_options, _from_args
from nanoseek.data.shards import TokenLoader, heldout_batches
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.model import DeepSeekV3
from nanoseek.parallel.mesh import Layout, init_parallel
from nanoseek.parallel.trainer import ParallelTrainer
from nanoseek.train.loop import TrainConfig
from nanoseek.train.pretrain import DataConfig, prepare_data


def run(setup: DataConfig, train: TrainConfig, layout: Layout, resume: bool = False) -> dict:
    from nanoseek.config import get_preset

    preset = get_preset(setup.preset)
    out = Path(train.out_dir)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and train.device != "cpu" else "gloo")
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        prepare_data(setup, out / "data", preset.vocab_size, train.seed)
    dist.barrier()
    data_dir = Path(setup.data[0]) if len(setup.data) == 1 and (Path(setup.data[0]) / "meta.json").is_file() \
        else out / "data"
    tokenizer = Tokenizer.load(data_dir)
    config = preset.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id)
    ctx = init_parallel(layout, config, train.device)
    torch.manual_seed(train.seed)
    with torch.device(ctx.device):
        model = DeepSeekV3(config)
    loader = TokenLoader(data_dir, "train", seq_len=train.seq_len, seed=train.seed)

    def heldout():
        return list(heldout_batches(data_dir, train.seq_len, train.micro_batch_size, train.eval_batches))

    trainer = ParallelTrainer(model, loader, train, ctx, heldout=heldout if layout.pp == 1 else None)
    if resume and not trainer.resume():
        raise NanoseekError(f"nothing to resume: {out} has no checkpoint")
    result = trainer.fit(progress=ctx.is_main)
    if ctx.is_main:
        held = result["heldout"]
        print(f"{layout} on {dist.get_world_size()} ranks ({ctx.device.type}): {trainer.step} steps, "
              f"{trainer.tokens:,} tokens" + (f", held-out loss {held['loss']:.3f}" if held else "")
              + f"; checkpoints in {out}/checkpoints")
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun ... -m nanoseek.parallel.train",
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pp", type=int, default=1, help="pipeline ranks (2*pp DualPipeV chunks)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    parser.add_argument("--resume", action="store_true")
    _add_dataclass_options(parser, DataConfig)
    _add_dataclass_options(parser, TrainConfig)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout(pp=args.pp, ep=args.ep, dp=max(1, world // (args.pp * args.ep)))
    try:
        run(_from_args(DataConfig, args), _from_args(TrainConfig, args), layout, resume=args.resume)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
