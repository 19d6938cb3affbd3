"""The DeepSeek-V3 model: transformer blocks, Multi-Token Prediction modules, the losses.

Module names follow the Hugging Face DeepSeek-V3 checkpoint (embed_tokens, layers.N.self_attn.q_a_proj, ...),
so that checkpoint I/O is a near-identity mapping (nanoseek/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import (KVCacheLayer, LatentCacheLayer, MultiHeadLatentAttention,
                                      document_causal_mask)
from nanoseek.model.layers import FeedForward, RMSNorm
from nanoseek.model.losses import IGNORE_INDEX, linear_cross_entropy, mtp_linear_cross_entropy
from nanoseek.model.moe import MoE, RoutedExperts, Router
from nanoseek.model.rope import RotaryEmbedding


class InferenceCache(Protocol):
    """What the model needs from an inference cache (nanoseek/infer/cache.py implements it: MLA's latent cache,
    whose layers are LatentCacheLayers, or a dense student's key/value cache, whose layers are KVCacheLayers)."""

    def positions(self, seq_len: int) -> torch.Tensor:
        """(B, seq_len) positions of the next seq_len tokens of each row."""
        ...

    def layer(self, index: int) -> LatentCacheLayer | KVCacheLayer: ...


class Block(nn.Module):
    """Pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is MoE past the dense layers."""

    def __init__(self, config: ModelConfig, layer_id: int, attention: nn.Module | None = None,
                 mlp: nn.Module | None = None):
        """attention, mlp: other modules than MLA and DeepSeek's FFN/MoE (a dense student's, model/dense.py)."""
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config) if attention is None else attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if mlp is None:
            mlp = MoE(config) if config.is_moe_layer(layer_id) else FeedForward(config.hidden_size,
                                                                                 config.intermediate_size)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheLayer | KVCacheLayer | None = None, mask: torch.Tensor | None = None):
        """-> x, and for an MoE block its tokens per expert and balance loss (else None, None). mask: the
        attention's (B, S, S), None for causal."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, counts, balance = self.mlp(h)
            return x + out, counts, balance
        return x + self.mlp(h), None, None


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth: h' = W [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then one block.

    The embedding and the output head are the main model's; `norm` is applied before that shared head.
    The [embedding; hidden] order is the released checkpoints' (eh_proj's input columns).
    """

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_id)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, next_embeddings: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheLayer | None = None, mask: torch.Tensor | None = None):
        x = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(hidden)], dim=-1))
        return self.block(x, cos, sin, cache, mask)


class Routed(NamedTuple):
    """What one MoE layer's router did in a forward."""

    counts: torch.Tensor  # (n_experts,) tokens routed to each expert, for the bias update
    balance: torch.Tensor  # () sequence-wise balance loss, before alpha


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: lm + lambda * mtp + alpha * balance
    lm_loss: torch.Tensor  # next-token cross-entropy of the main model
    mtp_loss: torch.Tensor | None  # mean cross-entropy over the D MTP depths (None when MTP is off)
    balance_loss: torch.Tensor  # sequence-wise balance loss summed over MoE layers, before alpha
    expert_counts: torch.Tensor | None  # (MoE layers incl. MTP, n_experts) tokens routed, for the bias update


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over depths k=1..D of the cross-entropy of depth k's logits (B, S-k, V) against targets[:, k:].

    targets[:, t] is the token after position t, so depth k at position t predicts targets[:, t + k],
    the token k+1 places ahead of input t. Training computes the same from the hidden states without whole
    logits (losses.mtp_linear_cross_entropy); this is the plain reference.
    """
    losses = [F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:].flatten(), ignore_index=IGNORE_INDEX)
              for k, logits in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


class DeepSeekV3(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if type(self) is DeepSeekV3 and not isinstance(config, ModelConfig):
            raise TypeError(f"DeepSeekV3 takes a ModelConfig, not a {type(config).__name__}: build a dense student "
                            "with nanoseek.model.build_model(config) (or DenseTransformer)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_block(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k)
                                 for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        self.init_weights()

    # ------------------------------------------------------------------ setup
    def make_block(self, layer_id: int) -> Block:
        """Main block layer_id (a dense student's are DenseBlocks: model/dense.py)."""
        return Block(self.config, layer_id)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.gate_up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
            if isinstance(module, nn.Linear) and module.bias is not None:  # a dense student's attention biases
                nn.init.zeros_(module.bias)

    def routers(self) -> list[Router]:
        """The MoE routers in forward order (main layers, then MTP), matching LossOutput.expert_counts rows."""
        return [m for m in self.modules() if isinstance(m, Router)]

    def update_router_biases(self, expert_counts: torch.Tensor, speed: float | None = None) -> None:
        """Once per optimizer step, with the tokens per expert summed over all of the step's micro-batches."""
        speed = self.config.bias_update_speed if speed is None else speed
        routers = self.routers()
        if len(expert_counts) not in (len(routers), self.config.num_moe_layers):  # MTP blocks may not have run
            raise ValueError(f"expert_counts has {len(expert_counts)} rows; this model has "
                             f"{self.config.num_moe_layers} MoE layers and {len(routers)} routers with MTP")
        for router, load in zip(routers, expert_counts):
            router.update_bias(load, speed)

    # ------------------------------------------------------------------ the pieces of the forward
    # forward, compute_loss and the pipeline's chunks (parallel/pipeline.py) are all built from these.
    def rope(self, seq_len: int, cache: InferenceCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, S, rope_dim/2) of positions 0..S-1, or with a cache (B, S, rope_dim/2): each row continues
        from where its cache ends."""
        if cache is not None:
            return self.rotary(cache.positions(seq_len))
        cos, sin = self.rotary(torch.arange(seq_len, device=self.rotary.inv_freq.device))
        return cos.unsqueeze(0), sin.unsqueeze(0)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   layer_ids: Iterable[int] | None = None, cache: InferenceCache | None = None,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, Routed]]:
        """The blocks layer_ids (default: all, in order) on x (B, S, H) -> x (B, S, H), and each MoE layer's Routed.
        mask: the attention mask (B, S, S) of packed documents (document_mask), None for causal."""
        routed: dict[int, Routed] = {}
        for i in range(len(self.layers)) if layer_ids is None else layer_ids:
            x, counts, balance = self.layers[i](x, cos, sin, None if cache is None else cache.layer(i), mask)
            if counts is not None:
                routed[i] = Routed(counts, balance)
        return x, routed

    def run_mtp(self, hidden: torch.Tensor, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], dict[int, Routed]]:
        """The MTP depths from the main model's final normed hidden (B, S, H) -> each depth k's normed hidden
        (B, S-k, H) and each MoE block's Routed (depth k's block is layer num_hidden_layers + k - 1).

        Depth k at position t sees h^{k-1}_t and the embedding of input t+k (RoPE positions 0..S-k-1).
        """
        prev, depths, routed = hidden, [], {}
        for k, module in enumerate(self.mtp, start=1):
            length = input_ids.shape[1] - k
            if length <= 0:
                break
            prev, counts, balance = module(prev[:, :length], self.embed_tokens(input_ids[:, k:]), cos[:, :length],
                                           sin[:, :length], mask=None if mask is None else mask[:, :length, :length])
            if counts is not None:
                routed[self.config.num_hidden_layers + k - 1] = Routed(counts, balance)
            depths.append(module.norm(prev))
        return depths, routed

    def head_loss(self, x: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, Routed]]:
        """From the last block's output x (B, S, H): the final norm, the output head's cross-entropy and, when
        mtp_weight > 0, the MTP depths' -> lm loss, MTP loss (None when MTP is off), the MTP blocks' Routed.

        The head runs fused with its cross-entropy, chunk by chunk over the tokens (losses.linear_cross_entropy):
        the (tokens, vocab) logits are never held whole.
        """
        hidden = self.norm(x)
        lm_loss = linear_cross_entropy(hidden, self.lm_head.weight, targets)
        if mtp_weight <= 0 or not self.mtp:
            return lm_loss, None, {}
        depths, routed = self.run_mtp(hidden, input_ids, cos, sin, mask)
        depth_loss = mtp_linear_cross_entropy(depths, self.lm_head.weight, targets) if depths else None
        return lm_loss, depth_loss, routed

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, return_mtp: bool = False, cache: InferenceCache | None = None,
                return_hidden: bool = False):
        """input_ids (B, S) -> logits (B, S, V); with return_mtp, also a list of D tensors (B, S-k, V).

        With a cache (inference), input_ids continue each row's cached tokens: positions start where the
        row's cache ends, and the new latents are appended (the caller advances the cache afterwards).
        return_hidden: return (logits, final normed hidden states) instead, the input of the MTP draft.
        """
        if cache is not None and return_mtp:
            raise ValueError("the MTP heads run without a cache; draft with mtp_draft()")
        cos, sin = self.rope(input_ids.shape[1], cache)
        x, _ = self.run_layers(self.embed_tokens(input_ids), cos, sin, cache=cache)
        hidden = self.norm(x)  # (B, S, H)
        logits = self.lm_head(hidden)
        if return_hidden:
            return logits, hidden
        if not return_mtp:
            return logits
        depths, _ = self.run_mtp(hidden, input_ids, cos, sin)
        return logits, [self.lm_head(h) for h in depths]

    def mtp_draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Speculative decoding's draft: the first MTP module at positions t, from the main model's hidden h_t
        (B, S, H) and the token t+1 (B, S), with its own cache (positions continue from it) -> logits for
        token t+2 (B, S, V)."""
        if not self.mtp:
            raise ValueError("this model has no MTP module to draft with")
        cos, sin = self.rope(next_ids.shape[1], cache)
        x, _, _ = self.mtp[0](hidden, self.embed_tokens(next_ids), cos, sin, cache.layer(0))
        return self.lm_head(self.mtp[0].norm(x))

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float | None = None,
                     balance_alpha: float | None = None, document_mask: bool = False) -> LossOutput:
        """Training loss. targets (B, S): the next token of each position, IGNORE_INDEX where none.

        mtp_weight (lambda) and balance_alpha default to the config's; 0 switches a term off (MTP off also
        skips the MTP forward). The head's cross-entropy runs fused (head_loss). document_mask: rows hold packed
        documents, each opened by bos_token_id, and each attends only within itself (document_causal_mask).
        """
        c = self.config
        mtp_weight = c.mtp_loss_weight if mtp_weight is None else mtp_weight
        balance_alpha = c.aux_loss_alpha if balance_alpha is None else balance_alpha
        cos, sin = self.rope(input_ids.shape[1])
        mask = document_causal_mask(input_ids, c.bos_token_id) if document_mask else None
        x, routed = self.run_layers(self.embed_tokens(input_ids), cos, sin, mask=mask)
        lm_loss, depth_loss, mtp_routed = self.head_loss(x, input_ids, targets, mtp_weight, cos, sin, mask)
        routed |= mtp_routed
        loss = lm_loss if depth_loss is None else lm_loss + mtp_weight * depth_loss
        balance = torch.stack([r.balance for r in routed.values()]).sum() if routed else lm_loss.new_zeros(())
        if balance_alpha > 0:
            loss = loss + balance_alpha * balance
        expert_counts = torch.stack([r.counts for r in routed.values()]) if routed else None
        return LossOutput(loss, lm_loss, depth_loss, balance, expert_counts)
