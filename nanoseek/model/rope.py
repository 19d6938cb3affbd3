"""Rotary position embedding for MLA's decoupled key/query part, with DeepSeek's YaRN extension."""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig, YarnScaling, yarn_mscale
from nanoseek.model.layers import Float32Buffers


def inverse_frequencies(dim: int, theta: float, yarn: YarnScaling | None) -> tuple[torch.Tensor, float]:
    """(dim/2,) inverse frequencies and the factor cos/sin are multiplied by.

    YaRN keeps the high frequencies (many rotations within the original context) as they are, divides the
    low ones by `factor`, and ramps linearly between the two over the dimensions [low, high].
    """
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / theta**exponent
    if yarn is None:
        return inv_freq.float(), 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = inv_freq / yarn.factor * (1 - keep) + inv_freq * keep
    attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    return inv_freq.float(), attention_factor


class RotaryEmbedding(Float32Buffers):
    float32_buffers = ("inv_freq",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(
            config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., S) -> cos, sin of shape (..., S, rope_dim/2), float32."""
        angles = positions.float()[..., None] * self.inv_freq
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x (B, S, heads, rope_dim) by cos/sin (B or 1, S, rope_dim/2).

    Two layouts exist in released checkpoints: interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek-V3's
    own weights) and two halves (x_i, x_{i+d/2}) (the "rotate-half" layout). The output is always in the
    half layout; queries and keys are rotated alike, so their dot products are the same either way.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
