"""Evaluation as DeepSeek-R1 reports it: pass@1 averaged over k samples, cons@k majority vote, greedy accuracy.

pass@1 = mean over problems of (correct samples / k), sampled at temperature 0.6 and top-p 0.95 by default;
cons@k: the most frequent normalised answer among the k samples (unparseable ones do not vote) is checked;
pass@k: whether any of the k samples is right (the ceiling that sharpening the sampled distribution can reach);
greedy: one temperature-0 completion per problem. Also the format rate (R1-Zero's structure) and the mean
completion length, per task and overall, and with EvalConfig.language the reasoning's language consistency.
`evaluate_instructions`: the accuracy of replies to held-out built-in non-reasoning instructions, whose replies a
reward model can score (`reward_model_score`).

The problems are the built-in tasks' held-out ones (`heldout_problems`), or a user's (data/problems.read_problems):
an answer is right by the problem's built-in checker, or by math-verify for a user's problem without one
(rewards.are_right, which checks a whole evaluation's answers concurrently). `problem_prompt` is how a problem
becomes a prompt, for the evaluation, `nanoseek grpo` and `nanoseek sample` alike.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from nanoseek.data import tasks
from nanoseek.data.chat import check_instruction, instruction_conversations, instruction_kind
from nanoseek.data.preferences import final_summary
from nanoseek.data.tokenizer import ASSISTANT, END_THINK, THINK, USER, Tokenizer
from nanoseek.infer.chat import completion_text, encode_prompt
from nanoseek.infer.engine import Completion, Engine, SamplingParams, StepOutput
from nanoseek.model import DeepSeekV3
from nanoseek.rewards import Sample, Scorer, are_right, final_answer, format_reward, language_reward

# How a problem becomes a prompt (infer.chat.TEMPLATES less "raw"): "question", the built-in corpus's format
# (pretrained and R1-Zero models); "chat", DeepSeek's chat format (models fine-tuned by `nanoseek sft`); "r1-zero",
# the R1-Zero paper's prompt.
PROBLEM_TEMPLATES = ("question", "chat", "r1-zero")


@dataclass
class EvalConfig:
    k: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 160
    seed: int = 0
    greedy: bool = True
    template: str = "question"  # how a problem becomes a prompt: one of PROBLEM_TEMPLATES
    language: str | None = None  # the reasoning's target language ("en", "zh"): also report "language", the mean
                                 # language consistency of the samples' reasoning (rewards.language_reward)


def problem_prompt(tokenizer: Tokenizer, problem: tasks.Problem, template: str = "question") -> list[int]:
    """The prompt's token ids of a problem: its question as the user's message in the template (one of
    PROBLEM_TEMPLATES); how `nanoseek eval`, `nanoseek grpo` and `nanoseek sample` all ask a problem. The
    `question` template is the built-in corpus's own start of a document (tasks.format_prompt), after bos."""
    return encode_prompt(tokenizer, [{"role": "user", "content": problem.question}], template)


def check_template(tokenizer: Tokenizer, template: str) -> None:
    """Refuse a template the tokenizer cannot write: one of PROBLEM_TEMPLATES, and for `chat` the chat template's
    special tokens (else its tags would be encoded as plain text); raises ValueError / TokenizerError."""
    if template not in PROBLEM_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(PROBLEM_TEMPLATES)}")
    if template == "chat":
        for token in (USER, ASSISTANT, THINK, END_THINK):
            tokenizer.token_id(token)


def vote_key(problem: tasks.Problem, answer: str | None) -> str | None:
    """What cons@k counts an answer as, None when it does not vote: the built-in checker's canonical form (all
    right Countdown expressions vote together); for a math-verify problem the answer's text without spaces, `$`
    and a final period (so `\\frac{1}{2}` and `0.5` vote apart; the winner is then checked by math-verify)."""
    if answer is None:
        return None
    if problem.task in tasks.TASKS:
        return tasks.normalize_answer(problem, answer)
    key = re.sub(r"\s+", "", answer).strip("$").rstrip(".")
    return key or None


def score_problem(problem: tasks.Problem, samples: list[str], correct: Sequence[bool] | None = None
                  ) -> dict[str, float]:
    """One problem's k sampled completions -> pass@1, cons@k, pass@k, format rate. correct: whether each sample's
    final answer is right, when already known (evaluate checks all of an evaluation's answers at once)."""
    answers = [final_answer(s) for s in samples]
    if correct is None:
        correct = are_right([(problem, a) for a in answers])
    keys = [vote_key(problem, a) for a in answers]
    votes = Counter(key for key in keys if key is not None)
    majority = votes.most_common(1)[0][0] if votes else None
    winner = next((i for i, key in enumerate(keys) if key is not None and key == majority), None)
    return {"pass@1": sum(correct) / len(samples),
            "cons@k": float(winner is not None and correct[winner]),
            "pass@k": float(any(correct)),
            "format": sum(format_reward(Sample(problem, s)) for s in samples) / len(samples)}


def sample_completions(model: DeepSeekV3, tokenizer: Tokenizer, problems: list[tasks.Problem], cfg: EvalConfig,
                       max_batch: int = 64, progress: bool = False) -> tuple[list[Completion], list[Completion]]:
    """-> (k sampled completions per problem, problem by problem; one greedy completion per problem, or none
    when cfg.greedy is off), all stopped at </answer>. progress: a bar of completions done (and tokens/s) on
    stderr."""
    prompts = [problem_prompt(tokenizer, p, cfg.template) for p in problems]
    return sample_prompts(model, tokenizer, prompts, cfg, max_batch, progress)


def sample_prompts(model: DeepSeekV3, tokenizer: Tokenizer, prompts: list[list[int]], cfg: EvalConfig,
                   max_batch: int = 64, progress: bool = False) -> tuple[list[Completion], list[Completion]]:
    """sample_completions of prompts given as token ids."""
    stop = {"stop_ids": tokenizer.stop_ids, "stop_strings": ("</answer>",)}
    engine = Engine(model, max_batch=max_batch, max_len=max(map(len, prompts)) + cfg.max_new_tokens,
                    tokenizer=tokenizer)
    with tqdm(total=len(prompts) * (cfg.k + cfg.greedy), desc="evaluating", unit="completion",
              disable=not progress) as bar:
        start, tokens = time.perf_counter(), 0

        def count(outputs: list[StepOutput]) -> None:
            nonlocal tokens
            tokens += sum(len(o.new_tokens) for o in outputs)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
            bar.update(sum(o.finished for o in outputs))

        sampled = engine.generate([p for p in prompts for _ in range(cfg.k)], SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, **stop),
            on_step=count)
        greedy = (engine.generate(prompts, SamplingParams(max_new_tokens=cfg.max_new_tokens, **stop), on_step=count)
                  if cfg.greedy else [])
    return sampled, greedy


def evaluate(model: DeepSeekV3, tokenizer: Tokenizer, problems: list[tasks.Problem], cfg: EvalConfig | None = None,
             max_batch: int = 64, progress: bool = False) -> dict[str, Any]:
    cfg = cfg or EvalConfig()
    sampled, greedy = sample_completions(model, tokenizer, problems, cfg, max_batch, progress)
    # Every answer is checked in one batch: a user's problems' math-verify checks run concurrently.
    asked = [problems[i // cfg.k] for i in range(len(sampled))] + list(problems[:len(greedy)])
    right = are_right([(p, final_answer(c.text)) for p, c in zip(asked, [*sampled, *greedy])])
    rows = []
    for i, problem in enumerate(problems):
        group = slice(i * cfg.k, (i + 1) * cfg.k)
        texts = [c.text for c in sampled[group]]
        row = {"task": problem.task, **score_problem(problem, texts, right[group]),
               "length": sum(len(c.tokens) for c in sampled[group]) / cfg.k}
        if cfg.language:
            row["language"] = sum(language_reward(Sample(problem, t), cfg.language) for t in texts) / cfg.k
        if greedy:
            row["greedy"] = float(right[len(sampled) + i])
        rows.append(row)
    metrics = [m for m in rows[0] if m != "task"]

    def mean(subset: list[dict]) -> dict[str, float]:
        return {m: sum(r[m] for r in subset) / len(subset) for m in metrics}

    per_task = {name: mean([r for r in rows if r["task"] == name]) for name in dict.fromkeys(r["task"] for r in rows)}
    return {"problems": len(problems), "k": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "overall": mean(rows), "per_task": per_task}


def heldout_problems(n_per_task: int, difficulty: int | None = 1, seed: int = 0) -> list[tasks.Problem]:
    """Distinct held-out questions of every built-in task (easy levels repeat, so more are drawn than kept)."""
    problems = []
    for name in tasks.TASKS:
        unique = {p.question: p for p in tasks.generate(name, 4 * n_per_task, seed=seed, split="heldout",
                                                        difficulty=difficulty)}
        problems += list(unique.values())[:n_per_task]
    return problems


def evaluate_instructions(model: DeepSeekV3, tokenizer: Tokenizer, n: int, cfg: EvalConfig | None = None,
                          max_batch: int = 64, progress: bool = False) -> dict[str, Any]:
    """Accuracy on n held-out built-in non-reasoning instructions (data/chat.instruction_conversations of the
    "heldout" split, seed cfg.seed: questions the training split never has), asked in cfg.template, k sampled
    replies each: a reply is right when check_instruction passes its answer (the text after `</think>`,
    preferences.final_summary). -> the accuracy overall and per kind of instruction, and each reply's question and
    answer ("prompts", "replies"), for a reward model to score (reward_model_score)."""
    cfg = replace(cfg or EvalConfig(), greedy=False)
    questions = [c.messages[0]["content"] for c in instruction_conversations(n, cfg.seed, split="heldout")]
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}], cfg.template) for q in questions]
    sampled, _ = sample_prompts(model, tokenizer, prompts, cfg, max_batch, progress)
    params = SamplingParams(stop_ids=tokenizer.stop_ids)
    asked = [questions[i // cfg.k] for i in range(len(sampled))]
    replies = [final_summary(completion_text(tokenizer, c, params)) for c in sampled]
    right = [check_instruction(q, r) for q, r in zip(asked, replies, strict=True)]
    kinds = [instruction_kind(q) for q in asked]
    per_kind = {kind: sum(r for r, k in zip(right, kinds) if k == kind) / kinds.count(kind)
                for kind in dict.fromkeys(kinds)}
    return {"instructions": n, "k": cfg.k, "accuracy": sum(right) / len(right), "per_kind": per_kind,
            "prompts": asked, "replies": replies}


def reward_model_score(scorer: Scorer, instructions: dict[str, Any]) -> float:
    """The mean score a reward model (train/reward_model.RewardModel) gives the replies of evaluate_instructions."""
    scores = scorer.score(instructions["prompts"], instructions["replies"])
    return sum(scores) / len(scores)


def format_table(report: dict[str, Any]) -> str:
    cols = list(report["overall"])
    lines = ["| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, values in [*report["per_task"].items(), ("overall", report["overall"])]:
        cells = [f"{v:.1f}" if c == "length" else f"{100 * v:.1f}%" for c, v in values.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
