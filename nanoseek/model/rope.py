"""Rotary position embedding: MLA's decoupled key/query part with DeepSeek's YaRN extension, and the dense
students' whole heads with Llama 3.1's frequency scaling."""

from __future__ import annotations

import math

import torch

from nanoseek.config import DenseConfig, Llama3Scaling, ModelConfig, YarnScaling, yarn_mscale
from nanoseek.model.layers import Float32Buffers


def inverse_frequencies(dim: int, theta: float,
                        yarn: YarnScaling | Llama3Scaling | None) -> tuple[torch.Tensor, float]:
    """(dim/2,) inverse frequencies and the factor cos/sin are multiplied by.

    YaRN keeps the high frequencies (many rotations within the original context) as they are, divides the
    low ones by `factor`, and ramps linearly between the two over the dimensions [low, high]. Llama 3's
    scaling (llama3_frequencies) does the same by wavelength, with no factor on cos/sin.
    """
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / theta**exponent
    if yarn is None:
        return inv_freq.float(), 1.0
    if isinstance(yarn, Llama3Scaling):
        return llama3_frequencies(inv_freq, yarn).float(), 1.0

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


def llama3_frequencies(inv_freq: torch.Tensor, scaling: Llama3Scaling) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of inverse frequencies (as Meta's reference and transformers' "llama3").

    By wavelength 2 pi / f against the original context L: shorter than L / high_freq_factor (many rotations
    within it) kept; longer than L / low_freq_factor divided by `factor`; between, interpolated with the weight
    s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor) on the kept frequency.
    """
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength < context / scaling.high_freq_factor, inv_freq, scaled)
    return torch.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, scaled)


class RotaryEmbedding(Float32Buffers):
    float32_buffers = ("inv_freq",)

    def __init__(self, config: ModelConfig | DenseConfig):
        super().__init__()
        # MLA rotates a decoupled slice of qk_rope_head_dim per head; a dense student whole heads.
        dim = config.head_dim if isinstance(config, DenseConfig) else config.qk_rope_head_dim
        inv_freq, self.attention_factor = inverse_frequencies(dim, config.rope_theta, config.rope_scaling)
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
