"""Data parallelism with ZeRO-1: gradients all-reduced during the backward, AdamW state sharded.

Why not torch's ZeroRedundancyOptimizer or FSDP2:
  - FSDP2 (fully_shard) is ZeRO-3 (or ZeRO-2 without resharding): it shards the weights and gathers
    them every micro-batch. DeepSeek-V3 keeps the bf16 weights whole (ZeRO-1) and shards only the
    optimizer; under pipeline parallelism with many micro-batches the per-micro-batch gathers cost
    bandwidth that ZeRO-1 does not spend.
  - ZeroRedundancyOptimizer is ZeRO-1, but takes one process group, and expert parallelism needs two:
    the dense weights are replicated over dp x ep ranks, each expert shard only over dp. Its state lives
    under private attributes, which a distributed checkpoint would have to reach into.
So: a gradient hook per parameter that starts an asynchronous all-reduce on the parameter's group as soon
as its gradient is final (on the last micro-batch: overlapped with the rest of the backward), and an AdamW
on each rank over the parameters it owns, which then broadcasts them to the other replicas.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.parallel.expert import is_expert_param
from nanoseek.parallel.mesh import ParallelContext


def replica_group(ctx: ParallelContext, name: str) -> dist.ProcessGroup:
    """The ranks that hold the same copy of parameter `name`: dp for expert shards, dp x ep otherwise."""
    return ctx.dp_group if is_expert_param(name) else ctx.data_group


class GradSync:
    """All-reduce (sum) each gradient over its replica group once it is final.

    Callers scale each rank's loss by its share of the global batch's tokens, so a sum is the global
    gradient. `enabled` is set for the last micro-batch only (earlier ones accumulate locally).
    """

    def __init__(self, model: nn.Module, ctx: ParallelContext):
        self.params = [(p, replica_group(ctx, name)) for name, p in model.named_parameters() if p.requires_grad]
        self.enabled = False
        self.pending: list[dist.Work] = []
        for p, group in self.params:
            if dist.get_world_size(group) > 1:
                p.register_post_accumulate_grad_hook(lambda p, g=group: self._reduce(p, g))

    def _reduce(self, p: torch.Tensor, group: dist.ProcessGroup) -> None:
        if self.enabled:
            self.pending.append(dist.all_reduce(p.grad, group=group, async_op=True))

    def wait(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()
        self.enabled = False

    def reduce_all(self) -> None:
        """Reduce every gradient now (after a pipeline schedule, whose backward runs in pieces)."""
        for p, group in self.params:
            if dist.get_world_size(group) > 1:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.pending.append(dist.all_reduce(p.grad, group=group, async_op=True))
        self.wait()


def clip_grad_norm(model: nn.Module, ctx: ParallelContext, max_norm: float) -> float:
    """Clip by the global gradient norm over every stage and expert shard; returns the norm before clipping.

    Each rank's squares are divided by how many ranks hold the same gradient (dp*ep for dense weights, dp
    for expert shards), so one sum over the world counts every distinct gradient once.
    """
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    dense = sum((g.float().square().sum() for n, g in grads if not is_expert_param(n)), torch.zeros((), device=ctx.device))
    expert = sum((g.float().square().sum() for n, g in grads if is_expert_param(n)), torch.zeros((), device=ctx.device))
    total = dense / ctx.layout.data_parallel + expert / ctx.layout.dp
    dist.all_reduce(total)
    norm = math.sqrt(float(total))
    if math.isfinite(norm) and norm > max_norm > 0:
        for _, g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


class ZeroAdamW:
    """ZeRO-1 AdamW: parameter i's moments live on one rank of its replica group (greedy by size, the same
    on every rank); that rank updates it and broadcasts the new values to the group."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, lr: float, betas: tuple[float, float],
                 weight_decay: float):
        self.owner: dict[str, int] = {}  # parameter name -> global rank that updates it
        self.params = dict(model.named_parameters())
        self.groups = {name: replica_group(ctx, name) for name in self.params}
        load: dict[tuple[int, ...], list[int]] = {}
        for name, p in sorted(self.params.items(), key=lambda kv: -kv[1].numel()):
            ranks = tuple(dist.get_process_group_ranks(self.groups[name]))
            sizes = load.setdefault(ranks, [0] * len(ranks))
            i = sizes.index(min(sizes))
            sizes[i] += p.numel()
            self.owner[name] = ranks[i]
        mine = [(n, p) for n, p in self.params.items() if self.owner[n] == ctx.rank]
        self.local = torch.optim.AdamW(
            [{"params": [p for _, p in mine if p.dim() >= 2], "weight_decay": weight_decay},
             {"params": [p for _, p in mine if p.dim() < 2], "weight_decay": 0.0}],
            lr=lr, betas=betas, fused=ctx.device.type == "cuda")
        self.rank = ctx.rank

    @property
    def param_groups(self) -> list[dict]:
        return self.local.param_groups

    def owned(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.params.items() if self.owner[n] == self.rank}

    @torch.no_grad()
    def step(self) -> None:
        self.local.step()
        works = [dist.broadcast(p, src=self.owner[n], group=self.groups[n], async_op=True)
                 for n, p in self.params.items() if dist.get_world_size(self.groups[n]) > 1]
        for work in works:
            work.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None
