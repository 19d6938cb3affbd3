"""`nanoseek distill-vs-rl`: the budget rule against hand-made metrics, the whole comparison end to end on tiny models
(a tiny DeepSeek-V3 teacher, a qwen2-tiny student) through the command line, its report, the reuse of finished stages,
arm (b)'s chunks against one uninterrupted GRPO run, and the bad inputs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import save_tiny_checkpoint, train_tokenizer

import nanoseek.distill_vs_rl as comparison
import nanoseek.sample as sampling
import nanoseek.train.grpo as grpo_stage
from nanoseek.cli import build_parser, main
from nanoseek.distill_vs_rl import (ComparisonError, DistillVsRLConfig, StageSettings, arm_budget, next_rl_steps,
                                    run_distill_vs_rl, train_records)
from nanoseek.errors import NanoseekError
from nanoseek.eval import EvalConfig
from nanoseek.rewards import RewardSet, format_reward
from nanoseek.sample import Drawn, SampleConfig
from nanoseek.train.distill import DISTILL_TRAIN_DEFAULTS, DistillConfig
from nanoseek.train.grpo import GRPOConfig, run_grpo
from nanoseek.train.loop import TrainConfig
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig


# ---------------------------------------------------------------------- the budget rule on hand-made metrics
def records(tokens: list[int], first_step: int = 1) -> list[dict]:
    return [{"kind": "train", "step": first_step + i, "tokens": t, "step_time": 0.5} for i, t in enumerate(tokens)]


def test_arm_b_chunks_by_the_tokens_still_missing():
    # Before any step: the most a step can take bounds it (1,000 tokens a step: 3 steps cannot pass 3,500).
    assert next_rl_steps("tokens", [], 3500, 1000) == 3
    assert next_rl_steps("tokens", [], 500, 1000) == 1  # at least one step
    # Steps of 100, 150 and 80 tokens (330 in all): 670 missing over the most a step took (150) -> 4 more steps.
    assert next_rl_steps("tokens", records([100, 250, 330]), 1000, 1000) == 3 + 4
    assert next_rl_steps("tokens", records([100, 250, 330]), 340, 1000) == 3 + 1
    assert next_rl_steps("tokens", records([100, 250, 330]), 330, 1000) is None  # reached
    # Records every other step (a log_every of 2): the most per step is 300 / 2.
    assert next_rl_steps("tokens", [{"step": 2, "tokens": 300}, {"step": 4, "tokens": 500}], 1000, 1000) == 4 + 3
    # steps: arm (a)'s step count, in one chunk.
    assert next_rl_steps("steps", [], 7, 1000) == 7
    assert next_rl_steps("steps", records([100, 250]), 7, 1000) == 7
    assert next_rl_steps("steps", records([100] * 7), 7, 1000) is None


def test_an_arms_budget_is_read_up_to_its_latest_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000003\n")
    lines = records([100, 250, 330, 400]) + [{"kind": "heldout", "step": 2, "tokens": 250, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # Step 4 was logged after the last save (a run killed without saving): a resume trains it again.
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3]
    assert arm_budget(tmp_path) == {"steps": 3, "tokens": 330, "train_minutes": 1.5 / 60}
    (tmp_path / "checkpoints" / "latest").unlink()
    with pytest.raises(ComparisonError, match="has no training steps"):
        arm_budget(tmp_path)


# ---------------------------------------------------------------------- the comparison end to end
TINY = StageSettings(
    pretrain=PretrainConfig(builtin_docs=800, batch_size=2, micro_batch_size=2, seq_len=64),
    pretrain_train=TrainConfig(warmup_steps=1, save_every=0, eval_every=0, tensorboard=False),
    distill=DistillConfig(batch_size=4, heldout_fraction=0.15, sample=SampleConfig(problems_per_task=2, k=2)),
    distill_train=replace(DISTILL_TRAIN_DEFAULTS, lr=3e-3, warmup_steps=1, save_every=0, eval_every=0,
                          tensorboard=False),
    grpo=GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=12),
    grpo_train=replace(StageSettings().grpo_train, save_every=0, tensorboard=False),
    evaluation=EvalConfig(k=2, max_new_tokens=12))
OPTIONS = ["--student-preset", "qwen2-tiny", "--student-steps", "3", "--distill-steps", "3", "--problems-per-task", "1"]


def teacher_answers(model, tokenizer, problems, cfg, progress=False):
    """A teacher that knows the answers: per problem its worked steps and answer, once right and once wrong."""
    samples = []
    for i, p in enumerate(problems):
        right = f"{p.steps}\nSo the answer is {p.answer}.\n</think>\n\n<answer>{p.answer}</answer>"
        samples += [Drawn(i, right, 30), Drawn(i, right.replace(f"<answer>{p.answer}", "<answer>x"), 30)]
    return samples[:len(problems) * cfg.k]


def varying_rewards(*args, **kwargs) -> RewardSet:
    """In place of the rule rewards, which a random tiny student never earns: a reward that differs within groups,
    so that GRPO updates the student."""
    return RewardSet({"accuracy": lambda s: float(len(set(s.completion)) % 2), "format": format_reward},
                     {"accuracy": 1.0, "format": 0.2})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The whole tiny comparison run by the command line in a working directory (relative paths, so a copy of the
    directory is a run of its own): the directory, the report and what the command printed."""
    work = tmp_path_factory.mktemp("comparison")
    save_tiny_checkpoint(work / "teacher", train_tokenizer("So the answer is"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setattr(sampling, "draw", teacher_answers)
        patch.setattr(grpo_stage, "r1_zero_rewards", varying_rewards)
        patch.setattr(comparison, "StageSettings", lambda: TINY)
        code = main(["distill-vs-rl", "--teacher", "teacher", "--out-dir", "cmp", *OPTIONS])
        assert code == 0
        return work, json.loads((work / "cmp" / "report.json").read_text())


@pytest.fixture
def work(finished, tmp_path, monkeypatch):
    """A copy of the finished comparison's directory, as the working directory, with the tiny settings."""
    shutil.copytree(finished[0], tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(sampling, "draw", teacher_answers)
    return tmp_path / "work"


def tokens_column(run_dir: Path) -> list[tuple[int, int]]:
    return [(r["step"], r["tokens"]) for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def test_the_comparison_trains_both_arms_from_one_student_and_reports_them(finished, monkeypatch):
    work, report = finished
    monkeypatch.chdir(work)
    out = Path("cmp")
    assert list(report["models"]) == ["student", "distill", "grpo", "teacher"]
    templates = {key: row["template"] for key, row in report["models"].items()}
    assert templates == {"student": "question", "distill": "chat", "grpo": "question", "teacher": "chat"}
    for key, row in report["models"].items():
        evaluation = json.loads((out / "eval" / f"{key}.json").read_text())
        assert evaluation["problems"] == 7 and evaluation["k"] == 2
        for metric in ("pass@1", "cons@k", "format", "language", "length"):
            assert row[metric] == evaluation["overall"][metric]
        assert row["per_task"] == evaluation["per_task"] and 0 <= row["language"] <= 1
    assert report["evaluation"] == {"problems": 7, "k": 2, "temperature": 0.6, "top_p": 0.95}

    # What each stage was given: the student is pretrained with the teacher's tokenizer, both arms start from it.
    settings = {key: json.loads((out / key / "run.json").read_text()) for key in ("student", "distill", "grpo")}
    assert settings["student"]["pretrain"]["preset"] == "qwen2-tiny"
    assert settings["student"]["pretrain"]["tokenizer"] == "teacher/tokenizer.json"
    assert settings["student"]["train"]["max_steps"] == 3
    assert settings["distill"]["distill"].items() >= {"teacher": "teacher", "student": str(out / "student"),
                                                      "method": "sft"}.items()
    assert settings["grpo"]["grpo"].items() >= {"model": str(out / "student"), "template": "question"}.items()
    assert all(s["train"]["seed"] == 0 for s in settings.values())
    # The teacher's samples: 7 tasks x 2 problems x k=2, the right half kept.
    assert {k: report["teacher_samples"][k] for k in ("samples", "kept")} == {"samples": 28, "kept": 14}

    # The budget: arm (b) stopped at the first GRPO step whose cumulative tokens reach arm (a)'s final tokens.
    budget = report["budget"]
    target = tokens_column(out / "distill")[-1][1]
    first = next(step for step, tokens in tokens_column(out / "grpo") if tokens >= target)
    assert budget["rule"] == "tokens" and budget["distill"]["steps"] == 3 and budget["distill"]["tokens"] == target
    assert budget["grpo"]["steps"] == first == tokens_column(out / "grpo")[-1][0] > 3
    assert budget["grpo"]["tokens"] >= target > tokens_column(out / "grpo")[-2][1]
    assert json.loads((out / "grpo" / "budget.json").read_text()).items() >= {"rule": "tokens", "target": target,
                                                                              "steps": first}.items()
    for arm in ("distill", "grpo"):
        assert 0 < budget[arm]["train_minutes"] <= budget[arm]["minutes"] == report["minutes"][
            {"distill": "arm (a): distill", "grpo": "arm (b): GRPO"}[arm]]

    text = (out / "report.md").read_text()
    assert "| model | template | pass@1 | cons@2 | format | language | length |" in text
    for label in ("| student | question |", "| arm (a): distilled | chat |", "| arm (b): GRPO | question |",
                  "| teacher | chat |"):
        assert label in text
    assert (f"| arm (a): distilled | 3 | {target:,} |" in text and f"| arm (b): GRPO | {first} | "
            f"{budget['grpo']['tokens']:,} |" in text)
    assert "Rule `tokens`: arm (b) trained until its cumulative tokens" in text and "| addition |" in text
    assert (out / "distill_vs_rl.png").stat().st_size > 0
    assert set(report["minutes"]) == {"student", "evaluate student", "evaluate teacher", "arm (a): distill",
                                      "evaluate distill", "arm (b): GRPO", "evaluate grpo", "total"}


def test_a_second_run_reuses_every_finished_stage(finished, work, monkeypatch, capsys):
    out = work / "cmp"
    checkpoints = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*/model/model.safetensors")}
    monkeypatch.setattr(comparison, "StageSettings", lambda: TINY)
    capsys.readouterr()
    assert main(["distill-vs-rl", "--teacher", "teacher", "--out-dir", "cmp", *OPTIONS]) == 0
    printed = capsys.readouterr().out
    for stage in ("student", "arm (a): distill", "arm (b): GRPO", "evaluate teacher"):
        assert f"[{stage}] finished earlier" in printed
    assert json.loads((out / "report.json").read_text()) == finished[1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*/model/model.safetensors")} == checkpoints
    b = finished[1]["budget"]
    assert (f"arms: {b['distill']['tokens']:,} / {b['grpo']['tokens']:,} tokens in 3 / {b['grpo']['steps']} steps "
            "(budget: tokens)") in printed and "report: cmp/report.md" in printed


def test_arm_b_in_chunks_trains_as_one_grpo_run_would(finished, tmp_path, monkeypatch):
    work, report = finished
    monkeypatch.chdir(work)
    monkeypatch.setattr(grpo_stage, "r1_zero_rewards", varying_rewards)
    steps = report["budget"]["grpo"]["steps"]
    once = tmp_path / "once"
    run_grpo(replace(TINY.grpo, model="cmp/student"), replace(TINY.grpo_train, out_dir=str(once), max_steps=steps),
             progress=False)
    # It ran in two chunks: the first as long as the most tokens a step can take (2 prompts x 2 samples x 12
    # tokens) allows, the second to the first step reaching arm (a)'s tokens (both chunks' last checkpoints kept).
    target = report["budget"]["distill"]["tokens"]
    assert sorted(p.name for p in Path("cmp/grpo/checkpoints").glob("step_*")) == [
        f"step_{target // 48:06d}", f"step_{steps:06d}"]
    keys = ("step", "tokens", "reward", "loss", "length_mean", "grad_norm")
    chunked = [r for r in read_metrics(Path("cmp/grpo/metrics.jsonl")) if r.get("kind") == "train"]
    single = [r for r in read_metrics(once / "metrics.jsonl") if r.get("kind") == "train"]
    assert sum(r["grad_norm"] is not None for r in chunked) > steps // 2  # the student was updated
    assert [[r[k] for k in keys] for r in chunked] == [[r[k] for k in keys] for r in single]


def test_steps_budget_from_a_given_student(finished, work):
    report = run_distill_vs_rl(DistillVsRLConfig(teacher="teacher", out_dir="steps", student="cmp/student",
                                                 distill_steps=2, budget="steps", problems_per_task=1),
                               settings=TINY, progress=False)
    assert report["budget"]["grpo"]["steps"] == report["budget"]["distill"]["steps"] == 2
    assert not (work / "steps" / "student").exists() and "student" not in report["minutes"]
    assert report["models"]["student"]["model"] == "cmp/student"
    assert json.loads((work / "steps" / "grpo" / "run.json").read_text())["grpo"]["model"] == "cmp/student"
    assert "Rule `steps`: arm (b) trained for arm (a)'s number of optimizer steps" in (
        work / "steps" / "report.md").read_text()


# ---------------------------------------------------------------------- bad input
def test_other_options_in_a_finished_directory_are_refused(finished, work):
    cfg = DistillVsRLConfig(teacher="teacher", out_dir="cmp", student_preset="qwen2-tiny", student_steps=3,
                            distill_steps=4, problems_per_task=1)
    with pytest.raises(ComparisonError, match=r"other options .*distill_steps = 4 \(saved: 3\)"):
        run_distill_vs_rl(cfg, settings=TINY, progress=False)


def test_a_missing_teacher_names_its_path_and_the_command_that_makes_it(tmp_path, capsys):
    assert main(["distill-vs-rl", "--teacher", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "out")]) == 2
    assert (f"nanoseek: error: no teacher at {tmp_path / 'absent'}: pass --teacher a checkpoint directory or a "
            "training run's directory (`nanoseek r1` writes the R1 model, runs/r1/all-scenario)"
            ) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_missing_student_and_a_decaying_rl_learning_rate_are_refused(finished, work):
    with pytest.raises(NanoseekError, match="no student at absent: pass --student a checkpoint directory"):
        run_distill_vs_rl(DistillVsRLConfig(teacher="teacher", out_dir="other", student="absent"), settings=TINY)
    decaying = replace(TINY, grpo_train=replace(TINY.grpo_train, decay_start=0.5))
    with pytest.raises(ComparisonError, match="must not decay with max_steps: decay_start is 0.5"):
        run_distill_vs_rl(DistillVsRLConfig(teacher="teacher", out_dir="other"), settings=decaying)
    assert not (work / "other").exists()


@pytest.mark.parametrize("args,message", [
    (["--student", "x", "--student-steps", "5"],
     "invalid distill-vs-rl option 'student_steps' = 5: sets the student pretrained here, and --student x names one"),
    (["--student-preset", "small"], "argument --student-preset: invalid choice: 'small'"),
    (["--distill-steps", "0"], "invalid distill-vs-rl option 'distill_steps' = 0: must be > 0"),
    (["--problems-per-task", "0"], "invalid distill-vs-rl option 'problems_per_task' = 0: must be > 0"),
    (["--budget", "minutes"], "argument --budget: invalid choice: 'minutes'"),
    (["--method", "reverse"], "argument --method: invalid choice: 'reverse'"),
])
def test_bad_options_exit_2_with_a_message(args, message, tmp_path, capsys):
    assert main(["distill-vs-rl", *args, "--out-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_choices_and_defaults():  # every option's help line: tests/test_cli.py
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["distill-vs-rl"].format_help().split())
    assert "--method {sft,logit,on-policy}" in text and "--budget {tokens,steps}" in text
    assert "--student-preset {qwen2-tiny,qwen2-small," in text
    assert "(default: runs/r1/all-scenario)" in text and "(default: 1200)" in text and "(default: qwen2-mini)" in text
