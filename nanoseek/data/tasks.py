"""Verifiable reasoning tasks: seeded problem generators with worked solutions, and their answer checkers.

One module serves three stages, so every choice here is made for all of them:

* pretraining: `corpus` yields documents in the R1-Zero answer format (`format_document`), so a small model
  learns both the worked steps and the `<think>`/`<answer>` layout. The steps are deliberately regular (one
  short sentence per line, the same wording every time, arithmetic done column by column) and level 1 is
  genuinely easy, so a ~6M-parameter model can learn to solve it greedily. `corpus(chinese_rate=...)` narrates
  a share of the worked steps in Chinese (language.py), R1-Zero's language mixing for R1's language reward.
* reinforcement learning: `check_answer` is the reward; it takes the model's raw final-answer text, is
  tolerant of harmless variation (whitespace, a trailing period, "x = 5", "1,4, 7") and never raises.
* evaluation: `normalize_answer` maps an answer to a canonical string so that majority voting groups
  equivalent answers (all correct Countdown expressions vote together).

Every task is a `Task`: a generator `(rng, difficulty) -> (question, steps, answer)` and a parser that turns
an answer into its canonical form (None when unparseable); a prediction is right when its canonical form equals
that of the reference answer. Generation is deterministic from the seed. Each problem belongs to one split,
decided by a hash of its question text (`split_of`), so the train and heldout sets never share a question.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.data.language import narrate_in_chinese
from nanoseek.data.tokenizer import BOS, EOS, apply_chat_template

DIFFICULTIES = (1, 2, 3)
LEVEL_WEIGHTS = (0.7, 0.2, 0.1)  # how often a mixed draw (difficulty=None) picks each level
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
MAX_ANSWER_CHARS = 200  # every reference answer is far shorter; longer predictions are wrong without parsing
MAX_NESTING = 20  # parentheses deeper than this are rejected by the Countdown parser


@dataclass(frozen=True)
class Problem:
    task: str  # task name, e.g. "addition"
    question: str  # e.g. "What is 47 + 38?"
    answer: str  # canonical final answer, e.g. "85"
    steps: str  # the worked solution, one step per line, without the final answer line
    difficulty: int


@dataclass(frozen=True)
class Task:
    """A generator of problems and the parser of their answers; an answer is right when its canonical form
    equals that of the reference answer."""

    name: str
    make: Callable[[random.Random, int], tuple[str, list[str], str]]  # (rng, level) -> (question, steps, answer)
    parse: Callable[[str, Problem | None], str | None]  # cleaned answer text -> canonical form or None

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        _check_difficulty(difficulty)
        question, steps, answer = self.make(rng, difficulty)
        return Problem(self.name, question, answer, "\n".join(steps), difficulty)

    def normalize(self, predicted: str, problem: Problem | None = None) -> str | None:
        if not isinstance(predicted, str):
            return None
        text = predicted.strip().rstrip(".").rstrip()
        if not text or len(text) > MAX_ANSWER_CHARS:
            return None
        return self.parse(text, problem)

    def check(self, problem: Problem, predicted: str) -> bool:
        got = self.normalize(predicted, problem)
        return got is not None and got == self.normalize(problem.answer, problem)


# --- arithmetic, narrated column by column (least significant digit first) ---

def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A random positive number with between min_digits and max_digits digits."""
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _columns(n: int, width: int) -> list[int]:
    """The digits of n, least significant first, padded with zeros to `width`."""
    return [int(d) for d in str(n).zfill(width)[::-1]]


def _add_columns(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for x, y in zip(_columns(a, width), _columns(b, width), strict=True):
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = total // 10
        steps.append(f"{terms} = {total}, write {total % 10}" + (f" carry {carry}" if carry else "") + ".")
    if carry:
        steps.append(f"Write the carry {carry}.")
    return steps


def _subtract_columns(a: int, b: int) -> list[str]:
    """a - b for a >= b; a column that would go negative borrows 10 from the next one."""
    width = len(str(a))
    steps, borrow = [], 0
    for x, y in zip(_columns(a, width), _columns(b, width), strict=True):
        borrow_in, borrow = borrow, int(x - y - borrow < 0)
        digit = x + 10 * borrow - y - borrow_in
        terms = f"{x + 10 * borrow} - {y}" + (" - 1" if borrow_in else "")
        steps.append(f"{terms} = {digit}, write {digit}" + (" borrow 1" if borrow else "") + ".")
    return steps


def _multiply_columns(a: int, digit: int) -> list[str]:
    steps, carry = [], 0
    for x in _columns(a, len(str(a))):
        product = x * digit + carry
        terms = f"{x} * {digit}" + (f" + {carry}" if carry else "")
        carry = product // 10
        steps.append(f"{terms} = {product}, write {product % 10}" + (f" carry {carry}" if carry else "") + ".")
    if carry:
        steps.append(f"Write the carry {carry}.")
    return steps


_ADDITION_DIGITS = {1: (1, 2), 2: (3, 4), 3: (5, 6)}
_MULTIPLICATION_DIGITS = {1: ((1, 2), (1, 1)), 2: ((2, 3), (2, 2)), 3: ((3, 4), (2, 3))}


def _addition(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    a, b = (_number(rng, *_ADDITION_DIGITS[level]) for _ in range(2))
    return f"What is {a} + {b}?", _add_columns(a, b) + [f"So {a} + {b} = {a + b}."], str(a + b)


def _subtraction(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    a, b = sorted((_number(rng, *_ADDITION_DIGITS[level]) for _ in range(2)), reverse=True)
    return f"What is {a} - {b}?", _subtract_columns(a, b) + [f"So {a} - {b} = {a - b}."], str(a - b)


def _multiplication(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    a_digits, b_digits = _MULTIPLICATION_DIGITS[level]
    a, b = _number(rng, *a_digits), _number(rng, *b_digits)
    if b < 10:
        steps = _multiply_columns(a, b)
    else:
        # One partial product per non-zero digit of b, then their running sum.
        steps, partials = [], []
        for place, digit in enumerate(_columns(b, len(str(b)))):
            if digit == 0:
                continue
            steps += [f"Multiply {a} by {digit}."] + _multiply_columns(a, digit)
            shifted = f", so {a} * {digit * 10**place} = {a * digit * 10**place}" if place else ""
            steps.append(f"{a} * {digit} = {a * digit}{shifted}.")
            partials.append(a * digit * 10**place)
        total = partials[0]
        for partial in partials[1:]:
            steps += [f"Add {total} + {partial}."] + _add_columns(total, partial)
            steps.append(f"{total} + {partial} = {total + partial}.")
            total += partial
    return f"What is {a} * {b}?", steps + [f"So {a} * {b} = {a * b}."], str(a * b)


# --- Countdown: reach a target from given numbers with + - * / ---

_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
}
_COUNTDOWN_QUESTION = re.compile(r"Make (\d+) from ([\d, ]+) using")


def _countdown_numbers(rng: random.Random, level: int) -> tuple[list[int], str]:
    """The given numbers and the operators the generator may combine them with."""
    if level == 1:
        return [rng.randint(1, 9) for _ in range(3)], "+-"
    if level == 2:
        return [rng.randint(1, 12) for _ in range(3)], "+-*"
    return [rng.choice((25, 50, 75, 100))] + [rng.randint(1, 10) for _ in range(3)], "+-*/"


def _combine(rng: random.Random, a: int, b: int, ops: str) -> tuple[str, int]:
    """A random operator applied to a >= b, keeping every intermediate result a positive integer."""
    while True:
        op = rng.choice(ops)
        if (op == "-" and a == b) or (op == "/" and (b == 1 or a % b)):
            continue
        return op, int(_OPS[op](Fraction(a), b))


def _countdown(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    # Combine two random pool entries until one is left: a solvable instance by construction.
    # Level 1 (three numbers, + and -) is then solved by a search the model can learn to carry out; the
    # harder levels show the construction, which needs search the steps do not show.
    while True:
        numbers, ops = _countdown_numbers(rng, level)
        pool = [(n, str(n)) for n in numbers]
        steps = []
        while len(pool) > 1:
            first, second = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
            (a, a_expr), (b, b_expr) = sorted((first, second), reverse=True)
            op, value = _combine(rng, a, b, ops)
            steps.append(f"{a} {op} {b} = {value}.")
            pool.append((value, f"{_operand(a_expr)} {op} {_operand(b_expr)}"))
        target, expression = pool[0]
        if target not in numbers:  # else the puzzle would be trivial
            break
    rng.shuffle(numbers)
    question = f"Make {target} from {', '.join(map(str, numbers))} using + - * / (each number at most once)."
    if level == 1:
        steps, expression = _countdown_search(numbers, target)
    return question, steps + [f"So {expression} = {target}."], expression


def _countdown_search(numbers: list[int], target: int) -> tuple[list[str], str]:
    """Three numbers a >= b >= c combined by + and - reach a positive target as one of a + b + c,
    a + b - c, a - b + c, a - b - c or b + c - a: try them in that order, one operation at a time, and
    stop at the first that hits -> (the tries, the expression found)."""
    a, b, c = sorted(numbers, reverse=True)
    steps = []
    for x, op1, y, op2, z in ((a, "+", b, "+", c), (a, "+", b, "-", c), (a, "-", b, "+", c),
                              (a, "-", b, "-", c), (b, "+", c, "-", a)):
        first = int(_OPS[op1](x, y))
        value = int(_OPS[op2](first, z))
        hit = value == target
        steps.append(f"{x} {op1} {y} = {first}, {first} {op2} {z} = {value}, " + ("yes." if hit else "no."))
        if hit:
            return steps, f"{x} {op1} {y} {op2} {z}"
    raise AssertionError(f"{numbers} cannot make {target} with + and -")  # unreachable: see the docstring


def _operand(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


class _Unparseable(Exception):
    pass


class _ExpressionParser:
    """Recursive descent over non-negative integers, + - * / and parentheses, evaluated exactly as Fractions."""

    _TOKEN = re.compile(r"\s*([0-9]+|[-+*/()])")

    def __init__(self, text: str):
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            match = self._TOKEN.match(text, pos)
            if match is None:
                raise _Unparseable
            self.tokens.append(match.group(1))
            pos = match.end()
        self.pos = 0
        self.depth = 0
        self.numbers: list[int] = []  # every number literal, in order

    def parse(self) -> Fraction:
        value = self._expression()
        if self.pos != len(self.tokens):
            raise _Unparseable
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expression(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            value = _OPS[op](value, self._term())
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._factor()
            if op == "/" and rhs == 0:
                raise _Unparseable
            value = _OPS[op](value, rhs)
        return value

    def _factor(self) -> Fraction:
        token = self._peek()
        self.pos += 1
        if token is not None and token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        if token == "(" and self.depth < MAX_NESTING:
            self.depth += 1
            value = self._expression()
            if self._peek() != ")":
                raise _Unparseable
            self.pos += 1
            self.depth -= 1
            return value
        raise _Unparseable


def _parse_countdown(text: str, problem: Problem | None) -> str | None:
    """A correct expression -> the target; a wrong one -> "wrong:" + its text without spaces (so it never
    votes with the correct ones); without a problem, just the text without spaces."""
    try:
        parser = _ExpressionParser(text)
        value = parser.parse()
    except _Unparseable:
        return None
    compact = "".join(parser.tokens)
    if problem is None:
        return compact
    match = _COUNTDOWN_QUESTION.match(problem.question)
    if match is None:
        raise ValueError(f"not a countdown question: {problem.question!r}")
    target, given = int(match.group(1)), Counter(int(n) for n in match.group(2).split(","))
    if value == target and not Counter(parser.numbers) - given:
        return str(target)
    return "wrong:" + compact


# --- algebra, sorting, counting ---

def _linear(coefficient: int, constant: int = 0) -> str:
    """e.g. (3, -5) -> "3x - 5", (1, 0) -> "x"."""
    term = "x" if coefficient == 1 else f"{coefficient}x"
    return term + (f" + {constant}" if constant > 0 else f" - {-constant}" if constant < 0 else "")


def _minus(value: int, constant: int) -> str:
    """value - constant written without a double sign, e.g. (20, -5) -> "20 + 5"."""
    return f"{value} - {constant}" if constant >= 0 else f"{value} + {-constant}"


def _linear_equation(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    if level == 1:  # one step: x + b = c, x - b = c or ax = c
        x = rng.randint(1, 20)
        form = rng.randrange(3)
        if form == 2:
            a = rng.randint(2, 9)
            equation, steps = f"{a}x = {a * x}", [f"x = {a * x} / {a} = {x}."]
        else:
            b = rng.randint(1, 20) if form == 0 else -rng.randint(1, x)
            equation, steps = f"{_linear(1, b)} = {x + b}", [f"x = {_minus(x + b, b)} = {x}."]
    elif level == 2:  # ax + b = c
        x, a, b = rng.randint(1, 20), rng.randint(2, 9), rng.choice((1, -1)) * rng.randint(1, 20)
        equation = f"{_linear(a, b)} = {a * x + b}"
        steps = [f"{_linear(a)} = {_minus(a * x + b, b)} = {a * x}.", f"x = {a * x} / {a} = {x}."]
    else:  # ax + b = cx + d, x possibly negative
        x, a = rng.randint(-20, 20), rng.randint(2, 9)
        c, b = rng.randint(1, a - 1), rng.choice((1, -1)) * rng.randint(1, 20)
        d = a * x + b - c * x
        equation = f"{_linear(a, b)} = {_linear(c, d)}"
        steps = [f"{_linear(a)} - {_linear(c)} = {_minus(d, b)} = {d - b}.", f"{_linear(a - c)} = {d - b}."]
        if a - c != 1:
            steps.append(f"x = {(a - c) * x} / {a - c} = {x}.")
    return f"Solve for x: {equation}.", steps + [f"So x = {x}."], str(x)


def _join(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


_SORTING_SIZES = {1: ((3, 4), 9), 2: ((5, 6), 99), 3: ((7, 8), 999)}  # (list length range, largest value)


def _sorting(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    (min_len, max_len), largest = _SORTING_SIZES[level]
    numbers = [rng.randint(0, largest) for _ in range(rng.randint(min_len, max_len))]
    remaining, steps = list(numbers), []
    while len(remaining) > 1:  # selection sort
        smallest = min(remaining)
        steps.append(f"Smallest of {_join(remaining)} is {smallest}.")
        remaining.remove(smallest)
    answer = _join(sorted(numbers))
    steps += [f"Last is {remaining[0]}.", f"So the sorted list is {answer}."]
    return f"Sort in ascending order: {_join(numbers)}.", steps, answer


_COUNTING_LENGTHS = {1: (4, 8), 2: (8, 14), 3: (14, 22)}
_COUNTING_MAX = {1: 5, 2: 8, 3: 12}


def _counting(rng: random.Random, level: int) -> tuple[str, list[str], str]:
    # The count is drawn first, uniformly, so that no constant answer scores well (drawing the word first made
    # "1" right 40% of the time, and GRPO learned to answer it without counting). The other letters come from
    # a few distinct ones, so that repeats are common.
    length = rng.randint(*_COUNTING_LENGTHS[level])
    count = rng.randint(0, min(_COUNTING_MAX[level], length))
    letter = rng.choice(string.ascii_lowercase)
    others = rng.sample([c for c in string.ascii_lowercase if c != letter], rng.randint(2, 5))
    chars = [letter] * count + [rng.choice(others) for _ in range(length - count)]
    rng.shuffle(chars)
    word = "".join(chars)
    positions = [i for i, c in enumerate(word, 1) if c == letter]
    steps = [
        "Letters: " + ", ".join(f"{i} {c}" for i, c in enumerate(word, 1)) + ".",
        f"The letter {letter} is at " + (_join(positions) if positions else "no position") + ".",
        f"So the count is {len(positions)}.",
    ]
    # The word is written letter by letter: a subword tokenizer merges runs of letters into one token, whose
    # letters a small model cannot see.
    spelled = " ".join(word)
    return f'How many times does the letter "{letter}" appear in "{spelled}"?', steps, str(len(positions))


# --- answer parsers ---

_INTEGER = re.compile(r"[+-]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)")  # "1786" or "1,786"
_LIST_ITEM = re.compile(r"[+-]?[0-9]+")


def _parse_integer(text: str, problem: Problem | None = None) -> str | None:
    return str(int(text.replace(",", ""))) if _INTEGER.fullmatch(text) else None


def _parse_solution(text: str, problem: Problem | None = None) -> str | None:
    return _parse_integer(re.sub(r"^x\s*=\s*", "", text))


def _parse_list(text: str, problem: Problem | None = None) -> str | None:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    items = re.split(r"\s*,\s*|\s+", text)
    if not all(_LIST_ITEM.fullmatch(item) for item in items):
        return None
    return _join([int(item) for item in items])


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("addition", _addition, _parse_integer),
        Task("subtraction", _subtraction, _parse_integer),
        Task("multiplication", _multiplication, _parse_integer),
        Task("countdown", _countdown, _parse_countdown),
        Task("linear_equation", _linear_equation, _parse_solution),
        Task("sorting", _sorting, _parse_list),
        Task("counting", _counting, _parse_integer),
    )
}


# --- public API ---

def _get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def _check_difficulty(difficulty: int) -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {', '.join(map(str, DIFFICULTIES))}")


def split_of(question: str) -> str:
    """The split a question belongs to: "heldout" for about HELDOUT_PERCENT% of question texts (by a stable
    hash), "train" for the rest."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _draw(task: Task, rng: random.Random, split: str, difficulty: int | None) -> Problem:
    while True:
        level = difficulty if difficulty is not None else rng.choices(DIFFICULTIES, LEVEL_WEIGHTS)[0]
        problem = task.generate(rng, level)
        if split_of(problem.question) == split:
            return problem


def generate(task: str, n: int, seed: int = 0, split: str = "train", difficulty: int | None = None) -> list[Problem]:
    """n problems of one task, deterministic for the arguments; difficulty None mixes levels (LEVEL_WEIGHTS).
    Problems may repeat (level 1 has only a few thousand distinct questions per task)."""
    chosen = _get_task(task)
    _check_split(split)
    if difficulty is not None:
        _check_difficulty(difficulty)
    rng = random.Random(f"{task}/{seed}/{split}/{difficulty}")
    return [_draw(chosen, rng, split, difficulty) for _ in range(n)]


def check_answer(problem: Problem, predicted: str) -> bool:
    """Whether `predicted` (the raw final-answer text) is a right answer to `problem`; never raises on it."""
    return _get_task(problem.task).check(problem, predicted)


def normalize_answer(problem_or_task: Problem | Task | str, predicted: str) -> str | None:
    """The canonical form of an answer for majority voting, None if unparseable. Given a Problem, the
    correct Countdown expressions all normalise to the target; given only a task, to their own text."""
    if isinstance(problem_or_task, Problem):
        return _get_task(problem_or_task.task).normalize(predicted, problem_or_task)
    task = problem_or_task if isinstance(problem_or_task, Task) else _get_task(problem_or_task)
    return task.normalize(predicted)


def format_prompt(problem: Problem) -> str:
    """The start of a document: what a model is given to complete at RL and evaluation time."""
    return f"Question: {problem.question}\n<think>\n"


DIRECT_ANSWER = "The answer is"  # how a document without worked steps opens its <think> block


def format_document(problem: Problem, worked: bool = True, chinese_share: float = 0.0,
                    rng: random.Random | None = None, chat: bool = False) -> str:
    """The pretraining text of one problem, in the R1-Zero answer format: the worked steps, or (worked=False)
    only a one-line guess of the answer, as text that states answers without working shows them.
    chinese_share: the probability that each line of worked steps is narrated in Chinese (language.py; at
    least one line when it is above 0; rng draws the lines, not needed for 0 or 1); the question, the direct
    answer's line and the <answer> stay as they are.
    chat: as one DeepSeek chat turn instead (data/tokenizer.apply_chat_template: the question as the user's
    message, the steps as the assistant's reasoning, the <answer> as its reply), without the bos and eos that the
    packing puts around every document."""
    if worked:
        thought = narrate_in_chinese(problem.steps, chinese_share, rng, at_least_one=True)
    else:
        thought = f"{DIRECT_ANSWER} {problem.answer}."
    if chat:
        turn = apply_chat_template([{"role": "user", "content": problem.question},
                                    {"role": "assistant", "content": f"<answer>{problem.answer}</answer>",
                                     "reasoning_content": thought}], add_generation_prompt=False)
        return turn.removeprefix(BOS).removesuffix(EOS)
    return f"{format_prompt(problem)}{thought}\n</think>\n<answer>{problem.answer}</answer>"


def extract_answer(completion: str) -> str | None:
    """The text of the last <answer> in a completion (to its </answer>, or to the end if generation stopped
    before it); None when there is none."""
    start = completion.rfind("<answer>")
    if start < 0:
        return None
    return completion[start + len("<answer>"):].split("</answer>", 1)[0]


CHINESE_SHARE = (0.3, 1.0)  # the range of a Chinese-narrated document's share of Chinese lines (drawn uniformly)


def corpus(n_docs: int, seed: int = 0, tasks: list[str] | None = None, split: str = "train",
           difficulty: int | None = None, direct_rate: float = 0.0, chinese_rate: float = 0.0,
           chat_rate: float = 0.0) -> Iterator[str]:
    """n_docs pretraining documents, each of a task drawn uniformly from `tasks` (default: all),
    deterministic from the arguments; a share `direct_rate` of them state the answer without the steps.

    chinese_rate: the share of the worked documents whose steps are narrated partly or wholly in Chinese
    (R1-Zero's language mixing, for R1's language-consistency reward): each of them a random share of its lines,
    uniform in CHINESE_SHARE. Those choices come from a random stream of their own, so the problems and which
    documents are worked are the same for every chinese_rate, and chinese_rate=0 gives the English corpus.
    chat_rate: the share of the documents written as a DeepSeek chat turn (format_document's chat), from a random
    stream of its own as well."""
    if not 0.0 <= direct_rate <= 1.0:
        raise ValueError(f"direct_rate must be between 0 and 1, not {direct_rate!r}")
    for name, rate in (("chinese_rate", chinese_rate), ("chat_rate", chat_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, not {rate!r}")
    names = list(TASKS) if tasks is None else list(tasks)
    if not names:
        raise ValueError("tasks is empty; choose from " + ", ".join(TASKS))
    chosen = [_get_task(name) for name in names]
    _check_split(split)
    if difficulty is not None:
        _check_difficulty(difficulty)
    rng = random.Random(f"corpus/{seed}/{split}/{difficulty}/{','.join(names)}")
    language_rng = random.Random(f"corpus-language/{seed}/{split}/{difficulty}/{','.join(names)}")
    chat_rng = random.Random(f"corpus-chat/{seed}/{split}/{difficulty}/{','.join(names)}")

    def document() -> str:
        problem = _draw(rng.choice(chosen), rng, split, difficulty)
        worked = rng.random() >= direct_rate
        share = 0.0
        if worked and chinese_rate > 0.0 and language_rng.random() < chinese_rate:
            share = language_rng.uniform(*CHINESE_SHARE)
        chat = chat_rate > 0.0 and chat_rng.random() < chat_rate
        return format_document(problem, worked, share, language_rng, chat)

    return (document() for _ in range(n_docs))
