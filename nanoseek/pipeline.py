"""`nanoseek pipeline`: the embedded R1-Zero pipeline in one command.

Pretrain the base model on the built-in corpus, evaluate it, run R1-Zero (GRPO with rule-based rewards) from
it, evaluate the result the same way, and write a before/after report with plots. Each stage writes into its
own directory under out_dir; a finished stage is reused when the pipeline runs again, an interrupted one is
continued with --resume.

The pipeline's seed is both training stages' seed; the evaluations keep their own fixed seed (the same held-out
problems and sampling for every pipeline seed), so runs of different seeds compare.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint
from nanoseek.data.tasks import Problem
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import EvalConfig, evaluate, evaluate_instructions, format_table, heldout_problems
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, run_grpo
from nanoseek.train.loop import TrainConfig
from nanoseek.train.pretrain import PretrainConfig, pretrain


def run_pipeline(out_dir: str | Path = "runs", resume: bool = False, eval_problems: int = 30, seed: int = 0,
                 eval_config: EvalConfig | None = None, data: PretrainConfig | None = None,
                 pretrain_train: TrainConfig | None = None, grpo: GRPOConfig | None = None,
                 grpo_train: TrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Every argument has the stages' own defaults (`nanoseek pretrain`, `nanoseek grpo`, `nanoseek eval`);
    out_dir/<stage> replaces each stage's output directory and `seed` each training stage's seed."""
    out = Path(out_dir)
    base, rl = out / "pretrain", out / "grpo"
    _check_seed(out, seed, (base / "data" / "meta.json", base / "run.json", rl / "run.json"))
    eval_config = eval_config or EvalConfig()
    problems = heldout_problems(eval_problems, seed=eval_config.seed)
    stages = StageRunner(out, "pipeline", resume)
    pretrain_train = replace(pretrain_train or TrainConfig(), out_dir=str(base), seed=seed)
    grpo_train = replace(grpo_train or GRPO_TRAIN_DEFAULTS, out_dir=str(rl), seed=seed)
    # The pretraining's own greedy check is skipped: the evaluation stage measures the base model fully.
    data = replace(data or PretrainConfig(), eval_problems=0)
    grpo = replace(grpo or GRPOConfig(), model=str(base))
    stages.train("pretrain", base, lambda resume: pretrain(data, pretrain_train, resume=resume, progress=progress))
    stages.run("evaluate base", out / "eval-base.json",
               lambda: evaluate_run(base, out / "eval-base.json", problems, eval_config))
    stages.train("R1-Zero", rl, lambda resume: run_grpo(grpo, grpo_train, resume=resume, progress=progress))
    stages.run("evaluate R1-Zero", out / "eval-grpo.json",
               lambda: evaluate_run(rl, out / "eval-grpo.json", problems, eval_config))

    before = json.loads((out / "eval-base.json").read_text())
    after = json.loads((out / "eval-grpo.json").read_text())
    seeds = {"pipeline": seed, "pretrain": _stage_seed(base), "grpo": _stage_seed(rl), "evaluation": eval_config.seed}
    report = {"seed": seed, "seeds": seeds, "base": before, "r1_zero": after, "minutes": stages.summary()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_pass_at_1(before, after, out / "pass_at_1.png")
    (out / "report.md").write_text(_report_markdown(report))
    return report


class StageRunner:
    """Runs a recipe's stages in order (`nanoseek pipeline`, `nanoseek r1`): a stage whose `done` file exists
    finished earlier and is reused; the others run, and their wall time is kept in out/minutes.json (across
    interrupted runs: a stage run again records its latest run)."""

    def __init__(self, out: Path, command: str, resume: bool = False):
        self.command, self.resume = command, resume
        out.mkdir(parents=True, exist_ok=True)
        self.timings = out / "minutes.json"
        self.minutes: dict[str, float] = json.loads(self.timings.read_text()) if self.timings.exists() else {}

    def run(self, name: str, done: Path, work: Callable[[], object]) -> None:
        if done.exists():
            print(f"[{name}] finished earlier ({done} exists): reused")
            return
        print(f"[{name}] ...")
        started = time.perf_counter()
        work()
        self.minutes[name] = (time.perf_counter() - started) / 60
        self.timings.write_text(json.dumps(self.minutes, indent=2) + "\n")

    def train(self, name: str, run_dir: Path, train: Callable[[bool], dict[str, Any]], done: Path | None = None
              ) -> None:
        """A training stage writing into run_dir, finished when `done` (default: its report.json) exists.
        train(resume) runs it, resuming when --resume was asked and the stage saved a checkpoint (a recipe stopped
        before a stage's first checkpoint starts that stage afresh); a stage stopped by a signal ends the recipe."""
        def work() -> None:
            result = train(self.resume and (run_dir / "checkpoints" / "latest").exists())
            if result.get("stopped") is not None:
                raise PipelineStopped(f"[{name}] stopped by signal {result['stopped']} at step {result['step']}; "
                                      f"continue with: nanoseek {self.command} --resume")

        self.run(name, done or run_dir / "report.json", work)

    def summary(self) -> dict[str, float]:
        """Each stage's minutes and their total."""
        return {**self.minutes, "total": sum(self.minutes.values())}


def evaluate_run(model_dir: Path, report: Path, problems: list[Problem], cfg: EvalConfig,
                 instructions: int = 0) -> dict[str, Any]:
    """Evaluate a run's latest checkpoint (or a checkpoint) on the problems, and with instructions > 0 on that many
    held-out instructions (eval.evaluate_instructions, under "instructions"); write the result to `report`."""
    path = resolve_checkpoint(model_dir)
    model, tokenizer = load_pretrained(path), Tokenizer.load(path)
    result = evaluate(model, tokenizer, problems, cfg)
    print(format_table(result))
    if instructions:
        result["instructions"] = evaluate_instructions(model, tokenizer, instructions, cfg)
        print(f"held-out instructions: {100 * result['instructions']['accuracy']:.1f}% right")
    report.write_text(json.dumps(result, indent=2) + "\n")
    return result


class PipelineStopped(NanoseekError):
    """A stage was stopped by a signal after saving; the pipeline ends there."""


class SeedMismatch(NanoseekError):
    """out_dir holds stages of another seed: reusing or continuing them would mix two seeds in one run."""


def _check_seed(out: Path, seed: int, settings_files: tuple[Path, ...]) -> None:
    """Refuse a seed other than the one the stages already in out ran with (their run.json, or the prepared
    pretraining data's meta.json), whether they would be reused or resumed."""
    for path in settings_files:
        if path.is_file():
            settings = json.loads(path.read_text())
            saved = settings.get("train", settings)["seed"]
            if saved != seed:
                raise SeedMismatch(f"{out} holds a pipeline run of seed {saved} ({path}), not {seed}: continue it "
                                   f"with --seed {saved}, or run seed {seed} in another --out-dir")


def _stage_seed(stage_dir: Path) -> int:
    """The seed a finished training stage reports it ran with."""
    return json.loads((stage_dir / "report.json").read_text())["seed"]


def _plot_pass_at_1(before: dict[str, Any], after: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*before["per_task"], "overall"]
    values = [[100 * r["per_task"][n]["pass@1"] if n != "overall" else 100 * r["overall"]["pass@1"] for n in names]
              for r in (before, after)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    for i, (label, row) in enumerate(zip(("base", "after R1-Zero"), values, strict=True)):
        ax.bar([x + (i - 0.5) * width for x in range(len(names))], row, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel="pass@1 (%)", title=f"held-out pass@1 (k={before['k']}, T={before['temperature']})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report_markdown(report: dict[str, Any]) -> str:
    before, after = report["base"], report["r1_zero"]
    metrics = ("pass@1", "cons@k", "pass@k", "greedy", "format")
    rows = []
    for name in [*before["per_task"], "overall"]:
        b = before["per_task"][name] if name != "overall" else before["overall"]
        a = after["per_task"][name] if name != "overall" else after["overall"]
        rows.append(f"| {name} | " + " | ".join(f"{100 * b[m]:.1f}% -> {100 * a[m]:.1f}%" for m in metrics) + " |")
    times = ", ".join(f"{name} {m:.1f} min" for name, m in report["minutes"].items())
    seeds = report["seeds"]
    return f"""# R1-Zero pipeline report

Base model pretrained on the built-in corpus, then R1-Zero (GRPO, accuracy + format rewards) from it.
Held-out problems: {before['problems']} (easy level), k = {before['k']} samples at temperature
{before['temperature']}, top-p {before['top_p']}; greedy is one temperature-0 completion.
Stages: {times}.
Seeds: pipeline {seeds['pipeline']} (pretraining {seeds['pretrain']}, R1-Zero {seeds['grpo']}; the evaluations'
problems and sampling {seeds['evaluation']}).

| task | {' | '.join(m.replace('@k', f"@{before['k']}") for m in metrics)} |
|---|{'---|' * len(metrics)}
{chr(10).join(rows)}

![pass@1 before and after](pass_at_1.png)
![GRPO rewards](grpo/plots/reward.png)
![completion length](grpo/plots/length.png)
![pretraining loss](pretrain/plots/loss.png)
"""
