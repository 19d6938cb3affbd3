"""DeepSeekMoE: shared experts plus fine-grained routed experts, run as grouped GEMMs.

Routing (DeepSeek-V3): per token, affinities s = sigmoid(x W_r^T) (or softmax, as V2). A per-expert
bias b is added for *selection only*: experts are picked from the top `topk_group` groups (a group
scored by the sum of its two best biased affinities), then the top-k inside them. The combine weights
are the unbiased affinities of the chosen experts, normalised to sum to 1, times routed_scaling_factor.
Balance comes from adjusting b after each step (auxiliary-loss-free), with a small sequence-wise
balance loss as a complement. No token is ever dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import FeedForward, Float32Buffers


class Routing(NamedTuple):
    indices: torch.Tensor  # (T, top_k) chosen experts
    weights: torch.Tensor  # (T, top_k) float32 combine weights
    scores: torch.Tensor  # (T, n_experts) float32 affinities (unbiased), for the balance loss


class Router(Float32Buffers):
    float32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # The balancing bias is state, not a learned parameter: it is moved by update_bias, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        c = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias
        if c.n_group > 1 and c.topk_group < c.n_group:
            grouped = choice.unflatten(-1, (c.n_group, -1))  # (T, n_group, experts_per_group)
            if c.scoring_func == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(c.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * c.routed_scaling_factor, scores)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float) -> None:
        """Auxiliary-loss-free balancing: b_i -= speed * sign(load_i - mean load), load from the whole step."""
        load = load.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias -= speed * torch.sign(load - load.mean())


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Rows must be 16-byte aligned; CUDA kernels exist for bf16 on Hopper and newer.
    aligned = all((d * x.element_size()) % 16 == 0 for d in (x.shape[-1], w.shape[-1]))
    if x.device.type == "cpu":
        return aligned and x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def _opaque_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm as one op that torch.compile leaves whole: Inductor has no float32 lowering of it on the
    CPU, and its own loops for the experts' small GEMMs are slower than the kernel (the compiled decode step,
    nanoseek/infer/engine.py). Inference only: it has no backward."""
    return torch._grouped_mm(x, w, offs=offsets)


@_opaque_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x (M, K) sorted by group, group g ending at offsets[g] (int32); w (G, K, N) -> (M, N).

    torch._grouped_mm where the device/dtype has a kernel; otherwise a padded batched matmul (still one
    kernel for all groups, never a loop over them).
    """
    if _grouped_mm_supported(x, w):
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return _opaque_grouped_mm(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    groups = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0])
    starts = offsets.long() - counts
    rows = torch.arange(x.shape[0], device=x.device) - starts[groups]
    padded = x.new_zeros(w.shape[0], int(counts.max()) if x.shape[0] else 0, x.shape[-1])
    padded[groups, rows] = x
    return torch.bmm(padded, w)[groups, rows]


class RoutedExperts(nn.Module):
    """All routed experts' SwiGLU weights stacked, applied to tokens already sorted by expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))  # [gate; up] rows, like nn.Linear weights
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offsets).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offsets)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over the batch's sequences.

    f_i = N_r / (K_r T) * (tokens of the sequence routed to expert i); P_i = mean over the sequence of the
    normalised affinity s_i / sum_j s_j. Equals 1 for a perfectly balanced sequence. Unweighted: the
    caller multiplies by alpha.
    """
    n_experts, top_k = scores.shape[-1], indices.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, -1, n_experts)
    seq_len = probs.shape[1]
    hits = torch.zeros(batch, n_experts, device=scores.device).scatter_add_(
        1, indices.view(batch, -1), torch.ones(batch, seq_len * top_k, device=scores.device))
    f = hits * n_experts / (top_k * seq_len)
    return (f * probs.mean(dim=1)).sum(dim=1).mean()


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert (n_experts,) int64. A scatter into a fixed size rather than bincount, whose CUDA
    kernel reads the maximum back to the host: this keeps the MoE free of host syncs (CUDA graphs, overlap)."""
    return torch.zeros(n_experts, dtype=torch.long, device=indices.device).scatter_add_(
        0, indices, torch.ones_like(indices, dtype=torch.long))


def run_local_experts(experts: RoutedExperts, tokens: torch.Tensor, route: Routing) -> torch.Tensor:
    """The default dispatch: every routed expert lives here. tokens (T, H) -> weighted expert outputs (T, H)."""
    top_k = route.indices.shape[-1]
    # Dispatch: sort the (token, expert) pairs by expert so that each expert's rows are contiguous.
    flat = route.indices.flatten()
    order = flat.argsort(stable=True)
    counts = expert_counts(flat, experts.gate_up_proj.shape[0])
    source = order // top_k
    # index_select rather than tokens[source]: its backward is an index_add_, several times faster on the CPU than
    # the sorting index_put_ that advanced indexing's backward runs.
    y = experts(tokens.index_select(0, source), counts.cumsum(0).to(torch.int32))
    # Combine: weight each expert output and sum back into its token's row.
    y = y * route.weights.flatten().index_select(0, order).unsqueeze(-1)
    return torch.zeros_like(tokens).index_add_(0, source, y.to(tokens.dtype))


Dispatch = Callable[[RoutedExperts, torch.Tensor, Routing], torch.Tensor]


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (FeedForward(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        # How routed tokens reach their experts: here, or (nanoseek.parallel.expert) over all-to-all to the
        # expert-parallel ranks that hold them.
        self.dispatch: Dispatch = run_local_experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, hidden) -> output, tokens per expert (n_experts,), sequence-wise balance loss."""
        batch, _, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        route = self.gate(tokens)
        counts = expert_counts(route.indices.flatten(), self.config.n_routed_experts)
        out = self.dispatch(self.experts, tokens, route)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        balance = (sequence_balance_loss(route.scores, route.indices, batch) if self.training
                   else x.new_zeros((), dtype=torch.float32))
        return out.view_as(x), counts, balance
