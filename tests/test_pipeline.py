"""`nanoseek pipeline`: pretrain -> evaluate -> R1-Zero -> evaluate on a tiny scale; reuse, resume and seeds; and
bench/pipeline_seeds.py's summary over seeds."""

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.checkpoint import resolve_checkpoint
from nanoseek.cli import main
from nanoseek.data.tasks import TASKS
from nanoseek.eval import EvalConfig
from nanoseek.pipeline import SeedMismatch, run_pipeline
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig
from nanoseek.train.loop import TrainConfig, TrainingError
from nanoseek.train.pretrain import PretrainConfig

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pipeline_seeds.py"
spec = importlib.util.spec_from_file_location("pipeline_seeds", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)

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
    with pytest.raises(SeedMismatch, match="seed 0 .*not 1"):  # nor with another seed
        run_pipeline(tmp_path, resume=True, seed=1, **TINY)
    report = run_pipeline(tmp_path, resume=True, **TINY)
    assert (tmp_path / "grpo" / "report.json").is_file() and report["r1_zero"]["problems"] == 7


def test_resume_starts_a_stage_that_never_saved(tmp_path):
    """Stopped after pretraining, before R1-Zero's first checkpoint (during the base evaluation, say): --resume
    reuses the base and starts R1-Zero."""
    run_pipeline(tmp_path, **TINY)
    shutil.rmtree(tmp_path / "grpo")
    for name in ("eval-base.json", "eval-grpo.json"):
        (tmp_path / name).unlink()
    report = run_pipeline(tmp_path, resume=True, **TINY)
    assert (tmp_path / "grpo" / "report.json").is_file() and report["base"]["problems"] == 7


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory):
    """Tiny pipelines of seed 0, seed 0 again, and seed 1, each in its own directory."""
    work = tmp_path_factory.mktemp("seeds")
    runs = {name: work / name for name in ("seed0", "seed0-again", "seed1")}
    for name, out in runs.items():
        run_pipeline(out, seed=int(name[4]), **TINY)
    return runs


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(resolve_checkpoint(run / "pretrain") / "model.safetensors")


def _losses(stage_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("kind", "train") == "train"]


def test_the_seed_is_both_training_stages_seed_and_every_report_states_it(seeded_runs):
    run = seeded_runs["seed1"]
    for stage in ("pretrain", "grpo"):
        assert json.loads((run / stage / "run.json").read_text())["train"]["seed"] == 1
        assert json.loads((run / stage / "report.json").read_text())["seed"] == 1
    assert "seed 1" in (run / "pretrain" / "report.md").read_text()
    assert "(seed 1)" in (run / "grpo" / "report.md").read_text()
    assert json.loads((run / "pretrain" / "data" / "meta.json").read_text())["seed"] == 1  # the corpus's draws
    report = json.loads((run / "report.json").read_text())
    assert report["seed"] == 1
    assert report["seeds"] == {"pipeline": 1, "pretrain": 1, "grpo": 1, "evaluation": 0}
    assert "Seeds: pipeline 1 (pretraining 1, R1-Zero 1; the evaluations'\nproblems and sampling 0)" in \
        (run / "report.md").read_text()


def test_one_seed_trains_the_same_model_and_another_a_different_one(seeded_runs):
    first, again, other = seeded_runs["seed0"], seeded_runs["seed0-again"], seeded_runs["seed1"]
    a, b, c = _weights(first), _weights(again), _weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(k in c and c[k].shape == a[k].shape and torch.equal(a[k], c[k]) for k in a)
    assert _losses(first / "pretrain") == _losses(again / "pretrain")
    assert _losses(first / "pretrain")[0] != _losses(other / "pretrain")[0]
    for name in ("eval-base.json", "eval-grpo.json"):
        assert (first / name).read_text() == (again / name).read_text()
    # The evaluations are the same for every seed: the same held-out problems, k and sampling.
    base, base_other = (json.loads((run / "eval-base.json").read_text()) for run in (first, other))
    assert {k: base[k] for k in ("problems", "k", "temperature", "top_p")} == \
        {k: base_other[k] for k in ("problems", "k", "temperature", "top_p")}


def test_a_run_of_another_seed_is_neither_reused_nor_resumed(seeded_runs, capsys):
    run = seeded_runs["seed1"]
    before = (run / "report.json").read_text()
    for resume in (False, True):
        with pytest.raises(SeedMismatch, match="holds a pipeline run of seed 1 .*not 0: continue it with --seed 1"):
            run_pipeline(run, resume=resume, seed=0, **TINY)
    assert main(["pipeline", "--out-dir", str(run), "--resume"]) == 2  # --seed 0, the default
    error = capsys.readouterr().err
    assert error.startswith("nanoseek: error: ") and "--seed 1, or run seed 0 in another --out-dir" in error
    assert (run / "report.json").read_text() == before


def _evaluation(pass_at_1: dict[str, float], format_rate: float) -> dict:
    """An evaluation result in run_pipeline's shape (nanoseek.eval.evaluate)."""
    per_task = {task: {"pass@1": p, "cons@k": p, "pass@k": p, "format": format_rate, "length": 50.0, "greedy": p}
                for task, p in pass_at_1.items()}
    overall = {m: sum(t[m] for t in per_task.values()) / len(per_task) for m in per_task[next(iter(per_task))]}
    return {"problems": 7 * 30, "k": 8, "temperature": 0.6, "top_p": 0.95, "overall": overall, "per_task": per_task}


def _fake_run(out: Path, seed: int, base: float, gains: list[float], format_rate: float, minutes: float) -> None:
    """report.json of a finished pipeline: every task at pass@1 `base`, R1-Zero adding gains[i] to task i."""
    out.mkdir(parents=True)
    report = {"seed": seed, "seeds": {"pipeline": seed, "pretrain": seed, "grpo": seed, "evaluation": 0},
              "base": _evaluation(dict.fromkeys(TASKS, base), 0.9),
              "r1_zero": _evaluation({t: base + g for t, g in zip(TASKS, gains, strict=True)}, format_rate),
              "minutes": {"pretrain": minutes / 2, "evaluate base": 0.5, "R1-Zero": minutes / 2 - 1,
                          "evaluate R1-Zero": 0.5, "total": minutes}}
    (out / "report.json").write_text(json.dumps(report))


def test_pipeline_seeds_summarises_the_runs_and_checks_the_bars(tmp_path, capsys):
    # seed 0: +14 points, 5 of 7 tasks up; seed 1: +9 points, 5 tasks up and one down, 94% format, 26 minutes
    _fake_run(tmp_path / "seed-0", 0, 0.25, [0.2, 0.2, 0.2, 0.2, 0.18, 0.0, 0.0], 0.99, 20.0)
    _fake_run(tmp_path / "seed-1", 1, 0.30, [0.14, 0.14, 0.14, 0.14, 0.0, -0.07, 0.14], 0.94, 26.0)
    summary = bench.summarise(bench.read_reports(tmp_path, [0, 1]))
    first, second = summary["runs"]
    assert first["base"] == pytest.approx(25) and first["gain"] == pytest.approx(14)
    assert first["tasks_improved"] == 5 and second["tasks_improved"] == 5 and first["tasks"] == 7
    assert second["gain"] == pytest.approx(9) and second["format"] == pytest.approx(94)
    assert summary["mean"]["gain"] == pytest.approx(11.5) and summary["mean"]["base"] == pytest.approx(27.5)
    assert summary["min"]["gain"] == pytest.approx(9) and summary["max"]["minutes"] == 26
    verdicts = {b["bar"]: b["pass"] for b in summary["bars"]}
    assert verdicts == {"every base model >= 20% pass@1": True, "every gain >= +8 points": True,
                        "mean gain >= +10 points": True, "every run improves >= 4 of 7 tasks": True,
                        "every format rate after R1-Zero >= 95%": False, "every run <= 25 minutes": False}

    out = tmp_path / "result.json"
    bench.main(["--summarise-only", "--work-dir", str(tmp_path), "--seeds", "0", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| 0 | 25.0% | 39.0% | +14.0 | 5/7 | 99.0% | 20.0 |" in printed
    assert "| mean | 27.5% | 39.0% | +11.5 | 5/7 | 96.5% | 23.0 |" in printed
    assert "FAIL  every run <= 25 minutes (26.0)" in printed and "PASS  mean gain >= +10 points (11.5)" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "pipeline_seeds" and result["git_commit"] and result["seeds"] == [0, 1]
    assert result["runs"] == summary["runs"]


def test_pipeline_seeds_refuses_a_missing_run_and_an_existing_one_unless_reused(tmp_path):
    with pytest.raises(SystemExit, match="seed 0: no finished pipeline"):
        bench.main(["--summarise-only", "--work-dir", str(tmp_path), "--seeds", "0"])
    _fake_run(tmp_path / "seed-0", 0, 0.25, [0.1] * 7, 0.99, 20.0)
    with pytest.raises(SystemExit, match="seed-0 exists: pass --reuse"):
        bench.main(["--work-dir", str(tmp_path), "--seeds", "0", "--out", str(tmp_path / "r.json")])
    bench.main(["--reuse", "--work-dir", str(tmp_path), "--seeds", "0", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["tasks_improved"] == 7


@pytest.mark.parametrize("options, expected", [
    ([], {}),
    (["--single-thread"], {"OMP_NUM_THREADS": "1"}),
    (["--isa", "avx2"], {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
])
def test_pipeline_seeds_runs_each_seed_in_the_asked_summation_order(tmp_path, monkeypatch, options, expected):
    """The child pipeline gets the environment of --single-thread / --isa (and nothing of the other's)."""
    for name in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    seen, real_run = [], subprocess.run

    def fake_pipeline(command, env=None, **kwargs):
        if "pipeline" not in command:  # git, for the result's provenance
            return real_run(command, env=env, **kwargs)
        seen.append({k: env[k] for k in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                     if k in env})
        _fake_run(Path(command[command.index("--out-dir") + 1]), 3, 0.25, [0.1] * 7, 0.99, 20.0)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_pipeline)
    bench.main([*options, "--work-dir", str(tmp_path), "--seeds", "3", "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert seen == [expected]
    assert result["isa"] == (options[1] if "--isa" in options else "default")
