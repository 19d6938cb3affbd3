"""The generation engine: latent KV cache, continuous batching, sampling.

Requests wait in a queue; each running one holds a cache slot. A step prefills waiting requests into free
slots, then decodes one token for every running request in one batched forward; a finished request frees
its slot at once for the next waiting one. Each request samples with its own seeded generator, so its
output does not depend on what it was batched with.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanoseek.infer.cache import LatentKVCache
from nanoseek.model import DeepSeekV3


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the engine's tokenizer
    seed: int = 0  # request i samples from a generator seeded with seed + i


@dataclass
class Completion:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (a stop id or string) or "length" (max_new_tokens)
    text: str | None = None  # decoded tokens, when the engine has a tokenizer


class Engine:
    """static_decode: decode in fixed shapes (batch padded to a power of two, attention over the whole cache
    length), which on CUDA are captured once per size in CUDA graphs and replayed, removing the per-kernel launch
    cost that dominates small-batch decoding. Default: on for CUDA."""

    def __init__(self, model: DeepSeekV3, max_batch: int = 32, max_len: int | None = None, tokenizer=None,
                 static_decode: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device = param.device
        max_len = max_len or min(model.config.max_position_embeddings, 4096)
        static = self.device.type == "cuda" if static_decode is None else static_decode
        # A static decode pads its batch with rows that write into one extra scratch slot, never a request's.
        self.cache = LatentKVCache(model.config, max_batch + static, max_len, self.device, param.dtype)
        self.max_batch = max_batch
        self._decode_graphs = DecodeGraphs(model, self.cache, max_batch) if static else None
        self._mtp_cache: LatentKVCache | None = None  # made on the first speculative request

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Completion]:
        params = params or SamplingParams()
        self._check(prompts, params)
        results = [Completion(list(p)) for p in prompts]
        generators = [torch.Generator().manual_seed(params.seed + i) for i in range(len(prompts))]
        waiting = deque(range(len(prompts)))
        free = list(range(self.max_batch))[::-1]
        running: dict[int, int] = {}  # slot -> request
        while waiting or running:
            admitted = {}  # slot -> request
            while waiting and free:
                admitted[free.pop()] = waiting.popleft()
            if admitted:
                logits = self._prefill(list(admitted), [prompts[r] for r in admitted.values()])
                tokens = self._sample(logits, params, [generators[r] for r in admitted.values()])
                for (slot, request), token in zip(admitted.items(), tokens, strict=True):
                    if not self._accept(results[request], token, params):
                        running[slot] = request
                    else:
                        free.append(slot)
            if not running:
                continue
            slots = sorted(running)
            logits = self._decode(torch.tensor([results[running[s]].tokens[-1] for s in slots]),
                                  torch.tensor(slots))
            tokens = self._sample(logits, params, [generators[running[slot]] for slot in slots])
            for slot, token in zip(slots, tokens, strict=True):
                request = running[slot]
                if self._accept(results[request], token, params):
                    del running[slot]
                    free.append(slot)
        if self.tokenizer is not None:
            for r in results:
                r.text = self._truncate(self.tokenizer.decode(r.tokens), params)
        return results

    @torch.no_grad()
    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """One request, token by token as they are sampled (for interactive use); uses cache slot 0."""
        params = params or SamplingParams()
        self._check([prompt], params)
        generator = torch.Generator().manual_seed(params.seed)
        completion = Completion(list(prompt))
        logits = self._prefill([0], [prompt])
        while True:
            token = self._sample(logits, params, [generator])[0]
            done = self._accept(completion, token, params)
            yield token
            if done:
                return
            logits = self._decode(torch.tensor([token]), torch.tensor([0]))

    @torch.no_grad()
    def generate_speculative(self, prompt: list[int], params: SamplingParams | None = None
                             ) -> tuple[Completion, dict[str, float]]:
        """Greedy decoding of one request where the MTP module drafts the next token and the main model checks
        it in the same forward as the pending one; the output equals plain greedy decoding token for token.

        Each verification feeds [pending, draft] (positions n, n+1). If the main model's prediction after
        `pending` is the draft, both are kept and the prediction after the draft comes free; otherwise the
        draft's cache entry is dropped and the main model's own token is kept. The MTP module then reads the
        hidden states of the kept positions (with their next tokens) to draft again.
        """
        params = params or SamplingParams()
        if params.temperature > 0:
            raise ValueError("speculative decoding is greedy here: use temperature 0")
        self._check([prompt], SamplingParams(max_new_tokens=params.max_new_tokens + 1))
        if self._mtp_cache is None:
            self._mtp_cache = LatentKVCache(self.model.config, 1, self.cache.max_len, self.device,
                                            self.cache.latent.dtype, layers=1)
        slot = torch.tensor([0], device=self.device)
        main, mtp = self.cache.bind(slot), self._mtp_cache.bind(slot)
        main.reset(0)
        mtp.reset(0)
        completion = Completion(list(prompt))
        logits, hidden = self.model(torch.tensor([prompt], device=self.device), cache=main, return_hidden=True)
        main.advance(len(prompt))
        pending = int(logits[0, -1].argmax())
        draft = self._draft(hidden, prompt[1:] + [pending])
        proposed = accepted = 0
        done = self._accept(completion, pending, params)
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
                if done := self._accept(completion, token, params):
                    break
            pending = kept[-1]
        if self.tokenizer is not None:
            completion.text = self._truncate(self.tokenizer.decode(completion.tokens), params)
        stats = {"proposed": proposed, "accepted": accepted, "acceptance_rate": accepted / max(1, proposed),
                 "tokens_per_forward": len(completion.tokens) / (1 + proposed)}
        return completion, stats

    def _draft(self, hidden: torch.Tensor, next_tokens: list[int]) -> int:
        """MTP over the positions whose hidden states are given, each with its next token -> the draft token."""
        logits = self.model.mtp_draft(hidden, torch.tensor([next_tokens], device=self.device), self._mtp_cache)
        self._mtp_cache.advance(len(next_tokens))
        return int(logits[0, -1].argmax())

    def _check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need an Engine built with a tokenizer")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) + params.max_new_tokens > self.cache.max_len:
                raise ValueError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens {params.max_new_tokens} "
                                 f"exceeds the cache's {self.cache.max_len} tokens per sequence")

    def _decode(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token (B,) for each of the slots (B,) -> next-token logits (B, V) float32; the slots advance."""
        tokens, slots = tokens.to(self.device), slots.to(self.device)
        if self._decode_graphs is not None:
            logits = self._decode_graphs(tokens, slots)
        else:
            logits = self.model(tokens[:, None], cache=self.cache.bind(slots))[:, -1].float()
        self.cache.bind(slots).advance(1)
        return logits

    def _prefill(self, slots: list[int], prompts: list[list[int]], token_budget: int = 8192) -> torch.Tensor:
        """Prompts into their slots, right-padded into few forwards of at most token_budget tokens -> (B, V)
        logits after each prompt's last token. A pad position's cache entry lies past its slot's length, so it
        is masked and later overwritten."""
        logits = []
        start = 0
        while start < len(prompts):
            end, width = start, 0
            while end < len(prompts) and (end == start or max(width, len(prompts[end])) * (end + 1 - start)
                                          <= token_budget):
                width = max(width, len(prompts[end]))
                end += 1
            batch = torch.zeros(end - start, width, dtype=torch.long)
            for row, prompt in enumerate(prompts[start:end]):
                batch[row, :len(prompt)] = torch.tensor(prompt)
            lengths = torch.tensor([len(p) for p in prompts[start:end]], device=self.device)
            active = torch.tensor(slots[start:end], device=self.device)
            self.cache.lengths[active] = 0
            self.cache.bind(active)
            out = self.model(batch.to(self.device), cache=self.cache)
            logits.append(out[torch.arange(end - start, device=self.device), lengths - 1].float())
            self.cache.advance(lengths)
            start = end
        return torch.cat(logits)

    def _accept(self, completion: Completion, token: int, params: SamplingParams) -> bool:
        """Append the token; True when the request is finished."""
        completion.tokens.append(token)
        if token in params.stop_ids:
            completion.finish_reason = "stop"
            return True
        if params.stop_strings:
            tail = self.tokenizer.decode(completion.tokens[-16:])
            if any(s in tail for s in params.stop_strings):
                completion.finish_reason = "stop"
                return True
        return len(completion.tokens) >= params.max_new_tokens

    @staticmethod
    def _truncate(text: str, params: SamplingParams) -> str:
        cut = min((text.index(s) + len(s) for s in params.stop_strings if s in text), default=len(text))
        return text[:cut]

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> list[int]:
        """logits (B, V) float32, one CPU generator per row -> one token id per row. The filtering runs batched on
        the logits' device; the draws run on the CPU from each request's own generator (one transfer per step),
        so a request's tokens depend only on its seed, not on its batch or device."""
        if params.temperature <= 0:
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
        return [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs, generators, strict=True)]


class DecodeGraphs:
    """Decode steps of fixed batch sizes (powers of two up to max_batch) in static shapes: the input tokens and
    slots live in fixed buffers, a smaller batch is padded with rows on the cache's scratch slot (the last one),
    and attention spans the whole cache. On CUDA each size is captured once in a CUDA graph and replayed; on
    other devices the same padded forward runs eagerly (how the CPU tests check it)."""

    def __init__(self, model: DeepSeekV3, cache: LatentKVCache, max_batch: int):
        self.model, self.cache = model, cache
        self.scratch = cache.lengths.shape[0] - 1
        self.sizes = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        device = cache.lengths.device
        self.tokens = {b: torch.zeros(b, 1, dtype=torch.long, device=device) for b in self.sizes}
        self.slots = {b: torch.full((b,), self.scratch, dtype=torch.long, device=device) for b in self.sizes}
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if device.type == "cuda":
            try:
                self._capture()
            except RuntimeError as e:  # e.g. an op that syncs with the host (the grouped GEMM's fp32 fallback)
                self.graphs.clear()
                warnings.warn(f"decode steps could not be captured in CUDA graphs, running them eagerly: {e}",
                              stacklevel=3)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.tokens[size], cache=self.cache.bind(self.slots[size]))[:, -1].float()

    @torch.no_grad()
    def _capture(self) -> None:
        self.cache.static_span = True
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, library workspaces
                for size in self.sizes:
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            pool = None
            for size in reversed(self.sizes):  # the largest first, so the smaller ones reuse its memory pool
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self._forward(size)
                self.graphs[size], pool = graph, graph.pool()
        finally:
            self.cache.static_span = False

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, slots (B,) -> logits (B, V); the caller advances the slots."""
        n = tokens.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.tokens[size][:n, 0].copy_(tokens)
        self.tokens[size][n:] = 0
        self.slots[size][:n].copy_(slots)
        self.slots[size][n:] = self.scratch
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:n].clone()
        self.cache.static_span = True
        try:
            return self._forward(size)[:n]
        finally:
            self.cache.static_span = False
