"""Front ends over the engine: `nanoseek generate` (a prompts file in, JSONL out) and `nanoseek chat`.

Prompt templates:
  chat      DeepSeek's chat format (<｜User｜>...<｜Assistant｜><think>), for chat/R1-style models
  question  nanoseek's built-in corpus format ("Question: ...\n<think>\n"), for models pretrained on it
  r1-zero   the DeepSeek-R1-Zero prompt, for base models in RL
  raw       the text as it is
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from nanoseek.data.shards import DataError
from nanoseek.data.tokenizer import END_THINK, R1_ZERO_TEMPLATE, Tokenizer, apply_chat_template
from nanoseek.infer.engine import Engine, SamplingParams

TEMPLATES = ("chat", "question", "r1-zero", "raw")


def render_prompt(messages: list[dict], template: str) -> str:
    """The text the model continues; every template but `chat` uses the last user message only."""
    if template == "chat":
        return apply_chat_template(messages, add_generation_prompt=True, thinking=True)
    text = messages[-1]["content"]
    if template == "question":
        return f"Question: {text}\n<think>\n"
    if template == "r1-zero":
        return R1_ZERO_TEMPLATE.format(prompt=text)
    if template == "raw":
        return text
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def encode_prompt(tokenizer: Tokenizer, messages: list[dict], template: str) -> list[int]:
    text = render_prompt(messages, template)
    return tokenizer.encode(text, bos=template != "chat")  # the chat template writes its own bos


def read_prompts(path: Path) -> list[str]:
    """A .txt file (one prompt per line) or .jsonl (a "prompt" field per line)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            prompts.append(json.loads(line)["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: expected a JSON object with a \"prompt\" string") from None
    return prompts


def generate_file(engine: Engine, tokenizer: Tokenizer, prompts: list[str], out: Path, template: str,
                  params: SamplingParams) -> None:
    encoded = [encode_prompt(tokenizer, [{"role": "user", "content": p}], template) for p in prompts]
    results = engine.generate(encoded, params)
    with open(out, "w") as f:
        for prompt, result in zip(prompts, results):
            f.write(json.dumps({"prompt": prompt, "completion": result.text, "finish_reason": result.finish_reason,
                                "tokens": len(result.tokens)}) + "\n")


class ThinkingPrinter:
    """Streams decoded text, showing the reasoning (up to </think>) apart from the answer."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.thinking = True
        self.answer_started = False
        self.pending = ""  # text that may be the start of "</think>"
        self.out.write(self._style("Thinking: ", dim=True))

    def _style(self, text: str, dim: bool) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color and dim and text else text

    def write(self, text: str) -> None:
        if not self.thinking:
            if not self.answer_started:  # the line break after </think> is layout, not answer
                text = text.lstrip("\n")
                self.answer_started = bool(text)
            self.out.write(text)
            self.out.flush()
            return
        self.pending += text
        if END_THINK in self.pending:
            thought, answer = self.pending.split(END_THINK, 1)
            self.out.write(self._style(thought, dim=True) + "\n\nAnswer: ")
            self.thinking, self.pending = False, ""
            self.write(answer)
            return
        else:
            keep = max((k for k in range(1, len(END_THINK)) if self.pending.endswith(END_THINK[:k])), default=0)
            self.out.write(self._style(self.pending[:len(self.pending) - keep], dim=True))
            self.pending = self.pending[len(self.pending) - keep:]
        self.out.flush()

    def close(self) -> None:
        self.out.write(self._style(self.pending, dim=True) + "\n")
        self.out.flush()


def chat(engine: Engine, tokenizer: Tokenizer, template: str, params: SamplingParams,
         read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The interactive loop: /exit (or end of input) quits, /reset starts a new conversation."""
    color = out.isatty()
    messages: list[dict] = []
    out.write("nanoseek chat: /reset starts over, /exit quits\n")
    while True:
        try:
            line = read("\nyou> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        printer = ThinkingPrinter(out, color)
        tokens = []
        for token in engine.stream(encode_prompt(tokenizer, messages, template), params):
            tokens.append(token)
            if token not in params.stop_ids:
                printer.write(_decode_increment(tokenizer, tokens))
        printer.close()
        # Like DeepSeek's own template, the history keeps the answer, not the reasoning.
        answer = tokenizer.decode(tokens, skip_special=True).split(END_THINK)[-1].strip()
        messages.append({"role": "assistant", "content": answer})


def _decode_increment(tokenizer: Tokenizer, tokens: list[int]) -> str:
    """The text the last token adds (decoding the tail keeps multi-byte characters whole)."""
    return tokenizer.decode(tokens[-8:]).removeprefix(tokenizer.decode(tokens[-8:-1]))


def stream_lines(lines: Iterable[str]) -> Callable[[str], str]:
    """A `read` for chat() from given lines (tests, scripts)."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read
