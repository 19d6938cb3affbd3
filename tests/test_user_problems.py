r"""A user's problems JSONL in the RL stage and the evaluation (issue 18): `nanoseek grpo --problems` trains on them
and resumes exactly, their accuracy reward is the named task's checker or math-verify, `nanoseek eval --problems`
reports them per task, the evaluation's old count option is `--problems-per-task`, and bad lines are named by
file:line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_checkpoint, train_tokenizer, write_jsonl

import nanoseek.rewards
from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import build_parser, main
from nanoseek.config import ConfigError
from nanoseek.data import tasks
from nanoseek.data.problems import USER_TASK, read_problems
from nanoseek.eval import problem_prompt, score_problem
from nanoseek.rewards import Sample, accuracy_reward, r1_zero_rewards
from nanoseek.train.grpo import GRPOConfig, UserProblemStream
from nanoseek.train.loop import TrainingError
from nanoseek.train.metrics import read_metrics

PROBLEMS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = 24.\nIn all 48+24 = 72.\n#### 72"},
    {"question": "What is $6 \\times 7$?", "answer": "We have $6 \\times 7 = \\boxed{42}$."},
    {"question": "What is 40 + 2?", "answer": 42, "task": "addition"},
    {"question": "How many grams are in a kilogram?", "answer": "#### 1,000"},
]
# A constant learning rate: the resume tests extend --max-steps, which moves a decaying schedule (GRPO's default).
GRPO = ["--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "6", "--lr", "1e-2", "--warmup-steps",
        "0", "--decay-start", "1", "--no-drop-uninformative", "--save-every", "1", "--no-tensorboard"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"), train_tokenizer("clips kilogram grams Natalia"))


@pytest.fixture
def problems_file(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)


def done(answer: str) -> str:
    return f"I work it out.\n</think>\n<answer>{answer}</answer>"


# ---------------------------------------------------------------------- 1. `nanoseek grpo --problems`
def test_grpo_on_user_problems_resumes_exactly(base, problems_file, tmp_path, monkeypatch, capsys):
    """2 steps straight equal 1 step, a resume, and 1 more: the same prompts (the order's cursor), rewards, metrics
    and weights. A random model never writes an answer, so a format reward that differs between completions and
    prompts stands in for R1's, for the advantages (and so the updates) not to be zero."""
    def varying_format(sample):
        return float((len(sample.completion) + len(sample.problem.question)) % 2)
    monkeypatch.setattr(nanoseek.rewards, "format_reward", varying_format)
    args = ["grpo", "--model", str(base), "--problems", str(problems_file), *GRPO]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, "--max-steps", "2", "--out-dir", str(straight)]) == 0
    assert main([*args, "--max-steps", "1", "--out-dir", str(resumed)]) == 0
    assert main(["grpo", "--resume", "--out-dir", str(resumed), "--max-steps", "2"]) == 0, capsys.readouterr().err

    run = json.loads((straight / "run.json").read_text())["grpo"]
    assert run["problems"] == [str(problems_file)] and run["template"] == "question"
    a, b = (read_metrics(out / "metrics.jsonl") for out in (straight, resumed))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert {k: v for k, v in x.items() if "time" not in k and "per_s" not in k} == \
            {k: v for k, v in y.items() if "time" not in k and "per_s" not in k}
    # One epoch of the 4 problems over 2 steps of 2 prompts: accuracy per task, the `task` field's or "user".
    assert {k for r in a for k in r if k.startswith("accuracy_")} == {"accuracy_user", "accuracy_addition"}
    assert len({r["reward"] for r in a}) > 1 or a[0]["groups_kept"] > 0
    weights = [load_pretrained(out / "checkpoints" / "step_000002" / "model").state_dict()
               for out in (straight, resumed)]
    initial = load_pretrained(base).state_dict()
    assert any(not torch.equal(weights[0][name], value) for name, value in initial.items())  # it did learn
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
    assert "on " + str(problems_file) in (straight / "report.md").read_text()

    write_jsonl(problems_file, PROBLEMS[:3])  # a resume on other problems is refused
    assert main(["grpo", "--resume", "--out-dir", str(resumed), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f"the problems of {problems_file} differ from the ones the run was trained on (4 problems then, 3 now" \
        in err


def test_user_problems_are_cycled_in_a_seeded_order_that_resumes_exactly(problems_file):
    problems = read_problems([problems_file])
    stream = UserProblemStream(problems, seed=3, source=(str(problems_file),))
    first = stream.next_batch(6)  # an epoch and a half
    assert sorted(p.question for p in first[:4]) == sorted(p.question for p in problems)
    state = stream.state_dict()
    assert state["cursor"] == 6 and state["epoch"] == 1 and state["problems"] == 4
    again = UserProblemStream(problems, seed=3)
    again.load_state_dict(state)
    assert again.next_batch(5) == stream.next_batch(5)  # the same order on from the cursor, across epochs
    assert UserProblemStream(problems, seed=3).next_batch(6) == first  # seeded
    assert UserProblemStream(problems, seed=4).next_batch(6) != first
    with pytest.raises(TrainingError, match="differ from the ones the run was trained on"):
        UserProblemStream(problems[::-1], seed=3).load_state_dict(state)


def test_the_prompt_template_is_an_option_and_the_default_keeps_the_builtin_prompt():
    tok = train_tokenizer()
    problem = tasks.generate("addition", 1, seed=0)[0]
    assert problem_prompt(tok, problem) == tok.encode(tasks.format_prompt(problem), bos=True)
    assert tok.decode(problem_prompt(tok, problem, "chat")).endswith("<think>\n")
    assert GRPOConfig(template="r1-zero").template == "r1-zero"
    with pytest.raises(ConfigError, match="template"):
        GRPOConfig(template="raw")
    args = build_parser().parse_args(["grpo", "--problems", "a.jsonl", "b.jsonl", "--template", "chat"])
    assert args.problems == ["a.jsonl", "b.jsonl"] and args.template == "chat"


# ---------------------------------------------------------------------- 2. the accuracy reward
def test_accuracy_of_a_user_problem_by_math_verify_or_its_tasks_checker(problems_file, monkeypatch):
    natalia, times, addition, kilogram = read_problems([problems_file])
    assert (natalia.task, times.task, addition.task) == (USER_TASK, USER_TASK, "addition")
    cases = [(natalia, done("72"), 1.0), (natalia, done("73"), 0.0), (times, done("42.0"), 1.0),
             (times, "so the product is \\boxed{42}", 1.0), (times, done("\\frac{84}{2}"), 1.0), (times, done("41"), 0.0),
             (addition, done("42"), 1.0), (addition, done("4 2"), 0.0), (kilogram, done("1000"), 1.0),
             (kilogram, done("1,000"), 1.0), (kilogram, "no answer at all", 0.0)]
    for problem, completion, expected in cases:
        assert accuracy_reward(Sample(problem, completion)) == expected, (problem.question, completion)

    # A batch (a GRPO step) scores the same, with its math-verify checks sent to the pool together, each distinct
    # (reference, answer) pair once.
    calls = []
    real = nanoseek.rewards.math_equal_many
    monkeypatch.setattr(nanoseek.rewards, "math_equal_many", lambda pairs: calls.append(list(pairs)) or real(pairs))
    samples = [Sample(p, c) for p, c, _ in cases] * 2
    scores = r1_zero_rewards(format_weight=0.2).score(samples)
    assert [s["accuracy"] for s in scores] == [e for _, _, e in cases] * 2
    assert [s["total"] for s in scores] == [s["accuracy"] + 0.2 * s["format"] for s in scores]
    assert len(calls) == 1 and len(calls[0]) == 8  # 9 math-verify answers, 8 distinct; the task's ones not


# ---------------------------------------------------------------------- 3. `nanoseek eval --problems`
def test_eval_on_user_problems_reports_per_task(base, problems_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(base), "--problems", str(problems_file), "--k", "2", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 4 and report["k"] == 2
    assert list(report["per_task"]) == ["user", "addition"]
    assert set(report["overall"]) == {"pass@1", "cons@k", "pass@k", "format", "length", "greedy"}
    printed = capsys.readouterr().out
    assert "| user |" in printed and "| addition |" in printed


def test_math_verify_problems_score_and_vote():
    half = tasks.Problem(USER_TASK, "What is half of one?", "\\frac{1}{2}", "", 0)
    s = score_problem(half, [done("0.5"), done("\\frac{1}{2}"), done("0.4"), done(" 0.4 ")])
    assert s["pass@1"] == 0.5 and s["pass@k"] == 1.0 and s["cons@k"] == 0.0  # 0.4 has the most votes
    s = score_problem(half, [done("0.5"), done("0.4"), done("$0.5$."), "no answer"])
    assert s["pass@1"] == 0.5 and s["cons@k"] == 1.0 and s["format"] == 0.75


def test_problems_takes_files_and_the_count_is_problems_per_task(monkeypatch, tmp_path, capsys):
    assert main(["eval", "--problems", "30"]) == 2
    err = capsys.readouterr().err
    assert "argument --problems: takes problem files (JSONL) now, not a count ('30'); the number of held-out " \
           "problems per task is --problems-per-task" in err
    args = build_parser().parse_args(["eval", "--problems-per-task", "30"])
    assert args.problems_per_task == 30 and args.problems is None

    import nanoseek.pipeline
    given = {}
    result = {"pass@1": 0.5, "format": 1.0}

    def fake_pipeline(out_dir, **options):
        given.update(options)
        return {"seed": 0, "base": {"overall": result}, "r1_zero": {"overall": result}, "minutes": {"total": 1.0}}
    monkeypatch.setattr(nanoseek.pipeline, "run_pipeline", fake_pipeline)
    assert main(["pipeline", "--out-dir", str(tmp_path), "--problems-per-task", "5"]) == 0
    assert given["eval_problems"] == 5


# ---------------------------------------------------------------------- 4. bad input
@pytest.mark.parametrize("line,message", [
    ({"answer": "#### 42"}, "no \"question\""),
    ({"question": "What is 1 + 1?"}, "no \"answer\""),
    ({"question": "What is 1 + 1?", "answer": "2", "task": "poetry"}, "unknown task 'poetry'"),
    ({"question": "What is 1 + 1?", "answer": "two", "task": "addition"},
     "the addition checker does not take the answer 'two' as a right answer"),
])
@pytest.mark.parametrize("command", ["grpo", "eval"])
def test_a_bad_line_is_named_by_file_and_line(command, line, message, tmp_path, capsys):
    path = write_jsonl(tmp_path / "problems.jsonl", [PROBLEMS[0], line])
    out = ["--out-dir", str(tmp_path / "run")] if command == "grpo" else []
    # No model at --model: the problems are checked first.
    assert main([command, "--problems", str(path), "--model", str(tmp_path / "none"), *out]) == 2
    err = capsys.readouterr().err
    assert f"nanoseek: error: {path}:2: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["grpo", "eval"])
def test_an_empty_file_is_an_error(command, tmp_path, capsys):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    out = ["--out-dir", str(tmp_path / "run")] if command == "grpo" else []
    assert main([command, "--problems", str(path), "--model", str(tmp_path / "none"), *out]) == 2
    assert f"nanoseek: error: {path} holds no problems" in capsys.readouterr().err
