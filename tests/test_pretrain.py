"""`nanoseek pretrain` end to end on the tiny preset: SIGKILL + resume is exact, and the run refuses to clobber."""

import json
import signal
import subprocess
import sys

import pytest
from conftest import sigkill_once_logged

from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.train.loop import TrainConfig

ARGS = ["--preset", "tiny", "--builtin-docs", "1500", "--max-steps", "12", "--save-every", "4", "--eval-every", "6",
        "--eval-batches", "2", "--seq-len", "64", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "3e-3",
        "--warmup-steps", "2", "--eval-problems", "0", "--no-tensorboard", "--keep-last", "3"]


def run(out, *extra):
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", "pretrain", "--out-dir", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=300)


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r["loss"]) for r in records]


def test_sigkill_between_checkpoints_then_resume_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    result = run(straight)
    assert result.returncode == 0, result.stderr[-2000:]

    killed = tmp_path / "killed"  # killed once step 6 is logged: past the step-4 checkpoint, before step 8
    assert sigkill_once_logged(["pretrain", "--out-dir", str(killed), *ARGS], killed / "metrics.jsonl", 6) == \
        -signal.SIGKILL
    checkpoint = (killed / "checkpoints" / "latest").read_text()
    assert checkpoint in ("step_000004", "step_000008")
    assert losses(killed)[-1][1] < 12  # it really died before the end

    result = run(killed, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(killed) == losses(straight)  # step for step, held-out evaluations included


def test_a_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_000004")
    assert main(["pretrain", "--out-dir", str(out), *ARGS]) == 2
    assert "already holds a run (at step_000004); pass --resume" in capsys.readouterr().err
    assert main(["pretrain", "--out-dir", str(tmp_path / "empty"), "--resume", *ARGS]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_user_files_need_a_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world")
    assert main(["pretrain", "--out-dir", str(tmp_path / "run"), "--data", str(tmp_path / "a.txt"), *ARGS]) == 2
    assert "needs a tokenizer: pass --tokenizer" in capsys.readouterr().err


def test_bad_training_option(tmp_path, capsys):
    assert main(["pretrain", "--out-dir", str(tmp_path / "run"), *ARGS, "--recompute", "some"]) == 2
    assert "argument --recompute: invalid choice: 'some' (choose from 'none', 'selective', 'full')" in \
        capsys.readouterr().err
    with pytest.raises(ConfigError, match="invalid training option 'recompute' = 'some': must be 'none', "
                                          "'selective' or 'full'"):
        TrainConfig(recompute="some")  # the same check for callers from Python
    assert not (tmp_path / "run").exists()


def test_unknown_corpus_difficulty(tmp_path, capsys):
    assert main(["pretrain", "--out-dir", str(tmp_path / "run"), *ARGS, "--difficulty", "4"]) == 2
    assert "difficulty 4 is not a level of the built-in corpus; choose 0 (mixed) or one of 1, 2, 3" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work
    assert main(["pretrain", "--out-dir", str(tmp_path / "run"), *ARGS, "--direct-rate", "1.5"]) == 2
    assert "direct_rate 1.5 must be between 0 and 1" in capsys.readouterr().err
