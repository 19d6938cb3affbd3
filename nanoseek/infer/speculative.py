"""MTP speculative decoding: the model's Multi-Token Prediction module drafts the next token, the main model
checks it in the same forward as the pending one; greedy, so the output equals plain greedy decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanoseek.infer.cache import LatentKVCache
from nanoseek.infer.sampling import Completion, SamplingParams, append_token, cut_after_stop
from nanoseek.model import DeepSeekV3

if TYPE_CHECKING:
    from nanoseek.data.tokenizer import Tokenizer


class MTPSpeculator:
    """Greedy decoding of one request in a slot of the engine's cache, with the MTP module's own one-layer cache.

    Each verification feeds [pending, draft] (positions n, n+1). If the main model's prediction after `pending`
    is the draft, both are kept and the prediction after the draft comes free; otherwise the draft's cache entry
    is dropped and the main model's own token is kept. The MTP module then reads the hidden states of the kept
    positions (with their next tokens) to draft again.
    """

    def __init__(self, model: DeepSeekV3, cache: LatentKVCache):
        self.model, self.cache = model, cache
        self.device = cache.latent.device
        self.mtp_cache = LatentKVCache(model.config, 1, cache.max_len, self.device, cache.latent.dtype, layers=1)

    @torch.no_grad()
    def generate(self, prompt: list[int], params: SamplingParams, slot: int, tokenizer: Tokenizer | None = None
                 ) -> tuple[Completion, dict[str, float]]:
        """-> (the completion, {proposed, accepted, acceptance_rate, tokens_per_forward}). The caller checked
        that prompt + max_new_tokens + 1 (the last draft) fits the cache and runs the model in eval mode."""
        main = self.cache.bind(torch.tensor([slot], device=self.device))
        mtp = self.mtp_cache.bind(torch.tensor([0], device=self.device))
        main.reset(slot)
        mtp.reset(0)
        completion = Completion(list(prompt))
        logits, hidden = self.model(torch.tensor([prompt], device=self.device), cache=main, return_hidden=True)
        main.advance(len(prompt))
        pending = int(logits[0, -1].argmax())
        draft = self._draft(hidden, prompt[1:] + [pending])
        proposed = accepted = 0
        done = append_token(completion, pending, params, tokenizer)
        while not done:
            proposed += 1
            logits, hidden = self.model(torch.tensor([[pending, draft]], device=self.device), cache=main,
                                        return_hidden=True)
            main.advance(2)
            verified = int(logits[0, 0].argmax())
            if verified == draft:
                accepted += 1
                kept = [draft, int(logits[0, 1].argmax())]
            else:
                main.advance(-1)  # the draft's position is wrong: drop it
                kept, hidden = [verified], hidden[:, :1]
            draft = self._draft(hidden, kept)
            for token in kept:
                if done := append_token(completion, token, params, tokenizer):
                    break
            pending = kept[-1]
        if tokenizer is not None:
            completion.text = cut_after_stop(tokenizer.decode(completion.tokens), params)
        stats = {"proposed": proposed, "accepted": accepted, "acceptance_rate": accepted / max(1, proposed),
                 "tokens_per_forward": len(completion.tokens) / (1 + proposed)}
        return completion, stats

    def _draft(self, hidden: torch.Tensor, next_tokens: list[int]) -> int:
        """MTP over the positions whose hidden states (1, S, H) are given, each with its next token -> the draft."""
        logits = self.model.mtp_draft(hidden, torch.tensor([next_tokens], device=self.device), self.mtp_cache)
        self.mtp_cache.advance(len(next_tokens))
        return int(logits[0, -1].argmax())
