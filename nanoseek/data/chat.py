"""Chat data for supervised fine-tuning: conversations read from JSONL (checked line by line), the built-in
cold-start conversations, the built-in non-reasoning instructions (with a checker of replies to them), and a
conversation's token ids with the mask of the tokens the assistant wrote.

A JSONL line is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`; an assistant's
reasoning is either inline, `<think>...</think>` at the start of its content, or a separate `reasoning_content`
field (DeepSeek's API names). Conversations are rendered by the one chat template (`tokenizer.chat_pieces`), the
one the engine's `chat` prompts use, and encoded piece by piece, so the mask is exact by construction.

A checkpoint with a chat template of its own (a Hugging Face student's: data/template.py) is trained in that
template instead (`template_samples`), the format it is prompted in: the reasoning reaches the template inline,
`<think>\n{reasoning}\n</think>\n\n{answer}` in the content (most templates know no `reasoning_content`), and
each assistant turn's tokens are found by rendering prefixes of the conversation (see `template_samples`).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanoseek.data import tasks
from nanoseek.data.shards import DataError
from nanoseek.data.template import ChatTemplate
from nanoseek.data.tokenizer import Tokenizer, chat_pieces, render_assistant

ROLES = ("system", "user", "assistant")


class ChatDataError(DataError):
    """A conversation that cannot be trained on; the message names its file and line."""


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    source: str  # where it came from, for messages: "path/to/file.jsonl:12", or "built-in #3"


def check_messages(messages: object, where: str) -> list[dict]:
    """A conversation's messages, checked: a non-empty list of {role, content} objects with known roles, at least
    one assistant turn, no empty assistant turn, and the assistant's reply last (what SFT learns is the
    assistant's; a conversation that ends with another role has a turn nothing is learnt from). Raises
    ChatDataError naming `where` and the message."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: expected a non-empty \"messages\" list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatDataError(f"{where}: message {i} is not an object with a role and a content")
        role = message.get("role")
        if role not in ROLES:
            raise ChatDataError(f"{where}: message {i} has unknown role {role!r} (expected 'system', 'user' or "
                                "'assistant')")
        if not isinstance(message.get("content"), str):
            raise ChatDataError(f"{where}: message {i} ({role}): content must be a string, got "
                                f"{type(message.get('content')).__name__}")
        if role == "assistant" and not message["content"].strip() and not (message.get("reasoning_content") or
                                                                          "").strip():
            raise ChatDataError(f"{where}: message {i} is an empty assistant turn (no content, no reasoning)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: no assistant turn: nothing to learn from (SFT trains on the assistant's "
                            "replies)")
    if messages[-1]["role"] != "assistant":
        raise ChatDataError(f"{where}: the last message is a {messages[-1]['role']} message; a conversation must "
                            "end with the assistant's reply")
    try:
        chat_pieces(messages, add_generation_prompt=False)  # the template's own checks (reasoning fields, tags)
    except ValueError as e:
        raise ChatDataError(f"{where}: {e}") from None
    return messages


def jsonl_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the *.jsonl files of directories (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob("*.jsonl"))
            if not found:
                raise ChatDataError(f"{path} holds no .jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ChatDataError(f"no such file or directory: {path}")
    return files


def read_conversations(paths: Iterable[str | Path]) -> list[Conversation]:
    """Every conversation of the JSONL files (or directories of them), in file and line order. Blank lines are
    skipped; any other line that is not a valid conversation stops the read with a ChatDataError naming its file
    and line number."""
    conversations = []
    for file in jsonl_files(paths):
        before = len(conversations)
        with open(file, encoding="utf-8") as f:
            for number, line in _lines(f, file):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict) or "messages" not in row:
                    raise ChatDataError(f"{where}: expected a JSON object with a \"messages\" list")
                conversations.append(Conversation(check_messages(row["messages"], where), where))
        if len(conversations) == before:
            raise ChatDataError(f"{file} holds no conversations")
    return conversations


def _lines(f, file: Path):
    """(line number, line) of an open text file; a line that is not UTF-8 is a ChatDataError naming it."""
    number = 0
    while True:
        try:
            line = f.readline()
        except UnicodeDecodeError as e:
            raise ChatDataError(f"{file}:{number + 1}: not UTF-8 text ({e.reason})") from None
        if not line:
            return
        number += 1
        yield number, line


# ---------------------------------------------------------------------- the built-in cold-start data
CLOSINGS = ("So the answer is {answer}.", "That gives {answer}.", "Therefore the answer is {answer}.")


def cold_start_conversation(problem: tasks.Problem, rng: random.Random) -> list[dict]:
    """One built-in problem as a DeepSeek-R1 cold-start conversation: the user asks the question; the assistant's
    reasoning is the problem's worked steps and a closing summary sentence, and its content is the answer in the
    R1-Zero answer tags, which the rewards and `nanoseek eval` grade (`rewards.final_answer`).

    The steps start right after `<think>`, as in the pretraining corpus: an opening sentence before them ("Let me
    work through this step by step.") cost the small base its copying of the question's digits, measured on seed 1
    (docs/r1.md): 250 SFT steps took chat-format pass@1 from 12.6% to 3.3% with the sentence and to 14.6% without."""
    reasoning = "\n".join([problem.steps, rng.choice(CLOSINGS).format(answer=problem.answer)])
    return [{"role": "user", "content": problem.question},
            {"role": "assistant", "content": f"<answer>{problem.answer}</answer>", "reasoning_content": reasoning}]


def cold_start_problems(n: int, seed: int = 0, split: str = "train", difficulty: int | None = 1
                        ) -> list[tasks.Problem]:
    """The problems of cold_start_conversations(n, seed, split, difficulty), in its order: the built-in tasks in
    turn; split "heldout" draws only questions that the "train" split never has (tasks.split_of)."""
    names = list(tasks.TASKS)
    per_task = {name: tasks.generate(name, -(-n // len(names)), seed=seed, split=split, difficulty=difficulty)
                for name in names}
    return [per_task[names[i % len(names)]][i // len(names)] for i in range(n)]


def cold_start_conversations(n: int, seed: int = 0, split: str = "train", difficulty: int | None = 1
                             ) -> list[Conversation]:
    """n cold-start conversations of the built-in tasks' problems (cold_start_problems), deterministic from the
    arguments. difficulty None mixes the levels."""
    rng = random.Random(f"cold-start/{seed}/{split}/{difficulty}")
    return [Conversation(cold_start_conversation(problem, rng), f"built-in {split} #{i}")
            for i, problem in enumerate(cold_start_problems(n, seed, split, difficulty))]


# ---------------------------------------------------------------------- tokens and the loss mask
def encode_conversations(tokenizer: Tokenizer, conversations: Sequence[Sequence[dict]]
                         ) -> list[tuple[list[int], list[bool]]]:
    """Each conversation -> (token ids, for each id whether the assistant wrote it): the reply text of each
    assistant turn shown as written, with its end of sentence, is True; bos, system and user text, the
    `<｜Assistant｜>` tag and replies shown without their reasoning are False (see tokenizer.chat_pieces). The
    pieces are encoded one by one: the mask needs no search, and the ids equal those of the whole rendering."""
    rendered = [chat_pieces(messages, add_generation_prompt=False) for messages in conversations]
    encoded = iter(tokenizer.encode_batch([text for pieces in rendered for text, _ in pieces]))
    out = []
    for pieces in rendered:
        ids: list[int] = []
        mask: list[bool] = []
        for (_, learnt), piece in zip(pieces, encoded):
            ids += piece
            mask += [learnt] * len(piece)
        out.append((ids, mask))
    return out


# ---------------------------------------------------------------------- a checkpoint's own chat template
TEMPLATES = ("auto", "deepseek", "checkpoint")
# A reply whose place in a rendering is found by search: no whitespace or tags a template might trim or cut at.
PROBE_REPLY = "NANOSEEK-PROBE-REPLY-7f3a"


def chat_template_for(tokenizer: Tokenizer, choice: str) -> ChatTemplate | None:
    """The chat template a stage trains in, by `--template` (one of TEMPLATES): the tokenizer's own (`checkpoint`,
    or `auto` when it has one), or None for DeepSeek's built-in format (`deepseek`, or `auto` without one)."""
    if choice not in TEMPLATES:
        raise ValueError(f"unknown template {choice!r}; choose from {', '.join(TEMPLATES)}")
    if choice == "deepseek":
        return None
    if choice == "checkpoint" and tokenizer.chat_template is None:
        raise ChatDataError("--template checkpoint, but the model has no chat template of its own (no "
                            "\"chat_template\" in its tokenizer_config.json, no chat_template.jinja); train in "
                            "DeepSeek's chat format with --template deepseek (or auto)")
    return tokenizer.chat_template


def inline_reasoning(message: dict) -> dict:
    """A message as a checkpoint's template is given it: an assistant's `reasoning_content` moved into its content
    as DeepSeek-R1 writes it, `<think>\n{reasoning}\n</think>\n\n{answer}` (an empty one as an empty think block,
    as chat_pieces renders it); inline reasoning and other messages as they are."""
    if message.get("role") != "assistant" or message.get("reasoning_content") is None:
        return message
    rest = {k: v for k, v in message.items() if k != "reasoning_content"}
    return {**rest, "content": render_assistant(message["reasoning_content"].strip(), message["content"], True)}


def _reply_frame(template: ChatTemplate, history: list[dict]) -> tuple[str, str]:
    """The rendering of history and an assistant reply, split at the reply's text: (up to it, after it: the end of
    the turn). A ChatDataError when the template never writes the reply's text."""
    text = template.render([*history, {"role": "assistant", "content": PROBE_REPLY}], add_generation_prompt=False)
    if text.count(PROBE_REPLY) != 1:
        raise ChatDataError(f"{template.origin}: the chat template never renders the assistant's content as it is "
                            f"(a reply {PROBE_REPLY!r} is {'not in' if PROBE_REPLY not in text else 'twice in'} its "
                            "rendering), so there is no reply to train on; train in DeepSeek's chat format with "
                            "--template deepseek")
    head, tail = text.split(PROBE_REPLY)
    if not tail:
        warnings.warn(f"{template.origin}: the chat template writes nothing after the assistant's reply (no end of "
                      "turn), so fine-tuning in it teaches the model no end to its replies", stacklevel=2)
    return head, tail


def _continued_reply(template: ChatTemplate, prompt: str, content: str, head: str, tail: str) -> str:
    """The text a model writes after the template's generation prompt `prompt` for a reply whose content (reasoning
    inline) is `content`, with the template's end of turn `tail` (head: the turn's rendering up to the reply, see
    _reply_frame): for a template that does not render the reply as written after its prompt, as
    DeepSeek-R1-Distill's, whose turns keep only the text after `</think>` and whose prompt opens `<think>\n`. The
    prompt must be the turn's opening plus a start of the reply (`<think>\n`, or nothing), which the reply must
    start with."""
    if not prompt.startswith(head):
        raise ChatDataError(f"{template.origin}: the chat template's generation prompt (...{prompt[-40:]!r}) does not "
                            f"start the assistant turn as the template renders one (...{head[-40:]!r}), so its "
                            "reply cannot be placed after it; train in DeepSeek's chat format with --template deepseek")
    opened = prompt[len(head):]
    if not content.startswith(opened):
        raise ChatDataError(f"{template.origin}: the chat template's generation prompt starts the reply with "
                            f"{opened!r}, and this reply starts with {content[:len(opened)]!r}; give a reply "
                            "without reasoning an empty \"reasoning_content\": \"\" (an empty think block)")
    return content[len(opened):] + tail


def template_samples(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[dict]
                     ) -> list[tuple[list[int], list[bool]]]:
    """A checked conversation in a checkpoint's own chat template -> training samples (token ids, whether the
    assistant wrote each), the ids as transformers' `apply_chat_template(..., tokenize=True)` encodes the text.

    Each assistant turn's text is what the template renders after its generation prompt: the rendering of the
    conversation up to and including the turn, past the rendering of the conversation before it with
    add_generation_prompt=True; that is the reply and the template's end of turn (its end of sentence, Llama 3's
    `<|eot_id|>`), all in the loss. Where every turn's prompt and rendering are prefixes of the whole
    conversation's rendering in tokens (Llama 3's, ChatML's templates), the conversation is one sample with every
    turn masked in. Where they are not, each assistant turn is a sample of its own: the template's prompt for it
    (the conversation before it, as the template shows history) and that turn alone in the loss, which is what the
    model sees and writes when asked in the template. Templates that show earlier turns otherwise than they were
    written break the property, as DeepSeek's and Qwen3's drop earlier turns' reasoning. A template that does not
    render a turn's content as written (`| trim` aside) cannot show what to learn: DeepSeek-R1-Distill's keeps no
    reasoning in any turn (`content.split('</think>')[-1]`), and its prompt opens `<think>\n`; there the turn's
    text is the reply as written, after what the prompt already opened, plus the template's end of turn
    (`_continued_reply`), a sample of its own."""
    messages = [inline_reasoning(m) for m in messages]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if turns[0] == 0:
        raise ChatDataError("message 0 is the assistant's: a chat template renders a reply after a prompt; start "
                            "the conversation with a system or user message")
    parts = []  # per assistant turn: (the template's prompt for it, its text, the rendering up to it)
    for i in turns:
        prompt = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[:i + 1], add_generation_prompt=False)
        head, tail = _reply_frame(template, messages[:i])
        content = messages[i]["content"]
        if upto.startswith(prompt) and upto in (head + content + tail, head + content.strip() + tail):
            parts.append((prompt, upto[len(prompt):], upto))
        else:
            parts.append((prompt, _continued_reply(template, prompt, content, head, tail), None))
    full = template.render(messages, add_generation_prompt=False)
    ids = tokenizer.encode(full)
    mask = [False] * len(ids)
    for prompt, _, upto in parts:
        if upto is None or not full.startswith(upto):
            break
        prompt_ids, upto_ids = tokenizer.encode(prompt), tokenizer.encode(upto)
        if ids[:len(upto_ids)] != upto_ids or upto_ids[:len(prompt_ids)] != prompt_ids:
            break
        mask[len(prompt_ids):len(upto_ids)] = [True] * (len(upto_ids) - len(prompt_ids))
    else:
        return [(ids, mask)]
    samples = []
    for prompt, reply, _ in parts:
        prompt_ids, reply_ids = tokenizer.encode(prompt), tokenizer.encode(reply)
        samples.append((prompt_ids + reply_ids, [False] * len(prompt_ids) + [True] * len(reply_ids)))
    return samples


# ---------------------------------------------------------------------- built-in non-reasoning instructions
# DeepSeek-R1's SFT mix also holds non-reasoning data, and "for simpler queries, such as 'hello', we do not provide
# a CoT in response" (the R1 paper, 2.3.3). These are such queries, of kinds the project can generate and grade
# deterministically, each a question template, a reply and a checker of any reply to the question.
NAMES = ("Ada", "Alan", "Grace", "Linus", "Marie", "Nikola", "Rosalind", "Emmy", "Claude", "Barbara", "Edsger",
         "Katherine", "Srinivasa", "Sofia", "Hedy", "Tim", "Radia", "Dennis", "Frances", "John", "Margaret", "Ken",
         "Lise", "Niels", "Chien", "Hypatia", "Leonhard", "Sophie", "Carl", "Mary")
WORDS = ("apple", "river", "stone", "cloud", "green", "quiet", "window", "paper", "garden", "silver", "bright",
         "table", "music", "yellow", "forest", "candle", "orange", "little", "winter", "summer", "bridge", "ocean",
         "pencil", "rabbit", "golden", "simple", "mountain", "letter", "friend", "morning", "evening", "basket",
         "purple", "rocket", "castle", "button", "dragon", "flower", "island", "marble")
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0 <= n < 1000 in English words: 7 -> "seven", 42 -> "forty-two", 305 -> "three hundred five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words takes 0 to 999, not {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _ONES[n % 10] if n % 10 else "")
    return _ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")


def _plain(text: str) -> str:
    """A reply for comparison: lower case, words only (quotes, punctuation, hyphens and extra spaces gone)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _greeting(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    return f"Say hello to {name}.", f"Hello, {name}!"


def _repeat(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    return f"Repeat after me: {words}", words


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
    return f"What is the last word of: {' '.join(words)}", words[-1]


def _in_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Write the number {n} in words.", number_words(n)


def _capitals(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Write {word} in capital letters.", word.upper()


# kind -> (make a (question, reply), the question's pattern, whether a reply is right given the pattern's match)
INSTRUCTIONS: dict[str, tuple] = {
    "greeting": (_greeting, re.compile(r"Say hello to ([A-Za-z]+)\."),
                 lambda m, reply: bool(re.search(r"\bhello\b", reply, re.IGNORECASE))
                 and re.search(rf"\b{re.escape(m[1])}\b", reply) is not None),
    "repeat": (_repeat, re.compile(r"Repeat after me: ([a-z ]+)"),
               lambda m, reply: _plain(reply) == _plain(m[1])),
    "last_word": (_last_word, re.compile(r"What is the last word of: ([a-z ]+)"),
                  lambda m, reply: _plain(reply) == m[1].split()[-1]),
    "in_words": (_in_words, re.compile(r"Write the number (\d+) in words\."),
                 lambda m, reply: _plain(reply).replace(" and ", " ") == _plain(number_words(int(m[1])))),
    "capitals": (_capitals, re.compile(r"Write ([a-z]+) in capital letters\."),
                 lambda m, reply: reply.strip().rstrip(".!").strip().strip("\"'") == m[1].upper()),
}


def instruction_kind(question: str) -> str | None:
    """The kind of a built-in instruction's question (a key of INSTRUCTIONS), None when it is not one."""
    return next((kind for kind, (_, pattern, _) in INSTRUCTIONS.items() if pattern.fullmatch(question)), None)


def check_instruction(question: str, reply: str) -> bool:
    """Whether `reply` (the answer, after any think block) does what the built-in instruction `question` asks:
    greets the name ("hello" and the name, any wording around them), repeats the words (case, punctuation and
    spacing aside), gives the last word, writes the number in words ("forty-two", "forty two", "one hundred and
    five" all count), or writes the word in capitals. A question that is not a built-in instruction is a
    ValueError."""
    kind = instruction_kind(question)
    if kind is None:
        raise ValueError(f"not a built-in instruction: {question!r}")
    _, pattern, check = INSTRUCTIONS[kind]
    return isinstance(reply, str) and bool(check(pattern.fullmatch(question), reply))


def instruction_conversations(n: int, seed: int = 0, split: str = "train") -> list[Conversation]:
    """n built-in non-reasoning instructions ("Say hello to Ada.", "Repeat after me: ...", "What is the last word
    of: ...", "Write the number 42 in words.", "Write apple in capital letters."), the kinds in turn,
    deterministic from the arguments. Each reply passes check_instruction. Split "heldout" draws only questions
    that "train" never has (tasks.split_of), for a held-out accuracy.

    The reply has no chain of thought, as R1's SFT data for simple queries; it is written with an empty
    `reasoning_content`, which the chat template renders as an empty think block, `<think>\\n\\n</think>\\n\\n` and
    the answer (see tokenizer.chat_pieces). That is how DeepSeek-R1 itself answers such prompts, and it continues
    the generation prompt, which always opens `<think>\\n`: a reply without the block would be trained after
    `<｜Assistant｜>` while the model is asked after `<｜Assistant｜><think>\\n`, a context it would never have seen
    with a direct answer."""
    if split not in tasks.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(tasks.SPLITS)}")
    rng = random.Random(f"instructions/{seed}/{split}")
    kinds = list(INSTRUCTIONS)
    out = []
    for i in range(n):
        make = INSTRUCTIONS[kinds[i % len(kinds)]][0]
        while True:
            question, reply = make(rng)
            if tasks.split_of(question) == split:
                break
        out.append(Conversation([{"role": "user", "content": question},
                                 {"role": "assistant", "content": reply, "reasoning_content": ""}],
                                f"built-in instruction {split} #{i}"))
    return out
