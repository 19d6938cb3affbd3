"""Pipeline parallelism with DualPipeV: 2 * pp chunks of layers, two per rank in a V.

Rank r holds chunk r and chunk 2*pp-1-r, so rank 0 holds both ends: the embedding (first chunk) and the
final norm, output head and MTP modules (last chunk). The MTP modules share the embedding and the head
with the main model, and in the V layout the sharing stays on one rank (DeepSeek-V3 places them alike).
torch.distributed.pipelining.ScheduleDualPipeV runs the schedule (forward of one micro-batch overlapped
with the backward of another, backward split into input and weight parts).

Only the hidden states (micro_batch, S, H) travel between chunks. Each chunk reads what else it needs
(the token ids for the MTP modules, the targets, the micro-batch's share of the step's tokens) from the
step's micro-batch list, in order: every chunk runs micro-batches 0, 1, 2, ... forward in that order.
The sequence-wise balance loss of a chunk's MoE layers enters the backward where it arises (AddAuxLoss).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

from nanoseek.model import DeepSeekV3
from nanoseek.model.attention import document_causal_mask
from nanoseek.model.moe import MoE, Router
from nanoseek.model.transformer import Routed
from nanoseek.parallel.mesh import LayoutError, ParallelContext


class AddAuxLoss(torch.autograd.Function):
    """Returns (a copy of) x; its backward also sends a gradient of 1 into `aux` (a scalar loss term), as if
    aux had been added to the loss at the end of the pipeline."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return x.clone()  # not a view: the schedule detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_ones(ctx.aux_shape)


class MicroBatch(Protocol):
    """What a chunk reads of a micro-batch (train.pretrain.TokenBatch is one)."""

    input_ids: torch.Tensor  # (mb, S)
    targets: torch.Tensor  # (mb, S)
    share: float  # its tokens / the step's tokens (all data-parallel ranks)
    document_mask: bool  # each packed document attends only within itself (model.attention.document_causal_mask)


@dataclass
class StepWeights:
    mtp: float  # lambda
    balance: float  # alpha


class Chunk(nn.Module):
    """Layers layer_ids of the model; the first chunk embeds, the last one returns the weighted loss.

    The math is the model's own (rope, run_layers, head_loss); the chunk registers only its own modules, which
    the stage's backward splits into input and weight gradients by.
    """

    def __init__(self, model: DeepSeekV3, layer_ids: list[int], first: bool, last: bool, weights: StepWeights):
        super().__init__()
        self.first, self.last, self.weights, self.layer_ids = first, last, weights, layer_ids
        self.rope, self.run_layers, self.head_loss = model.rope, model.run_layers, model.head_loss
        self.bos_token_id = model.config.bos_token_id
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if first or last:
            self.embed_tokens = model.embed_tokens  # the last chunk's MTP modules embed too (same rank)
        if last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.queue: deque[MicroBatch] = deque()
        self.counts: dict[int, torch.Tensor] = {}  # layer id (MTP: L + k - 1) -> tokens per expert this step
        self.totals = torch.zeros(3, dtype=torch.float64)  # lm, mtp, balance, weighted by share

    def begin_step(self, micro_batches: list[MicroBatch]) -> None:
        self.queue = deque(micro_batches)
        self.counts = {}
        self.totals = torch.zeros(3, dtype=torch.float64)

    def _aux(self, routed: dict[int, Routed], share: float) -> torch.Tensor | None:
        """Record the MoE layers' loads and balance losses; -> their weighted balance loss (None: no term)."""
        terms = []
        for layer_id, r in routed.items():
            self.counts[layer_id] = self.counts.get(layer_id, 0) + r.counts
            self.totals[2] += float(r.balance.detach()) * share
            terms.append(r.balance * (self.weights.balance * share))
        return torch.stack(terms).sum() if terms and self.weights.balance > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """first: input ids (mb, S), else hidden (mb, S, H) -> hidden (mb, S, H), or the weighted loss (last)."""
        mb = self.queue.popleft()
        if self.first:
            x = self.embed_tokens(x)
        cos, sin = self.rope(x.shape[1])
        mask = document_causal_mask(mb.input_ids, self.bos_token_id) if mb.document_mask else None
        x, routed = self.run_layers(x, cos, sin, self.layer_ids, mask=mask)
        if not self.last:
            aux = self._aux(routed, mb.share)
            return x if aux is None else AddAuxLoss.apply(x, aux)
        lm, depth, mtp_routed = self.head_loss(x, mb.input_ids, mb.targets, self.weights.mtp, cos, sin, mask)
        aux = self._aux(routed | mtp_routed, mb.share)
        self.totals[0] += float(lm.detach()) * mb.share
        loss = lm
        if depth is not None:
            self.totals[1] += float(depth.detach()) * mb.share
            loss = loss + self.weights.mtp * depth
        loss = loss * mb.share
        return loss if aux is None else loss + aux


def chunk_layers(n_layers: int, pp: int) -> list[list[int]]:
    per = n_layers // (2 * pp)
    return [list(range(c * per, (c + 1) * per)) for c in range(2 * pp)]


def keep_own_parts(model: DeepSeekV3, layer_ids: set[int], ends: bool) -> None:
    """Drop the layers (and, away from the ends, the embedding, head and MTP) another pipeline rank holds,
    so that this rank's parameters keep their full-model names."""
    for i in range(len(model.layers)):
        if i not in layer_ids:
            model.layers[i] = nn.Identity()
    if not ends:
        model.embed_tokens, model.norm, model.lm_head, model.mtp = nn.Identity(), nn.Identity(), nn.Identity(), \
            nn.ModuleList()


class Pipeline:
    """This rank's two chunks and the DualPipeV schedule over them."""

    def __init__(self, model: DeepSeekV3, ctx: ParallelContext, micro_batch: int, seq_len: int):
        pp, r = ctx.layout.pp, ctx.pp_rank
        chunks = chunk_layers(model.config.num_hidden_layers, pp)
        mine = (r, 2 * pp - 1 - r)
        keep_own_parts(model, set(chunks[mine[0]] + chunks[mine[1]]), ends=r == 0)
        self.ctx, self.model = ctx, model
        self.weights = StepWeights(mtp=0.0, balance=0.0)
        self.chunks = [Chunk(model, chunks[c], first=c == 0, last=c == 2 * pp - 1, weights=self.weights)
                       for c in mine]
        h, dev = model.config.hidden_size, ctx.device
        hidden = torch.empty(micro_batch, seq_len, h, device=dev, requires_grad=True)
        ids = torch.empty(micro_batch, seq_len, dtype=torch.long, device=dev)
        loss = torch.empty((), device=dev, requires_grad=True)
        # Shapes given up front (static metadata): the schedule runs no extra forward to infer them.
        self.stages = [PipelineStage(chunk, c, 2 * pp, dev, input_args=(ids if c == 0 else hidden,),
                                     output_args=loss if c == 2 * pp - 1 else hidden, group=ctx.pp_group)
                       for chunk, c in zip(self.chunks, mine)]
        self.schedules: dict[int, ScheduleDualPipeV] = {}
        self.last_step_time = 0.0

    def routers(self) -> dict[int, Router]:
        """Layer id -> router, for this rank's MoE layers (MTP blocks numbered from num_hidden_layers)."""
        out: dict[int, Router] = {}
        for chunk in self.chunks:
            for name, block in chunk.layers.items():
                if isinstance(block.mlp, MoE):
                    out[int(name)] = block.mlp.gate
            if chunk.last:
                for k, module in enumerate(chunk.mtp):
                    if isinstance(module.block.mlp, MoE):
                        out[self.model.config.num_hidden_layers + k] = module.block.mlp.gate
        return out

    def step(self, micro_batches: list[MicroBatch], mtp_weight: float, balance_alpha: float):
        """Forward and backward of every micro-batch through the pipeline; gradients accumulate in .grad.

        -> (lm, mtp, balance) totals of this rank's chunks, tokens per expert per router (layer id -> (E,)).
        """
        n, stages = len(micro_batches), 2 * self.ctx.layout.pp
        if n < stages:
            raise LayoutError(f"DualPipeV needs at least 2 * pp = {stages} micro-batches per step and data-parallel "
                              f"rank, got {n}: raise batch_size or lower micro_batch_size")
        self.weights.mtp, self.weights.balance = mtp_weight, balance_alpha
        for chunk in self.chunks:
            chunk.begin_step(micro_batches)
        if n not in self.schedules:
            self.schedules[n] = ScheduleDualPipeV(self.stages, n, loss_fn=lambda loss, _target: loss,
                                                  scale_grads=False)
        schedule = self.schedules[n]
        start = time.perf_counter()
        if self.ctx.pp_rank == 0:  # the first and the last chunk: feed the ids, receive the losses
            ids = torch.cat([mb.input_ids for mb in micro_batches])
            schedule.step(ids, target=ids, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        self.last_step_time = time.perf_counter() - start
        totals = sum(chunk.totals for chunk in self.chunks)
        counts: dict[int, torch.Tensor] = {}
        for chunk in self.chunks:
            counts.update(chunk.counts)
        return totals, counts
