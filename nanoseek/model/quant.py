"""Block-wise FP8 quantization (DeepSeek-V3's fine-grained scheme) and the checkpoint format built on it.

A tensor is cut into tiles, each with one float32 scale s = max|tile| / FP_MAX (optionally rounded up to a power of
two) so that the tile's largest value maps to the format's largest; the stored value is q = fp8(x / s) (round to
nearest even) and x ~ q * s. Activations and gradients use 1x128 tiles along the GEMM's reduction dimension, weights
128x128 blocks.

Checkpoints store `weight` in float8_e4m3fn and `weight_scale_inv` of shape (ceil(out/128), ceil(in/128)); the
real weight is weight * scale_inv, block by block. FP8 training (model/fp8.py) and checkpoint I/O
(nanoseek/checkpoint.py) both build on this module, which imports nothing else of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
BLOCK = 128
TILE = (1, BLOCK)  # activations and gradients
WEIGHT_BLOCK = (BLOCK, BLOCK)
MIN_AMAX = 1e-12  # an all-zero tile still gets a finite scale


class Fp8Tensor(NamedTuple):
    """A quantized matrix (or stack of matrices): data (..., rows, cols) in FP8, one float32 scale per tile.

    scale is (..., ceil(rows/tile[0]), ceil(cols/tile[1])); data * scale (tile-expanded) approximates the original.
    """

    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.data.shape[-2:]
        scale = self.scale.repeat_interleave(self.tile[0], -2)[..., :rows, :]
        scale = scale.repeat_interleave(self.tile[1], -1)[..., :cols]
        return (self.data.float() * scale).to(dtype)

    def t(self) -> Fp8Tensor:
        """The transpose: 128x128 blocks stay blocks (a 1x128 tile would become 128x1, which this type cannot hold)."""
        if self.tile[0] != self.tile[1]:
            raise ValueError(f"only square-tiled matrices transpose; this one has {self.tile} tiles")
        return Fp8Tensor(self.data.transpose(-2, -1), self.scale.transpose(-2, -1), self.tile)


def quantize(x: torch.Tensor, tile: tuple[int, int] = TILE, dtype: torch.dtype = torch.float8_e4m3fn,
             pow2_scales: bool = False) -> Fp8Tensor:
    """x (..., rows, cols) -> Fp8Tensor with max-abs scales per tile (ragged edge tiles are smaller).

    pow2_scales rounds each scale up to a power of two, so that scaling itself is exact.
    """
    fmax = torch.finfo(dtype).max
    rows, cols = x.shape[-2:]
    tr, tc = tile
    padded = F.pad(x.float(), (0, -cols % tc, 0, -rows % tr))
    blocks = padded.unflatten(-1, (-1, tc)).unflatten(-3, (-1, tr))  # (..., R, tr, C, tc)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=MIN_AMAX) / fmax  # (..., R, C)
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[..., :, None, :, None]).clamp(-fmax, fmax)
    q = q.flatten(-2).flatten(-3, -2)[..., :rows, :cols]
    return Fp8Tensor(q.to(dtype).contiguous(), scale, tile)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK,
                       pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> float8_e4m3fn weight, float32 scale_inv per block: the checkpoint format."""
    q = quantize(weight, (block, block), pow2_scales=pow2_scales)
    return q.data, q.scale


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float8_e4m3fn weight (out, in) and its scale_inv (ceil(out/block), ceil(in/block)) -> weight in `dtype`."""
    rows, cols = weight.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{rows}x{cols} weight in {block}x{block} blocks")
    return Fp8Tensor(weight, scale_inv.float(), (block, block)).dequantize(dtype)
