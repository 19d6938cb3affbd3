"""`nanoseek r1`: DeepSeek-R1's recipe in one command, and R1-Zero from the same base beside it.

Each stage is an existing command's function writing into its own directory under out_dir; they run in
pipeline.StageRunner as `nanoseek pipeline`'s do (a finished stage is reused, an interrupted one continues with
--resume, each stage's minutes in minutes.json, a directory of another seed refused):

    base           the finished `nanoseek pretrain` run --base, reused (pretrained there with its defaults if absent)
    cold-start     `nanoseek sft` of the base on the built-in cold-start conversations (the chat template)
    reasoning-rl   `nanoseek grpo` from cold-start in the chat template: accuracy + format + language consistency,
                   summed (--language-weight)
    sample         `nanoseek sample` of reasoning-rl: k samples of the built-in tasks' training problems, the right
                   and clean ones kept, and built-in non-reasoning instructions
    rs-sft         `nanoseek sft` of the BASE on all of sample/data.jsonl for --sft-epochs passes
    rm             `nanoseek rm` from rs-sft on the built-in preference pairs
    all-scenario   `nanoseek grpo` from rs-sft: --general-share of each step's prompts are the built-in general
                   prompts scored by rm, the others reasoning problems scored by the rule rewards and the language
                   reward
    r1-zero        `nanoseek grpo` from the base with GRPO's own defaults, as `nanoseek pipeline`; a finished R1-Zero
                   where `nanoseek pipeline` leaves it (BASE/../grpo) from the same base checkpoint with the same
                   settings and seed is reused instead

Every model, the base too, is evaluated the same way into eval/<stage>.json, in the template it was trained for
(base and R1-Zero: question; the others: chat): on the built-in tasks' held-out problems (pass@1 over k=8
samples, cons@8, format rate, language consistency of the reasoning, mean completion length) and on held-out
built-in non-reasoning instructions (accuracy; and the mean score rm gives the replies, all stages scored once rm
is trained, eval/reward-model.json). report.json, report.md and stages.png compare them.

The default lengths keep the post-training stages under about 45 minutes on a 2-core CPU, from the stages'
measured speeds (README and docs: GRPO 16 prompts x 8 samples 3.6-4.0 s a step, 300 steps in 18.0-20.2 min; SFT
0.3-0.95 s a step of 16 conversations; the reward model 0.8 s a step, 200 steps in 2.6 min; an evaluation of
210 problems x 9 completions 0.8 min, about 2,400 completions a minute):

    cold start      250 steps: one epoch of the 4,000 built-in conversations          2-4 min
    reasoning RL    200 steps                                                          12-13.5 min
    sampling        100 problems x 7 tasks x 4 samples = 2,800 samples                1-1.5 min
    SFT of the base 2 epochs of the kept samples + 300 instructions: <= 390 steps     <= 2-6 min
    reward model    150 steps                                                          2 min
    all-scenario RL 150 steps                                                          9-10 min
    evaluations     5 x (210 problems x 9 + 50 instructions x 8 completions)           5-6 min
                                                                                       about 33-43 min

R1-Zero adds nothing when reused, else its 300 steps and an evaluation; the base, when absent, the pretraining
(9-11 min). The other times were measured with the earlier `small` base and 300 R1-Zero steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nanoseek.checkpoint import resolve_checkpoint
from nanoseek.config import require
from nanoseek.eval import EvalConfig, heldout_problems, reward_model_score
from nanoseek.pipeline import StageRunner, _check_seed, _stage_seed, evaluate_run
from nanoseek.sample import SampleConfig, run_sample
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, run_grpo
from nanoseek.train.loop import RESUMABLE_CHANGES, TrainConfig
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.reward_model import RM_TRAIN_DEFAULTS, RMConfig, load_reward_model, run_rm
from nanoseek.train.sft import SFT_TRAIN_DEFAULTS, SFTConfig, run_sft


@dataclass
class R1Config:
    """`nanoseek r1`'s options: where, from which base, the seed, each stage's length, the recipe's knobs."""

    out_dir: str = "runs/r1"  # one directory per stage under it; finished stages are reused
    base: str = "runs/pretrain"  # a finished `nanoseek pretrain` run to start from (pretrained there if absent)
    seed: int = 0  # every stage's seed: training, sampling, the built-in data's draws (the evaluations keep seed 0)
    cold_start_steps: int = 250  # SFT steps of the cold start (16 conversations a step: one epoch of the 4,000)
    reasoning_steps: int = 200  # GRPO steps of the reasoning RL (16 prompts x 8 samples a step)
    language_weight: float = 1.0  # the language-consistency reward's weight, summed with accuracy and format in
                                  # both RL stages (R1 sums them)
    samples_per_prompt: int = 4  # rejection sampling: samples drawn per training problem
    sample_problems_per_task: int = 100  # rejection sampling: distinct training problems per built-in task
    sample_instructions: int = 300  # built-in non-reasoning instructions added to the kept samples
    sft_epochs: float = 2.0  # passes of the rejection-sampling SFT (of the base) over its conversations
    rm_steps: int = 150  # reward-model steps (16 built-in preference pairs a step)
    all_scenario_steps: int = 150  # GRPO steps of the all-scenario RL
    general_share: float = 0.25  # share of the all-scenario RL's prompts that are general prompts scored by the
                                 # reward model
    r1_zero_steps: int = GRPO_TRAIN_DEFAULTS.max_steps  # GRPO steps of R1-Zero from the base (`nanoseek pipeline`'s)
    problems_per_task: int = 30  # held-out problems per built-in task in each evaluation (7 tasks, k=8 each)
    eval_instructions: int = 50  # held-out non-reasoning instructions in each evaluation (k=8 replies each)

    def __post_init__(self) -> None:
        for name in ("cold_start_steps", "reasoning_steps", "samples_per_prompt", "sample_problems_per_task",
                     "rm_steps", "all_scenario_steps", "r1_zero_steps", "problems_per_task", "eval_instructions",
                     "sft_epochs"):
            require(self, getattr(self, name) > 0, name, "must be > 0", kind="r1 option")
        for name in ("seed", "sample_instructions", "language_weight"):
            require(self, getattr(self, name) >= 0, name, "must be >= 0", kind="r1 option")
        require(self, 0 < self.general_share < 1, "general_share", "must be in (0, 1)", kind="r1 option")


@dataclass
class StageSettings:
    """Each stage's own settings, by default its command's; run_r1 sets on them what the recipe decides (models,
    data, templates, rewards, directories, seed and lengths)."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pretrain_train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sft_train: TrainConfig = field(default_factory=lambda: SFT_TRAIN_DEFAULTS)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    grpo_train: TrainConfig = field(default_factory=lambda: GRPO_TRAIN_DEFAULTS)
    sample: SampleConfig = field(default_factory=SampleConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rm_train: TrainConfig = field(default_factory=lambda: RM_TRAIN_DEFAULTS)
    evaluation: EvalConfig = field(default_factory=EvalConfig)


# The evaluated models: key (its eval file), label, the template it was trained for.
MODELS = (("base", "base", "question"), ("cold-start", "cold start (SFT)", "chat"),
          ("reasoning-rl", "reasoning RL", "chat"), ("rs-sft", "rejection-sampling SFT", "chat"),
          ("all-scenario", "all-scenario RL", "chat"), ("r1-zero", "R1-Zero", "question"))
COLUMNS = ("pass@1", "cons@k", "format", "language", "length", "instructions", "reward_model")


def run_r1(cfg: R1Config | None = None, resume: bool = False, settings: StageSettings | None = None,
           progress: bool = True) -> dict[str, Any]:
    """`nanoseek r1`: every stage in turn (see the module's docstring); -> the report (also report.json)."""
    cfg, s = cfg or R1Config(), settings or StageSettings()
    out, base, seed = Path(cfg.out_dir), Path(cfg.base), cfg.seed
    run = {key: out / key for key in ("cold-start", "reasoning-rl", "sample", "rs-sft", "rm", "all-scenario")}
    # Every stage's settings first, so that a bad combination stops the recipe before its first stage.
    pretrain_data = replace(s.pretrain, eval_problems=0)  # the evaluation stage measures the base fully
    pretrain_train = replace(s.pretrain_train, out_dir=str(base), seed=seed)
    cold = replace(s.sft, model=str(base), data=(), eval_problems=0)
    cold_train = replace(s.sft_train, out_dir=str(run["cold-start"]), seed=seed, max_steps=cfg.cold_start_steps)
    reasoning = replace(s.grpo, model=str(run["cold-start"]), template="chat", language_weight=cfg.language_weight)
    reasoning_train = replace(s.grpo_train, out_dir=str(run["reasoning-rl"]), seed=seed, max_steps=cfg.reasoning_steps)
    sample = replace(s.sample, model=str(run["reasoning-rl"]), problems=(), template="chat", k=cfg.samples_per_prompt,
                     problems_per_task=cfg.sample_problems_per_task, instructions=cfg.sample_instructions,
                     language=reasoning.language, out_dir=str(run["sample"]), overwrite=True, seed=seed)
    rs_sft = replace(s.sft, model=str(base), data=(str(run["sample"] / "data.jsonl"),), epochs=cfg.sft_epochs,
                     eval_problems=0)
    # epochs set the steps (run_sft wants SFT's default max_steps beside them)
    rs_sft_train = replace(s.sft_train, out_dir=str(run["rs-sft"]), seed=seed, max_steps=SFT_TRAIN_DEFAULTS.max_steps)
    rm = replace(s.rm, model=str(run["rs-sft"]), data=())
    rm_train = replace(s.rm_train, out_dir=str(run["rm"]), seed=seed, max_steps=cfg.rm_steps)
    general = replace(reasoning, model=str(run["rs-sft"]), reward_model=str(run["rm"]),
                      general_share=cfg.general_share)
    general_train = replace(s.grpo_train, out_dir=str(run["all-scenario"]), seed=seed,
                            max_steps=cfg.all_scenario_steps)
    zero = replace(s.grpo, model=str(base))  # R1-Zero: GRPO's own settings, as `nanoseek pipeline`'s
    zero_train = replace(s.grpo_train, seed=seed, max_steps=cfg.r1_zero_steps)
    zero_train = replace(zero_train, out_dir=str(r1_zero_run(out, base, zero, zero_train)))  # its own, or reused
    models = {"base": base, **run, "r1-zero": Path(zero_train.out_dir)}

    base_files = () if (base / "report.json").exists() else (base / "data" / "meta.json", base / "run.json")
    _check_seed(out, seed, (*base_files, *(run[key] / "run.json" for key in run if key != "sample"),
                            run["sample"] / "summary.json", out / "r1-zero" / "run.json"))
    stages = StageRunner(out, "r1", resume)
    (out / "eval").mkdir(exist_ok=True)
    evals = {key: out / "eval" / f"{key}.json" for key, _, _ in MODELS}
    problems = heldout_problems(cfg.problems_per_task, seed=s.evaluation.seed)
    templates = {key: template for key, _, template in MODELS}

    def evaluation(key: str) -> None:
        stages.run(f"evaluate {key}", evals[key], lambda: evaluate_run(
            models[key], evals[key], problems, replace(s.evaluation, template=templates[key],
                                                       language=reasoning.language), cfg.eval_instructions))

    stages.train("pretrain", base, lambda resume: pretrain(pretrain_data, pretrain_train, resume, progress))
    evaluation("base")
    stages.train("cold start", run["cold-start"], lambda resume: run_sft(cold, cold_train, resume, progress))
    evaluation("cold-start")
    stages.train("reasoning RL", run["reasoning-rl"],
                 lambda resume: run_grpo(reasoning, reasoning_train, resume, progress))
    evaluation("reasoning-rl")
    stages.run("rejection sampling", run["sample"] / "summary.md", lambda: run_sample(sample, progress))
    stages.train("rejection-sampling SFT", run["rs-sft"], lambda resume: run_sft(rs_sft, rs_sft_train, resume,
                                                                                 progress))
    evaluation("rs-sft")
    stages.train("reward model", run["rm"], lambda resume: run_rm(rm, rm_train, resume, progress))
    stages.train("all-scenario RL", run["all-scenario"],
                 lambda resume: run_grpo(general, general_train, resume, progress))
    evaluation("all-scenario")
    stages.train("R1-Zero", models["r1-zero"], lambda resume: run_grpo(zero, zero_train, resume, progress))
    evaluation("r1-zero")
    scores = out / "eval" / "reward-model.json"
    stages.run("score the replies with the reward model", scores, lambda: score_replies(run["rm"], evals, scores))

    report = _report(cfg, models, evals, json.loads(scores.read_text()), stages.summary(), s.evaluation)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_stages(report, out / "stages.png")
    (out / "report.md").write_text(_report_markdown(report))
    return report


def r1_zero_run(out: Path, base: Path, grpo: GRPOConfig, train: TrainConfig) -> Path:
    """Where R1-Zero runs: out/r1-zero; unless that has not started and a finished R1-Zero lies where `nanoseek
    pipeline` puts it (base/../grpo) from the same base checkpoint with the same settings (but those a resume
    may change, the steps aside) and seed: that one is reused."""
    own, other = out / "r1-zero", base.parent / "grpo"
    if own.exists() or not (other / "report.json").is_file() or not (other / "run.json").is_file():
        return own
    report, saved = (json.loads((other / name).read_text()) for name in ("report.json", "run.json"))

    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        return {"grpo": {k: v for k, v in settings["grpo"].items() if k != "model"},
                "train": {k: v for k, v in settings["train"].items() if k == "max_steps" or
                          k not in RESUMABLE_CHANGES}}

    wanted = json.loads(json.dumps({"grpo": asdict(grpo), "train": asdict(train)}))
    same = (Path(report["base_model"]).resolve() == resolve_checkpoint(base).resolve()
            and report["steps"] == train.max_steps and comparable(saved) == comparable(wanted))
    return other if same else own


def score_replies(rm_dir: Path, evals: dict[str, Path], path: Path) -> None:
    """The reward model's mean score of each evaluation's replies to the held-out instructions, into path."""
    scorer = load_reward_model(rm_dir)
    scores = {key: reward_model_score(scorer, json.loads(file.read_text())["instructions"])
              for key, file in evals.items()}
    path.write_text(json.dumps(scores, indent=2) + "\n")


def _report(cfg: R1Config, models: dict[str, Path], evals: dict[str, Path], scores: dict[str, float],
            minutes: dict[str, float], evaluation: EvalConfig) -> dict[str, Any]:
    rows = {}
    for key, label, template in MODELS:
        result = json.loads(evals[key].read_text())
        overall, instructions = result["overall"], result["instructions"]
        rows[key] = {"label": label, "model": str(models[key]), "template": template,
                     **{m: overall[m] for m in COLUMNS[:5]}, "instructions": instructions["accuracy"],
                     "reward_model": scores[key], "per_task": result["per_task"],
                     "instructions_per_kind": instructions["per_kind"]}
    first = json.loads(evals["base"].read_text())
    sample = json.loads((models["sample"] / "summary.json").read_text())
    steps = {key: json.loads((models[key] / "report.json").read_text())["steps"]
             for key in ("cold-start", "reasoning-rl", "rs-sft", "rm", "all-scenario", "r1-zero")}
    return {"seed": cfg.seed, "seeds": {"r1": cfg.seed, "base": _stage_seed(models["base"]),
                                        "evaluation": evaluation.seed},
            "settings": asdict(cfg), "steps": steps,
            "evaluation": {"problems": first["problems"], "k": first["k"], "temperature": first["temperature"],
                           "top_p": first["top_p"], "instructions": first["instructions"]["instructions"]},
            "sample": {k: sample[k] for k in ("samples", "kept", "kept_rate", "instructions", "rows_written")},
            "stages": rows, "minutes": minutes}


def _plot_stages(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["stages"].values())
    metrics = (("pass@1", "pass@1"), ("format", "format"), ("language", "language consistency"))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(metrics)
    for i, (metric, label) in enumerate(metrics):
        ax.bar([x + (i - 1) * width for x in range(len(rows))], [100 * r[metric] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=15)
    e = report["evaluation"]
    ax.set(ylabel="%", ylim=(0, 118), title=f"held-out problems per stage (k={e['k']}, T={e['temperature']})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(metrics))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report_markdown(r: dict[str, Any]) -> str:
    e, c, steps, sample = r["evaluation"], r["settings"], r["steps"], r["sample"]
    head = ["stage", "template", "pass@1", f"cons@{e['k']}", "format", "language", "length", "instructions",
            "RM score"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in r["stages"].values():
        cells = [f"{100 * row[m]:.1f}%" for m in ("pass@1", "cons@k", "format", "language")]
        cells += [f"{row['length']:.1f}", f"{100 * row['instructions']:.1f}%", f"{row['reward_model']:+.3f}"]
        lines.append(f"| {row['label']} | {row['template']} | " + " | ".join(cells) + " |")
    times = ", ".join(f"{name} {m:.1f} min" for name, m in r["minutes"].items())
    seeds = r["seeds"]
    return f"""# DeepSeek-R1 recipe report

From the base `{r['stages']['base']['model']}`:

- cold start: SFT of the base on the built-in cold-start conversations, {steps['cold-start']} steps;
- reasoning RL: GRPO from it in the chat template, accuracy + format + language consistency x {c['language_weight']},
  {steps['reasoning-rl']} steps;
- rejection sampling from it: {sample['kept']} of {sample['samples']} samples kept, {sample['instructions']} built-in
  non-reasoning instructions added;
- rejection-sampling SFT: the base fine-tuned on them, {steps['rs-sft']} steps;
- reward model from it on the built-in preference pairs, {steps['rm']} steps;
- all-scenario RL: GRPO from the rejection-sampling SFT, {100 * c['general_share']:.0f}% of the prompts general ones
  scored by the reward model, {steps['all-scenario']} steps;
- R1-Zero for comparison: GRPO from the base, {steps['r1-zero']} steps (`{r['stages']['r1-zero']['model']}`).

Every model is asked in the template it was trained for, on {e['problems']} held-out problems (k = {e['k']} samples
at temperature {e['temperature']}, top-p {e['top_p']}; language: the share of the reasoning's words in English) and
on {e['instructions']} held-out non-reasoning instructions (k = {e['k']} replies each; instructions: the share of
right replies; RM score: the reward model's mean score of those replies).

{chr(10).join(lines)}

Minutes: {times}.
Seeds: recipe {seeds['r1']} (every stage after the base), base {seeds['base']}, the evaluations {seeds['evaluation']}.

![pass@1, format and language per stage](stages.png)
"""
