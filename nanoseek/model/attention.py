"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values come from one low-rank latent c_kv = RMSNorm(W_dkv x) of kv_lora_rank values per token,
plus one RoPE key of qk_rope_head_dim shared by all heads (the "decoupled" RoPE: position lives in a
separate slice, so the latent stays position-free and cacheable). Queries are optionally low-rank too.
Per head: q = [q_nope; q_rope], k = [W_uk c_kv; k_rope], v = W_uv c_kv.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import RMSNorm
from nanoseek.model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # DeepSeek's q/kv latent norms use the default eps, not rms_norm_eps


def document_causal_mask(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """input_ids (B, S) of packed documents, each opened by a bos -> (B, S, S) bool, True where query i may attend
    key j: j <= i and no bos in (j, i], so every document attends only within itself (tokens before a row's first
    bos form a document of their own). Training on packed rows with it sees what inference sees: a document
    whose context starts at its own bos."""
    document = torch.cumsum(input_ids == bos_token_id, dim=1)  # (B, S): how many documents have begun
    seq = input_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
    return (document[:, :, None] == document[:, None, :]) & causal


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """SDPA over (B, heads, S, d): causal when mask is None, else mask (B, S, S), True where a query may attend a
    key (document_causal_mask). With a boolean mask the CPU's flash kernel still runs (fwd+bwd 33 against 30 ms
    causal at 8 x 4 heads x 256 tokens), so training with document masks costs little."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], **kwargs)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.n_heads = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.softmax_scale = c.softmax_scale

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, hidden) -> q (B, S, heads, qk_head_dim)."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.unflatten(-1, (self.n_heads, self.config.qk_head_dim))

    def project_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, hidden) -> normalised latent (B, S, kv_lora_rank), un-rotated RoPE key (B, S, 1, rope_dim)."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.config.kv_lora_rank, self.config.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope.unsqueeze(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheLayer | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention over x (B, S, hidden). Without a cache: the expanded form, keys and values
        materialised per head; mask (B, S, S) limits it further (document_causal_mask). With a cache: the new
        tokens' latents are appended to it and attention runs over everything cached in the absorbed form."""
        c = self.config
        q = self.project_query(x)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.project_latent(x)
        q_rope = apply_rope(q_rope, cos, sin, c.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, c.rope_interleave)
        if cache is not None:
            return self._absorbed(q_nope, q_rope, *cache.update(latent, k_rope.squeeze(2)))

        kv = self.kv_b_proj(latent).unflatten(-1, (self.n_heads, c.qk_nope_head_dim + c.v_head_dim))
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)
        # SDPA takes (B, heads, S, d). The fused (flash) kernels want one head dim for q, k and v; with a narrower
        # v, SDPA falls back to the math kernel (full S x S scores, 3x slower forward on the CPU), so v is padded
        # with zeros to the query/key dim and the padding cut from the output, as transformers does for FA2.
        pad = c.qk_head_dim - c.v_head_dim
        out = attend(q.transpose(1, 2), k.transpose(1, 2),
                     F.pad(v, (0, pad)).transpose(1, 2) if pad > 0 else v.transpose(1, 2), mask,
                     scale=self.softmax_scale)
        return self.o_proj(out[..., :c.v_head_dim].transpose(1, 2).flatten(2))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Attention straight over the cached latents (B, T, r) and RoPE keys (B, T, rope_dim): latent attention,
        as FlashMLA computes it.

        W_uk is folded into the query (q_nope W_uk scores against the latent itself) and W_uv is applied after
        the attention-weighted sum of latents, so all heads share one "key" [latent; k_rope] and one "value" (the
        latent): multi-query attention. The S x heads queries of a row are one matrix against the row's cache,
        so each step reads the cache once and copies nothing per head; the cost grows with the FLOPs.
        mask (B, S, T) is True where a query may see a key.
        """
        c = self.config
        _, seq, heads, _ = q_nope.shape
        w = self.kv_b_proj.weight.unflatten(0, (heads, c.qk_nope_head_dim + c.v_head_dim))
        w_uk, w_uv = w.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)  # (heads, d, r)
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk).flatten(1, 2)  # (B, S*heads, r)
        scores = torch.bmm(q_latent, latent.mT).baddbmm_(q_rope.flatten(1, 2), k_rope.mT)  # (B, S*heads, T)
        scores = scores.unflatten(1, (seq, heads)).mul_(self.softmax_scale)
        scores = scores.masked_fill_(~mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(latent.dtype)  # (B, S, heads, T)
        out = torch.bmm(probs.flatten(1, 2), latent).unflatten(1, (seq, heads))  # (B, S, heads, r)
        return self.o_proj(torch.einsum("bshr,hvr->bshv", out, w_uv).flatten(2))


class KVCacheLayer(Protocol):
    """One layer's view of a dense student's key/value cache (model/dense.py; nanoseek/infer/cache.py's GQAKVCache
    implements it)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new tokens' rotated keys and values (B, S, kv_heads, d); return everything cached for these
        rows, keys and values (B, kv_heads, T, d), and the attention mask (B, S, T)."""
        ...


class LatentCacheLayer(Protocol):
    """One layer's view of a latent KV cache (nanoseek/infer/cache.py implements it)."""

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new tokens' latents (B, S, r) and rotated RoPE keys (B, S, rope_dim); return everything cached
        for these rows (B, T, r), (B, T, rope_dim) and the attention mask (B, S, T)."""
        ...
