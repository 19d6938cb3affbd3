"""Group Relative Policy Optimization (DeepSeekMath / DeepSeek-R1): the advantage, the loss, the update.

For each prompt, G completions are sampled; a completion's advantage is its reward relative to its group,
A = (r - mean) / (std + eps), or r - mean without the std scaling (Dr. GRPO). No value model. The loss per
token is the clipped surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) (separate epsilons are
DAPO's clip-higher) plus beta times the k3 estimate of KL(policy || reference), aggregated per sequence
(GRPO), over all tokens (DAPO), or over a constant token budget (Dr. GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.model import DeepSeekV3

AGGREGATIONS = ("sequence", "token", "constant")


@dataclass
class GRPOLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low is DAPO's clip-higher
    beta: float = 0.0  # KL coefficient; 0 keeps no reference model
    aggregation: str = "sequence"  # "sequence" (GRPO), "token" (DAPO), "constant" (Dr. GRPO: / (B * max_tokens))
    max_tokens: int = 256  # the constant of "constant" aggregation: the completion length budget
    scale_std: bool = True  # False is Dr. GRPO's unscaled advantage
    std_eps: float = 1e-4


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (prompts, G) -> advantages (prompts, G), relative to each prompt's group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts,) True where the group's rewards differ: an all-equal group has zero advantage everywhere and
    only dilutes the batch (DAPO's dynamic sampling drops it)."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) at tokens sampled from the policy:
    exp(ref - logp) - (ref - logp) - 1, unbiased and never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOLossConfig, ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp, mask (B, T) over completion tokens; advantages (B,) -> loss, stats."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if cfg.beta:
        per_token = per_token + cfg.beta * kl
    if cfg.aggregation == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif cfg.aggregation == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif cfg.aggregation == "constant":
        loss = (per_token * mask).sum() / (mask.shape[0] * cfg.max_tokens)
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {cfg.aggregation!r}")
    n = mask.sum().clamp(min=1)
    is_clipped = ((ratio < 1 - cfg.eps_low) & (adv < 0)) | ((ratio > 1 + cfg.eps_high) & (adv > 0))
    stats = {"clip_fraction": float((is_clipped * mask).sum() / n), "kl": float((kl * mask).sum() / n)}
    return loss, stats


def completion_logprobs(model: DeepSeekV3, sequences: torch.Tensor, prompt_lens: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sequences (B, S) = prompt + completion, right-padded; prompt_lens (B,).

    -> log-probabilities (B, S-1) of each next token, the mask of completion tokens (B, S-1) (padding is
    marked by the caller with -1 in `sequences`), and the entropy of each next-token distribution (B, S-1).
    """
    valid = sequences >= 0
    inputs = sequences.clamp(min=0)
    logits = model(inputs[:, :-1]).float()
    logp_all = F.log_softmax(logits, dim=-1)
    targets = inputs[:, 1:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(1, sequences.shape[1], device=sequences.device)[None]
    mask = (positions >= prompt_lens[:, None]) & valid[:, 1:]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, mask, entropy
