"""Evaluation metrics against hand-computed cases, and `nanoseek eval` end to end on a tiny checkpoint."""

import json

import pytest

import nanoseek
from nanoseek.cli import main
from nanoseek.data.tasks import Problem
from nanoseek.eval import heldout_problems, score_problem

ADD = Problem("addition", "What is 47 + 38?", "85", "...", 1)


def done(answer: str) -> str:
    return f"7 + 8 = 15.\n</think>\n<answer>{answer}</answer>"


def test_pass_at_1_and_majority_vote_hand_computed():
    # 4 samples, 2 right ("85" and " 85." normalise alike)
    s = score_problem(ADD, [done("85"), done("86"), done(" 85."), done("86")])
    assert s["pass@1"] == 0.5 and s["format"] == 1.0 and s["pass@k"] == 1.0
    # 3 right of 5, the majority ("85" x3 vs "86" x2) is right; one malformed sample drags the format rate
    s = score_problem(ADD, [done("85"), done("86"), done("85"), done("86"), "85 without tags <answer>85</answer>"])
    assert s["pass@1"] == pytest.approx(3 / 5) and s["cons@k"] == 1.0 and s["format"] == pytest.approx(4 / 5)
    # majority wrong: 86 x3, 85 x2
    s = score_problem(ADD, [done("86"), done("86"), done("85"), done("86"), done("85")])
    assert s["pass@1"] == pytest.approx(2 / 5) and s["cons@k"] == 0.0 and s["pass@k"] == 1.0
    # none right: pass@k is 0
    assert score_problem(ADD, [done("86"), done("84")])["pass@k"] == 0.0
    # nothing parseable: no vote
    assert score_problem(ADD, ["", "garbage"]) == {"pass@1": 0.0, "cons@k": 0.0, "pass@k": 0.0,
                                                         "format": 0.0}


def test_heldout_problems_are_distinct_and_held_out():
    problems = heldout_problems(20)
    assert len(problems) == 20 * 7 and len({p.question for p in problems}) == 140
    assert {p.difficulty for p in problems} == {1}


def test_eval_command_on_tiny_checkpoint(tmp_path, capsys):
    import torch

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model import DeepSeekV3

    from conftest import tiny_config
    tokenizer = Tokenizer.train([f"Question: What is {a} + {b}?\n<think>\n{a + b}" for a in range(20)
                                 for b in range(20)], 300)
    torch.manual_seed(0)
    nanoseek.save_pretrained(DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size)), tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--k", "2", "--problems-per-task", "2",
                 "--max-new-tokens", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 14 and report["k"] == 2
    assert set(report["overall"]) == {"pass@1", "cons@k", "pass@k", "format", "length", "greedy"}
    assert "| overall |" in capsys.readouterr().out
    # --language adds the reasoning's language consistency to every row.
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--k", "2", "--problems-per-task", "2",
                 "--max-new-tokens", "8", "--language", "zh", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["overall"]["language"] <= 1.0
    assert all("language" in row for row in report["per_task"].values())
