"""DeepSeek-V3's fine-grained FP8 training: FP8 GEMMs on block-wise quantized operands (model/quant.py).

Every linear layer of the attention and the FFN/shared experts and the routed experts run their three GEMMs on FP8
operands, each with fp32 accumulation:
  forward  y  = x W^T     x in 1x128 tiles along K, W in 128x128 blocks
  dgrad    dx = dy W      dy in 1x128 tiles along N, W in the same blocks
  wgrad    dW = dy^T x    dy and x in 128x1 tiles (128 tokens x 1 channel): the activation saved in FP8 for the
                          backward in 1x128 tiles is dequantized and re-quantized in tiles along the tokens
The embedding, output head, router, norms and attention core stay in higher precision. The FP32 weights stay the
master copy: quantization happens online, in every forward.
On CUDA with every dimension a multiple of 128, a dense GEMM runs in torch._scaled_mm's block-wise FP8 kernel;
everywhere else (the CPU, ragged shapes, the routed experts' grouped GEMM) it is the reference: quantize,
dequantize, multiply in fp32 (bf16 for CUDA's grouped GEMM), which has the same numerics up to accumulation order.
convert_to_fp8_training switches a model to it.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import RoutedExperts, grouped_mm
from nanoseek.model.quant import BLOCK, TILE, WEIGHT_BLOCK, Fp8Tensor, quantize
from nanoseek.model.transformer import Block

# How many GEMMs ran in torch._scaled_mm and how many in the quantize-dequantize reference (the benchmark reports it).
GEMM_PATHS: Counter[str] = Counter()


# ---------------------------------------------------------------------- GEMMs
def _scaled_mm_applies(a: Fp8Tensor, b: Fp8Tensor) -> bool:
    dims = (*a.data.shape, b.data.shape[0])
    return a.data.is_cuda and hasattr(torch, "_scaled_mm") and all(d % BLOCK == 0 for d in dims)


def _scaled_mm(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    """cuBLAS block-wise FP8 (torch 2.11+, Hopper): the scale layouts ../shared/anchors found to work."""
    scale_a = a.scale.t().contiguous().t()  # (M, K/128), column-major
    if b.tile == WEIGHT_BLOCK:
        scale_b = b.scale.contiguous().t()  # (K/128, N/128), column-major
    else:
        scale_b = b.scale.t().contiguous()  # (K/128, N), row-major
    return torch._scaled_mm(a.data, b.data.contiguous().t(), scale_a, scale_b, out_dtype=torch.bfloat16)


def _emulation_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    """a (M, K) in 1x128 tiles, b (N, K) in 128x128 blocks or 1x128 tiles -> a @ b^T (M, N).

    bf16 from torch._scaled_mm where it applies, else float32 from the reference (fp32 accumulation).
    """
    if a.tile != TILE or b.tile not in (TILE, WEIGHT_BLOCK):
        raise ValueError(f"fp8_gemm takes 1x128 tiles times 1x128 tiles or 128x128 blocks, not {a.tile} x {b.tile}")
    if _scaled_mm_applies(a, b) and not GEMM_PATHS["scaled_mm_failed"]:
        try:
            out = _scaled_mm(a, b)
            GEMM_PATHS["scaled_mm"] += 1
            return out
        except RuntimeError as e:
            GEMM_PATHS["scaled_mm_failed"] += 1
            warnings.warn(f"torch._scaled_mm rejected block-wise FP8 ({e}); using the quantize-dequantize "
                          "reference from now on", stacklevel=2)
    GEMM_PATHS["emulated"] += 1
    return a.dequantize() @ b.dequantize().t()


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            xq = quantize(x.reshape(-1, x.shape[-1]), pow2_scales=pow2_scales)  # (M, K) 1x128 tiles
            wq = quantize(weight, WEIGHT_BLOCK, pow2_scales=pow2_scales)  # (N, K) 128x128 blocks
            y = fp8_gemm(xq, wq)
        ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)  # activations kept in FP8
        ctx.pow2_scales, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = pow2_scales, x.shape, x.dtype, weight.dtype
        return y.to(out_dtype).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        pow2 = ctx.pow2_scales
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.reshape(-1, dy.shape[-1])  # (M, N)
            wq = Fp8Tensor(w_data, w_scale, WEIGHT_BLOCK)
            dx = fp8_gemm(quantize(dy, pow2_scales=pow2), wq.t())  # (M, K)
            # wgrad contracts over the tokens: both operands re-tiled to 128 tokens x 1 channel.
            x = Fp8Tensor(x_data, x_scale, TILE).dequantize()
            dw = fp8_gemm(quantize(dy.t(), pow2_scales=pow2), quantize(x.t(), pow2_scales=pow2))  # (N, K)
        return dx.to(ctx.x_dtype).view(ctx.x_shape), dw.to(ctx.w_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T with FP8 forward, dgrad and wgrad GEMMs."""
    return _Fp8Linear.apply(x, weight, pow2_scales)


def _pad_groups(x: torch.Tensor, offsets: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rows of x (M, D) grouped by offsets -> (G, C, D), each group's rows from slot 0, zeros after, C a multiple
    of 128 (so that 128-row tiles never cross groups)."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    groups = torch.repeat_interleave(torch.arange(n_groups, device=x.device), counts, output_size=x.shape[0])
    slots = torch.arange(x.shape[0], device=x.device) - (offsets.long() - counts)[groups]
    capacity = -(-int(counts.max()) // BLOCK) * BLOCK if x.shape[0] else 0
    padded = x.new_zeros(n_groups, capacity, x.shape[-1])
    padded[groups, slots] = x
    return padded


class _Fp8GroupedLinear(torch.autograd.Function):
    """Per group g (rows offsets[g-1]:offsets[g] of x): x_g @ weight[g]^T, each GEMM on FP8 operands (reference)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
        compute = _emulation_dtype(x.device)
        with torch.autocast(x.device.type, enabled=False):
            xq = quantize(x, pow2_scales=pow2_scales)  # (M, K)
            wq = quantize(weight, WEIGHT_BLOCK, pow2_scales=pow2_scales)  # (G, N, K), blocks per expert
            y = grouped_mm(xq.dequantize(compute), wq.dequantize(compute).transpose(1, 2), offsets)
        ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale, offsets)
        ctx.pow2_scales, ctx.x_dtype, ctx.w_dtype = pow2_scales, x.dtype, weight.dtype
        GEMM_PATHS["emulated"] += 1
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x_data, x_scale, w_data, w_scale, offsets = ctx.saved_tensors
        pow2, compute = ctx.pow2_scales, _emulation_dtype(dy.device)
        with torch.autocast(dy.device.type, enabled=False):
            w = Fp8Tensor(w_data, w_scale, WEIGHT_BLOCK).dequantize(compute)  # (G, N, K)
            dx = grouped_mm(quantize(dy, pow2_scales=pow2).dequantize(compute), w, offsets)  # (M, K)
            x = Fp8Tensor(x_data, x_scale, TILE).dequantize()
            x_pad = _pad_groups(x, offsets, w.shape[0])  # (G, C, K)
            dy_pad = _pad_groups(dy.float(), offsets, w.shape[0])  # (G, C, N)
            x_t = quantize(x_pad.transpose(1, 2), pow2_scales=pow2).dequantize(compute)  # (G, K, C): 128x1 tiles
            dy_t = quantize(dy_pad.transpose(1, 2), pow2_scales=pow2).dequantize(compute)  # (G, N, C)
            dw = torch.bmm(dy_t.float(), x_t.float().transpose(1, 2))  # (G, N, K), fp32 accumulation
        GEMM_PATHS["emulated"] += 2
        return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                       pow2_scales: bool = False) -> torch.Tensor:
    """x (M, K) sorted by group, weight (G, N, K) in nn.Linear orientation, offsets (G,) int32 ends -> (M, N)."""
    return _Fp8GroupedLinear.apply(x, weight, offsets, pow2_scales)


# ---------------------------------------------------------------------- the model switch
class Fp8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8; same parameters and state dict (a converted module, not a new one)."""

    pow2_scales: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.pow2_scales)
        return y if self.bias is None else y + self.bias


class Fp8RoutedExperts(RoutedExperts):
    """The routed experts' two grouped GEMMs (and their backward) on FP8 operands."""

    pow2_scales: bool = False

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        gate, up = fp8_grouped_linear(x_sorted, self.gate_up_proj, offsets, self.pow2_scales).chunk(2, dim=-1)
        return fp8_grouped_linear(F.silu(gate) * up, self.down_proj, offsets, self.pow2_scales)


def convert_to_fp8_training(model: nn.Module, pow2_scales: bool = False) -> list[str]:
    """Switch a DeepSeekV3 to DeepSeek-V3's FP8 recipe in place; returns the names of the converted modules.

    Converted: every linear layer inside the blocks' attention and FFN (MLA projections, dense FFN, shared experts)
    and the routed experts, in the main layers and the MTP blocks. Left as they are: embedding, output head, router,
    norms, attention core (softmax(QK^T)V), and the MTP modules' eh_proj. Parameters are not copied, so an optimizer
    built before or after the conversion sees the same tensors. Convert before wrapping forwards for recomputation.
    """
    converted = []
    for block_name, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        for part in ("self_attn", "mlp"):
            for name, module in getattr(block, part).named_modules(prefix=f"{block_name}.{part}"):
                if type(module) not in (nn.Linear, RoutedExperts):
                    continue
                if "forward" in module.__dict__:
                    raise ValueError(f"{name} has a wrapped forward (recomputation?); convert to FP8 before that")
                module.__class__ = Fp8Linear if type(module) is nn.Linear else Fp8RoutedExperts
                module.pow2_scales = pow2_scales
                converted.append(name)
    return converted
