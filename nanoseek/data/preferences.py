"""Preference pairs for the reward model (`nanoseek rm`): a prompt, a chosen and a rejected response.

A JSONL line holds `prompt`, `chosen` and `rejected`, in the shape of the public preference sets:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
or with the responses as chat messages, whose last (assistant) message is the response and whose earlier turns
are the conversation it answers (Anthropic HH, UltraFeedback, TRL's conversational format); `prompt` (a string
or a list of messages) is then only needed when the lists hold the response alone:
  {"chosen": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], "rejected": [...]}

As DeepSeek-R1's helpfulness reward model, the reward model judges only a response's final summary: the text
after its `</think>` (final_summary). A pair whose two responses are then the same teaches nothing; it is skipped
and counted (read_pairs returns where), any other bad line stops the read with its file and line.

The built-in pairs (builtin_pairs) answer the built-in non-reasoning instructions of data/chat.py: the right,
concise reply against a wrong, a rambling or an off-format one, the kind recorded for per-kind accuracy.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from nanoseek.data.chat import (INSTRUCTIONS, ChatDataError, _lines, check_instruction, check_messages,
                                instruction_conversations, instruction_kind, jsonl_files)
from nanoseek.data.shards import DataError
from nanoseek.data.tokenizer import END_THINK, THINK

REJECTED_KINDS = ("wrong", "rambling", "off_format")


class PreferenceDataError(DataError):
    """A preference pair that cannot be trained on; the message names its file and line."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]  # the conversation the responses answer, as chat messages (a plain prompt: one user turn)
    chosen: str  # the preferred response
    rejected: str
    source: str  # where it came from: "path/to/file.jsonl:12", or "built-in train #3"
    kind: str | None = None  # the built-in pairs' kind of rejected response (REJECTED_KINDS); None for a user's


class Pairs(NamedTuple):
    """What read_pairs found: the pairs, and where the pairs it skipped as identical responses are."""

    pairs: list[PreferencePair]
    identical: list[str]


def final_summary(response: str) -> str:
    """What the reward model judges of a response: the text after its last `</think>` (DeepSeek-R1's helpfulness
    reward model sees only the final summary), stripped; the whole response when it has no `</think>`. A stray
    `<think>` left in it is dropped: the chat template cannot render an unclosed thinking block, and a malformed
    reply must still be judged by the reward model rather than fall to a default score."""
    return response.rpartition(END_THINK)[2].replace(THINK, "").strip()


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# ---------------------------------------------------------------------- reading JSONL
def read_pairs(paths: Iterable[str | Path]) -> Pairs:
    """Every pair of the JSONL files (or directories of them), in file and line order. Blank lines are skipped;
    a pair whose responses have the same final summary is skipped and its place returned; any other line that is
    not a valid pair stops the read with a PreferenceDataError naming its file and line (ChatDataError for a file
    that is missing or not UTF-8)."""
    pairs: list[PreferencePair] = []
    identical: list[str] = []
    for file in jsonl_files(paths):
        before = len(pairs) + len(identical)
        with open(file, encoding="utf-8") as f:
            for number, line in _lines(f, file):
                if not line.strip():
                    continue
                pair = parse_pair(line, f"{file}:{number}")
                if final_summary(pair.chosen) == final_summary(pair.rejected):
                    identical.append(pair.source)
                else:
                    pairs.append(pair)
        if len(pairs) + len(identical) == before:
            raise PreferenceDataError(f"{file} holds no preference pairs")
    return Pairs(pairs, identical)


def parse_pair(line: str, where: str) -> PreferencePair:
    """One JSONL line -> its pair, checked; a PreferenceDataError naming `where` if it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise PreferenceDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object with \"prompt\", \"chosen\" and \"rejected\"")
    missing = [name for name in ("chosen", "rejected") if name not in row]
    if missing:
        raise PreferenceDataError(f"{where}: no {' or '.join(map(repr, missing))} field (a pair needs \"chosen\" "
                                  "and \"rejected\" responses, and a \"prompt\")")
    (context, chosen), (other, rejected) = (_response(row, name, where) for name in ("chosen", "rejected"))
    if context != other:
        raise PreferenceDataError(f"{where}: \"chosen\" and \"rejected\" continue different conversations (their "
                                  "turns before the response differ)")
    if not context:
        if "prompt" not in row:
            raise PreferenceDataError(f"{where}: no \"prompt\" field, and the responses have no earlier turns to "
                                      "take the prompt from")
        prompt = row["prompt"]
        if not (isinstance(prompt, str) and prompt.strip() or isinstance(prompt, list) and prompt):
            raise PreferenceDataError(f"{where}: \"prompt\" must be a non-empty string or list of chat messages")
        context = as_messages(prompt)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        try:  # the whole conversation as the reward model renders it: roles, contents, the template's own checks
            check_messages([*context, {"role": "assistant", "content": final_summary(response)}], f"{where}: {name}")
        except ChatDataError as e:
            raise PreferenceDataError(str(e)) from None
    return PreferencePair(context, chosen, rejected, where)


def _response(row: dict, name: str, where: str) -> tuple[list[dict], str]:
    """row[name] -> (the turns before the response, the response): a string is the response alone; a message
    list ends with the assistant's response (its content: any reasoning is not judged)."""
    value = row[name]
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise PreferenceDataError(f"{where}: \"{name}\" is a message list whose last message is not the "
                                      "assistant's response")
        context, value = value[:-1], value[-1].get("content")
    else:
        context = []
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: \"{name}\" must be a string or a list of chat messages, got "
                                  f"{type(value).__name__}")
    if not final_summary(value):
        raise PreferenceDataError(f"{where}: \"{name}\" is an empty response" +
                                  (f" (nothing after {END_THINK})" if END_THINK in value else ""))
    return context, value


# ---------------------------------------------------------------------- the built-in pairs
FILLERS = ("That is a good question, and I want to be careful with it.",
           "Let me restate what you asked before I answer it.", "There are a few ways to look at this.",
           "I will go over it once more to be completely sure.", "Some context first, to be thorough.",
           "I hope that this is what you were looking for.", "Please let me know if anything is unclear.")


def _rejected(question: str, reply: str, kind: str, rng: random.Random) -> str:
    """A worse reply to a built-in instruction: wrong (the reply to another question of its kind, which
    check_instruction fails), rambling (the right reply buried in filler and repetition), or off-format (the
    answer missing, or wrapped in an unclosed tag or bracket)."""
    if kind == "wrong":
        make = INSTRUCTIONS[instruction_kind(question)][0]
        while True:
            other = make(rng)[1]
            if not check_instruction(question, other):
                return other
    if kind == "rambling":
        first, second, last = rng.sample(FILLERS, 3)
        return f"{first} {second} The answer is {reply}. To say it once more: {reply}. {last}"
    return rng.choice(["Sure, here is the answer you asked for:", f"<answer>{reply}", f"Answer: [{reply}"])


def builtin_pairs(n: int, seed: int = 0, split: str = "train") -> list[PreferencePair]:
    """n pairs of the built-in non-reasoning instructions (data/chat.instruction_conversations: their split, so
    the "heldout" pairs ask questions the "train" ones never do): the chosen response is the instruction's right,
    concise reply; the rejected one is, in turn, a wrong, a rambling and an off-format reply (REJECTED_KINDS,
    recorded as the pair's kind). Deterministic from the arguments."""
    rng = random.Random(f"preferences/{seed}/{split}")
    pairs = []
    for i, conversation in enumerate(instruction_conversations(n, seed, split)):
        user, reply = conversation.messages
        kind = REJECTED_KINDS[i % len(REJECTED_KINDS)]
        pairs.append(PreferencePair([{"role": "user", "content": user["content"]}], reply["content"],
                                    _rejected(user["content"], reply["content"], kind, rng),
                                    f"built-in {split} #{i}", kind))
    return pairs
