"""Plain batched generation (no KV cache yet): greedy or temperature/top-p sampling with stop tokens.

Prompts of equal length run as one batch; the engine of issue 5 (latent KV cache, continuous batching)
replaces the recomputation of the whole prefix at every step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from nanoseek.model import DeepSeekV3


@torch.no_grad()
def generate(model: DeepSeekV3, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int] | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[list[int]]:
    """-> the generated token ids of each prompt (stop token included when one was produced)."""
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_ids or set()
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        by_length[len(p)].append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for lo in range(0, len(indices), batch_size):
            chunk = indices[lo:lo + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                logits = model(ids)[:, -1].float()
                token = _sample(logits, temperature, top_p, generator)
                ids = torch.cat([ids, token[:, None]], dim=1)
                for row, t in enumerate(token.tolist()):
                    if not done[row]:
                        outputs[chunk[row]].append(t)
                        done[row] = t in stop_ids
                if done.all():
                    break
    return outputs


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
