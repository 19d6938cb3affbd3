"""`nanoseek pretrain` and `nanoseek grpo` keep their word: the printed resume hint resumes with the run's own
settings, a resume in the wrong place is refused with a message, each stage lists only options it uses, and a
finished stage reports what it did."""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest

from nanoseek.cli import main
from nanoseek.train.loop import Trainer
from nanoseek.train.metrics import read_metrics

TINY = ["--preset", "tiny", "--builtin-docs", "600", "--seq-len", "64", "--batch-size", "4", "--micro-batch-size",
        "2", "--warmup-steps", "1", "--eval-every", "0", "--eval-problems", "0", "--no-tensorboard"]
GRPO = ["--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "6", "--no-tensorboard"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished tiny pretraining run (4 steps)."""
    out = tmp_path_factory.mktemp("stages") / "pretrain"
    assert main(["pretrain", *TINY, "--max-steps", "4", "--out-dir", str(out)]) == 0
    return out


def test_the_printed_resume_hint_resumes_with_the_runs_own_settings(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = Trainer.train_step

    def step_then_interrupt(self):
        record = real(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the trainer finishes the step, saves, returns
        return record
    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert main(["pretrain", *TINY, "--max-steps", "5", "--out-dir", str(out)]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("stopped at step 2; resume with: nanoseek pretrain --resume")
    monkeypatch.setattr(Trainer, "train_step", real)
    command = shlex.split(hint.split("resume with: ")[1])
    assert main(command[1:]) == 0, capsys.readouterr().err  # the default preset is `small`: the run's own is used
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    assert json.loads((out / "report.json").read_text())["preset"] == "tiny"


def test_a_resume_may_not_change_the_runs_settings(base, capsys):
    assert main(["pretrain", "--resume", "--out-dir", str(base), "--lr", "1"]) == 2
    assert "these differ: lr = 1.0 (saved: 0.003)" in capsys.readouterr().err


def test_resume_in_another_stages_directory_is_refused(base, tmp_path, capsys):
    assert main(["grpo", "--resume", "--out-dir", str(base)]) == 2
    assert f"{base} holds a `pretrain` run, not a `grpo` run; resume it with: nanoseek pretrain --resume" in \
        capsys.readouterr().err
    grpo_dir = tmp_path / "grpo"
    assert main(["grpo", "--model", str(base), *GRPO, "--max-steps", "1", "--out-dir", str(grpo_dir)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--resume", "--out-dir", str(grpo_dir)]) == 2
    assert "holds a `grpo` run, not a `pretrain` run; resume it with: nanoseek grpo --resume" in \
        capsys.readouterr().err


def test_grpo_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["grpo", "--resume", "--out-dir", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_grpo_writes_a_report(base, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(base), *GRPO, "--max-steps", "2", "--out-dir", str(out)]) == 0
    assert f"report: {out}/report.md" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "2 steps" in text and "reward" in text and "plots/reward.png" in text


def test_grpo_resumes_a_run_started_with_its_own_learning_rate(base, tmp_path):
    """The resume takes the run's saved lr; GRPO's default lr is not an option given against it."""
    out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(base), *GRPO, "--lr", "1e-3", "--max-steps", "1", "--out-dir", str(out)]) == 0
    assert main(["grpo", "--resume", "--out-dir", str(out), "--max-steps", "2"]) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["step"] for r in records] == [1, 2] and json.loads((out / "run.json").read_text())["train"]["lr"] == 1e-3


def test_pretrain_without_the_greedy_check_still_reports(base, capsys):
    report = json.loads((base / "report.json").read_text())
    assert report["task_accuracy"] is None and report["heldout_loss"] > 0
    assert "No greedy check" in (base / "report.md").read_text()


def test_pretraining_on_your_own_text_reports_no_builtin_task_accuracy(tmp_path, capsys):
    corpus = tmp_path / "text"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over {i} lazy dogs. " * 4)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok.json")]) == 0
    out = tmp_path / "run"
    at = TINY.index("--eval-problems")
    args = TINY[:at] + TINY[at + 2:]  # the default (50 problems) would check the built-in tasks
    assert main(["pretrain", *args, "--max-steps", "2", "--data", str(corpus), "--tokenizer",
                 str(tmp_path / "tok.json"), "--heldout-fraction", "0.1", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "greedy accuracy" not in printed
    assert json.loads((out / "report.json").read_text())["task_accuracy"] is None


@pytest.mark.parametrize("option", ["--seq-len", "--batch-size", "--micro-batch-size", "--mtp-weight",
                                    "--bias-update-speed", "--aux-alpha", "--eval-every"])
def test_grpo_lists_only_options_it_uses(option, capsys):
    assert main(["grpo", "--help"]) == 0
    assert option not in capsys.readouterr().out
    assert main(["grpo", option, "1"]) == 2  # and refuses them


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"stage": "pretrain"}',
                                     '{"stage": "pretrain", "train": {}, "pretrain": {"unknown_field": 1}}'])
def test_a_broken_run_json_is_a_message(base, tmp_path, content, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(base, run)
    (run / "run.json").write_text(content)
    assert main(["pretrain", "--resume", "--out-dir", str(run)]) == 2
    assert f"{run}/run.json" in capsys.readouterr().err
