"""metrics.jsonl is strict JSON (a non-finite number becomes null), and a resumed run drops the records past
its checkpoint."""
import json

from nanoseek.train.metrics import MetricsLog, read_metrics


def _strict(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"kind": "train", "step": 1, "loss": float("nan"), "entropy": float("inf"), "grad_norm": 0.5,
               "tokens": 7})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line) for line in lines] == [{"kind": "train", "step": 1, "loss": None, "entropy": None,
                                                  "grad_norm": 0.5, "tokens": 7}]


def test_resume_keeps_only_records_up_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step})
    log.close()
    MetricsLog(tmp_path, resume_step=2, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
