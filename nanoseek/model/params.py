"""Parameter accounting from the module tree, on the meta device (no memory is allocated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.model.dense import build_model
from nanoseek.model.moe import RoutedExperts


@dataclass
class ParameterCounts:
    total: int  # main model (embedding, blocks, final norm, output head), MTP modules excluded
    activated: int  # per token: total minus the routed experts a token does not visit
    embedding: int  # the input embedding (left out of FLOP counts)
    mtp: int  # the MTP modules' own parameters (they share the embedding and head)

    @property
    def activated_without_embedding(self) -> int:
        return self.activated - self.embedding


def count_parameters(config: ModelConfig | DenseConfig) -> ParameterCounts:
    """A dense student (DenseConfig) activates all of its parameters and has no MTP modules. A tied output head
    is the embedding, counted once."""
    with torch.device("meta"):
        model = build_model(config)
    mtp_ids = {id(p) for p in model.mtp.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in mtp_ids)
    inactive = 0
    for layer in model.layers:
        for module in layer.modules():
            if isinstance(module, RoutedExperts):
                routed = sum(p.numel() for p in module.parameters())
                inactive += routed * (config.n_routed_experts - config.num_experts_per_tok) // config.n_routed_experts
    return ParameterCounts(total=total, activated=total - inactive, embedding=model.embed_tokens.weight.numel(),
                           mtp=sum(p.numel() for p in model.mtp.parameters()))


def flops_per_token(config: ModelConfig | DenseConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (activated, input embedding excluded) + 6 L S H (d_qk + d_v) for attention.

    The formula of ../shared/anchors (a causal mask halves the attention term in practice; like the anchor,
    it is counted in full so that MFU figures compare).
    """
    c = config
    n = count_parameters(c).activated_without_embedding
    qk_v = 2 * c.head_dim if isinstance(c, DenseConfig) else c.qk_head_dim + c.v_head_dim
    return 6 * n + 6 * c.num_hidden_layers * seq_len * c.num_attention_heads * qk_v
