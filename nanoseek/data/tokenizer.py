"""The tokenizer: byte-level BPE (HF `tokenizers`) with DeepSeek-V3/R1's special tokens and chat template.

`Tokenizer.train` builds a small one (digits split one per token, exact round trip of any text);
`Tokenizer.load` reads any HF `tokenizer.json`, a released DeepSeek-V3/R1 one included, and the chat template of
its directory when it has one (a Hugging Face checkpoint's own Jinja template, see data/template.py).

Two chat formats: DeepSeek-V3/R1's, written here in Python (`chat_pieces`, `apply_chat_template`), which
nanoseek's own checkpoints use (they hold no Jinja template) and SFT trains on; and a checkpoint's own template,
which `Tokenizer.render_chat`/`encode_chat` use when the tokenizer was loaded with one, else DeepSeek's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.data.template import ChatTemplate, read_special_tokens
from nanoseek.errors import NanoseekError

# DeepSeek-V3/R1's strings: the bars are FULLWIDTH VERTICAL LINE (U+FF5C), the spaces LOWER ONE EIGHTH BLOCK (U+2581).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
# In id order: bos 0 and eos 1, as in DeepSeek-V3's config.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, FIM_BEGIN, FIM_HOLE, FIM_END)
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# The DeepSeek-R1-Zero training prompt (DeepSeek-R1 paper, Table 1); fill with R1_ZERO_TEMPLATE.format(prompt=...).
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)


class TokenizerError(NanoseekError, ValueError):
    """A tokenizer file that cannot be used; the message names the file and what is missing."""


def split_thinking(content: str) -> tuple[str, str]:
    """An assistant message's content -> (reasoning, answer): an inline `<think>...</think>` block (the opening tag
    may be missing, as in DeepSeek-R1's own outputs, whose template opens it) and the text after it, both stripped;
    no `</think>`: no reasoning. A `<think>` that is never closed is a ValueError."""
    if END_THINK in content:
        reasoning, answer = content.split(END_THINK, 1)
        reasoning = reasoning.strip()
        return reasoning.removeprefix(THINK).strip(), answer.strip()
    if THINK in content:
        raise ValueError(f"the content opens {THINK} but never closes it with {END_THINK}")
    return "", content


def render_assistant(reasoning: str, answer: str, think_block: bool | None = None) -> str:
    """An assistant turn's text between `<｜Assistant｜>` and the end of sentence, as DeepSeek-R1 writes it.
    think_block: show the `<think>` block even when the reasoning is empty (`<think>\n\n</think>\n\n{answer}`,
    how DeepSeek-R1 answers a simple prompt without a chain of thought); None: only when there is reasoning."""
    if think_block is None:
        think_block = bool(reasoning)
    return f"{THINK}\n{reasoning}\n{END_THINK}\n\n{answer}" if think_block else answer


def chat_pieces(messages: Sequence[dict], add_generation_prompt: bool = True,
                thinking: bool = True) -> list[tuple[str, bool]]:
    """DeepSeek-V3/R1's chat format as (text, is the assistant's output) pieces, in order; their texts joined are
    `apply_chat_template`'s string, so the engine's prompts and SFT's training sequences are one rendering.

    bos, the system prompts (joined by a blank line), then `<｜User｜>{content}` and
    `<｜Assistant｜>{reply}<｜end▁of▁sentence｜>` turns, where a reply with reasoning (a `reasoning_content` field, or
    an inline `<think>...</think>` at the start of its content) is `<think>\n{reasoning}\n</think>\n\n{answer}`.
    A reply that has a think block with nothing in it (an empty `reasoning_content` string, or an empty inline
    `<think>\n\n</think>`) keeps the empty block, `<think>\n\n</think>\n\n{answer}`, as DeepSeek-R1 answers a simple
    prompt with no chain of thought; it continues the generation prompt, which opens `<think>\n`. A reply with
    neither is the answer alone.
    As DeepSeek-R1's template, replies before the last user message show only their answer (the model never sees
    its earlier reasoning; `nanoseek chat` keeps its history that way); replies after it keep their reasoning.
    Every piece ends or starts at a special token, so encoding the pieces one by one gives the ids of the whole.

    The second item is True for a reply's text and its end of sentence when the reply is shown as the assistant
    wrote it (the tokens SFT learns); False for everything else: bos, system and user text, the `<｜Assistant｜>`
    tag, and a reply whose reasoning was dropped (its answer alone is not what the assistant wrote). The
    generation prompt is `<｜Assistant｜>`, followed by `<think>\n` when `thinking` (as DeepSeek-R1 starts its
    reply)."""
    system: list[str] = []
    turns: list[tuple[str, bool]] = []
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    last_user = users[-1] if users else -1
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i}: expected an object with a role and a content, got "
                             f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            raise ValueError(f"message {i}: reasoning_content must be a string, and only in an assistant message")
        if role == "system":
            system.append(content)
        elif role == "user":
            turns.append((USER + content, False))
        elif role == "assistant":
            try:
                inline, answer = split_thinking(content)
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from None
            if inline and reasoning:
                raise ValueError(f"message {i}: has both a reasoning_content and a {THINK} block in its content")
            thought = reasoning is not None or END_THINK in content  # a think block, maybe an empty one
            reasoning = (reasoning or inline).strip()
            dropped = thought and i < last_user
            turns.append((ASSISTANT, False))
            turns.append((render_assistant("" if dropped else reasoning, answer, thought and not dropped) + EOS,
                          not dropped))
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (expected 'system', 'user' or 'assistant')")
    pieces = [(BOS + "\n\n".join(system), False), *turns]
    if add_generation_prompt:
        pieces.append((ASSISTANT + (THINK + "\n" if thinking else ""), False))
    return pieces


def apply_chat_template(messages: Sequence[dict], add_generation_prompt: bool = True, thinking: bool = True) -> str:
    """DeepSeek-V3/R1 chat format as one string (see `chat_pieces`): bos, the system prompts, then
    `<｜User｜>{content}` and `<｜Assistant｜>{reply}<｜end▁of▁sentence｜>` turns (the reasoning of replies before
    the last user message dropped, as DeepSeek-R1's template does); the generation prompt is `<｜Assistant｜>`,
    followed by `<think>\n` when `thinking`."""
    return "".join(text for text, _ in chat_pieces(messages, add_generation_prompt, thinking))


def declared_end_ids(directory: Path, tokenizer: HFTokenizer) -> list[int]:
    """The ids a checkpoint directory says end a reply: tokenizer_config.json's `eos_token` and
    generation_config.json's `eos_token_id` (an id or a list), the set transformers' generate and vLLM stop on.
    A Llama-3-style template ends each turn in `<|eot_id|>`, which only these files name. A value that is not a
    token of the vocabulary is a TokenizerError naming its file."""
    ids = []
    eos_token = read_special_tokens(directory).get("eos_token")
    if eos_token is not None:
        token_id = tokenizer.token_to_id(eos_token)
        if token_id is None:
            raise TokenizerError(f"{directory / 'tokenizer_config.json'}: eos_token {eos_token!r} is not a token of "
                                 f"{directory / TOKENIZER_FILE}")
        ids.append(token_id)
    file = directory / GENERATION_CONFIG_FILE
    if file.is_file():
        try:
            declared = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise TokenizerError(f"{file} is not a valid JSON object ({e})") from None
        declared = [] if declared is None else declared if isinstance(declared, list) else [declared]
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        for token_id in declared:
            if not (isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < vocab):
                raise TokenizerError(f"{file}: eos_token_id {token_id!r} is not a token id of the {vocab}-token "
                                     f"vocabulary (an int, or a list of them, in [0, {vocab}))")
            ids.append(token_id)
    return ids


class Tokenizer:
    """A HF `tokenizers.Tokenizer` with DeepSeek's special tokens found by their strings, and the checkpoint's own
    chat template (`chat_template`, None when it has none)."""

    apply_chat_template = staticmethod(apply_chat_template)  # DeepSeek's format, whatever the checkpoint's template

    def __init__(self, tokenizer: HFTokenizer, source: str = "tokenizer", chat_template: ChatTemplate | None = None,
                 end_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._source = source
        self.chat_template = chat_template
        missing = [t for t in (BOS, EOS) if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"{source} has no {' or '.join(map(repr, missing))} token "
                                 f"(DeepSeek's bos/eos strings are required)")
        # The ids that end a reply: DeepSeek's eos first, then the checkpoint's own (see `declared_end_ids`).
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys((self.eos_id, *end_ids)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Byte-level BPE with every digit its own pre-token; deterministic for the same texts. The vocabulary
        can come out smaller than `vocab_size` when the texts offer fewer merges."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(f"vocab_size={vocab_size} is too small: the 256 bytes and {len(SPECIAL_TOKENS)} "
                             f"special tokens need {256 + len(SPECIAL_TOKENS)}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok, source="trained tokenizer")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A `tokenizer.json` file, or a directory that holds one; the chat template of that directory
        (tokenizer_config.json's `chat_template`, chat_template.jinja, ...: see `ChatTemplate.find`) is kept as
        `chat_template` when it has one. A template file that cannot be read is a ChatTemplateError naming it."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {path} (expected a {TOKENIZER_FILE} file or a directory "
                                    f"holding one)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"{file} is not a valid tokenizer.json ({e})") from None
        return cls(tok, source=str(file), chat_template=ChatTemplate.find(file.parent),
                   end_ids=declared_end_ids(file.parent, tok))

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (into `path` if it is a directory, else to `path` itself); returns the file."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, file)
        return file

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, thinking: bool = True,
                    **extra) -> str:
        """A conversation as text, in the checkpoint's own chat template when it has one (as transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` writes it; `extra` are more
        template variables, e.g. Qwen3's enable_thinking=False; `thinking` is not passed: the template decides, as
        R1's opens `<think>\n` itself), else in DeepSeek-V3/R1's (`apply_chat_template`: `thinking` opens
        `<think>\n` after the generation prompt; no extra variables). Either writes its own bos where it has one."""
        if self.chat_template is None:
            if extra:
                raise TypeError(f"DeepSeek's built-in chat template takes no variables ({', '.join(extra)}); only "
                                "a checkpoint's own template does")
            return apply_chat_template(messages, add_generation_prompt, thinking)
        return self.chat_template.render(messages, add_generation_prompt, **extra)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, thinking: bool = True,
                    **extra) -> list[int]:
        """`render_chat`'s text as token ids (no bos added: the template writes it), as transformers'
        `apply_chat_template(..., tokenize=True)` encodes it."""
        return self.encode(self.render_chat(messages, add_generation_prompt, thinking, **extra))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in parallel (no bos/eos)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a token string; a TokenizerError if the vocabulary lacks it."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self._source} has no {token!r} token")
        return token_id

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    @property
    def user_id(self) -> int:
        return self.token_id(USER)

    @property
    def assistant_id(self) -> int:
        return self.token_id(ASSISTANT)

    @property
    def think_id(self) -> int:
        return self.token_id(THINK)

    @property
    def end_think_id(self) -> int:
        return self.token_id(END_THINK)

    @property
    def fim_begin_id(self) -> int:
        return self.token_id(FIM_BEGIN)

    @property
    def fim_hole_id(self) -> int:
        return self.token_id(FIM_HOLE)

    @property
    def fim_end_id(self) -> int:
        return self.token_id(FIM_END)
