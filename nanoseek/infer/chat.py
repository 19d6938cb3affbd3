"""Front ends over the engine: `nanoseek generate` (a prompts file in, JSONL out) and `nanoseek chat`.

Prompt templates:
  chat      DeepSeek's chat format (<｜User｜>...<｜Assistant｜><think>), for chat/R1-style models
  question  nanoseek's built-in corpus format ("Question: ...\n<think>\n"), for models pretrained on it
  r1-zero   the DeepSeek-R1-Zero prompt, for base models in RL
  raw       the text as it is
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from nanoseek.atomic import write_text
from nanoseek.data.shards import DataError
from nanoseek.data.tokenizer import END_THINK, R1_ZERO_TEMPLATE, THINK, Tokenizer, apply_chat_template
from nanoseek.infer.engine import Completion, Engine, SamplingParams

TEMPLATES = ("chat", "question", "r1-zero", "raw")


def render_prompt(messages: list[dict], template: str, tokenizer: Tokenizer | None = None) -> str:
    """The text the model continues; every template but `chat` uses the last user message only. `chat` is the
    checkpoint's own chat template when its tokenizer has one (a Hugging Face student's), else DeepSeek's."""
    if template == "chat":
        if tokenizer is not None:
            return tokenizer.render_chat(messages, add_generation_prompt=True, thinking=True)
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
    text = render_prompt(messages, template, tokenizer)
    return tokenizer.encode(text, bos=template != "chat")  # the chat template writes its own bos


def opens_thinking(messages: list[dict], template: str, tokenizer: Tokenizer | None = None) -> bool:
    """Whether the prompt ends inside <think>, so that the completion starts with reasoning."""
    return render_prompt(messages, template, tokenizer).rstrip().endswith(THINK)


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """A completion -> (reasoning, answer): the text before </think> and the text after it, as DeepSeek's API
    returns `reasoning_content` and `content`. thinking: the prompt opened <think>, so a completion that never
    closes it is all reasoning (a completion that opens <think> itself, as R1-Zero's do, is read the same way)."""
    text = text.strip()
    if text.startswith(THINK):
        text, thinking = text[len(THINK):], True
    if END_THINK in text:
        reasoning, answer = text.split(END_THINK, 1)
        return reasoning.strip(), answer.strip()
    return (text, "") if thinking else ("", text)


def completion_text(tokenizer: Tokenizer, completion: Completion, params: SamplingParams) -> str:
    """The completion's text without the stop token that ended it (the end-of-sentence marker is not text)."""
    text = tokenizer.decode(completion.tokens) if completion.text is None else completion.text
    if completion.tokens and completion.tokens[-1] in params.stop_ids:
        text = text.removesuffix(tokenizer.decode(completion.tokens[-1:]))
    return text


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
    """Complete the prompts into the JSONL file `out` (written whole once all are done, replacing any file
    there): one row per prompt with its `reasoning_content` (before </think>) and `content` (the answer after)."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    results = engine.generate([encode_prompt(tokenizer, c, template) for c in conversations], params)
    rows = []
    for prompt, conversation, result in zip(prompts, conversations, results, strict=True):
        reasoning, content = split_reasoning(completion_text(tokenizer, result, params),
                                             opens_thinking(conversation, template, tokenizer))
        rows.append(json.dumps({"prompt": prompt, "reasoning_content": reasoning, "content": content,
                                "finish_reason": result.finish_reason, "tokens": len(result.tokens)}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(rows))


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


COMMANDS = {
    "/help": "list these commands",
    "/reset": "start a new conversation",
    "/exit": "quit (so do /quit, and Ctrl-D or Ctrl-C at the prompt)",
}


def chat(engine: Engine, tokenizer: Tokenizer, template: str, params: SamplingParams,
         read: Callable[[str], str] | None = None, out: TextIO | None = None) -> None:
    """The interactive loop: each message gets a streamed reply, which Ctrl-C stops; a line starting with a
    /word is a command (COMMANDS), never a message. read, out: input() and sys.stdout unless given."""
    read, out = read or input, out or sys.stdout
    color = out.isatty()
    messages: list[dict] = []
    out.write("nanoseek chat: /help lists the commands, /exit quits, Ctrl-C stops a reply\n")
    while True:
        try:
            line = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\nbye\n")
            break
        command = line.split(maxsplit=1)[0] if re.match(r"/[A-Za-z]", line) else None
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = []
            out.write("(a new conversation)\n")
            continue
        if command is not None:
            unknown = f"unknown command {command}; " if command != "/help" else ""
            out.write(unknown + "commands:\n" + "".join(f"  {name:<7} {what}\n" for name, what in COMMANDS.items()))
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream_reply(engine, tokenizer, encode_prompt(tokenizer, messages, template), params,
                              ThinkingPrinter(out, color))
        # Like DeepSeek's own template, the history keeps the answer, not the reasoning.
        answer = split_reasoning(reply, opens_thinking(messages, template, tokenizer))[1]
        messages.append({"role": "assistant", "content": answer})


def _stream_reply(engine: Engine, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                  printer: ThinkingPrinter) -> str:
    """Stream one reply through the printer -> its text (without the stop token). Ctrl-C stops the reply where
    it is (the engine drops the request) and keeps what came so far."""
    decoder = IncrementalDecoder(tokenizer)
    stream = engine.stream(prompt, params)
    try:
        for token in stream:
            if token in params.stop_ids:
                break
            printer.write(decoder.push(token))
        printer.write(decoder.flush())
        printer.close()
    except KeyboardInterrupt:
        printer.close()
        printer.out.write("(stopped)\n")
    finally:
        stream.close()
    return tokenizer.decode(decoder.tokens)


class IncrementalDecoder:
    """A completion's text as its tokens arrive, each piece once it is certain: a token that ends inside a
    multi-byte character adds nothing until the token that completes it (alone it decodes to U+FFFD), and each
    piece is decoded together with the tokens of the piece before, so that a decoder that drops the leading space
    of a whole text (sentencepiece's) keeps it mid-text. The pieces joined are the decode of all the tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._start = 0  # the first token of the previous piece
        self._done = 0  # the tokens whose text has been returned

    def push(self, token: int) -> str:
        """Add a token -> the text it makes certain ("" while a character is incomplete)."""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._start:self._done])
        text = self.tokenizer.decode(self.tokens[self._start:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._start, self._done = self._done, len(self.tokens)
        return text[len(before):]

    def flush(self) -> str:
        """The text still held back, at the end of the tokens (an incomplete character shows as U+FFFD)."""
        before = self.tokenizer.decode(self.tokens[self._start:self._done])
        text = self.tokenizer.decode(self.tokens[self._start:])
        self._start, self._done = self._done, len(self.tokens)
        return text[len(before):]


def stream_lines(lines: Iterable[str]) -> Callable[[str], str]:
    """A `read` for chat() from given lines (tests, scripts)."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read
