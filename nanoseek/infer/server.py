"""`nanoseek serve`: an OpenAI-compatible HTTP server over the engine, and a web chat page.

One thread drives the engine (`EngineRunner`): requests and aborts reach it through a command queue, and it steps
the engine while any request is unfinished, so a request that arrives while others decode joins the running batch
at the next step. Each step's tokens go back to the asyncio loop, into one queue per HTTP request; the loop never
waits on a forward.

The endpoints follow OpenAI's API as DeepSeek's `deepseek-reasoner` extends it: a chat completion carries the chain
of thought in `reasoning_content` (the text up to `</think>`, also when the prompt template opened `<think>` itself)
and the answer in `content`; a streamed delta carries one or the other, never both. Extensions: `thinking_budget`
(a cap on the reasoning tokens, after which the engine appends `</think>` and the model answers; `reasoning_effort`
low/medium/high caps it at 1/4, 1/2, 3/4 of the request's max_tokens) and `top_k`.
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with status 400 for bad input
(FastAPI's 422 included), 401 for a wrong API key, 404 for an unknown model, 429 when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanoseek.data.tokenizer import END_THINK, THINK, Tokenizer
from nanoseek.infer.chat import TEMPLATES, IncrementalDecoder, encode_prompt, opens_thinking, split_reasoning
from nanoseek.infer.engine import Engine, EngineError, SamplingParams, StepOutput

STATIC = Path(__file__).parent / "static"
EFFORT_SHARE = {"low": 0.25, "medium": 0.5, "high": 0.75}  # reasoning_effort -> the thinking cap, of max_tokens
MAX_N = 16  # choices per request


@dataclass
class ServerSettings:
    """What a request gets when it does not say, and the server's limits."""

    model_name: str  # the name /v1/models lists; a request naming another model gets 404
    template: str = "question"  # how chat messages become a prompt (infer.chat.TEMPLATES)
    max_tokens: int = 256  # a request's max_tokens by default (less when the prompt leaves less room in the cache)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0  # the i-th request without a seed samples with seed + i
    stop: tuple[str, ...] = ()  # stop strings added to every request's
    thinking_budget: int | None = None  # the reasoning cap of a request that sets none (None: no cap)
    max_queue: int = 64  # requests that may wait for a cache slot; one more answers 429
    api_key: str | None = None  # when set, /v1/ requires `Authorization: Bearer <api_key>`

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose one of {', '.join(TEMPLATES)}")


# ---------------------------------------------------------------------- errors in OpenAI's shape
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's 422 -> OpenAI's 400, naming the first bad field and what is wrong with it."""
    first = e.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    return APIError(400, f"{param or 'the request body'}: {first.get('msg', 'invalid')}", param=param,
                    code=first.get("type"))


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)  # unknown fields (logprobs, user, ...) are ignored


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # an earlier reply's reasoning (the templates drop it from the history)

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class StreamOptions(_Body):
    include_usage: bool = False


Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
StopText = Annotated[str, Field(min_length=1)]


class _Sampling(_Body):
    model: str | None = Field(None, description="the served model's name (see /v1/models); none: that model")
    max_tokens: int | None = Field(None, ge=1, description="tokens generated at most, reasoning included")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="nanoseek extension: keep the k most likely tokens (0: all)")
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate")
    stop: StopText | list[StopText] | None = Field(None, description="up to 4 strings that end the text (not "
                                                                     "included in it)")
    seed: Seed | None = Field(None, description="sampling seed: the same seed and request give the same reply")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(stops)}", param="stop")
        return stops


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens by its newer name")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="caps the reasoning at 1/4, 1/2 or 3/4 of max_tokens")
    thinking_budget: int | None = Field(None, ge=0, description="nanoseek extension: reasoning tokens at most; "
                                                                "then </think> is appended and the model answers")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="the text to continue (a list: one completion each)")


# ---------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics of one server, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanoseek_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens", "prompt tokens of the admitted requests", registry=r)
        self.generated_tokens = Counter("nanoseek_generated_tokens", "tokens generated", registry=r)
        self.running = Gauge("nanoseek_requests_running", "sequences decoding (holding a cache slot)", registry=r)
        self.waiting = Gauge("nanoseek_requests_waiting", "sequences waiting for a cache slot (the queue)",
                             registry=r)
        self.batch_max = Gauge("nanoseek_batch_size_max", "the largest batch one engine step has run", registry=r)
        self.tokens_per_second = Gauge("nanoseek_generated_tokens_per_second",
                                       "tokens generated per second over the last 10 seconds", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds",
                              "seconds from a request's arrival to its first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s of steps
        self.now_running = self.now_waiting = self.largest_batch = 0  # the gauges' values, for /health

    def step(self, tokens: int, running: int, waiting: int) -> None:
        now = time.monotonic()
        self.generated_tokens.inc(tokens)
        self.now_running, self.now_waiting = running, waiting
        self.running.set(running)
        self.waiting.set(waiting)
        self.largest_batch = max(self.largest_batch, tokens)
        self.batch_max.set(self.largest_batch)
        self._recent.append((now, tokens))
        while now - self._recent[0][0] > 10:
            self._recent.popleft()
        span = now - self._recent[0][0]
        self.tokens_per_second.set(sum(n for _, n in self._recent) / span if span > 0 else 0.0)


# ---------------------------------------------------------------------- the engine's thread
@dataclass(eq=False)
class Ticket:
    """One sequence for the engine: its prompt and params, and where its step outputs go (on the asyncio loop)."""

    prompt: list[int]
    params: SamplingParams
    index: int  # the choice it is
    sink: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    id: int | None = None  # the engine's request id, once added (set by the engine's thread)
    finished: bool = False  # finished, failed or aborted (set by the loop's thread)


class EngineRunner:
    """Steps the engine in a thread of its own while any request is unfinished (blocked, not polling, when idle).
    submit/abort may be called from any thread; the outputs of a step are put in their tickets' sinks by the loop's
    thread. A step that raises fails its requests (their sinks get the exception) and the server goes on."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.error: str | None = None  # the last step failure, for /health
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}  # engine id -> ticket; the engine thread's own
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def submit(self, ticket: Ticket) -> None:
        self._commands.put(("add", ticket))

    def abort(self, ticket: Ticket) -> None:
        self._commands.put(("abort", ticket))

    def stop(self) -> None:
        """Finish the unfinished requests, then end the thread."""
        self._commands.put(("stop", None))
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not (stopping and not self.engine.has_unfinished()):
            commands = [] if self.engine.has_unfinished() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for kind, ticket in commands:
                if kind == "stop":
                    stopping = True
                elif kind == "add":
                    self._add(ticket)
                elif ticket.id is not None and self._tickets.pop(ticket.id, None) is not None:
                    self.engine.abort(ticket.id)
            if self.engine.has_unfinished():
                self._step()
        self._publish([])

    def _add(self, ticket: Ticket) -> None:
        try:
            ticket.id = self.engine.add_request(ticket.prompt, ticket.params)
        except EngineError as e:
            self._loop.call_soon_threadsafe(ticket.sink.put_nowait, (ticket.index, e))
            return
        self._tickets[ticket.id] = ticket
        self.metrics.prompt_tokens.inc(len(ticket.prompt))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the server
            self.error = f"{type(e).__name__}: {e}"
            failed = list(self._tickets.values())
            for ticket in failed:
                self.engine.abort(ticket.id)
            self._tickets.clear()
            self._loop.call_soon_threadsafe(_put_all, [(t, e) for t in failed])
            return
        self.error = None
        self._publish(outputs)

    def _publish(self, outputs: list[StepOutput]) -> None:
        items = []
        for output in outputs:
            ticket = self._tickets.get(output.request_id)
            if ticket is not None:
                items.append((ticket, output))
                if output.finished:
                    del self._tickets[output.request_id]
        unfinished = len(self.engine.unfinished)
        running = min(unfinished, self.engine.max_batch)
        self.metrics.step(len(outputs), running, unfinished - running)
        if items:
            self._loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Ticket, StepOutput | Exception]]) -> None:
    for ticket, item in items:
        ticket.sink.put_nowait((ticket.index, item))


# ---------------------------------------------------------------------- text of a reply
class ReplyText:
    """One choice's text as its tokens arrive -> its fields so far: for a chat reply (thinking True or False: whether
    the prompt opened <think>) `reasoning_content` up to </think> and `content` after it, split as split_reasoning
    splits a whole reply; for a text completion (thinking None) `text`. The text ends before the first stop string.
    Until the end, text that may yet become </think>, <think> or a stop string is held back (and split_reasoning's
    strip holds back trailing whitespace), so each field only grows and the growth is what a delta sends."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, thinking: bool | None):
        self.params, self.thinking = params, thinking
        self.decoder = IncrementalDecoder(tokenizer)
        self.text = ""
        self.sent: dict[str, str] = {}
        self.markers = params.stop_strings + ((THINK, END_THINK) if thinking is not None else ())

    def feed(self, tokens: list[int], final: bool) -> list[tuple[str, str]]:
        """Add a step's tokens (final: the reply ended) -> the new text of each field that grew, in order."""
        for token in tokens:
            if token not in self.params.stop_ids:
                self.text += self.decoder.push(token)
        if final:  # a character the last token left incomplete shows as U+FFFD
            self.text += self.decoder.flush()
        pieces = []
        for name, value in self.fields(final).items():
            before = self.sent.get(name, "")
            if len(value) > len(before):
                pieces.append((name, value[len(before):]))
                self.sent[name] = value
        return pieces

    def fields(self, final: bool) -> dict[str, str]:
        text = self.text
        stops = [text.index(s) for s in self.params.stop_strings if s in text]
        if stops:
            text = text[:min(stops)]
        elif not final:
            held = max((k for m in self.markers for k in range(1, min(len(m), len(text) + 1))
                        if text.endswith(m[:k])), default=0)
            text = text[:len(text) - held]
        if self.thinking is None:
            return {"text": text}
        if self.has_reasoning:
            reasoning, content = split_reasoning(text, True)
        else:  # no reasoning: a </think> in the answer is answer text
            reasoning, content = "", text.strip()
        return {"reasoning_content": reasoning, "content": content}

    @property
    def has_reasoning(self) -> bool:
        return bool(self.thinking) or self.text.lstrip().startswith(THINK)

    def reasoning_tokens(self, end_think: tuple[int, ...]) -> int:
        """The tokens before the reply's first </think> (all of them when it never closed the thinking)."""
        if not self.has_reasoning:
            return 0
        tokens, n = self.decoder.tokens, len(end_think)
        return next((i for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) == end_think), len(tokens))


# ---------------------------------------------------------------------- the app
class Server:
    """The FastAPI app over one engine (`Server(...).app`)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, settings: ServerSettings):
        if engine.tokenizer is None:
            raise ValueError("the server's engine needs its tokenizer (Engine(..., tokenizer=...)) for stop strings")
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.metrics = Metrics()
        self.runner = EngineRunner(engine, self.metrics)
        self.end_think = tuple(tokenizer.encode(END_THINK))
        self.in_flight = 0  # sequences submitted and not yet finished or aborted
        self.created = int(time.time())
        self._requests_without_seed = 0
        self.app = self._build()

    # ------------------------------------------------------------------ routes
    def _build(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.runner.start(asyncio.get_running_loop())
            yield
            await asyncio.to_thread(self.runner.stop)

        app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                      description="OpenAI-compatible API with the reasoning in `reasoning_content`")
        app.add_exception_handler(APIError, lambda request, e: self._error(request, e))
        app.add_exception_handler(RequestValidationError,
                                  lambda request, e: self._error(request, _validation_error(e)))
        app.add_exception_handler(HTTPException, lambda request, e: self._error(
            request, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              code="not_found" if e.status_code == 404 else None)))

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatRequest, request: Request) -> Response:
            self._authorize(request)
            return await self._chat(body, request)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            self._authorize(request)
            return await self._completions(body, request)

        @app.get("/v1/models")
        async def models(request: Request) -> dict:
            self._authorize(request)
            return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model",
                                                "created": self.created, "owned_by": "nanoseek",
                                                "max_model_len": self.engine.cache.max_len}]}

        @app.get("/health")
        async def health() -> JSONResponse:
            status = {"status": "error" if self.runner.error else "ok", "running": self.metrics.now_running,
                      "waiting": self.metrics.now_waiting, "in_flight": self.in_flight}
            if self.runner.error:
                status["error"] = self.runner.error
            return JSONResponse(status, status_code=503 if self.runner.error else 200)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html")

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        return app

    def _error(self, request: Request, e: APIError) -> JSONResponse:
        self._count(request, e.status)
        return e.response()

    def _count(self, request: Request, status: int) -> None:
        route = request.scope.get("route")
        self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), key.encode())):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>` with the key the "
                                "server was started with (--api-key)", code="invalid_api_key")

    # ------------------------------------------------------------------ requests -> engine params
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.settings.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def _params(self, body: _Sampling, prompt: list[int], max_tokens: int | None,
                thinking_budget: int | None = None) -> list[SamplingParams]:
        """The engine params of each of the body's n choices; a request that cannot fit answers 400 or 429."""
        s = self.settings
        if self.in_flight + body.n > self.engine.max_batch + s.max_queue:
            raise APIError(429, f"the server is full: {self.in_flight} sequences are running or waiting, the limit "
                                f"is {self.engine.max_batch} running (--max-batch) + {s.max_queue} waiting "
                                "(--max-queue); retry later", type="rate_limit_error", code="queue_full")
        if max_tokens is None:  # the default, within the room the prompt leaves in the cache
            max_tokens = min(s.max_tokens, max(1, self.engine.cache.max_len - len(prompt)))
        if body.seed is None:
            seed = s.seed + self._requests_without_seed
            self._requests_without_seed += body.n
        else:
            seed = body.seed
        base = SamplingParams(
            max_new_tokens=max_tokens, temperature=s.temperature if body.temperature is None else body.temperature,
            top_p=s.top_p if body.top_p is None else body.top_p, top_k=s.top_k if body.top_k is None else body.top_k,
            stop_ids=self.tokenizer.stop_ids, stop_strings=body.stops() + s.stop, seed=seed,
            thinking_budget=thinking_budget, end_think_ids=self.end_think if thinking_budget is not None else ())
        try:
            self.engine.check(prompt, base)
        except EngineError as e:
            raise APIError(400, str(e), param="max_tokens" if len(prompt) < self.engine.cache.max_len else "messages",
                           code="context_length_exceeded") from None
        return [SamplingParams(**{**base.__dict__, "seed": seed + i}) for i in range(body.n)]

    async def _chat(self, body: ChatRequest, request: Request) -> Response:
        self._check_model(body.model)
        messages = [m.as_dict() for m in body.messages]
        try:
            prompt = encode_prompt(self.tokenizer, messages, self.settings.template)
            thinking = opens_thinking(messages, self.settings.template, self.tokenizer)
        except (ValueError, TemplateError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        budget = body.thinking_budget
        if budget is None and body.reasoning_effort is not None:
            limit = max_tokens or self.settings.max_tokens
            budget = int(EFFORT_SHARE[body.reasoning_effort] * limit)
        if budget is None:
            budget = self.settings.thinking_budget
        params = self._params(body, prompt, max_tokens, budget if thinking else None)
        return await self._respond(request, body, prompt, params, thinking, "chat.completion")

    async def _completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt: one prompt per request here, got {len(prompts)} (use n for more "
                                "completions of it)", param="prompt")
        prompt = self.tokenizer.encode(prompts[0], bos=True)
        params = self._params(body, prompt, body.max_tokens)
        return await self._respond(request, body, prompt, params, None, "text_completion")

    # ------------------------------------------------------------------ running a request
    async def _respond(self, request: Request, body: _Sampling, prompt: list[int], params: list[SamplingParams],
                       thinking: bool | None, kind: str) -> Response:
        sink: asyncio.Queue = asyncio.Queue()
        tickets = [Ticket(prompt, p, i, sink) for i, p in enumerate(params)]
        replies = [ReplyText(self.tokenizer, p, thinking) for p in params]
        self.in_flight += len(tickets)
        for ticket in tickets:
            self.runner.submit(ticket)
        head = {"id": f"{'chatcmpl' if thinking is not None else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self.settings.model_name}
        events = self._events(tickets, replies)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            self._count(request, 200)
            return StreamingResponse(self._sse(events, tickets, replies, head, kind, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = [{"index": i, "finish_reason": None, "logprobs": None} for i in range(len(tickets))]
        try:
            async for index, pieces, finish in self._until_disconnected(events, request):
                if finish is not None:
                    choices[index]["finish_reason"] = finish
        finally:
            self._release(tickets)
        for choice, reply in zip(choices, replies, strict=True):
            if thinking is None:
                choice["text"] = reply.sent.get("text", "")
            else:
                choice["message"] = {"role": "assistant", "content": reply.sent.get("content", ""),
                                     "reasoning_content": reply.sent.get("reasoning_content", "")
                                     if reply.has_reasoning else None}
        self._count(request, 200)
        return JSONResponse({**head, "object": kind, "choices": choices,
                             "usage": self._usage(prompt, replies, thinking)})

    async def _events(self, tickets: list[Ticket], replies: list[ReplyText]
                      ) -> AsyncIterator[tuple[int, list[tuple[str, str]], str | None]]:
        """-> (choice, its new pieces of text, its finish_reason once finished) as the engine's steps arrive."""
        sink, left, started = tickets[0].sink, len(tickets), set()
        while left:
            index, item = await sink.get()
            ticket = tickets[index]
            finish = item.finish_reason if isinstance(item, StepOutput) else "error"
            if finish is not None:
                left -= 1
                ticket.finished = True
                self.in_flight -= 1
            if isinstance(item, EngineError):
                raise APIError(400, str(item), code="context_length_exceeded")
            if isinstance(item, Exception):
                raise APIError(500, f"the engine failed: {type(item).__name__}: {item}", type="server_error")
            if index not in started:
                started.add(index)
                self.metrics.ttft.observe(time.monotonic() - ticket.submitted)
            yield index, replies[index].feed(item.new_tokens, finish is not None), finish

    async def _until_disconnected(self, events: AsyncIterator, request: Request, every: float = 0.25
                                  ) -> AsyncIterator:
        """The events, stopping early when the client has gone (checked at least every `every` seconds)."""
        waiting = asyncio.ensure_future(anext(events, None))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=every)
                if not done:
                    if await request.is_disconnected():
                        return
                    continue
                event = waiting.result()
                if event is None:
                    return
                yield event
                waiting = asyncio.ensure_future(anext(events, None))
        finally:
            waiting.cancel()

    def _release(self, tickets: list[Ticket]) -> None:
        """Abort the tickets that have not finished (their client left), freeing their cache slots."""
        for ticket in tickets:
            if not ticket.finished:
                ticket.finished = True
                self.in_flight -= 1
                self.runner.abort(ticket)

    async def _sse(self, events: AsyncIterator, tickets: list[Ticket], replies: list[ReplyText], head: dict,
                   kind: str, usage: bool) -> AsyncIterator[str]:
        chunk_kind = f"{kind}.chunk" if kind == "chat.completion" else kind
        chat = kind == "chat.completion"

        def chunk(index: int, delta: dict | None, finish: str | None, text: str = "") -> str:
            choice = {"index": index, "delta": delta} if chat else {"index": index, "text": text}
            choice.update(logprobs=None, finish_reason=finish)
            return _sse_line({**head, "object": chunk_kind, "choices": [choice]})

        try:
            if chat:
                for ticket in tickets:
                    yield chunk(ticket.index, {"role": "assistant", "content": ""}, None)
            async for index, pieces, finish in events:
                for name, text in pieces:
                    yield chunk(index, {name: text}, None) if chat else chunk(index, None, None, text)
                if finish is not None:
                    yield chunk(index, {}, finish) if chat else chunk(index, None, finish)
            if usage:
                yield _sse_line({**head, "object": chunk_kind, "choices": [],
                                 "usage": self._usage(tickets[0].prompt, replies, True if chat else None)})
            yield "data: [DONE]\n\n"
        except APIError as e:  # after the headers: the error goes in the stream, as OpenAI's does
            yield _sse_line({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        finally:
            self._release(tickets)

    def _usage(self, prompt: list[int], replies: list[ReplyText], thinking: bool | None) -> dict:
        completion = sum(len(r.decoder.tokens) for r in replies)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": completion,
                 "total_tokens": len(prompt) + completion}
        if thinking is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(r.reasoning_tokens(self.end_think)
                                                                          for r in replies)}
        return usage


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def run_server(server: Server, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; running requests are finished (drained) before it returns."""
    import uvicorn

    uvicorn.run(server.app, host=host, port=port, log_level="info", access_log=False)
