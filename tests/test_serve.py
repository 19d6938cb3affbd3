"""`nanoseek serve`: the OpenAI-compatible server, driven over HTTP (the official `openai` client and raw requests)
against a tiny random model; the expected replies come from running the engine directly."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import Tokenizer, apply_chat_template
from nanoseek.infer.chat import IncrementalDecoder
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.server import ReplyText, Server, ServerSettings
from nanoseek.model import DeepSeekV3

from conftest import tiny_config

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

QUESTION = "What is 1 + 2?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve")
    tokenizer = Tokenizer.train([f"Question: What is {a} + {b}?\n<think>\n{a + b}\n</think>" for a in range(30)
                                 for b in range(30)], 300)
    torch.manual_seed(0)
    nanoseek.save_pretrained(DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size)), path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return nanoseek.from_pretrained(checkpoint), Tokenizer.load(checkpoint)


@dataclass
class Live:
    server: Server
    engine: Engine
    url: str

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)


@contextmanager
def serving(loaded, max_batch: int = 4, max_len: int = 256, **settings):
    """A server in a thread of this process, on a free port."""
    model, tokenizer = loaded
    engine = Engine(model, max_batch=max_batch, max_len=max_len, tokenizer=tokenizer)
    server = Server(engine, tokenizer, ServerSettings(model_name="tiny", **settings))
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live(server, engine, f"http://127.0.0.1:{port}")
    finally:
        uv.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def live(loaded):
    with serving(loaded) as live:
        yield live


def request(url: str, body: dict | None = None, headers: dict | None = None, method: str | None = None):
    """-> (status, parsed JSON body) of a request with the standard library (errors included)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sse_events(url: str, body: dict) -> list:
    """The `data:` payloads of a streamed request, parsed, up to and including "[DONE]"."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        lines = response.read().decode().split("\n\n")
    return [json.loads(p[6:]) if p[6:] != "[DONE]" else "[DONE]" for p in lines if p.startswith("data: ")]


def greedy(loaded, prompt: list[int], n: int) -> list[int]:
    """The oracle: the engine on its own, greedy, to eos or n tokens."""
    model, tokenizer = loaded
    engine = Engine(model, max_batch=1, max_len=len(prompt) + n, tokenizer=tokenizer)
    return engine.generate([prompt], SamplingParams(max_new_tokens=n, stop_ids=(tokenizer.eos_id,)))[0].tokens


def without_eos(tokens: list[int], tokenizer: Tokenizer) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens


def is_error(body: dict, words: str) -> bool:
    """OpenAI's error shape, with the message naming what is wrong."""
    error = body.get("error", {})
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], body
    return True


PROMPTS = {  # the prompt each template renders, written out: both open <think>
    "question": lambda tok: tok.encode(f"Question: {QUESTION}\n<think>\n", bos=True),
    "chat": lambda tok: tok.encode(apply_chat_template([{"role": "user", "content": QUESTION}])),
}


@pytest.mark.parametrize("template", ["question", "chat"])
def test_thinking_budget_splits_reasoning_and_answer_as_the_engine_decodes_them(loaded, template):
    _, tok = loaded
    prompt = PROMPTS[template](tok)
    assert tok.decode(prompt).endswith("<think>\n")  # the template pre-fills <think>: the reply has no tag
    budget, max_tokens = 6, 24
    thought = greedy(loaded, prompt, budget)
    assert len(thought) == budget and tok.eos_id not in thought and tok.end_think_id not in thought
    # The oracle of the budget: the model continues the prompt, its reasoning and a </think>.
    answer = greedy(loaded, prompt + thought + [tok.end_think_id], max_tokens - budget - 1)
    reasoning, content = tok.decode(thought).strip(), tok.decode(without_eos(answer, tok)).strip()
    assert content  # a reply to compare, not an empty one

    with serving(loaded, template=template) as live:
        client = live.client()
        kwargs = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
                  "temperature": 0, "extra_body": {"thinking_budget": budget}}
        reply = client.chat.completions.create(**kwargs)
        assert reply.choices[0].message.reasoning_content == reasoning
        assert reply.choices[0].message.content == content
        assert reply.usage.completion_tokens_details.reasoning_tokens == budget
        assert reply.usage.completion_tokens == budget + 1 + len(answer)
        assert reply.choices[0].finish_reason == ("stop" if answer[-1] == tok.eos_id else "length")

        streamed = {"reasoning_content": "", "content": ""}
        finish = None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            delta = chunk.choices[0].delta
            pieces = {k: v for k, v in (("reasoning_content", getattr(delta, "reasoning_content", None)),
                                        ("content", delta.content)) if v}
            assert len(pieces) <= 1, f"a delta carries both: {pieces}"
            for key, text in pieces.items():
                assert not (key == "reasoning_content" and streamed["content"]), "reasoning after the answer"
                streamed[key] += text
            finish = chunk.choices[0].finish_reason or finish
        assert streamed == {"reasoning_content": reasoning, "content": content}
        assert finish == reply.choices[0].finish_reason


def test_a_template_that_opens_no_thinking_gives_content_only(loaded):
    _, tok = loaded
    expected = tok.decode(without_eos(greedy(loaded, tok.encode(QUESTION, bos=True), 12), tok)).strip()
    with serving(loaded, template="raw") as live:
        reply = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                      max_tokens=12, temperature=0)
    message = reply.choices[0].message
    assert message.content == expected and message.reasoning_content is None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_raw_stream_deltas_never_carry_both_fields_and_end_with_done(live):
    events = sse_events(f"{live.url}/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20, "thinking_budget": 5,
        "temperature": 0.9, "seed": 1, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert all(len(d) == 1 for d in deltas[1:-1]), deltas
    kinds = [next(iter(d)) for d in deltas[1:-1]]
    assert kinds == sorted(kinds, key=["reasoning_content", "content"].index)  # the reasoning, then the answer
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == [] and usage["completion_tokens"] == 20
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 5


def test_reasoning_effort_caps_the_thinking_at_a_share_of_max_tokens(live):
    client = live.client()
    for effort, cap in [("low", 8), ("high", 24)]:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=32, temperature=1.0, seed=3, reasoning_effort=effort)
        assert reply.usage.completion_tokens_details.reasoning_tokens <= cap
        # the greedy-free reply of this seed closes its thinking only through the cap
        assert reply.usage.completion_tokens_details.reasoning_tokens == cap


def test_seed_reproduces_a_sampled_reply_and_choice_i_samples_with_seed_plus_i(live):
    client = live.client()

    def reply(seed, n=1):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=16, temperature=1.0, seed=seed, n=n,
                                           extra_body={"thinking_budget": 4})
        return [(c.message.reasoning_content, c.message.content) for c in r.choices]

    first = reply(7)
    assert reply(7) == first and reply(8) != first
    assert reply(7, n=2) == first + reply(8)
    unseeded = [live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=1.0,
    ).choices[0].message.reasoning_content for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # a request without a seed gets a seed of its own


def test_completions_cut_the_text_before_a_stop_string(live, loaded):
    _, tok = loaded
    text = tok.decode(without_eos(greedy(loaded, tok.encode("1 + 2 =", bos=True), 30), tok))
    stop = text[10:12]
    assert len(stop) == 2
    client = live.client()
    full = client.completions.create(model="tiny", prompt="1 + 2 =", max_tokens=30, temperature=0)
    assert full.choices[0].text == text
    cut = client.completions.create(model="tiny", prompt="1 + 2 =", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="1 + 2 =", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_models_health_and_metrics(live):
    status, models = request(f"{live.url}/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    assert request(f"{live.url}/health") == (200, {"status": "ok", "running": 0, "waiting": 0, "in_flight": 0})
    before = metric(live, "nanoseek_time_to_first_token_seconds_count")
    live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert metric(live, "nanoseek_time_to_first_token_seconds_count") == before + 1
    assert metric(live, 'nanoseek_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 1
    assert metric(live, "nanoseek_generated_tokens_total") >= 5


def metric(live: Live, name: str) -> float:
    with urllib.request.urlopen(f"{live.url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /metrics")


def test_requests_that_arrive_while_others_decode_join_the_batch(loaded):
    with serving(loaded, max_len=1024) as live:
        results = []

        def one():
            results.append(live.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=400, temperature=1.0))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        assert len(results) == 3 and all(r.usage.completion_tokens >= 1 for r in results)
        assert metric(live, "nanoseek_batch_size_max") >= 2


def open_stream(live: Live, body: dict, stream: bool = True) -> http.client.HTTPConnection:
    host, port = live.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                       {"Content-Type": "application/json"})
    return connection


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_has_its_request_aborted_and_its_slot_freed(loaded, stream):
    with serving(loaded, max_len=1024) as live:
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1000, "temperature": 1.0}
        connection = open_stream(live, body, stream)
        assert wait_until(lambda: live.engine.unfinished, 10)
        if stream:
            response = connection.getresponse()
            assert response.status == 200 and response.read1(100)
        generated = metric(live, "nanoseek_generated_tokens_total")
        connection.sock.shutdown(2)
        connection.close()
        # 1000 tokens take seconds; the abort frees the slot long before
        assert wait_until(lambda: not live.engine.unfinished and live.server.in_flight == 0, 3)
        assert metric(live, "nanoseek_generated_tokens_total") < generated + 500
        reply = live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3)
        assert reply.usage.completion_tokens == 3  # and the server still answers


def test_a_full_queue_answers_429_naming_the_limit(loaded):
    with serving(loaded, max_batch=1, max_len=1024, max_queue=0) as live:
        connection = open_stream(live, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1000})
        assert wait_until(lambda: live.server.in_flight == 1, 10)
        status, body = request(f"{live.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 429 and is_error(body, "--max-queue") and body["error"]["code"] == "queue_full"
        connection.close()
        assert wait_until(lambda: live.server.in_flight == 0, 5)
        status, _ = request(f"{live.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                "max_tokens": 2})
        assert status == 200


@pytest.mark.parametrize("body, status, words", [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 300}, 400, "> the cache's 256 tokens"),
    ({"messages": [{"role": "user", "content": "x " * 300}]}, 400, "the cache's 256 tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n: "),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    (b"{not json", 400, "JSON"),
])
def test_bad_requests_get_openai_errors_that_name_the_problem(live, body, status, words):
    got, reply = request(f"{live.url}/v1/chat/completions", body)
    assert got == status and is_error(reply, words)


def test_unknown_paths_and_methods_get_openai_errors(live):
    assert request(f"{live.url}/v1/nothing")[0] == 404
    got, reply = request(f"{live.url}/v1/models", {}, method="POST")
    assert got == 405 and is_error(reply, "/v1/models")


def test_an_api_key_is_required_when_set(loaded):
    with serving(loaded, api_key="sesame") as live:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, reply = request(f"{live.url}/v1/chat/completions", body, headers)
            assert status == 401 and is_error(reply, "--api-key")
        with pytest.raises(openai.AuthenticationError):
            live.client("wrong").models.list()
        assert live.client("sesame").models.list().data[0].id == "tiny"
        assert request(f"{live.url}/v1/chat/completions", body, {"Authorization": "Bearer sesame"})[0] == 200
        assert request(f"{live.url}/health")[0] == 200  # open, for load balancers


def test_sigterm_drains_running_requests_before_exit(checkpoint, loaded):
    expected = greedy(loaded, PROMPTS["question"](loaded[1]), 600)
    assert len(expected) > 300  # long enough to be running when the signal comes
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(checkpoint), "--port",
                                str(port), "--max-len", "1024"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        live = Live(None, None, f"http://127.0.0.1:{port}")
        assert wait_until(lambda: _answers(live.url), 60), process.stderr.read() if process.poll() else ""
        connection = open_stream(live, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 600,
                                        "temperature": 0, "stream_options": {"include_usage": True}})
        response = connection.getresponse()
        assert response.status == 200 and response.read1(100)
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        usage = json.loads(rest.rstrip().split("\n\n")[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == len(expected)  # the whole reply, not an aborted one
        assert process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once drained
    finally:
        process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return request(f"{url}/health")[0] == 200
    except OSError:
        return False


# ---------------------------------------------------------------------- the pieces under the server
def test_engine_thinking_budget_appends_every_token_of_a_multi_token_end_of_thinking():
    model = DeepSeekV3(tiny_config()).eval()
    engine = Engine(model, max_batch=2, max_len=64)
    free = engine.generate([[5, 9, 2]], SamplingParams(max_new_tokens=12))[0].tokens
    capped = engine.generate([[5, 9, 2]], SamplingParams(max_new_tokens=12, thinking_budget=4,
                                                         end_think_ids=(7, 8)))[0].tokens
    assert capped[:4] == free[:4] and capped[4:6] == [7, 8]
    # after the forced </think>, the model goes on from it: as if the prompt had held it
    assert capped[6:] == engine.generate([[5, 9, 2] + capped[:6]], SamplingParams(max_new_tokens=6))[0].tokens
    # a reply that closes its thinking before the budget is left alone
    closing = (free[1],)
    assert engine.generate([[5, 9, 2]], SamplingParams(max_new_tokens=12, thinking_budget=4,
                                                       end_think_ids=closing))[0].tokens == free
    with pytest.raises(ValueError, match="end_think_ids"):
        SamplingParams(thinking_budget=3)


def test_reply_text_holds_back_a_split_tag_and_a_stop_string_and_never_mixes_fields(loaded):
    _, tok = loaded
    params = SamplingParams(stop_ids=(tok.eos_id,), stop_strings=("STOP",))
    reply = ReplyText(tok, params, thinking=True)
    pieces = []
    for text in ["7 + 8", " = 15.", "\n</th", "ink>", "\n\nAnswer", " 15 ST", "OP and more"]:
        for token in tok.encode(text):
            pieces += reply.feed([token], final=False)
    pieces += reply.feed([tok.eos_id], final=True)
    joined = {}
    for name, text in pieces:
        joined[name] = joined.get(name, "") + text
        assert "</" not in text and "ST" not in text
    assert joined == {"reasoning_content": "7 + 8 = 15.", "content": "Answer 15"}


def test_incremental_decoder_keeps_multi_byte_characters_whole(loaded):
    _, tok = loaded
    ids = tok.encode("héllo 中文 😀 x")
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == "héllo 中文 😀 x"
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------------- the web chat, in a real browser
def chromium() -> str | None:
    return os.environ.get("NANOSEEK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


RECORD = """() => {  // every value each field of the reply was set to, in order
  window.seen = {"thinking-text": [], "answer": [], "meta": []};
  new MutationObserver((records) => {
    for (const r of records) {
      const field = r.target.classList && [...r.target.classList].find((c) => c in window.seen);
      if (field && r.target.closest(".message.assistant:last-child")) window.seen[field].push(r.target.textContent);
    }
  }).observe(document.getElementById("messages"), {childList: true, subtree: true});
}"""


def test_web_chat_streams_thinking_and_answer_into_their_places_in_chromium(loaded, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with Playwright "
                                   "(pip install playwright)")
    if chromium() is None:
        pytest.skip("no Chromium to drive: apt-get install chromium (or set NANOSEEK_CHROMIUM to a Chromium binary)")
    _, tok = loaded
    prompt = PROMPTS["question"](tok)
    budget, max_tokens = 6, 24
    thought = greedy(loaded, prompt, budget)
    answer = greedy(loaded, prompt + thought + [tok.end_think_id], max_tokens - budget - 1)
    reasoning, content = tok.decode(thought).strip(), tok.decode(without_eos(answer, tok)).strip()

    with serving(loaded, max_len=1024, temperature=0, thinking_budget=budget, max_tokens=max_tokens) as live, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(live.url)
        page.wait_for_function("document.getElementById('model-name').textContent === 'tiny'")
        page.evaluate(RECORD)
        page.fill("#input", QUESTION)
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelector('.message.assistant .meta')?.textContent.includes('tokens')")
        assert page.text_content(".message.assistant .thinking-text") == reasoning
        assert page.text_content(".message.assistant .answer") == content
        seen = page.evaluate("window.seen")
        # streamed: the reasoning grew over several updates, and was there before the answer began
        thinking_values = [v for v in seen["thinking-text"] if v]
        assert len(set(thinking_values)) > 1 and all(reasoning.startswith(v) for v in thinking_values)
        assert len(set(seen["answer"])) > 2 and all(content.startswith(v) for v in seen["answer"])
        page.click(".message.assistant summary")  # the collapsed thinking opens
        page.screenshot(path=tmp_path / "serve-chat.png")

        # a second turn sends the history; the stop button aborts a long reply and frees its slot
        page.click("#settings summary")
        page.fill("#max-tokens", "900")
        page.fill("#input", "And 2 + 3?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.message.assistant')[1]?.textContent.length > 0")
        assert live.engine.unfinished or live.server.in_flight
        page.click("#stop")
        page.wait_for_function("document.querySelectorAll('.message.assistant')[1].textContent.includes('stopped')")
        assert wait_until(lambda: not live.engine.unfinished and live.server.in_flight == 0, 3)
        assert page.locator(".message").count() == 4 and page.locator("#history li").count() == 1
        assert page.is_visible("#send") and not page.is_visible("#stop")
        browser.close()
