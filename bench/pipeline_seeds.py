"""Does R1-Zero's gain hold across seeds?

`nanoseek pipeline` for each seed in its own directory, then a table of
base and R1-Zero pass@1 per seed, the gain, the tasks improved, the format rate after R1-Zero and the minutes, with
their mean, min and max over the seeds, checked against issue 17's bars.

    python bench/pipeline_seeds.py                      # seeds 0 1 2 in runs/seeds/seed-N
    python bench/pipeline_seeds.py --single-thread --work-dir runs/seeds-1t   # OMP_NUM_THREADS=1 in the runs
    python bench/pipeline_seeds.py --isa avx2 --seeds 1 --work-dir runs/seeds-avx2   # a CPU without AVX-512
    python bench/pipeline_seeds.py --summarise-only     # only the table, from the finished runs in --work-dir

Each run is `python -m nanoseek.cli pipeline --seed N --out-dir WORK_DIR/seed-N` (and --pipeline-args), in a
process of its own. The evaluations use the same held-out problems and sampling seed for every pipeline seed, so
the seeds differ only in their training. The result JSON (default bench/results/pipeline-seeds-cpu.json) keeps
the table, the bars' verdicts and the provenance of this machine.

A rerun in another summation order tells a robust recipe from a knife edge. OMP_NUM_THREADS=1 is one such order
on some machines, but not on every one: on this project's 2-core CPU, one and two threads gave bit-identical runs
(seed 0: all 1,400 pretraining losses and both evaluations). `--isa avx2` runs ATen's and MKL's AVX2 kernels instead
of AVX-512's, as a CPU without AVX-512 would; the base model's logits then differ in their last bits from the first
forward on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.options import child_options  # noqa: E402
from nanoseek.provenance import device_name, git_commit, write_result  # noqa: E402

COLUMNS = ("base", "r1_zero", "gain", "tasks_improved", "format", "minutes")  # a run's numbers (percent, minutes)
# Issue 17's bars: (what is checked, the statistic over the seeds, the column, "min" or "max" bound, the bound).
BARS = (
    ("every base model >= 20% pass@1", "min", "base", ">=", 20.0),
    ("every gain >= +8 points", "min", "gain", ">=", 8.0),
    ("mean gain >= +10 points", "mean", "gain", ">=", 10.0),
    ("every run improves >= 4 of 7 tasks", "min", "tasks_improved", ">=", 4),
    ("every format rate after R1-Zero >= 95%", "min", "format", ">=", 95.0),
    ("every run <= 25 minutes", "max", "minutes", "<=", 25.0),
)
RESERVED = ("--seed", "--out-dir")  # the options this script sets for each run
# The environment that makes torch (ATen's vectorised kernels) and MKL (its GEMMs) use only AVX2 instructions.
ISA_ENV = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def run_dir(work_dir: Path, seed: int) -> Path:
    return work_dir / f"seed-{seed}"


def run_seed(seed: int, out: Path, single_thread: bool, pipeline_args: list[str], isa: str = "default") -> None:
    """`nanoseek pipeline` for one seed in a child process; exits with its status if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
           **ISA_ENV[isa]}
    if single_thread:
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "nanoseek.cli", "pipeline", "--seed", str(seed), "--out-dir", str(out),
               *pipeline_args]
    print(f"=== seed {seed}: {shlex.join(command)}", flush=True)
    status = subprocess.run(command, env=env, check=False).returncode
    if status:
        sys.exit(f"seed {seed}: nanoseek pipeline exited with status {status}; its run is in {out}")


def seed_row(seed: int, report: dict[str, Any]) -> dict[str, Any]:
    """One pipeline's report.json -> its row: pass@1 and format in percent, the gain in points."""
    base, after = report["base"], report["r1_zero"]
    tasks = list(base["per_task"])
    improved = [t for t in tasks if after["per_task"][t]["pass@1"] > base["per_task"][t]["pass@1"]]
    row = {"seed": seed, "base": 100 * base["overall"]["pass@1"], "r1_zero": 100 * after["overall"]["pass@1"],
           "tasks_improved": len(improved), "tasks": len(tasks), "improved": improved,
           "format": 100 * after["overall"]["format"], "minutes": report["minutes"]["total"]}
    row["gain"] = row["r1_zero"] - row["base"]
    return row


def summarise(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Seed -> report.json -> the rows, each column's mean, min and max over the seeds, and the bars' verdicts."""
    rows = [seed_row(seed, report) for seed, report in reports.items()]
    summary: dict[str, Any] = {"runs": rows}
    for name, reduce in (("mean", statistics.mean), ("min", min), ("max", max)):
        summary[name] = {c: reduce(r[c] for r in rows) for c in COLUMNS}
    summary["bars"] = [{"bar": bar, "value": summary[stat][column],
                        "pass": summary[stat][column] >= bound if op == ">=" else summary[stat][column] <= bound}
                       for bar, stat, column, op, bound in BARS]
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| seed | base pass@1 | R1-Zero pass@1 | gain | tasks improved | format after | minutes |",
             "|---|---|---|---|---|---|---|"]

    def line(name: str, r: dict[str, Any], tasks: int) -> str:
        return (f"| {name} | {r['base']:.1f}% | {r['r1_zero']:.1f}% | {r['gain']:+.1f} | "
                f"{r['tasks_improved']:g}/{tasks} | {r['format']:.1f}% | {r['minutes']:.1f} |")

    tasks = summary["runs"][0]["tasks"]
    lines += [line(str(r["seed"]), r, r["tasks"]) for r in summary["runs"]]
    lines += [line(name, summary[name], tasks) for name in ("mean", "min", "max")]
    return "\n".join(lines)


def format_bars(summary: dict[str, Any]) -> str:
    return "\n".join(f"{'PASS' if b['pass'] else 'FAIL'}  {b['bar']} ({b['value']:.1f})" for b in summary["bars"])


def read_reports(work_dir: Path, seeds: list[int]) -> dict[int, dict[str, Any]]:
    reports = {}
    for seed in seeds:
        path = run_dir(work_dir, seed) / "report.json"
        if not path.is_file():
            sys.exit(f"seed {seed}: no finished pipeline at {path.parent} (no report.json)")
        reports[seed] = json.loads(path.read_text())
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the pipeline seeds to run")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/seeds"),
                        help="each seed's run goes in WORK_DIR/seed-N")
    parser.add_argument("--single-thread", action="store_true",
                        help="run the pipelines with OMP_NUM_THREADS=1 (a different summation order)")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default="default",
                        help="the CPU kernels of the runs: default (the best this CPU has), or avx2 (ATen's and "
                             "MKL's AVX2 kernels, as on a CPU without AVX-512: another summation order)")
    parser.add_argument("--pipeline-args", default="",
                        help="more `nanoseek pipeline` options for every run, in one string (empty: none; a lone "
                             "option: --pipeline-args=--resume)")
    parser.add_argument("--reuse", action="store_true",
                        help="read a run directory that holds a finished report.json instead of running it again, "
                             "and run the pipeline in one that holds an unfinished run (it reuses the finished "
                             "stages); without it, an existing run directory is refused")
    parser.add_argument("--summarise-only", action="store_true",
                        help="run nothing: summarise the finished runs in --work-dir")
    parser.add_argument("--out", default="bench/results/pipeline-seeds-cpu.json", help="result JSON")
    args = parser.parse_args(argv)
    pipeline_args = child_options(parser, "--pipeline-args", args.pipeline_args, RESERVED)

    if not args.summarise_only:
        for seed in args.seeds:
            out = run_dir(args.work_dir, seed)
            if out.exists() and not args.reuse:
                sys.exit(f"{out} exists: pass --reuse to read or continue it, or choose another --work-dir")
            if (out / "report.json").is_file():
                print(f"=== seed {seed}: finished earlier, read from {out / 'report.json'}")
            else:
                run_seed(seed, out, args.single_thread, pipeline_args, args.isa)
    summary = summarise(read_reports(args.work_dir, args.seeds))
    print(format_table(summary))
    print(format_bars(summary))
    write_result(args.out, {
        "benchmark": "pipeline_seeds", "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "machine": platform.machine(), "threads": 1 if args.single_thread else torch.get_num_threads(),
        "versions": {"torch": torch.__version__}, "git_commit": git_commit(), "seeds": args.seeds,
        "work_dir": str(args.work_dir), "single_thread": args.single_thread, "isa": args.isa,
        "isa_env": ISA_ENV[args.isa], "pipeline_args": pipeline_args,
        **summary})


if __name__ == "__main__":
    main()
