r"""A user's problems: JSONL files of verifiable questions for `nanoseek grpo`, `nanoseek eval` and `nanoseek sample`.

A line is `{"question": ..., "answer": ..., "task": ...}`. The answer may be a worked solution: its final answer is
read after the last `####` (GSM8K) or from the last `\boxed{}` (MATH), else the whole text is the answer. The
optional "task" names a built-in checker (nanoseek/data/tasks.py), which then grades the answers; without one,
math-verify does (nanoseek/math_check.py), and the problem's task is USER_TASK, the name its per-task numbers are
logged under.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from nanoseek.data import tasks
from nanoseek.data.chat import jsonl_files
from nanoseek.data.shards import DataError

USER_TASK = "user"  # the task of a user's problem that names no built-in checker: math-verify checks its answers


class ProblemFileError(DataError):
    """A problems JSONL line (or file) that cannot be used; the message names its file and line."""


def boxed_answer(text: str) -> str | None:
    r"""The content of the last \boxed{...}, with nested braces kept whole; None when there is none (or it is
    never closed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def reference_answer(text: str) -> str:
    r"""The final answer in a problem's `answer` field: after the last `####` (GSM8K; thousands commas dropped),
    else the last `\boxed{}` (MATH solutions), else the whole text; stripped."""
    if "####" in text:
        return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.rsplit("####", 1)[1]).strip()
    boxed = boxed_answer(text)
    return (boxed if boxed is not None else text).strip()


def read_problems(paths: Iterable[str | Path]) -> list[tasks.Problem]:
    """The problems of JSONL files (or directories of *.jsonl), in file and line order: per line an object with a
    "question" and an "answer" (a string or a number; read by reference_answer), and optionally a "task" naming a
    built-in checker (then the checker must take the answer as right: it parses, and a countdown expression makes
    the target); without one math-verify checks the answers. Blank lines are skipped; any other bad line, and a
    file without a problem, is a ProblemFileError naming its file (and line)."""
    problems = []
    for file in jsonl_files(paths):
        before = len(problems)
        try:
            lines = file.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
        except UnicodeDecodeError as e:
            raise ProblemFileError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for number, line in enumerate(lines, start=1):
            if line.strip():
                problems.append(_problem(line, f"{file}:{number}"))
        if len(problems) == before:
            raise ProblemFileError(f"{file} holds no problems")
    return problems


def _problem(line: str, where: str) -> tasks.Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProblemFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ProblemFileError(f"{where}: expected a JSON object with a \"question\" and an \"answer\"")
    question, answer, task = row.get("question"), row.get("answer"), row.get("task") or USER_TASK
    if not isinstance(question, str) or not question.strip():
        raise ProblemFileError(f"{where}: no \"question\" (a non-empty string) in this line")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not reference_answer(answer):
        raise ProblemFileError(f"{where}: no \"answer\" (a non-empty string or a number) in this line")
    if task != USER_TASK and task not in tasks.TASKS:
        raise ProblemFileError(f"{where}: unknown task {task!r}: name a built-in checker "
                               f"({', '.join(tasks.TASKS)}), or leave it out for math-verify")
    problem = tasks.Problem(task, question.strip(), reference_answer(answer), "", 0)
    if task != USER_TASK:
        try:
            canonical = tasks.normalize_answer(problem, problem.answer)
        except ValueError as e:  # a countdown checker given a question that is not one
            raise ProblemFileError(f"{where}: the {task} checker cannot read this problem: {e}") from None
        # Unparseable, or (countdown) an expression that does not make the target, which normalises to "wrong:...":
        # the checker would then grade every sample against a wrong reference.
        if canonical is None or canonical.startswith("wrong:"):
            raise ProblemFileError(f"{where}: the {task} checker does not take the answer {problem.answer!r} as "
                                   "a right answer to this question")
    return problem


def problems_fingerprint(problems: Sequence[tasks.Problem]) -> str:
    """A digest of the problems (task, question, reference answer, in order): a resumed run checks that it is
    given the problems it started on."""
    digest = hashlib.sha256()
    for p in problems:
        digest.update(json.dumps([p.task, p.question, p.answer], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]
