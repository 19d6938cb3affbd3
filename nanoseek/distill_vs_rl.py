"""`nanoseek distill-vs-rl`: DeepSeek-R1's finding (paper, section 4.1) at this scale, in one command.

R1 found that for a small model, distilling from a strong reasoner beats running RL on the small model itself. From
one existing teacher (by default the R1 model of `nanoseek r1`), each stage an existing command's function writing
into its own directory under out_dir, run in pipeline.StageRunner as `nanoseek r1`'s stages are (a finished stage
is reused, an interrupted one continues with --resume, each stage's minutes in minutes.json):

    student   `nanoseek pretrain` of a small dense student (--student-preset, qwen2-mini) on the built-in corpus
              with the teacher's tokenizer, --student-steps steps; or --student, an existing one, used as it is
    distill   arm (a): `nanoseek distill` from the teacher into a copy of the student (--method; sft, R1's: the
              teacher's rejection-filtered samples, then SFT), --distill-steps steps
    grpo      arm (b): `nanoseek grpo` on the student directly (R1-Zero: the question template, accuracy + format
              rewards), for the budget arm (a) used (--budget, below)

The student, both arms and the teacher are evaluated alike into eval/<model>.json (`nanoseek eval`: pass@1 over
k=8 samples at temperature 0.6, cons@8, format rate, language consistency of the reasoning, mean length, on
--problems-per-task held-out problems of each of the 7 built-in tasks), each in the template it was trained for:
the teacher and arm (a) in the distillation's (chat), the student and arm (b) in GRPO's (question).
report.json, report.md and distill_vs_rl.png compare them.

The student-side budget (--budget): `tokens` (default) gives arm (b) the first step count at which GRPO's
cumulative `tokens` in its metrics.jsonl reaches arm (a)'s final `tokens`. The two count what each arm's student
learns from: arm (a)'s are the tokens of the teacher's conversations it is trained on (prompt and answer), arm (b)'s
the tokens of its own sampled completions (every group's, kept or not). GRPO's tokens per step are known only once
sampled, so arm (b) runs in chunks, each resumed from the last (the shared Trainer resumes exactly, and GRPO's
learning rate is constant after its warmup, so the chunks train as one run would): a chunk's length is the tokens
still missing over the most tokens a step has taken so far (over the most a step can take, before the first), at
least one step. `steps` gives arm (b) arm (a)'s number of optimizer steps. Either way the report gives both arms'
steps, tokens and minutes (the student's training: the steps' own time, GRPO's sampling included; the teacher's
sampling for arm (a) apart).

Default lengths, for at most 30 minutes on one thread of a 2-core CPU when the teacher exists (estimates, from
speeds measured on that machine while another job used the other core: qwen2-small pretraining 0.64 s a step of
8 x 256 tokens; SFT 0.45-0.5 s a step of 16 conversations; GRPO 2.1-2.9 s a step of 16 prompts x 8 samples
(~60 tokens each, from a barely trained student whose groups were mostly dropped; with most groups kept, a step
costs more: 3.6-4.0 s in R1-Zero from the `small` base); an evaluation of 210 problems x 9 completions 0.6 min):

    student      1,200 steps + the corpus (0.2 min)                                   about 13 min
    arm (a)      the teacher's 2,800 samples (0.5-1 min) + 300 SFT steps (2-2.5 min)  about 3 min
    arm (b)      tokens-matched: 300 steps x 16 conversations of 70-90 tokens are
                 330,000-430,000 tokens, so 65-100 GRPO steps of about 4,500-5,000     about 3.5-7 min
                 (and under half a minute of reloading between its chunks)
    evaluations  4 x 0.6-0.8 min                                                       about 3 min
                                                                                       about 23-27 min
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from nanoseek.config import DENSE_PRESETS, require
from nanoseek.errors import NanoseekError
from nanoseek.eval import EvalConfig, heldout_problems
from nanoseek.options import add_dataclass_options, field_comments
from nanoseek.pipeline import StageRunner, evaluate_run
from nanoseek.train.distill import (DISTILL_TRAIN_DEFAULTS, METHODS, DistillConfig, check_config,
                                    checkpoint_with_tokenizer, run_distill)
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, run_grpo
from nanoseek.train.loop import TrainConfig
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig, pretrain

BUDGETS = ("tokens", "steps")
TEACHER_HINT = "`nanoseek r1` writes the R1 model, runs/r1/all-scenario"


class ComparisonError(NanoseekError, ValueError):
    pass


@dataclass
class DistillVsRLConfig:
    """`nanoseek distill-vs-rl`'s options: the teacher, the student, the arms' budget, the evaluation."""

    teacher: str = "runs/r1/all-scenario"  # the teacher: a checkpoint directory, or a run directory (its latest);
                                           # default: the R1 model of `nanoseek r1`
    out_dir: str = "runs/distill-vs-rl"  # one directory per stage under it; finished stages are reused
    # the student both arms start from: a checkpoint or run directory (its tokenizer need not be the teacher's for
    # --method sft); empty: a --student-preset student pretrained in OUT_DIR/student with the teacher's tokenizer
    student: str = ""
    student_preset: str = "qwen2-mini"  # the dense preset of the student pretrained when --student is empty
    student_steps: int = 1200  # pretraining steps of that student (8 sequences of 256 tokens a step)
    method: Literal["sft", "logit", "on-policy"] = "sft"  # arm (a)'s `nanoseek distill --method`: sft (R1's: SFT on
                               # the teacher's rejection-filtered samples), logit, on-policy (a shared tokenizer)
    distill_steps: int = 300  # arm (a)'s optimizer steps (`nanoseek distill`'s default)
    budget: Literal["tokens", "steps"] = "tokens"  # how arm (b)'s GRPO steps are set from arm (a): tokens (its
                               # cumulative trained tokens reach arm (a)'s) or steps (arm (a)'s step count)
    problems_per_task: int = 30  # held-out problems per built-in task in each evaluation (7 tasks, k=8 each)
    seed: int = 0  # every stage's seed: pretraining, the teacher's sampling, training (the evaluations keep seed 0)

    def __post_init__(self) -> None:
        need = _need
        need(self, bool(self.teacher), "teacher", "must name the teacher's checkpoint or run directory")
        need(self, self.student_preset in DENSE_PRESETS, "student_preset",
             f"must be a dense student preset: one of {', '.join(DENSE_PRESETS)}")
        need(self, self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(self, self.budget in BUDGETS, "budget", f"must be one of {', '.join(BUDGETS)}")
        for name in ("student_steps", "distill_steps", "problems_per_task"):
            need(self, getattr(self, name) > 0, name, "must be > 0")
        need(self, self.seed >= 0, "seed", "must be >= 0")
        if self.student:
            defaults = DistillVsRLConfig()
            for name in ("student_preset", "student_steps"):
                need(self, getattr(self, name) == getattr(defaults, name), name,
                     f"sets the student pretrained here, and --student {self.student} names one to use: pass one of "
                     "them")


def _need(config: Any, ok: bool, name: str, why: str) -> None:
    require(config, ok, name, why, kind="distill-vs-rl option")


@dataclass
class StageSettings:
    """Each stage's own settings, by default its command's; run_distill_vs_rl sets on them what the comparison
    decides (models, directories, seed, lengths, templates)."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pretrain_train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distill_train: TrainConfig = field(default_factory=lambda: DISTILL_TRAIN_DEFAULTS)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # Arm (b) is lengthened chunk by chunk until its tokens match arm (a)'s, so its learning rate stays constant.
    grpo_train: TrainConfig = field(default_factory=lambda: replace(GRPO_TRAIN_DEFAULTS, decay_start=1.0))
    evaluation: EvalConfig = field(default_factory=EvalConfig)


# The evaluated models, in the report's order: key (its eval file), label.
MODELS = (("student", "student"), ("distill", "arm (a): distilled"), ("grpo", "arm (b): GRPO"),
          ("teacher", "teacher"))
COLUMNS = ("pass@1", "cons@k", "format", "language", "length")
SETTINGS_FILE = "settings.json"


def run_distill_vs_rl(cfg: DistillVsRLConfig | None = None, resume: bool = False,
                      settings: StageSettings | None = None, progress: bool = True) -> dict[str, Any]:
    """`nanoseek distill-vs-rl`: every stage in turn (see the module's docstring); -> the report (also
    report.json)."""
    cfg, s = cfg or DistillVsRLConfig(), settings or StageSettings()
    out, seed = Path(cfg.out_dir), cfg.seed
    teacher = checkpoint_with_tokenizer(cfg.teacher, "teacher", TEACHER_HINT)
    check_config(teacher, "teacher")
    student = Path(cfg.student) if cfg.student else out / "student"
    if cfg.student:
        checkpoint_with_tokenizer(cfg.student, "student", "or leave --student empty to pretrain one here")
    run = {"distill": out / "distill", "grpo": out / "grpo"}
    # Every stage's settings first, so that a bad combination stops before the first stage.
    student_data = replace(s.pretrain, preset=cfg.student_preset, tokenizer=str(teacher / "tokenizer.json"),
                           eval_problems=0)  # the evaluation stage measures the student fully
    student_train = replace(s.pretrain_train, out_dir=str(student), seed=seed, max_steps=cfg.student_steps)
    distill = replace(s.distill, teacher=cfg.teacher, student=str(student), student_preset=None, method=cfg.method,
                      eval_problems=0)
    distill_train = replace(s.distill_train, out_dir=str(run["distill"]), seed=seed, max_steps=cfg.distill_steps)
    grpo = replace(s.grpo, model=str(student))
    grpo_train = replace(s.grpo_train, out_dir=str(run["grpo"]), seed=seed, log_every=1)
    if cfg.budget == "tokens" and grpo_train.decay_start < 1:
        raise ComparisonError("the tokens budget lengthens arm (b)'s GRPO run chunk by chunk, so its learning rate "
                              f"must not decay with max_steps: decay_start is {grpo_train.decay_start}, not 1")
    templates = {"student": grpo.template, "distill": distill.sample.template, "grpo": grpo.template,
                 "teacher": distill.sample.template}
    models = {"student": student, **run, "teacher": Path(cfg.teacher)}

    check_settings(out, cfg)
    stages = StageRunner(out, "distill-vs-rl", resume)
    (out / "eval").mkdir(exist_ok=True)
    evals = {key: out / "eval" / f"{key}.json" for key, _ in MODELS}
    problems = heldout_problems(cfg.problems_per_task, seed=s.evaluation.seed)

    def evaluation(key: str) -> None:
        stages.run(f"evaluate {key}", evals[key], lambda: evaluate_run(
            models[key], evals[key], problems, replace(s.evaluation, template=templates[key], language=grpo.language)))

    if not cfg.student:
        stages.train("student", student, lambda resume: pretrain(student_data, student_train, resume, progress))
    evaluation("student")
    evaluation("teacher")
    stages.train("arm (a): distill", run["distill"],
                 lambda resume: run_distill(distill, distill_train, resume, progress))
    evaluation("distill")
    stages.train("arm (b): GRPO", run["grpo"], lambda resume: run_rl_arm(
        grpo, grpo_train, cfg.budget, arm_budget(run["distill"])[cfg.budget], resume, progress),
        done=run["grpo"] / BUDGET_FILE)
    evaluation("grpo")

    report = _report(cfg, models, templates, evals, run, stages.summary())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "distill_vs_rl.png")
    (out / "report.md").write_text(_report_markdown(report))
    return report


def check_settings(out: Path, cfg: DistillVsRLConfig) -> None:
    """out/settings.json keeps the options the comparison in out runs with (but out_dir): its finished stages are
    reused, so a later run with other options there is refused rather than mixed with them."""
    path = out / SETTINGS_FILE
    mine = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
    if path.is_file():
        saved = json.loads(path.read_text())
        differ = [f"{k} = {mine[k]!r} (saved: {saved.get(k)!r})" for k in mine if saved.get(k) != mine[k]]
        if differ:
            raise ComparisonError(f"{out} holds a comparison run with other options ({path}): " + ", ".join(differ)
                                  + ". Continue it with its own options, or run these in another --out-dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2) + "\n")


# ---------------------------------------------------------------------- the budget
BUDGET_FILE = "budget.json"


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's training records (metrics.jsonl) up to its latest checkpoint: the steps a resume continues from
    (a run killed without saving has logged steps past it, which it trains again)."""
    latest = run_dir / "checkpoints" / "latest"
    saved = int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else 0
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train" and r["step"] <= saved]


def arm_budget(run_dir: Path) -> dict[str, Any]:
    """What a finished arm spent: its optimizer steps, its cumulative trained tokens, and the minutes of its
    steps (the student's forward, backward and update, and GRPO's sampling; from metrics.jsonl)."""
    records = train_records(run_dir)
    if not records:
        raise ComparisonError(f"{run_dir} has no training steps in its metrics.jsonl: the arm has not run")
    return {"steps": records[-1]["step"], "tokens": records[-1]["tokens"],
            "train_minutes": sum(r["step_time"] for r in records) / 60}


def next_rl_steps(budget: str, records: list[dict[str, Any]], target: int, step_bound: int) -> int | None:
    """The max_steps of arm (b)'s next chunk, from its training records so far; None when it has reached the
    target (arm (a)'s steps or tokens, by `budget`). With `tokens`: the tokens missing over the most tokens a step
    has taken (step_bound, the most a step can take, before any step), at least one step more."""
    step = records[-1]["step"] if records else 0
    if budget == "steps":
        return None if step >= target else target
    done = records[-1]["tokens"] if records else 0
    if done >= target:
        return None
    per_step, previous = step_bound if not records else 0, {"step": 0, "tokens": 0}
    for record in records:
        per_step = max(per_step, (record["tokens"] - previous["tokens"]) // max(1, record["step"] - previous["step"]))
        previous = record
    return step + max(1, (target - done) // max(1, per_step))


def run_rl_arm(grpo: GRPOConfig, train: TrainConfig, budget: str, target: int, resume: bool,
               progress: bool) -> dict[str, Any]:
    """Arm (b): `nanoseek grpo` in train.out_dir, in chunks (next_rl_steps), each continuing the last, until it has
    spent `target` (arm (a)'s steps or tokens); then BUDGET_FILE records it. -> {"stopped": None}, or the GRPO run's
    result when a signal stopped it. resume: continue the run already there (the first chunk)."""
    out = Path(train.out_dir)
    bound = grpo.prompts_per_step * grpo.group_size * grpo.max_new_tokens
    chunks = 0
    while (steps := next_rl_steps(budget, train_records(out), target, bound)) is not None:
        result = run_grpo(grpo, replace(train, max_steps=steps), resume=resume or chunks > 0, progress=progress)
        if result["stopped"] is not None:
            return result
        chunks += 1
    spent = arm_budget(out)
    (out / BUDGET_FILE).write_text(json.dumps({"rule": budget, "target": target, **spent}, indent=2) + "\n")
    return {"stopped": None}


# ---------------------------------------------------------------------- the report
RULES = {"tokens": "arm (b) trained until its cumulative tokens (its sampled completions) reached arm (a)'s (the "
                   "teacher's conversations it was trained on, prompts included): the first such GRPO step",
         "steps": "arm (b) trained for arm (a)'s number of optimizer steps"}


def _report(cfg: DistillVsRLConfig, models: dict[str, Path], templates: dict[str, str], evals: dict[str, Path],
            run: dict[str, Path], minutes: dict[str, float]) -> dict[str, Any]:
    rows = {}
    for key, label in MODELS:
        result = json.loads(evals[key].read_text())
        rows[key] = {"label": label, "model": str(models[key]), "template": templates[key],
                     **{m: result["overall"][m] for m in COLUMNS}, "per_task": result["per_task"]}
    first = json.loads(evals["student"].read_text())
    distilled = json.loads((run["distill"] / "report.json").read_text())
    sampling = distilled["sampling"]
    arms = {"distill": {**arm_budget(run["distill"]), "minutes": minutes["arm (a): distill"]},
            "grpo": {**arm_budget(run["grpo"]), "minutes": minutes["arm (b): GRPO"]}}
    return {"seed": cfg.seed, "settings": asdict(cfg),
            "budget": {"rule": cfg.budget, "how": RULES[cfg.budget], **arms},
            "teacher_samples": None if sampling is None else
            {k: sampling[k] for k in ("samples", "kept", "kept_rate", "minutes")},
            "evaluation": {"problems": first["problems"], "k": first["k"], "temperature": first["temperature"],
                           "top_p": first["top_p"]},
            "models": rows, "minutes": minutes}


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["models"].values())
    tasks = list(rows[0]["per_task"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    metrics = (("pass@1", "pass@1"), ("format", "format"), ("language", "language consistency"))
    width = 0.8 / len(metrics)
    for i, (metric, label) in enumerate(metrics):
        left.bar([x + (i - 1) * width for x in range(len(rows))], [100 * r[metric] for r in rows], width, label=label)
    left.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=15)
    left.set(ylabel="%", ylim=(0, 118), title="overall")
    left.legend(loc="upper center", ncol=len(metrics), fontsize="small")
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        right.bar([x + (i - (len(rows) - 1) / 2) * width for x in range(len(tasks))],
                  [100 * row["per_task"][t]["pass@1"] for t in tasks], width, label=row["label"])
    right.set_xticks(range(len(tasks)), tasks, rotation=15)
    e = report["evaluation"]
    right.set(ylabel="pass@1 (%)", title=f"pass@1 per task (k={e['k']}, T={e['temperature']})")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report_markdown(r: dict[str, Any]) -> str:
    e, c, b, rows = r["evaluation"], r["settings"], r["budget"], r["models"]
    head = ["model", "template", "pass@1", f"cons@{e['k']}", "format", "language", "length"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows.values():
        cells = [f"{100 * row[m]:.1f}%" for m in COLUMNS[:4]] + [f"{row['length']:.1f}"]
        lines.append(f"| {row['label']} | {row['template']} | " + " | ".join(cells) + " |")
    tasks = list(rows["student"]["per_task"])
    per_task = ["| task | " + " | ".join(row["label"] for row in rows.values()) + " |", "|---" * (len(rows) + 1) + "|"]
    per_task += [f"| {t} | " + " | ".join(f"{100 * row['per_task'][t]['pass@1']:.1f}%" for row in rows.values())
                 + " |" for t in tasks]
    arms = ["| arm | optimizer steps | trained tokens | training minutes | stage minutes |", "|---|---|---|---|---|"]
    for key, label in (("distill", "arm (a): distilled"), ("grpo", "arm (b): GRPO")):
        a = b[key]
        arms.append(f"| {label} | {a['steps']} | {a['tokens']:,} | {a['train_minutes']:.1f} | {a['minutes']:.1f} |")
    samples = r["teacher_samples"]
    sampled = ("" if samples is None else f" The teacher's samples: {samples['kept']} of {samples['samples']} kept "
               f"({100 * samples['kept_rate']:.1f}%), drawn in {samples['minutes']:.1f} min (in arm (a)'s stage "
               "minutes, not its training minutes).")
    student = (f"`{c['student']}`" if c["student"] else
               f"a `{c['student_preset']}` pretrained here for {c['student_steps']} steps with the teacher's tokenizer")
    gap = 100 * (rows["distill"]["pass@1"] - rows["grpo"]["pass@1"])
    times = ", ".join(f"{name} {m:.1f} min" for name, m in r["minutes"].items())
    return f"""# Distillation vs RL on the same small student (DeepSeek-R1, section 4.1)

Teacher `{c['teacher']}`; student: {student}.
Arm (a): `nanoseek distill --method {c['method']}` from the teacher into the student.
Arm (b): `nanoseek grpo` (R1-Zero: question template, accuracy and format rewards) on the student.
Every model is asked in the template it was trained for, on {e['problems']} held-out problems (k = {e['k']} samples
at temperature {e['temperature']}, top-p {e['top_p']}; language: the share of the reasoning's words in English).

{chr(10).join(lines)}

Held-out pass@1: arm (a) minus arm (b) = {gap:+.1f} points.

## The student-side budget

Rule `{b['rule']}`: {b['how']}.
Training minutes: the student's steps (GRPO's sampling included); stage minutes: the whole stage.{sampled}

{chr(10).join(arms)}

## pass@1 per task

{chr(10).join(per_task)}

Minutes: {times}. Seed {r['seed']} (the evaluations: seed 0).

![pass@1, format and language, and pass@1 per task](distill_vs_rl.png)
"""


# ---------------------------------------------------------------------- the command
def add_options(parser: argparse.ArgumentParser) -> None:
    """The command's options (`nanoseek distill-vs-rl`)."""
    parser.add_argument("--resume", action="store_true", help="continue an interrupted stage from its latest "
                        "checkpoint")
    add_dataclass_options(parser, DistillVsRLConfig, skip=("student_preset",))
    parser.add_argument("--student-preset", choices=list(DENSE_PRESETS), default=DistillVsRLConfig.student_preset,
                        help=field_comments(DistillVsRLConfig)["student_preset"])
