"""Expert parallelism: the routed experts split over the "ep" ranks, tokens exchanged with all-to-all.

Rank j of an expert-parallel group of size ep holds experts [j*E/ep, (j+1)*E/ep). Experts are placed
contiguously, so an expert group (DeepSeek-V3's node-limited routing: a token visits at most topk_group
groups) lives on whole ranks; with ep/n_group ranks per node, a token's experts sit on at most
topk_group nodes. Per MoE layer and micro-batch:
  1. all-to-all of the counts: how many rows each rank will receive per local expert;
  2. dispatch: all-to-all of the (token, expert) rows, variable split sizes;
  3. the local experts run as one grouped GEMM over rows regrouped by expert;
  4. combine: the reverse all-to-all, then the routing weights and the sum per token, as on one rank.
Both all-to-alls are differentiable (the backward is the all-to-all with the splits swapped), so the
gradient of a local expert already holds every ep rank's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.moe import MoE, RoutedExperts, Routing


class _AllToAll(torch.autograd.Function):
    """rows (sum(send), H) -> (sum(recv), H): send[j] rows to rank j, recv[j] rows from rank j."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty(sum(recv), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class ExpertParallel:
    """MoE.dispatch across the ranks of `group`; this rank holds experts [rank*local, (rank+1)*local)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.local = n_experts // self.size

    def __call__(self, experts: RoutedExperts, tokens: torch.Tensor, route: Routing) -> torch.Tensor:
        top_k = route.indices.shape[-1]
        flat = route.indices.flatten()
        order = flat.argsort(stable=True)  # (T*k,) pairs sorted by global expert = by destination rank
        source = order // top_k
        counts = torch.bincount(flat, minlength=self.size * self.local).view(self.size, self.local)
        received = torch.empty_like(counts)  # (ep, local): rows from each source rank for each local expert
        dist.all_to_all_single(received, counts, group=self.group)
        send, recv = counts.sum(1).tolist(), received.sum(1).tolist()
        rows = _AllToAll.apply(tokens[source], send, recv, self.group)  # grouped by (source rank, local expert)
        expert_of_row = torch.repeat_interleave(torch.arange(self.local, device=rows.device).repeat(self.size),
                                                received.flatten(), output_size=rows.shape[0])
        by_expert = expert_of_row.argsort(stable=True)
        y = experts(rows[by_expert], received.sum(0).cumsum(0).to(torch.int32))
        y = y[by_expert.argsort()]  # back to (source rank, local expert) order
        y = _AllToAll.apply(y, recv, send, self.group)  # (T*k, H) in this rank's sorted order
        y = y * route.weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(tokens).index_add_(0, source, y.to(tokens.dtype))


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (sharded over ep) by their name in the model: layers.N.mlp.experts.*"""
    return ".mlp.experts." in name


@torch.no_grad()
def shard_experts(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Keep this rank's slice of every routed-expert stack and send tokens to the other slices."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for module in model.modules():
        if isinstance(module, MoE):
            n = module.config.n_routed_experts
            local = n // size
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(module.experts, name)
                setattr(module.experts, name, nn.Parameter(full[rank * local:(rank + 1) * local].clone()))
            module.dispatch = ExpertParallel(group, n)
