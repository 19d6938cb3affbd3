"""`nanoseek pipeline`: pretrain -> evaluate -> R1-Zero -> evaluate on a tiny scale; reuse and resume."""

import json
from dataclasses import replace

import pytest

from nanoseek.eval import EvalConfig
from nanoseek.pipeline import run_pipeline
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig
from nanoseek.train.loop import TrainConfig, TrainingError
from nanoseek.train.pretrain import PretrainConfig

TINY = dict(data=PretrainConfig(preset="tiny", builtin_docs=800, batch_size=2, micro_batch_size=2, seq_len=64),  # noqa: C408
            pretrain_train=TrainConfig(max_steps=3, warmup_steps=1, save_every=2, eval_every=0, tensorboard=False),
            grpo=GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=12),
            grpo_train=replace(GRPO_TRAIN_DEFAULTS, max_steps=2, save_every=1, tensorboard=False),
            eval_problems=1, eval_config=EvalConfig(k=2, max_new_tokens=12), progress=False)


def test_pipeline_writes_a_before_after_report_and_reuses_finished_stages(tmp_path):
    report = run_pipeline(tmp_path, **TINY)
    for stage in ("base", "r1_zero"):
        assert report[stage]["problems"] == 7 and report[stage]["k"] == 2
        assert 0.0 <= report[stage]["overall"]["pass@1"] <= 1.0
    assert set(report["minutes"]) == {"pretrain", "evaluate base", "R1-Zero", "evaluate R1-Zero", "total"}
    text = (tmp_path / "report.md").read_text()
    assert "| overall |" in text and "cons@2" in text
    assert (tmp_path / "pass_at_1.png").is_file() and (tmp_path / "grpo" / "plots" / "reward.png").is_file()
    assert json.loads((tmp_path / "grpo" / "report.json").read_text())["steps"] == 2

    checkpoints = sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir())
    again = run_pipeline(tmp_path, **TINY)  # every stage finished: nothing is trained again
    assert again["minutes"] == report["minutes"]
    assert sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").iterdir()) == checkpoints


def test_an_interrupted_stage_needs_resume_and_then_continues(tmp_path):
    run_pipeline(tmp_path, **TINY)
    (tmp_path / "grpo" / "report.json").unlink()  # as if R1-Zero had been stopped before its end
    (tmp_path / "eval-grpo.json").unlink()
    with pytest.raises(TrainingError, match="--resume"):
        run_pipeline(tmp_path, **TINY)
    report = run_pipeline(tmp_path, resume=True, **TINY)
    assert (tmp_path / "grpo" / "report.json").is_file() and report["r1_zero"]["problems"] == 7
