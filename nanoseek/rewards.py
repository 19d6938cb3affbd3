"""Rule-based rewards of DeepSeek-R1(-Zero): accuracy, format, language consistency, and overlong shaping; and
R1's helpfulness reward of a trained reward model, for all-scenario RL's general prompts.

Each reward is a plain function of the completion text (and the problem) returning a float; `RewardSet`
composes them with weights. A malformed completion scores 0 and never raises. `RewardRouter` scores each sample
with the RewardSet of its prompt's source: a reasoning problem (tasks.Problem) with the rule rewards, a general
prompt (GeneralPrompt) with the reward model's.

Completions are the text after the prompt. Prompts end inside `<think>` (both the built-in `question`
template and DeepSeek's chat template open it), so a well-formed completion is
`reasoning </think> <answer> answer </answer>`; one that opens `<think>` itself is accepted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Protocol

from nanoseek.data import tasks
from nanoseek.data.preferences import final_summary
from nanoseek.data.problems import boxed_answer
from nanoseek.math_check import math_equal, math_equal_many

_FORMAT = re.compile(r"^\s*(?:<think>)?(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL)


REASONING, GENERAL = "reasoning", "general"  # the sources of prompts: verifiable problems, general prompts


@dataclass(frozen=True)
class GeneralPrompt:
    """A general prompt of R1's all-scenario RL: a conversation ending with the user's turn, without a reference
    answer; a reward model judges the replies to it (reward_model_reward)."""

    messages: tuple[dict, ...]
    where: str = ""  # where it came from: "path/to/file.jsonl:3", or "built-in instruction train #3"
    task: ClassVar[str] = GENERAL  # what a per-task log calls it

    @property
    def question(self) -> str:
        """The user's last message."""
        return self.messages[-1]["content"]


def prompt_source(problem: tasks.Problem | GeneralPrompt) -> str:
    """GENERAL for a general prompt, REASONING for a verifiable problem."""
    return GENERAL if isinstance(problem, GeneralPrompt) else REASONING


@dataclass(frozen=True)
class Sample:
    """What a reward sees: the problem (task + reference answer) or general prompt, and the completion's text and
    length."""

    problem: tasks.Problem | GeneralPrompt
    completion: str
    num_tokens: int = 0


def final_answer(completion: str) -> str | None:
    """The answer a completion commits to: its last <answer> block, else its last \\boxed{}."""
    answer = tasks.extract_answer(completion)
    return answer if answer is not None else boxed_answer(completion)


def is_right(problem: tasks.Problem, answer: str | None) -> bool:
    """Whether a final answer is right: the built-in task's own checker (a user's problem may name one), else
    math-verify against the reference answer (a user's problem without a task). No answer, or a blank one, is
    wrong."""
    return are_right([(problem, answer)])[0]


def are_right(pairs: Sequence[tuple[tasks.Problem, str | None]]) -> list[bool]:
    """is_right of each (problem, answer) pair; the math-verify checks, each distinct (reference, answer) pair
    once, run concurrently in the worker pool (math_equal_many), so a batch costs about its slowest check."""
    verdicts = [False] * len(pairs)
    math: dict[tuple[str, str], list[int]] = {}
    for i, (problem, answer) in enumerate(pairs):
        if answer is None or not answer.strip():
            continue
        if problem.task in tasks.TASKS:
            verdicts[i] = tasks.check_answer(problem, answer)
        else:
            math.setdefault((problem.answer, answer), []).append(i)
    checks = list(math)
    results = [math_equal(*checks[0])] if len(checks) == 1 else math_equal_many(checks) if checks else []
    for pair, right in zip(checks, results):
        for i in math[pair]:
            verdicts[i] = right
    return verdicts


def accuracy_reward(sample: Sample) -> float:
    """1 when the final answer is right (is_right): the built-in task's own checker, or math-verify."""
    return float(is_right(sample.problem, final_answer(sample.completion)))


def accuracy_rewards(samples: Sequence[Sample]) -> list[float]:
    """accuracy_reward of each sample, their math-verify checks run together (are_right)."""
    return [float(right) for right in are_right([(s.problem, final_answer(s.completion)) for s in samples])]


accuracy_reward.batched = accuracy_rewards  # RewardSet.score uses it for a batch


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

    A word is English when it is a run of two or more Latin letters, Chinese/Japanese/Korean when it is CJK (each
    CJK character counts as a word). Numbers, symbols and single letters (a variable such as x, the letters a
    counting problem spells out) are data, not narration, and do not count. No words: 1.
    """
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en' or 'zh', not {language!r}")
    latin = len(re.findall(r"[A-Za-z]{2,}", text))
    cjk = len(_CJK.findall(text))
    total = latin + cjk
    if total == 0:
        return 1.0
    return (latin if language == "en" else cjk) / total


def language_reward(sample: Sample, language: str = "en") -> float:
    """language_consistency of the chain of thought: the completion's text before `</think>` (all of it when it
    never closes the block), an opening `<think>` tag aside."""
    think = sample.completion.split("</think>")[0].strip().removeprefix("<think>")
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
        return self.score([sample])[0]

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        """Each sample's scores by name, and their weighted "total". A function with a `batched` form (a function
        of the list of samples; the accuracy's runs its math-verify checks concurrently) scores them in one call;
        the others one by one."""
        columns = {name: _scores(fn, samples) for name, fn in self.functions.items()}
        rows = []
        for i in range(len(samples)):
            scores = {name: column[i] for name, column in columns.items()}
            scores["total"] = sum(self.weights.get(name, 1.0) * s for name, s in scores.items())
            rows.append(scores)
        return rows


def _scores(fn: RewardFn, samples: Sequence[Sample]) -> list[float]:
    """fn of each sample (its batched form where it has one); a reward must never take the run down: a sample
    whose reward raises scores 0 (a batch that raises is scored one by one)."""
    batched = getattr(fn, "batched", None)
    if batched is not None:
        try:
            scores = [float(s) for s in batched(samples)]
        except Exception:  # noqa: BLE001 - then one by one, below
            scores = []
        if len(scores) == len(samples):
            return scores
    scores = []
    for sample in samples:
        try:
            scores.append(float(fn(sample)))
        except Exception:  # noqa: BLE001 - malformed scores 0
            scores.append(0.0)
    return scores


@dataclass
class RewardRouter:
    """Rewards chosen per sample by its prompt's source (prompt_source), as R1's all-scenario RL: each source's
    RewardSet scores only the samples of that source (in one call, so batched forms still batch)."""

    sets: dict[str, RewardSet]

    def score(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        """Each sample's scores by name and their "total", from its own source's RewardSet only."""
        by_source: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            by_source.setdefault(prompt_source(sample.problem), []).append(i)
        rows: list[dict[str, float]] = [{} for _ in samples]
        for source, indices in by_source.items():
            if source not in self.sets:
                raise ValueError(f"no rewards for {source} prompts (the rewards score {', '.join(self.sets)} ones)")
            for i, row in zip(indices, self.sets[source].score([samples[i] for i in indices]), strict=True):
                rows[i] = row
        return rows


def r1_zero_rewards(format_weight: float = 1.0, max_tokens: int | None = None, overlong_buffer: int = 0,
                    language_weight: float = 0.0, language: str = "en") -> RewardSet:
    """Accuracy + format as in R1-Zero; optionally R1's language consistency (language_weight > 0: the share of the
    reasoning's words in `language`) and the overlong shaping."""
    functions: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}
    weights = {"accuracy": 1.0, "format": format_weight}
    if language_weight:
        functions["language"] = partial(language_reward, language=language)
        weights["language"] = language_weight
    if max_tokens and overlong_buffer:
        functions["overlong"] = lambda s: overlong_penalty(s.num_tokens, max_tokens, overlong_buffer)
        weights["overlong"] = 1.0
    return RewardSet(functions, weights)


class Scorer(Protocol):
    """What reward_model_reward needs of a reward model (train/reward_model.load_reward_model's RewardModel)."""

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> list[float]: ...


def reward_model_reward(model: Scorer) -> RewardFn:
    """DeepSeek-R1's helpfulness reward: a trained reward model's score (`nanoseek rm`) of the completion's final
    summary, the text after `</think>` (the whole completion when it has none): the reasoning is never judged.
    The prompt is a general prompt's conversation, or a problem's question. Its `batched` form scores a batch in one
    call of model.score."""

    def batched(samples: Sequence[Sample]) -> list[float]:
        prompts = [list(s.problem.messages) if isinstance(s.problem, GeneralPrompt) else s.problem.question
                   for s in samples]
        return model.score(prompts, [final_summary(s.completion) for s in samples])

    def reward(sample: Sample) -> float:
        return batched([sample])[0]

    reward.batched = batched
    return reward
