"""Cross-entropy through the output head without materialising the logits.

linear_cross_entropy(h, W, targets) equals F.cross_entropy(F.linear(h, W).float(), targets, ignore_index=...),
but runs over the tokens in chunks: each chunk's logits (chunk, V) live only while that chunk's loss and its
gradients for h and W are computed, in the forward pass. The backward pass only scales the stored gradients,
so the head costs the same three GEMMs as the plain path while its memory drops from (tokens, V) logits (plus
their float32 copy and softmax) to one chunk's, and the loss accumulates in float32.

bradley_terry_loss is the reward model's pairwise loss (`nanoseek rm`); forward_kl and reverse_kl are
distillation's per-token losses (`nanoseek distill`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MiB in float32): 2048 tokens at a 32768 vocabulary


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
        """hidden (T, H), weight (V, H), targets (T,); the GEMMs run in `dtype`, softmax and sums in >= fp32."""
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, H)
            valid = targets != ignore_index  # (T,)
            n_valid = valid.sum().to(acc)  # stays on the device: no host sync
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
            for lo in range(0, hidden.shape[0], chunk_size):
                h = hidden[lo:lo + chunk_size].to(dtype)  # (C, H)
                keep = valid[lo:lo + chunk_size]  # (C,)
                target = targets[lo:lo + chunk_size].where(keep, 0).unsqueeze(1)  # (C, 1)
                logits = (h @ w.T).to(acc)  # (C, V): rounded to `dtype` first, as the plain path's logits are
                # A stable log-sum-exp whose exponentials are built in place: one (C, V) buffer per chunk.
                top = logits.amax(dim=-1, keepdim=True)  # (C, 1)
                target_logit = logits.gather(1, target) - top  # (C, 1)
                probs = logits.sub_(top).exp_()  # (C, V), unnormalised
                norm = probs.sum(dim=-1, keepdim=True)  # (C, 1)
                total += ((norm.log() - target_logit).squeeze(1) * keep).sum()
                if need_hidden or need_weight:
                    # d(mean loss)/d logits = (softmax - one_hot(target)) / valid count, zero on ignored rows.
                    grad = probs.div_(norm).scatter_add_(1, target, torch.full_like(norm, -1.0))
                    grad = grad.mul_((keep / n_valid).unsqueeze(1)).to(dtype)  # (C, V)
                    if need_hidden:
                        grad_hidden[lo:lo + chunk_size] = grad @ w
                    if need_weight:
                        grad_weight += (grad.T @ h).to(acc)
                    del grad
                del logits, probs  # free this chunk's (C, V) buffer before the next chunk's GEMM allocates one
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of F.linear(hidden, weight) (..., V) against targets (...), over non-ignored targets.

    hidden (..., H), weight (V, H). Under autocast the GEMMs run in the autocast dtype, as nn.Linear's would.
    Returns a float32 scalar (float64 for float64 inputs); NaN when every target is ignored, like F.cross_entropy.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if not torch.is_grad_enabled():  # needs_input_grad follows requires_grad alone: skip the gradient GEMMs
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                     ignore_index, chunk, dtype)


def mtp_linear_cross_entropy(mtp_hidden: list[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor,
                             chunk_size: int | None = None) -> torch.Tensor:
    """transformer.mtp_loss from the depths' normed hidden states (B, S-k, H) and the shared head weight (V, H):
    the mean over depths k of linear_cross_entropy against targets[:, k:]."""
    losses = [linear_cross_entropy(h, weight, targets[:, k:], chunk_size=chunk_size)
              for k, h in enumerate(mtp_hidden, start=1)]
    return torch.stack(losses).mean()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The reward model's pairwise loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected), the mean over pairs.

    chosen, rejected (P,): the rewards of each pair's preferred and rejected response. In float32 (or wider).
    """
    acc = torch.promote_types(chosen.dtype, torch.float32)
    return -F.logsigmoid(chosen.to(acc) - rejected.to(acc)).mean()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per position KL(p_teacher || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), where p = softmax(logits /
    temperature): logit distillation's loss (Hinton et al.), mass-covering. student_logits, teacher_logits (..., V)
    -> (...,), in float32 (or wider); differentiable through the student's logits (detach the teacher's)."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per position KL(p_student || p_teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), exact over the vocabulary:
    on-policy distillation's loss on the student's own samples, mode-seeking. (..., V) -> (...,), in float32 (or
    wider); differentiable through the student's logits (detach the teacher's)."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(acc), dim=-1)
    log_t = F.log_softmax(teacher_logits.to(acc), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)
