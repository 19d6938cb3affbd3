"""`nanoseek sample`: DeepSeek-R1's rejection sampling. Draw k completions per prompt from a checkpoint, keep the
ones whose answer is right and whose reasoning is clean, and write them as chat JSONL that `nanoseek sft --data`
trains on, with a summary of what was kept and why the rest was not.

R1 (paper, 2.3.3): "we curate reasoning prompts and generate reasoning trajectories by performing rejection
sampling from the checkpoint" of reasoning-oriented RL, "we have filtered out chain-of-thought with mixed
languages, long paragraphs, and code blocks", "for each prompt, we sample multiple responses and retain only the
correct ones".
Here a sample is judged by `judge`, a pure function of (problem, completion text, token count) that gives the
first reason to reject it, in this order:

    too_long    more than max_tokens tokens (the engine draws max_tokens + 1 at most, so an unfinished sample is
                too long rather than malformed);
    no_format   not R1's layout: the completion starts inside the think block (the prompt opened `<think>\\n`), so
                it must be reasoning, one `</think>`, then an answer that commits to one final answer, an
                `<answer>...</answer>` block (the built-in format, what the rewards and `nanoseek eval` grade) or a
                `\\boxed{}`; non-empty reasoning; no other think or answer tags;
    wrong       the final answer is wrong: the built-in task's checker, or math-verify (nanoseek/math_check.py)
                for a user's problem without a task;
    language    the share of the reasoning's words in the target language (R1's language-consistency reward,
                rewards.language_consistency) is below min_language_share;
    repetitive  degenerate repetition: the share of the completion's word 4-grams that repeat an earlier 4-gram
                (repeated_ngram_share) is above max_repeat_share. The worked steps of 63,000 built-in problems
                (3,000 per task and level, seed 1, with the cold-start wording and the answer around them) score
                at most 0.46 (2989 * 444 repeats a whole partial product three times); a loop of one sentence
                scores near 1;

and then, over the samples of one prompt in order (`select`): duplicate (the same reasoning and answer, case and
spacing aside, as a sample kept before it) and over_limit (the prompt already has max_per_prompt kept samples).
Every sample drawn gets exactly one verdict, so the kept samples and the rejections add up to the samples drawn.

Prompts are the built-in tasks' problems of the TRAIN split (never the held-out questions `nanoseek eval` asks),
or a user's problems JSONL. The prompt is the chat template's (`nanoseek eval --template chat`, how a model
fine-tuned by `nanoseek sft` is asked), or `--template question` for a base model pretrained on the built-in
corpus; both end inside `<think>`. Built-in non-reasoning instructions (data/chat.instruction_conversations) and
the user's own chat files can be appended to the output, counted apart.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from nanoseek.atomic import write_text
from nanoseek.checkpoint import load_pretrained, resolve_checkpoint
from nanoseek.config import require
from nanoseek.data import tasks
from nanoseek.data.chat import instruction_conversations, read_conversations
from nanoseek.data.problems import boxed_answer, read_problems
from nanoseek.data.tokenizer import END_THINK, THINK, Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import check_template, problem_prompt
from nanoseek.infer.chat import completion_text
from nanoseek.infer.engine import Engine, SamplingParams, StepOutput
from nanoseek.model import DeepSeekV3
from nanoseek.rewards import is_right, language_consistency

REASONS = ("too_long", "no_format", "wrong", "language", "repetitive", "duplicate", "over_limit")
STOP_STRINGS = ("</answer>",)  # as `nanoseek eval`: the built-in answer format ends there
_TAGS = (THINK, END_THINK, "<answer>", "</answer>")


class SampleError(NanoseekError, ValueError):
    pass


@dataclass
class SampleConfig:
    """`nanoseek sample`'s options: the model, the prompts, the sampling, the rejection rules, the output."""

    model: str = "runs/sft"  # the model to sample from: a checkpoint directory, or a run directory (its latest)
    problems: tuple[str, ...] = ()  # problems JSONL files or directories of them ({"question", "answer", optional
                                    # "task"} per line; none: the built-in tasks' training problems)
    tasks: tuple[str, ...] = ()  # built-in tasks to draw problems from (none: all of them)
    problems_per_task: int = 50  # distinct built-in problems per task (from the training split)
    difficulty: int = 1  # level of the built-in problems (0: mixed, tasks.LEVEL_WEIGHTS)
    k: int = 8  # samples drawn per prompt
    template: Literal["chat", "question"] = "chat"  # how a problem becomes a prompt: chat (DeepSeek's chat
                                                   # format: models fine-tuned by `nanoseek sft`), question (the
                                                   # built-in corpus's format: pretrained and R1-Zero models)
    temperature: float = 0.6  # sampling temperature (0 is greedy: then k > 1 draws the same sample k times)
    top_p: float = 0.95  # nucleus sampling: keep the most likely tokens up to this probability (1 keeps all)
    max_tokens: int = 256  # length cap: a sample longer than this many tokens (or unfinished) is too_long
    language: Literal["en", "zh"] = "en"  # the reasoning's target language
    min_language_share: float = 0.95  # share of the reasoning's words in the target language at least
    max_repeat_share: float = 0.5  # share of the completion's word 4-grams that repeat an earlier one, at most
    max_per_prompt: int = 0  # kept samples per prompt at most (0: no limit)
    instructions: int = 0  # built-in non-reasoning instructions (answered with no chain of thought) to append
    data: tuple[str, ...] = ()  # chat JSONL files to copy into the output (checked as `nanoseek sft` reads them)
    out_dir: str = "runs/sample"  # writes data.jsonl (the conversations), summary.json and summary.md
    overwrite: bool = False  # replace an existing out_dir/data.jsonl
    seed: int = 0  # the built-in problems and instructions drawn, and the sampling (sample i uses seed + i)
    max_batch: int = 64  # sequences decoded together (cache slots)
    device: str = "auto"  # auto (CUDA when there is one), cpu, cuda, cuda:1, ...

    def __post_init__(self) -> None:
        self.problems, self.tasks, self.data = tuple(self.problems), tuple(self.tasks), tuple(self.data)
        need = _need
        for name in ("problems_per_task", "k", "max_tokens", "max_batch"):
            need(self, getattr(self, name) > 0, name, "must be > 0")
        for name in ("max_per_prompt", "instructions"):
            need(self, getattr(self, name) >= 0, name, "must be >= 0")
        need(self, self.difficulty in (0, *tasks.DIFFICULTIES), "difficulty",
             f"must be 0 (mixed) or one of {', '.join(map(str, tasks.DIFFICULTIES))}")
        need(self, self.template in ("chat", "question"), "template", "must be 'chat' or 'question'")
        need(self, self.language in ("en", "zh"), "language", "must be 'en' or 'zh'")
        need(self, self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
        need(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        for name in ("min_language_share", "max_repeat_share"):
            need(self, 0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        need(self, not (self.tasks and self.problems), "tasks", "chooses built-in problems; with --problems the "
             "problems are the file's")
        unknown = [t for t in self.tasks if t not in tasks.TASKS]
        need(self, not unknown, "tasks", f"unknown task {', '.join(map(repr, unknown))}; choose from "
             f"{', '.join(tasks.TASKS)}")

    @property
    def rules(self) -> Rules:
        return Rules(self.max_tokens, self.language, self.min_language_share, self.max_repeat_share)


def _need(config: Any, ok: bool, name: str, why: str) -> None:
    require(config, ok, name, why, kind="sample option")


# ---------------------------------------------------------------------- the rejection filter
@dataclass(frozen=True)
class Rules:
    """What a kept sample must satisfy (see the module's docstring)."""

    max_tokens: int = 256
    language: str = "en"
    min_language_share: float = 0.95
    max_repeat_share: float = 0.5
    ngram: int = 4


def split_completion(completion: str) -> tuple[str, str] | None:
    """A completion that starts inside the think block -> (reasoning, answer), both stripped, when it has R1's
    layout: reasoning, exactly one `</think>`, then an answer (a `<think>` at its very start is tolerated, as
    R1-Zero's models write one). None when the layout is broken: no `</think>`, a second think tag, empty
    reasoning or answer."""
    text = completion.strip().removeprefix(THINK)
    if text.count(END_THINK) != 1 or THINK in text:
        return None
    reasoning, answer = (part.strip() for part in text.split(END_THINK))
    return (reasoning, answer) if reasoning and answer else None


def final_answer_of(answer: str) -> str | None:
    r"""The final answer an answer part commits to: the content of its one `<answer>...</answer>` block, with
    nothing after it; else the last `\boxed{}`. None when there is neither, or the tags are not one clean pair."""
    if "<answer>" in answer or "</answer>" in answer:
        match = re.fullmatch(r"(?s)(.*?)<answer>(.*?)</answer>\s*", answer)
        if match is None or answer.count("<answer>") != 1 or answer.count("</answer>") != 1:
            return None
        final = match[2].strip()
        return final or None
    boxed = (boxed_answer(answer) or "").strip()
    return boxed or None


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams (words: whitespace-separated, lower-cased) that repeat an n-gram seen
    earlier in it: 0 for text without repeats (or fewer than n words), near 1 for a phrase looped many times."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def judge(problem: tasks.Problem, completion: str, num_tokens: int, rules: Rules = Rules()
          ) -> tuple[bool, str | None]:
    """One sample -> (kept, the first reason to reject it: "too_long", "no_format", "wrong", "language" or
    "repetitive"; None when kept). A pure function of its arguments (math-verify, for user problems, runs in a
    worker process but is a function of the answers)."""
    if num_tokens > rules.max_tokens:
        return False, "too_long"
    parts = split_completion(completion)
    if parts is None:
        return False, "no_format"
    reasoning, answer = parts
    final = final_answer_of(answer)
    if final is None or any(tag in reasoning for tag in _TAGS):
        return False, "no_format"
    if not is_right(problem, final):
        return False, "wrong"
    if language_consistency(reasoning, rules.language) < rules.min_language_share:
        return False, "language"
    if repeated_ngram_share(f"{reasoning}\n{answer}", rules.ngram) > rules.max_repeat_share:
        return False, "repetitive"
    return True, None


def dedupe_key(reasoning: str, answer: str) -> str:
    """What makes two samples of a prompt the same: their reasoning and answer, lower-cased, spacing collapsed."""
    return " ".join(reasoning.lower().split()) + f" {END_THINK} " + " ".join(answer.lower().split())


@dataclass(frozen=True)
class Drawn:
    """One sample: the prompt it answers (an index), the completion's text and its token count (no end token)."""

    prompt: int
    text: str
    tokens: int


def select(problems: Sequence[tasks.Problem], samples: Iterable[Drawn], rules: Rules = Rules(),
           max_per_prompt: int = 0) -> list[tuple[bool, str | None]]:
    """The verdict of each sample, in order: judge's, then "duplicate" for a sample whose dedupe_key a kept sample
    of the same prompt already has, and "over_limit" once the prompt has max_per_prompt kept samples (0: no
    limit)."""
    seen: dict[int, set[str]] = {}
    verdicts = []
    for sample in samples:
        kept, reason = judge(problems[sample.prompt], sample.text, sample.tokens, rules)
        if kept:
            key = dedupe_key(*split_completion(sample.text))
            mine = seen.setdefault(sample.prompt, set())
            if key in mine:
                kept, reason = False, "duplicate"
            elif max_per_prompt and len(mine) >= max_per_prompt:
                kept, reason = False, "over_limit"
            else:
                mine.add(key)
        verdicts.append((kept, reason))
    return verdicts


# ---------------------------------------------------------------------- prompts
def builtin_problems(per_task: int, difficulty: int | None = 1, seed: int = 0,
                     names: Sequence[str] = ()) -> list[tasks.Problem]:
    """Up to per_task distinct TRAINING-split problems of each built-in task (all, or `names`), task by task.
    Easy levels have few distinct questions, so more are drawn than kept; a task with fewer gives what it has."""
    problems = []
    for name in names or tasks.TASKS:
        unique = {p.question: p for p in tasks.generate(name, 8 * per_task, seed=seed, split="train",
                                                        difficulty=difficulty)}
        problems += list(unique.values())[:per_task]
    return problems


def prompt_problems(cfg: SampleConfig) -> list[tasks.Problem]:
    if cfg.problems:
        return read_problems(cfg.problems)
    return builtin_problems(cfg.problems_per_task, cfg.difficulty or None, cfg.seed, cfg.tasks)


# ---------------------------------------------------------------------- sampling
def draw(model: DeepSeekV3, tokenizer: Tokenizer, problems: Sequence[tasks.Problem], cfg: SampleConfig,
         progress: bool = False) -> list[Drawn]:
    """k samples of each problem, problem by problem, on the engine in batches of cfg.max_batch sequences: at
    most max_tokens + 1 tokens (one past the cap, so that an unfinished sample is counted too long), stopped at
    the end of sentence or `</answer>`; sample i is seeded with cfg.seed + i."""
    prompts = [problem_prompt(tokenizer, p, cfg.template) for p in problems]
    params = SamplingParams(max_new_tokens=cfg.max_tokens + 1, temperature=cfg.temperature, top_p=cfg.top_p,
                            seed=cfg.seed, stop_ids=tokenizer.stop_ids, stop_strings=STOP_STRINGS)
    max_len = max(map(len, prompts)) + params.max_new_tokens
    if max_len > model.config.max_position_embeddings:
        raise SampleError(f"the longest prompt ({max(map(len, prompts))} tokens) and max_tokens + 1 "
                          f"({params.max_new_tokens}) pass the model's context "
                          f"({model.config.max_position_embeddings} tokens); lower --max-tokens")
    engine = Engine(model, max_batch=cfg.max_batch, max_len=max_len, tokenizer=tokenizer)
    with tqdm(total=len(prompts) * cfg.k, desc="sampling", unit="sample", disable=not progress) as bar:
        def count(outputs: list[StepOutput]) -> None:
            bar.update(sum(o.finished for o in outputs))

        completions = engine.generate([p for p in prompts for _ in range(cfg.k)], params, on_step=count)
    ended = [bool(c.tokens) and c.tokens[-1] in params.stop_ids for c in completions]  # the stop token is not text
    return [Drawn(i // cfg.k, completion_text(tokenizer, c, params), len(c.tokens) - stop)
            for i, (c, stop) in enumerate(zip(completions, ended, strict=True))]


def load_model(cfg: SampleConfig) -> tuple[DeepSeekV3, Tokenizer, Path]:
    """The checkpoint of cfg.model (a run's latest) on cfg.device, its tokenizer, and its path."""
    path = resolve_checkpoint(cfg.model)
    if not path.is_dir():
        raise SampleError(f"no model at {path}: pass --model a checkpoint directory or a training run's directory "
                          "(`nanoseek sft` writes runs/sft)")
    if not (path / "tokenizer.json").is_file():
        raise SampleError(f"{path} has no tokenizer.json; pass a checkpoint directory that holds one")
    tokenizer = Tokenizer.load(path)
    check_template(tokenizer, cfg.template)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return load_pretrained(path, device=device), tokenizer, path


# ---------------------------------------------------------------------- the command
def run_sample(cfg: SampleConfig, progress: bool = True) -> dict[str, Any]:
    """`nanoseek sample`: draw, judge and write; -> the summary (also written to out_dir/summary.json)."""
    out = Path(cfg.out_dir)
    if (out / "data.jsonl").exists() and not cfg.overwrite:
        raise SampleError(f"{out / 'data.jsonl'} already exists; pass --overwrite to replace it, or --out-dir "
                          "another directory")
    started = time.perf_counter()
    problems = prompt_problems(cfg)  # the inputs are checked before the model is loaded
    extra = read_conversations(cfg.data) if cfg.data else []
    model, tokenizer, path = load_model(cfg)
    samples = draw(model, tokenizer, problems, cfg, progress)
    verdicts = select(problems, samples, cfg.rules, cfg.max_per_prompt)
    instructions = instruction_conversations(cfg.instructions, seed=cfg.seed)
    rows = [{"messages": sample_messages(problems[s.prompt], s.text)} for s, (kept, _) in zip(samples, verdicts)
            if kept]
    rows += [{"messages": c.messages} for c in instructions] + [{"messages": c.messages} for c in extra]
    summary = {"model": str(path), "template": cfg.template, "k": cfg.k, "temperature": cfg.temperature,
               "top_p": cfg.top_p, "seed": cfg.seed, "rules": asdict(cfg.rules), "max_per_prompt": cfg.max_per_prompt,
               "prompts_from": list(cfg.problems) or
               f"built-in tasks, training split, difficulty {cfg.difficulty or 'mixed'}",
               **summarize(problems, samples, verdicts), "instructions": len(instructions),
               "copied": {"files": list(cfg.data), "conversations": len(extra)}, "rows_written": len(rows),
               "minutes": (time.perf_counter() - started) / 60}
    write_output(out, rows, summary)
    return summary


def sample_messages(problem: tasks.Problem, completion: str) -> list[dict]:
    """A kept sample as a conversation: the question, and the reply with its reasoning apart (as `nanoseek sft`
    reads it, and DeepSeek's API names it)."""
    reasoning, answer = split_completion(completion)
    return [{"role": "user", "content": problem.question},
            {"role": "assistant", "content": answer, "reasoning_content": reasoning}]


def summarize(problems: Sequence[tasks.Problem], samples: Sequence[Drawn],
              verdicts: Sequence[tuple[bool, str | None]]) -> dict[str, Any]:
    """Counts of the kept samples and of each reason to reject, per task and in total; and an example of each
    reason (its question and the start of its completion)."""
    def block(indices: list[int]) -> dict[str, Any]:
        reasons = Counter(verdicts[i][1] for i in indices if not verdicts[i][0])
        kept = sum(verdicts[i][0] for i in indices)
        prompts = {samples[i].prompt for i in indices}
        solved = {samples[i].prompt for i in indices if verdicts[i][0]}
        return {"prompts": len(prompts), "prompts_with_a_kept_sample": len(solved), "samples": len(indices),
                "kept": kept, "kept_rate": kept / len(indices) if indices else 0.0,
                "rejected": {reason: reasons.get(reason, 0) for reason in REASONS}}

    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(problems[sample.prompt].task, []).append(i)
    examples = {}
    for sample, (kept, reason) in zip(samples, verdicts):
        if not kept and reason not in examples:
            examples[reason] = {"question": problems[sample.prompt].question, "completion": sample.text[:400],
                                "tokens": sample.tokens}
    return {**block(list(range(len(samples)))), "per_task": {t: block(ix) for t, ix in by_task.items()},
            "examples": examples}


def write_output(out: Path, rows: list[dict], summary: dict[str, Any]) -> None:
    """out/data.jsonl (a conversation per line), out/summary.json and out/summary.md, each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "data.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_text(out / "summary.md", summary_markdown(summary, out))


def summary_markdown(s: dict[str, Any], out: Path) -> str:
    head = "| task | prompts | solved | samples | kept | kept rate | " + " | ".join(REASONS) + " |"
    lines = [head, "|---" * (6 + len(REASONS)) + "|"]
    for name, b in [*s["per_task"].items(), ("total", s)]:
        lines.append(f"| {name} | {b['prompts']} | {b['prompts_with_a_kept_sample']} | {b['samples']} | {b['kept']} | "
                     f"{100 * b['kept_rate']:.1f}% | " + " | ".join(str(b["rejected"][r]) for r in REASONS) + " |")
    rules, copied = s["rules"], s["copied"]
    prompts = s["prompts_from"] if isinstance(s["prompts_from"], str) else ", ".join(s["prompts_from"])
    limit = f"at most {s['max_per_prompt']} per prompt" if s["max_per_prompt"] else "no limit per prompt"
    sampled = (f"Sampled `{s['model']}` ({s['template']} template), k={s['k']} per prompt at temperature "
               f"{s['temperature']}, top-p {s['top_p']}, seed {s['seed']}; prompts: {prompts}.")
    kept = (f"Kept: at most {rules['max_tokens']} tokens, R1's layout (reasoning, `</think>`, one final answer), "
            f"right, at least {100 * rules['min_language_share']:.0f}% of the reasoning's words in "
            f"`{rules['language']}`, at most {100 * rules['max_repeat_share']:.0f}% repeated word "
            f"{rules['ngram']}-grams, no duplicates, {limit}. Each rejected sample counts once, under its first "
            "reason; \"solved\": prompts with a kept sample.")
    written = (f"`{out / 'data.jsonl'}`: {s['rows_written']} conversations: {s['kept']} kept samples, "
               f"{s['instructions']} built-in instructions (no chain of thought), {copied['conversations']} copied "
               f"from {', '.join(copied['files']) or 'no files'}. Train on them with "
               f"`nanoseek sft --data {out / 'data.jsonl'}`. {s['minutes']:.1f} minutes.")
    return "\n\n".join(["# Rejection sampling", sampled, kept, "\n".join(lines), written]) + "\n"
