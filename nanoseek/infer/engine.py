"""The generation engine: requests in, tokens out, one step at a time.

`add_request` queues a request; each `step` decodes one token for every running request in one batched forward,
then prefills waiting requests into the free cache slots, and reports which requests got which token and which
finished. A finished or aborted request frees its slot at once for the next waiting one. The running requests
always hold the first cache slots (a finished request's slot takes over the last running one's cache rows), so a
forward reads its rows of the cache as one view rather than gathering them. Each request samples
from its own generator, seeded with its params.seed, so its output does not depend on what it is batched with.
`generate` and `stream` are short loops over add_request/step; a server or an RL rollout can drive the same three
calls (and `abort`) itself. (generate and stream call step themselves: a loop of your own over step does not see
the outputs of the steps they run.) The model runs in eval mode for the engine's forwards, whatever mode it is
left in.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.fx.experimental import _config as shape_config

from nanoseek.errors import NanoseekError
from nanoseek.infer.cache import SlotCache, make_cache
from nanoseek.infer.sampling import Completion, SamplingParams, append_token, cut_after_stop, sample
from nanoseek.infer.speculative import MTPSpeculator
from nanoseek.model import DeepSeekV3

if TYPE_CHECKING:
    from nanoseek.data.tokenizer import Tokenizer

__all__ = ["Completion", "DecodeGraphs", "Engine", "EngineError", "SamplingParams", "StepOutput", "eval_mode"]


class EngineError(NanoseekError, ValueError):
    """A request the engine cannot run; the message names the limit and how to get within it."""


@dataclass(slots=True)
class StepOutput:
    """What one step gave one request."""

    request_id: int
    new_tokens: list[int]  # sampled in this step (one token: from the prefill, then one per decode)
    completion: Completion | None = None  # the whole result (tokens, finish_reason, text), once it finished

    @property
    def finished(self) -> bool:
        return self.completion is not None

    @property
    def finish_reason(self) -> str | None:
        return None if self.completion is None else self.completion.finish_reason


@dataclass(eq=False, slots=True)
class _Request:
    id: int
    params: SamplingParams
    generator: torch.Generator  # CPU, seeded once: the request's draws
    completion: Completion
    slot: int | None = None  # its cache slot, while running
    finished: bool = False
    thought: bool = False  # the completion has closed the thinking (params.end_think_ids): no budget to enforce


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; a model that was training is put back in training mode after."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


def _decode_step(model: DeepSeekV3, cache: SlotCache, tokens: torch.Tensor, span: int) -> torch.Tensor:
    """One decode forward of the first B slots: tokens (B,) -> next-token logits (B, V) float32 (the caller
    advances the slots). The span comes from the host, so nothing is read back from the cache's lengths; the same
    function runs eagerly or compiled (compile_decode: two graphs, batch 1 and the rest, for every size and span)."""
    return model(tokens[:, None], cache=cache.leading(tokens.shape[0], span))[:, -1].float()


class Engine:
    """static_decode: decode in fixed shapes (batch padded to a power of two, attention over the whole cache
    length), which on CUDA are captured once per size in CUDA graphs and replayed, removing the per-kernel launch
    cost that dominates small-batch decoding. Default: on for CUDA.

    compile_decode: run each decode step as one torch.compile'd graph (Inductor fuses the norms, RoPE, routing and
    softmax around the GEMMs, the grouped experts and the cache writes, which stay library calls), compiled in the
    first steps: one graph for batch 1, one for every other batch size and span. For the CPU, where a step's
    hundreds of small ops cost more in dispatch than in arithmetic. The same tokens as the eager step (tested).
    Default: off (the compilation takes 20-40 s); CPU only, not with static_decode."""

    def __init__(self, model: DeepSeekV3, max_batch: int = 32, max_len: int | None = None,
                 tokenizer: Tokenizer | None = None, static_decode: bool | None = None,
                 compile_decode: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device = param.device
        max_len = max_len or min(model.config.max_position_embeddings, 4096)
        static = self.device.type == "cuda" if static_decode is None else static_decode
        # A static decode pads its batch with rows that write into one extra scratch slot, never a request's.
        # The cache is the model's kind: MLA's latent cache, or a dense student's key/value cache.
        self.cache = make_cache(model.config, max_batch + static, max_len, self.device, param.dtype)
        self.max_batch = max_batch
        if compile_decode and self.device.type != "cpu":
            raise EngineError(f"compile_decode is for the CPU; on {self.device.type} decode with static_decode "
                              "(CUDA graphs, the default on CUDA)")
        if compile_decode and static:
            raise EngineError("compile_decode and static_decode are two ways to fix the decode step: choose one")
        self._compiled = compile_decode
        self._decode_step = torch.compile(_decode_step, dynamic=True, fullgraph=True) if compile_decode else _decode_step
        with eval_mode(model):  # CUDA graphs record the forward of the mode they are captured in
            self._decode_graphs = DecodeGraphs(model, self.cache, max_batch) if static else None
        self._speculator: MTPSpeculator | None = None  # made on the first speculative request
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # slot -> request; always the slots 0 .. len - 1
        self._unfinished: dict[int, _Request] = {}  # id -> request, waiting or running, in arrival order
        self._next_id = 0

    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request, sampling from a generator seeded with params.seed -> its id. It joins the running batch
        at the next step with a free slot. Raises EngineError when it cannot fit the cache."""
        params = params or SamplingParams()
        self._check(prompt, params, "the prompt")
        return self._enqueue(prompt, params, params.seed).id

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise the EngineError that add_request would raise for this request, without queueing it."""
        self._check(prompt, params, "the prompt")

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Decode one token for every running request in one batched forward, then prefill waiting requests into
        the free slots (their first token) -> one StepOutput per request that got a token (none when idle)."""
        outputs: list[StepOutput] = []
        with eval_mode(self.model):
            if self._running:
                batch = [self._running[slot] for slot in range(len(self._running))]
                # The longest row after this step: each row holds its prompt and all its tokens but the last.
                span = max(len(r.completion.prompt) + len(r.completion.tokens) for r in batch)
                logits = self._decode(torch.tensor([r.completion.tokens[-1] for r in batch]), span)
                outputs = self._take(batch, logits)
            admitted = []
            while self._waiting and len(self._running) < self.max_batch:
                request = self._waiting.popleft()
                request.slot = len(self._running)
                self._running[request.slot] = request
                admitted.append(request)
            if admitted:
                logits = self._prefill([r.slot for r in admitted], [r.completion.prompt for r in admitted])
                outputs += self._take(admitted, logits)
        return outputs

    def abort(self, request_id: int) -> bool:
        """Stop a waiting or running request now, freeing its cache slot; it produces nothing more, and its
        completion keeps the tokens so far with finish_reason "abort". -> True when it stopped one; an id that is
        not unfinished (finished, aborted already, or never issued) is a no-op that returns False."""
        request = self._unfinished.get(request_id)
        if request is None:
            return False
        request.completion.finish_reason = "abort"
        self._finish(request)
        return True

    @property
    def unfinished(self) -> list[int]:
        """The ids of the waiting and running requests, in arrival order."""
        return list(self._unfinished)

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 on_step: Callable[[list[StepOutput]], None] | None = None) -> list[Completion]:
        """Run the prompts to the end -> their completions, in order; request i samples from a generator seeded
        with params.seed + i. Steps the engine, so requests queued before advance (and may finish) meanwhile.
        on_step: called with each step's outputs (a progress bar, say)."""
        params = params or SamplingParams()
        for i, prompt in enumerate(prompts):
            self._check(prompt, params, f"prompt {i}")
        requests = [self._enqueue(prompt, params, params.seed + i) for i, prompt in enumerate(prompts)]
        with eval_mode(self.model):  # once for the whole loop rather than per step
            for request in requests:
                while not request.finished:
                    outputs = self.step()
                    if on_step is not None:
                        on_step(outputs)
        return [r.completion for r in requests]

    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """One request, token by token as they are sampled. It holds a slot of its own, so several streams can be
        consumed alternately (each steps the engine when it has nothing to yield); closing a stream early aborts
        its request."""
        params = params or SamplingParams()
        self._check(prompt, params, "the prompt")
        request = self._enqueue(prompt, params, params.seed)
        tokens, emitted = request.completion.tokens, 0
        try:
            while emitted < len(tokens) or not request.finished:
                if emitted == len(tokens):
                    self.step()
                else:
                    emitted += 1
                    yield tokens[emitted - 1]
        finally:
            self.abort(request.id)

    def generate_speculative(self, prompt: list[int], params: SamplingParams | None = None
                             ) -> tuple[Completion, dict[str, float]]:
        """Greedy decoding of one request where the MTP module drafts the next token and the main model checks it
        in the same forward as the pending one (speculative.MTPSpeculator); the output equals plain greedy decoding
        token for token. Runs at once, in a slot that is free -> (completion, acceptance stats)."""
        params = params or SamplingParams()
        if params.temperature > 0:
            raise EngineError("speculative decoding is greedy here: use temperature 0")
        if not self.model.mtp:
            raise EngineError("speculative decoding drafts with the MTP module; this model has none "
                              "(num_nextn_predict_layers = 0)")
        self._check(prompt, params, "the prompt", draft_tokens=1)
        if len(self._running) == self.max_batch:
            raise EngineError(f"speculative decoding needs a free cache slot; all {self.max_batch} hold running "
                              "requests")
        if self._speculator is None:
            self._speculator = MTPSpeculator(self.model, self.cache)
        with eval_mode(self.model):
            return self._speculator.generate(prompt, params, len(self._running), self.tokenizer)

    def _check(self, prompt: list[int], params: SamplingParams, name: str, draft_tokens: int = 0) -> None:
        if params.stop_strings and self.tokenizer is None:
            raise EngineError("stop_strings need an Engine built with a tokenizer (Engine(..., tokenizer=...))")
        if not prompt:
            raise EngineError(f"{name} is empty: a request needs at least one token (e.g. the bos token)")
        needed = len(prompt) + params.max_new_tokens + draft_tokens
        if needed > self.cache.max_len:
            draft = f" + {draft_tokens} draft token" if draft_tokens else ""
            raise EngineError(f"{name} has {len(prompt)} tokens + max_new_tokens {params.max_new_tokens}{draft} = "
                              f"{needed} > the cache's {self.cache.max_len} tokens per sequence; raise the engine's "
                              "max_len (--max-len) or shorten the prompt")

    def _enqueue(self, prompt: list[int], params: SamplingParams, seed: int) -> _Request:
        request = _Request(self._next_id, params, torch.Generator().manual_seed(seed), Completion(list(prompt)))
        self._next_id += 1
        self._unfinished[request.id] = request
        self._waiting.append(request)
        return request

    def _take(self, requests: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        """Sample each request's next token from its row of logits (B, V); finish the requests that stop."""
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        outputs = []
        for request, token in zip(requests, tokens, strict=True):
            token = self._budget_token(request, token)
            finished = append_token(request.completion, token, request.params, self.tokenizer)
            if finished:
                self._finish(request)
            outputs.append(StepOutput(request.id, [token], request.completion if finished else None))
        return outputs

    @staticmethod
    def _budget_token(request: _Request, token: int) -> int:
        """The sampled token, or the next token of </think> once the reasoning has used its thinking_budget."""
        params, tokens = request.params, request.completion.tokens
        if params.thinking_budget is None or request.thought:
            return token
        if len(tokens) >= params.thinking_budget:
            token = params.end_think_ids[len(tokens) - params.thinking_budget]
        end = params.end_think_ids
        request.thought = (*tokens[max(0, len(tokens) + 1 - len(end)):], token) == end
        return token

    def _finish(self, request: _Request) -> None:
        """Take a request out of the queue or its slot (freed for the next waiting one); decode its text."""
        if request.slot is None:
            self._waiting.remove(request)
        else:
            last = len(self._running) - 1
            if request.slot != last:  # the last running request moves into the freed slot: no gaps
                moved = self._running.pop(last)
                self.cache.move(last, request.slot)
                moved.slot = request.slot
                self._running[request.slot] = moved
            else:
                del self._running[last]
                self.cache.reset(last)
            request.slot = None
        del self._unfinished[request.id]
        request.finished = True
        if self.tokenizer is not None:
            request.completion.text = cut_after_stop(self.tokenizer.decode(request.completion.tokens),
                                                     request.params)

    def _decode(self, tokens: torch.Tensor, span: int) -> torch.Tensor:
        """One token (B,) for each of the first B slots, span the longest row's length after it -> next-token
        logits (B, V) float32; the slots advance."""
        tokens, slots = tokens.to(self.device), range(len(tokens))
        if self._decode_graphs is not None:
            logits = self._decode_graphs(tokens, torch.arange(len(tokens), device=self.device))
        elif self._compiled:
            # Two graphs in all: batch 1 and every other size. Without duck shaping, because it would tie the batch
            # to the cache's slot count when they first happen to be equal and compile again when the batch shrinks.
            with shape_config.patch(use_duck_shape=False):
                logits = self._decode_step(self.model, self.cache, tokens, span)
        else:
            logits = self._decode_step(self.model, self.cache, tokens, span)
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
            self.cache.bind(slots[start:end]).lengths[self.cache.rows] = 0
            out = self.model(batch.to(self.device), cache=self.cache)
            logits.append(out[torch.arange(end - start, device=self.device), lengths - 1].float())
            self.cache.advance(lengths)
            start = end
        return torch.cat(logits)


class DecodeGraphs:
    """Decode steps of fixed batch sizes (powers of two up to max_batch) in static shapes: the input tokens and
    slots live in fixed buffers, a smaller batch is padded with rows on the cache's scratch slot (the last one),
    and attention spans the whole cache. On CUDA each size is captured once in a CUDA graph and replayed; on
    other devices the same padded forward runs eagerly (how the CPU tests check it)."""

    def __init__(self, model: DeepSeekV3, cache: SlotCache, max_batch: int):
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
