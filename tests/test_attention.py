"""MLA's latent attention (the absorbed form the cache decodes with) against a float64 reference written from
the paper's equations: per-head keys k = [W_uk c; k_rope], values v = W_uv c, softmax(q k^T * scale) v."""

import math

import pytest
import torch

from nanoseek.infer.cache import LatentKVCache
from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.rope import RotaryEmbedding, apply_rope

from conftest import randomize, tiny_config


def reference(attn: MultiHeadLatentAttention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Causal MLA over x (B, S, hidden) in float64, head by head, with explicit loops over heads."""
    c = attn.config
    attn = attn.double()
    x, cos, sin = x.double(), cos.double(), sin.double()
    q = attn.project_query(x)
    q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
    latent, k_rope = attn.project_latent(x)
    q_rope = apply_rope(q_rope, cos, sin, c.rope_interleave)
    k_rope = apply_rope(k_rope, cos, sin, c.rope_interleave)[:, :, 0]
    w = attn.kv_b_proj.weight.unflatten(0, (attn.n_heads, c.qk_nope_head_dim + c.v_head_dim))
    seq = x.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    heads = []
    for h in range(attn.n_heads):
        w_uk, w_uv = w[h].split([c.qk_nope_head_dim, c.v_head_dim])
        k = torch.cat([latent @ w_uk.T, k_rope], dim=-1)  # (B, S, qk_head_dim)
        v = latent @ w_uv.T  # (B, S, v_head_dim)
        qh = torch.cat([q_nope[:, :, h], q_rope[:, :, h]], dim=-1)
        scores = (qh @ k.mT * attn.softmax_scale).masked_fill(~causal, -math.inf)
        heads.append(scores.softmax(-1) @ v)
    return attn.o_proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("changes", [dict(), dict(kv_lora_rank=64, qk_rope_head_dim=16, q_lora_rank=None),
                                     dict(rope_interleave=False, num_attention_heads=8)])
def test_latent_attention_equals_the_float64_reference_in_prefill_and_decode(changes):
    config = tiny_config(**changes)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config)
    randomize(attn, seed=3, std=0.3)
    rotary = RotaryEmbedding(config)
    batch, prompt, total = 3, 5, 12
    x = torch.randn(batch, total, config.hidden_size)
    cos, sin = rotary(torch.arange(total))
    expected = reference(attn, x, cos[None], sin[None])
    attn.float()
    with torch.no_grad():
        expanded = attn(x, cos[None], sin[None])  # no cache: keys and values per head
        cache = LatentKVCache(config, slots=batch, max_len=total, layers=1).bind(torch.arange(batch))
        positions = cache.positions(prompt)
        out = [attn(x[:, :prompt], *rotary(positions), cache.layer(0))]  # prefill: S x heads queries per row
        cache.advance(prompt)
        for t in range(prompt, total):  # decode: one query per row and head
            out.append(attn(x[:, t:t + 1], *rotary(cache.positions(1)), cache.layer(0)))
            cache.advance(1)
    latent = torch.cat(out, dim=1)
    torch.testing.assert_close(expanded.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(latent.double(), expected, atol=1e-5, rtol=1e-4)


def test_latent_attention_rows_of_different_lengths_see_only_their_own_cache():
    """Rows whose caches hold different lengths (as in continuous batching): each equals its own run alone."""
    config = tiny_config()
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config).eval()
    randomize(attn, seed=4, std=0.3)
    rotary = RotaryEmbedding(config)
    lengths = [3, 7]
    xs = [torch.randn(1, n + 1, config.hidden_size) for n in lengths]
    with torch.no_grad():
        alone = []
        for x in xs:
            cos, sin = rotary(torch.arange(x.shape[1]))
            alone.append(attn(x, cos[None], sin[None])[:, -1])
        cache = LatentKVCache(config, slots=2, max_len=16, layers=1)
        for row, (x, n) in enumerate(zip(xs, lengths)):
            cache.bind(torch.tensor([row]))
            attn(x[:, :n], *rotary(cache.positions(n)), cache.layer(0))
            cache.advance(n)
        cache.bind(torch.arange(2))
        step = torch.cat([x[:, -1:] for x in xs])
        together = attn(step, *rotary(cache.positions(1)), cache.layer(0))[:, -1]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-4)
