"""Rule-based rewards of DeepSeek-R1(-Zero): accuracy, format, language consistency, and overlong shaping.

Each reward is a plain function of the completion text (and the problem) returning a float; `RewardSet`
composes them with weights. A malformed completion scores 0 and never raises.

Completions are the text after the prompt. Prompts end inside `<think>` (both the built-in `question`
template and DeepSeek's chat template open it), so a well-formed completion is
`reasoning </think> <answer> answer </answer>`; one that opens `<think>` itself is accepted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from nanoseek.data import tasks
from nanoseek.math_check import math_equal

_FORMAT = re.compile(r"^\s*(?:<think>)?(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL)


@dataclass(frozen=True)
class Sample:
    """What a reward sees: the problem (task + reference answer) and the completion's text and length."""

    problem: tasks.Problem
    completion: str
    num_tokens: int = 0


def boxed_answer(text: str) -> str | None:
    r"""The content of the last \boxed{...}, with nested braces kept whole."""
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


def final_answer(completion: str) -> str | None:
    """The answer a completion commits to: its last <answer> block, else its last \\boxed{}."""
    answer = tasks.extract_answer(completion)
    return answer if answer is not None else boxed_answer(completion)


def accuracy_reward(sample: Sample) -> float:
    """1 when the final answer is right: the built-in task's own checker, or math-verify for math answers."""
    answer = final_answer(sample.completion)
    if answer is None or not answer.strip():
        return 0.0
    problem = sample.problem
    if problem.task in tasks.TASKS:
        return float(tasks.check_answer(problem, answer))
    return float(math_equal(problem.answer, answer))


def format_reward(sample: Sample) -> float:
    """1 for exactly one `... </think> <answer> ... </answer>` structure (R1-Zero's template), else 0."""
    match = _FORMAT.match(sample.completion)
    if not match:
        return 0.0
    think, answer = match["think"], match["answer"]
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    clean = not any(tag in think or tag in answer for tag in tags)
    return float(clean and bool(think.strip()) and bool(answer.strip()))


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def language_consistency(text: str, language: str = "en") -> float:
    """R1's language-consistency reward: the share of the chain of thought's words in the target language.

    Words are runs of letters; a word is English when it is Latin script, Chinese/Japanese/Korean when it
    is CJK (each CJK character counts as a word). Numbers and symbols do not count. No words: 1.
    """
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en' or 'zh', not {language!r}")
    latin = len(re.findall(r"[A-Za-z]+", text))
    cjk = len(_CJK.findall(text))
    total = latin + cjk
    if total == 0:
        return 1.0
    return (latin if language == "en" else cjk) / total


def language_reward(sample: Sample, language: str = "en") -> float:
    think = sample.completion.split("</think>")[0]
    return language_consistency(think, language)


def overlong_penalty(num_tokens: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer, then linearly down to -1 at max_tokens."""
    if num_tokens <= max_tokens - buffer:
        return 0.0
    return max(-1.0, (max_tokens - buffer - num_tokens) / buffer)


RewardFn = Callable[[Sample], float]


@dataclass
class RewardSet:
    """Named reward functions with weights; the total is the weighted sum, each term logged on its own."""

    functions: dict[str, RewardFn]
    weights: dict[str, float]

    def __call__(self, sample: Sample) -> dict[str, float]:
        scores = {}
        for name, fn in self.functions.items():
            try:
                scores[name] = float(fn(sample))
            except Exception:  # noqa: BLE001 - a reward must never take the run down; malformed scores 0
                scores[name] = 0.0
        scores["total"] = sum(self.weights.get(name, 1.0) * s for name, s in scores.items())
        return scores


def r1_zero_rewards(format_weight: float = 1.0, max_tokens: int | None = None, overlong_buffer: int = 0
                    ) -> RewardSet:
    """Accuracy + format as in R1-Zero; optionally the overlong shaping."""
    functions: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}
    weights = {"accuracy": 1.0, "format": format_weight}
    if max_tokens and overlong_buffer:
        functions["overlong"] = lambda s: overlong_penalty(s.num_tokens, max_tokens, overlong_buffer)
        weights["overlong"] = 1.0
    return RewardSet(functions, weights)
