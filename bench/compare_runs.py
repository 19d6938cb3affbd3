"""Do two training runs log the same numbers, and which steps faster? Compares the metrics.jsonl of two runs
(say, the same command before and after a change), step by step.

    python bench/compare_runs.py RUN_BEFORE RUN_AFTER --keys reward accuracy length_mean loss --out result.json

Prints, per key, the steps where the two differ and the largest difference; the mean and median step time of
each run (the first step, which includes warm-up, excluded) and their ratio. The JSON keeps both runs' values
of the keys (the excerpts) with the provenance of this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanoseek.provenance import device_name, git_commit, write_result  # noqa: E402
from nanoseek.train.metrics import read_metrics  # noqa: E402


def train_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind", "train") == "train"]


def step_times(records: list[dict]) -> dict[str, float]:
    times = [r["step_time"] for r in records[1:]] or [r["step_time"] for r in records]
    return {"mean": statistics.mean(times), "median": statistics.median(times), "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("before", type=Path, help="the first run's directory (its metrics.jsonl)")
    parser.add_argument("after", type=Path, help="the second run's directory")
    parser.add_argument("--keys", nargs="+", default=["reward", "accuracy", "length_mean", "loss"],
                        help="the logged values compared step by step")
    parser.add_argument("--out", help="write the comparison and both runs' excerpts as JSON here")
    args = parser.parse_args()

    before, after = train_records(args.before), train_records(args.after)
    if [r["step"] for r in before] != [r["step"] for r in after]:
        sys.exit(f"the runs logged different steps: {len(before)} and {len(after)} records")
    comparison = {}
    for key in args.keys:
        pairs = [(r["step"], r.get(key), s.get(key)) for r, s in zip(before, after, strict=True)]
        differing = [step for step, a, b in pairs if a != b]
        largest = max((abs(a - b) for _, a, b in pairs if isinstance(a, float) and isinstance(b, float)), default=0.0)
        comparison[key] = {"steps_differing": differing, "largest_difference": largest}
        print(f"{key}: {len(pairs) - len(differing)}/{len(pairs)} steps identical, largest difference {largest:.3g}")
    timing = {"before": step_times(before), "after": step_times(after)}
    timing["after_over_before"] = timing["after"]["mean"] / timing["before"]["mean"]
    print(f"step time (mean, first step excluded): {timing['before']['mean']:.3f} s -> {timing['after']['mean']:.3f} s "
          f"(x{timing['after_over_before']:.3f})")
    if args.out:
        write_result(args.out, {
            "benchmark": "compare_runs", "device": device_name("cpu"), "git_commit": git_commit(),
            "before": str(args.before), "after": str(args.after), "comparison": comparison, "step_time": timing,
            "excerpts": {name: [{"step": r["step"], **{k: r.get(k) for k in args.keys}} for r in records]
                         for name, records in (("before", before), ("after", after))}})


if __name__ == "__main__":
    main()
