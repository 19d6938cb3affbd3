"""bench/grpo_vs_trl.py on the CPU: its reward wrappers, its prompts, and a two-step run of both trainers
(skipped without trl)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nanoseek.data import tasks
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.train.grpo import ProblemStream
from nanoseek.rewards import Sample, r1_zero_rewards

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "grpo_vs_trl.py"
spec = importlib.util.spec_from_file_location("grpo_vs_trl", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(tasks.corpus(300, seed=1), vocab_size=400)


def test_trl_reward_functions_score_like_nanoseeks_reward_set(tokenizer):
    problems = ProblemStream(0, 1).next_batch(3)
    texts = [f"work\n</think>\n<answer>{problems[0].answer}</answer>", "no format at all",
             f"x </think> <answer>{problems[2].answer}9</answer>"]
    ids = [tokenizer.encode(t, eos=True) for t in texts]
    rewards = r1_zero_rewards(format_weight=0.2)
    seen = []
    funcs, weights = bench.reward_functions(rewards, tokenizer, seen)
    columns = {name: [getattr(p, name) for p in problems] for name in ("task", "question", "answer", "steps",
                                                                        "difficulty")}
    got = {f.__name__: f(completions=["(TRL's text, unused)"] * 3, completion_ids=ids, **columns) for f in funcs}
    for i, (problem, text) in enumerate(zip(problems, texts, strict=True)):
        want = rewards(Sample(problem, text, len(ids[i])))
        assert {name: got[name][i] for name in got} == {k: v for k, v in want.items() if k != "total"}
        assert sum(w * got[name][i] for w, name in zip(weights, got, strict=True)) == pytest.approx(want["total"])
    assert got["accuracy"] == [1.0, 0.0, 0.0] and got["format"] == [1.0, 0.0, 1.0]
    assert seen == [p.question for p in problems]


def test_exported_tokenizer_gives_nanoseeks_prompt_ids(tokenizer, tmp_path):
    from conftest import tiny_config

    from nanoseek.model import DeepSeekV3

    model = DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size))
    hf_tok = bench.export_hf(model, tokenizer, tmp_path / "hf")
    problems = ProblemStream(0, 1).next_batch(7)
    texts, _ = bench.trl_prompt_texts(problems, tokenizer, hf_tok)
    assert hf_tok(text=texts)["input_ids"] == [tokenizer.encode(tasks.format_prompt(p), bos=True) for p in problems]
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_both_trainers_run_two_steps(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["grpo_vs_trl.py", "--preset", "tiny", "--steps", "2", "--prompts-per-step",
                                      "1", "--group-size", "2", "--max-new-tokens", "6", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    trl, nano = result["runs"]["trl"], result["runs"]["nanoseek"]
    assert trl["same_prompts_as_nanoseek"] and trl["logits_max_abs_diff_vs_nanoseek"] < 1e-4
    assert trl["lr"] == pytest.approx(nano["lr"])
    assert len(trl["step_time_s"]) == len(nano["step_time_s"]) == 2 and len(trl["reward"]) == 2
    assert set(result["summary"]) == {"trl", "nanoseek"} and "nanoseek_over_trl_step_time" in result["comparison"]
