"""The shared training loop (nanoseek.train.loop.Trainer) on a (pipeline, data, expert) mesh.

Every rank reads the same global batch from the same data stream (so the data position in a checkpoint
is one number) and keeps its own rows. Each micro-batch's loss is weighted by its share of the *global*
batch's tokens, so summed gradients are the single-process gradients of the same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.model import DeepSeekV3
from nanoseek.parallel.data import GradSync, ZeroAdamW, clip_grad_norm
from nanoseek.parallel.expert import shard_experts
from nanoseek.parallel.mesh import LayoutError, ParallelContext
from nanoseek.train.loop import BatchSource, TrainConfig, Trainer, TrainingError


class ParallelTrainer(Trainer):
    def __init__(self, model: DeepSeekV3, data: BatchSource, cfg: TrainConfig, ctx: ParallelContext,
                 heldout: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 model_files: dict[str, Path] | None = None):
        """`model` holds the full initial weights on every rank (the same seed); this rank keeps its part."""
        if cfg.ema_decay > 0:
            raise TrainingError("ema_decay > 0 is not supported with parallelism (the EMA would be sharded too)")
        if ctx.layout.pp > 1:
            raise LayoutError("pipeline parallelism: use nanoseek.parallel.pipeline")
        self.ctx = ctx
        self.is_main = ctx.is_main
        if ctx.layout.ep > 1:
            shard_experts(model, ctx.ep_group)
        super().__init__(model, data, cfg, heldout, model_files)
        self.optimizer = ZeroAdamW(self.model, ctx, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.grad_sync = GradSync(self.model, ctx)

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, parts = len(inputs), self.ctx.layout.data_parallel
        if n % parts or (n // parts) % self.cfg.micro_batch_size:
            raise LayoutError(f"a step of {n} sequences does not split into {parts} data-parallel ranks x "
                              f"micro-batches of {self.cfg.micro_batch_size}; make batch_size (and the ramp) "
                              f"a multiple of {parts * self.cfg.micro_batch_size}")
        rows = slice(self.ctx.data_rank * n // parts, (self.ctx.data_rank + 1) * n // parts)
        return inputs[rows], targets[rows]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.grad_sync.enabled = last  # the last micro-batch's backward all-reduces as gradients become final
        loss.backward()

    def reduce_step(self, totals: dict[str, float], counts: torch.Tensor | None):
        self.grad_sync.wait()
        values = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=self.ctx.data_group)
        if counts is not None:
            dist.all_reduce(counts, group=self.ctx.data_group)  # every rank moves its biases alike
        return dict(zip(totals, values.tolist())), counts

    def clip_gradients(self) -> float:
        return clip_grad_norm(self.model, self.ctx, self.cfg.grad_clip)
