"""What a request samples and when it stops: SamplingParams, the batched sampler, the stop rules of a Completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanoseek.config import require

if TYPE_CHECKING:
    from nanoseek.data.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the engine's tokenizer
    seed: int = 0  # the request's own generator; Engine.generate seeds its request i with seed + i
    # A cap on the reasoning, for prompts that open <think>: once the completion has this many tokens and has not
    # closed the thinking, the engine appends end_think_ids (</think>) in place of the next samples, and the model
    # goes on to answer. None: no cap.
    thinking_budget: int | None = None
    end_think_ids: tuple[int, ...] = ()  # the tokens of </think>; needed with thinking_budget

    def __post_init__(self) -> None:
        kind = "sampling option"
        if self.thinking_budget is not None:
            require(self, self.thinking_budget >= 0, "thinking_budget", "must be >= 0 (None: no cap)", kind)
            require(self, bool(self.end_think_ids), "end_think_ids",
                    "must name the tokens of </think> that a thinking_budget appends", kind)
        require(self, self.max_new_tokens > 0, "max_new_tokens", "must be at least 1", kind)
        require(self, self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)", kind)
        require(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 keeps every token)", kind)
        require(self, self.top_k >= 0, "top_k", "must be >= 0 (0 keeps every token)", kind)

    @property
    def filter_key(self) -> tuple[float, int, float]:
        """What the logits filter depends on: rows with the same key are filtered in one batch."""
        return self.temperature, self.top_k, self.top_p


@dataclass
class Completion:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (a stop id or string), "length" (max_new_tokens) or "abort"
    text: str | None = None  # decoded tokens cut after the first stop string, when the engine has a tokenizer


def append_token(completion: Completion, token: int, params: SamplingParams,
                 tokenizer: Tokenizer | None) -> bool:
    """Append the token; True when the request is finished (completion.finish_reason says why)."""
    completion.tokens.append(token)
    if token in params.stop_ids:
        completion.finish_reason = "stop"
        return True
    if params.stop_strings:
        tail = tokenizer.decode(completion.tokens[-16:])
        if any(s in tail for s in params.stop_strings):
            completion.finish_reason = "stop"
            return True
    return len(completion.tokens) >= params.max_new_tokens


def cut_after_stop(text: str, params: SamplingParams) -> str:
    """The text up to and including its first stop string."""
    cut = min((text.index(s) + len(s) for s in params.stop_strings if s in text), default=len(text))
    return text[:cut]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits (B, V) float32, each row's params and CPU generator -> one token id per row. Rows sharing a filter
    (temperature, top_k, top_p) are filtered in one batch on the logits' device; the draws run on the CPU from each
    row's own generator (one transfer per group), so a request's tokens depend only on its seed, not on its batch
    or device."""
    first = params[0]
    if all(p is first or p.filter_key == first.filter_key for p in params):  # the common case: one filter
        return _sample_rows(logits, first, generators)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, p in enumerate(params):
        groups.setdefault(p.filter_key, []).append(row)
    tokens = [0] * len(params)
    for rows in groups.values():
        drawn = _sample_rows(logits[rows], params[rows[0]], [generators[r] for r in rows])
        for row, token in zip(rows, drawn, strict=True):
            tokens[row] = token
    return tokens


def _sample_rows(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> list[int]:
    """logits (B, V) float32 of rows sharing one filter -> one token id per row."""
    if params.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / params.temperature
    if params.top_k:
        cut = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    probs = probs.cpu()
    # torch.multinomial(row, 1, generator=g) is argmax(row / q) with q ~ Exp(1) drawn from g: the same draws, each
    # from its row's generator, then one division and argmax for the batch instead of a multinomial call per row.
    noise = torch.empty_like(probs)
    for row, g in zip(noise, generators, strict=True):
        row.exponential_(generator=g)
    return (probs / noise).argmax(dim=-1).tolist()
