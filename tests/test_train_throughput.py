"""bench/train_throughput.py on the CPU: its data, its micro-batch search, and that both libraries train alike."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.model.params import count_parameters

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # its dataclasses look their module up
spec.loader.exec_module(bench)


def test_token_stream_is_seeded_and_follows_four_successors():
    a = bench.token_stream(vocab=10_000, rows=6, seq_len=300, seed=3)
    assert torch.equal(a, bench.token_stream(vocab=10_000, rows=6, seq_len=300, seed=3))
    assert a.shape == (6, 301) and int(a.max()) < 4096
    successors: dict[int, set[int]] = {}
    for prev, nxt in zip(a[:, :-1].flatten().tolist(), a[:, 1:].flatten().tolist()):
        successors.setdefault(prev, set()).add(nxt)
    assert max(len(s) for s in successors.values()) <= 4


@pytest.mark.parametrize("largest, start, expected", [(37, 8, 37), (3, 8, 3), (8, 8, 8), (0, 8, 0), (5000, 8, 1024)])
def test_max_micro_batch_bisects_to_the_largest_that_fits(monkeypatch, largest, start, expected):
    tried = []

    def fake_fits(run, config, hf_dir, micro_batch, *rest):
        tried.append(micro_batch)
        return micro_batch <= largest

    monkeypatch.setattr(bench, "fits", fake_fits)
    args = type("Args", (), {"micro_batch": start, "seq_len": 16})()
    assert bench.max_micro_batch(None, None, None, args, None, None, limit=1024) == expected
    assert len(tried) <= 2 * 11  # doubling then bisection: logarithmic


def test_wide_preset_is_wider_than_2048():
    config = bench.preset("wide")
    assert config.hidden_size >= 2048
    assert 2.0e9 < count_parameters(config).total < 3.0e9  # weights + grads + AdamW in bf16: about 20 GB


def test_cpu_smoke_trains_both_libraries_to_the_same_losses(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--preset", "tiny", "--seq-len", "32", "--micro-batch",
                                      "2", "--steps", "4", "--warmup", "1", "--lr", "3e-3", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"nanoseek parity", "nanoseek", "nanoseek mtp", "transformers"}
    assert all(len(r["losses"]) == 4 and r["tokens_per_s"] > 0 for r in runs.values())
    # float32 on the CPU, the same initial weights, data and optimizer: the curves agree to float32 rounding.
    assert result["parity"]["max_step_difference"] < 1e-4
    assert runs["nanoseek parity"]["losses"][-1] < runs["nanoseek parity"]["losses"][0]
    assert runs["nanoseek mtp"]["losses"] != runs["nanoseek"]["losses"]  # the MTP gradient reaches the trunk
