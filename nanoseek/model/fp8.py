"""DeepSeek's block-wise FP8 (E4M3) weight format: one float32 scale per 128x128 block.

A checkpoint stores `weight` in float8_e4m3fn and `weight_scale_inv` of shape (ceil(out/128), ceil(in/128));
the real weight is weight * scale_inv, block by block.
"""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
BLOCK = 128


def _expand_blocks(scales: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    return scales.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    rows, cols = weight.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{rows}x{cols} weight in {block}x{block} blocks")
    return (weight.float() * _expand_blocks(scale_inv.float(), weight.shape, block)).to(dtype)


def quantize_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> float8_e4m3fn weight, float32 scale_inv per block (max-abs maps to 448)."""
    rows, cols = weight.shape
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, -cols % block, 0, -rows % block))
    blocks = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # (R, block, C, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (w / _expand_blocks(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv
