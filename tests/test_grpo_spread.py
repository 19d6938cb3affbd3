"""bench/grpo_spread.py: GRPO runs from one base, their gains on two evaluations, the spread over seeds."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.data.tasks import TASKS

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "grpo_spread.py"
spec = importlib.util.spec_from_file_location("grpo_spread", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


def _evaluation(per_task: list[float]) -> dict:
    return {"per_task": {t: {"pass@1": p} for t, p in zip(TASKS, per_task, strict=True)}}


def _write(path: Path, per_task: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_evaluation(per_task)))


def _fake_runs(work: Path) -> None:
    """A base at 20% on every task of the pipeline's evaluation (10% on the larger set); seed 1 gains 7 points on
    one task there (+1 overall), 14 on one task of the larger set (+2); seed 2 gains 0.7 points on every task
    (+0.7 overall, 7 tasks up) and 2.1 on every task of the larger set."""
    _write(work / "base-eval-heldout.json", [0.2] * 7)
    _write(work / "base-eval-big.json", [0.1] * 7)
    for seed, pipeline, big in ((1, [0.27] + [0.2] * 6, [0.24] + [0.1] * 6), (2, [0.207] * 7, [0.121] * 7)):
        _write(work / f"seed-{seed}" / "eval-heldout.json", pipeline)
        _write(work / f"seed-{seed}" / "eval-big.json", big)
        (work / f"seed-{seed}" / "report.json").write_text("{}")


def test_the_spread_is_the_mean_over_tasks_gain_of_each_seed_on_both_evaluations(tmp_path, capsys):
    _fake_runs(tmp_path)
    out = tmp_path / "result.json"
    bench.main(["--base", str(tmp_path), "--work-dir", str(tmp_path), "--seeds", "1", "2", "--summarise-only",
                "--out", str(out)])
    result = json.loads(out.read_text())
    first, second = result["runs"]
    assert result["base_pass@1"] == pytest.approx({"pipeline": 20.0, "big": 10.0})
    assert first["pipeline_gain"] == pytest.approx(1.0) and first["big_gain"] == pytest.approx(2.0)
    assert second["pipeline_gain"] == pytest.approx(0.7) and second["big_gain"] == pytest.approx(2.1)
    assert (first["tasks_improved"], second["tasks_improved"]) == (1, 7)
    assert result["mean"]["pipeline_gain"] == pytest.approx(0.85) and result["min"]["big_gain"] == pytest.approx(2.0)
    assert result["stdev"]["pipeline_gain"] == pytest.approx(statistics.stdev([1.0, 0.7]))
    assert result["benchmark"] == "grpo_spread" and result["git_commit"] and result["seeds"] == [1, 2]
    printed = capsys.readouterr().out
    assert "base: pipeline evaluation 20.0%, larger set 10.0%" in printed
    assert "| 1 | 21.0% | +1.0 | 1 | 12.0% | +2.0 |" in printed


def test_each_seed_runs_grpo_from_the_base_with_the_extra_options_on_a_share_of_the_cores(tmp_path, monkeypatch):
    seen, real_popen = [], subprocess.Popen

    class FakeProcess:
        def __new__(cls, command, **kwargs):
            return super().__new__(cls) if "grpo" in command else real_popen(command, **kwargs)  # git: provenance

        def __init__(self, command, env=None, **kwargs):
            seen.append((command, env["OMP_NUM_THREADS"]))
            out = Path(command[command.index("--out-dir") + 1])
            seed = int(command[command.index("--seed") + 1])
            (out / "report.json").write_text("{}")
            _write(out / "eval-heldout.json", [0.2 + seed / 100] * 7)
            _write(out / "eval-big.json", [0.1] * 7)

        def wait(self):
            return 0

    _fake_runs(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("base-eval-heldout.json", "base-eval-big.json"):
        (work / name).write_text((tmp_path / "src" / name).read_text())
    monkeypatch.setattr(bench.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 4)
    bench.main(["--base", str(tmp_path), "--work-dir", str(work), "--seeds", "3", "5", "--parallel", "2",
                "--grpo-args", "--no-scale-std --lr 1e-4", "--out", str(tmp_path / "r.json")])
    assert [threads for _, threads in seen] == ["2", "2"]
    first = seen[0][0]
    assert first[first.index("--model") + 1] == str(tmp_path) and first[-3:] == ["--no-scale-std", "--lr", "1e-4"]
    gains = [r["pipeline_gain"] for r in json.loads((tmp_path / "r.json").read_text())["runs"]]
    assert gains == pytest.approx([3.0, 5.0])


def test_bad_options_are_refused_by_name(tmp_path):
    def refused(*argv):
        result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, check=False)
        assert result.returncode == 2
        return result.stderr

    assert "may not set --seed" in refused("--base", str(tmp_path), "--work-dir", str(tmp_path), "--grpo-args=--seed 3")
    assert "--base" in refused("--base", str(tmp_path / "nothing"), "--work-dir", str(tmp_path))
    assert "must be >= 1" in refused("--base", str(tmp_path), "--work-dir", str(tmp_path), "--parallel", "0")
    with pytest.raises(SystemExit, match=r"no finished GRPO run for seeds \[4\]"):
        bench.main(["--base", str(tmp_path), "--work-dir", str(tmp_path), "--seeds", "4", "--summarise-only"])
