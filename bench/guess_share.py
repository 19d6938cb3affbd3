"""How often a model works a problem out and how often it states the answer outright, and how often each is right.

The built-in corpus writes a share of its documents (`nanoseek pretrain --direct-rate`) as a direct answer,
`<think>\nThe answer is X.\n</think>`, so a base model pretrained on it sometimes guesses; this script samples
the pipeline's evaluation (the held-out problems, k samples at temperature 0.6, top-p 0.95) and splits every
task's samples into guesses and worked solutions. Run it on the base model and on the R1-Zero model to see
what R1-Zero learned:

    python bench/guess_share.py runs/pretrain runs/grpo --json bench/results/guess-share.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import replace

import torch

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint
from nanoseek.data import tasks
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval import EvalConfig, heldout_problems, sample_completions
from nanoseek.provenance import device_name, git_commit, write_result
from nanoseek.rewards import final_answer


def guess_share(model_path: str, n_per_task: int, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    path = resolve_checkpoint(model_path)
    model, tokenizer = load_pretrained(path), Tokenizer.load(path)
    problems = heldout_problems(n_per_task)
    samples, _ = sample_completions(model, tokenizer, problems, replace(cfg, greedy=False))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # guesses, right guesses, worked, right worked
    for i, sample in enumerate(samples):
        problem = problems[i // cfg.k]
        answer = final_answer(sample.text)
        right = answer is not None and tasks.check_answer(problem, answer)
        guessed = sample.text.lstrip().startswith(tasks.DIRECT_ANSWER)
        row = counts[problem.task]
        row[0 if guessed else 2] += 1
        row[1 if guessed else 3] += right
    totals = [sum(column) for column in zip(*counts.values())]
    return {task: {"guess_share": g / (g + w), "accuracy_of_guesses": gr / g if g else None,
                   "accuracy_of_worked": wr / w if w else None}
            for task, (g, gr, w, wr) in {**counts, "overall": totals}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoint or run directories")
    parser.add_argument("--problems", type=int, default=30, help="held-out problems per task (the pipeline's 30)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    result = {model: guess_share(model, args.problems, EvalConfig()) for model in args.models}

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    for model, rows in result.items():
        print(f"\n{model}\n| task | guesses | right when guessing | right when working |\n|---|---|---|---|")
        for task, row in rows.items():
            print(f"| {task} | {percent(row['guess_share'])} | {percent(row['accuracy_of_guesses'])} | "
                  f"{percent(row['accuracy_of_worked'])} |")
    if args.json:
        write_result(args.json, {"device": device_name("cpu"), "torch": torch.__version__, "git_commit": git_commit(),
                                 "settings": vars(EvalConfig()), "problems_per_task": args.problems,
                                 "models": result})


if __name__ == "__main__":
    main()
