"""`nanoseek r1`: DeepSeek-R1's recipe end to end on a tiny scale; reuse, resume, seeds and the command line."""

import json
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest

from nanoseek import eval as evaluation
from nanoseek.checkpoint import resolve_checkpoint
from nanoseek.cli import main
from nanoseek.data import tasks
from nanoseek.data.chat import instruction_conversations
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval import EvalConfig, heldout_problems
from nanoseek.infer.engine import Completion
from nanoseek.pipeline import SeedMismatch
from nanoseek.r1 import COLUMNS, MODELS, R1Config, StageSettings, r1_zero_run, run_r1
from nanoseek.sample import SampleConfig
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig
from nanoseek.train.loop import TrainConfig, TrainingError
from nanoseek.train.pretrain import PretrainConfig
from nanoseek.train.reward_model import RM_TRAIN_DEFAULTS, RMConfig
from nanoseek.train.sft import SFT_TRAIN_DEFAULTS, SFTConfig

TINY = StageSettings(
    pretrain=PretrainConfig(preset="tiny", builtin_docs=800, batch_size=2, micro_batch_size=2, seq_len=64),
    pretrain_train=TrainConfig(max_steps=3, warmup_steps=1, save_every=2, eval_every=0, tensorboard=False),
    sft=SFTConfig(builtin_conversations=16, batch_size=4, eval_conversations=4),
    sft_train=replace(SFT_TRAIN_DEFAULTS, save_every=1, eval_every=0, tensorboard=False),
    grpo=GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=12),
    grpo_train=replace(GRPO_TRAIN_DEFAULTS, save_every=1, tensorboard=False),
    sample=SampleConfig(max_tokens=12),
    rm=RMConfig(builtin_pairs=16, batch_size=4),
    rm_train=replace(RM_TRAIN_DEFAULTS, save_every=1, eval_every=0, tensorboard=False),
    evaluation=EvalConfig(k=2, max_new_tokens=12))
STEPS = dict(cold_start_steps=2, reasoning_steps=2, samples_per_prompt=2, sample_problems_per_task=1,  # noqa: C408
             sample_instructions=8, rm_steps=2, all_scenario_steps=2, general_share=0.5, r1_zero_steps=2,
             problems_per_task=1, eval_instructions=5)
TRAINED = ("cold-start", "reasoning-rl", "rs-sft", "rm", "all-scenario", "r1-zero")


def tiny(**options) -> R1Config:
    """The tiny recipe in the working directory: the base in pretrain/, the stages in r1/ (relative paths: a copy of
    the directory is a run of its own)."""
    return R1Config(out_dir="r1", base="pretrain", **{**STEPS, **options})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A whole tiny recipe, the base pretrained by it: its directory and report."""
    work = tmp_path_factory.mktemp("r1")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        return work, run_r1(tiny(), settings=TINY, progress=False)


@pytest.fixture
def work(finished, tmp_path, monkeypatch):
    """A copy of the finished recipe's directory, as the working directory."""
    shutil.copytree(finished[0], tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def test_the_recipe_runs_every_stage_and_reports_every_model(finished, monkeypatch):
    work, report = finished
    monkeypatch.chdir(work)
    out = Path("r1")
    assert list(report["stages"]) == [key for key, _, _ in MODELS]
    for key, label, template in MODELS:
        row = report["stages"][key]
        assert row["label"] == label and row["template"] == template
        assert set(COLUMNS) <= set(row) and all(isinstance(row[c], float) for c in COLUMNS)
        assert 0 <= row["pass@1"] <= 1 and 0 <= row["language"] <= 1 and 0 <= row["instructions"] <= 1
        assert set(row["per_task"]) and len(row["instructions_per_kind"]) == 5
    for key in TRAINED:  # each stage trained its steps, with the recipe's seed
        assert json.loads((out / key / "report.json").read_text())["seed"] == 0
    assert report["steps"] == {"cold-start": 2, "reasoning-rl": 2, "rs-sft": 4, "rm": 2, "all-scenario": 2,
                               "r1-zero": 2}  # rs-sft: 2 epochs of 7 conversations (8 instructions, 1 held out)
    assert report["seeds"] == {"r1": 0, "base": 0, "evaluation": 0}
    assert report["evaluation"] == {"problems": 7, "k": 2, "temperature": 0.6, "top_p": 0.95, "instructions": 5}

    # What each stage was given: the models it starts from, its template, rewards and data.
    settings = {key: json.loads((out / key / "run.json").read_text()) for key in TRAINED}
    assert settings["cold-start"]["sft"]["model"] == "pretrain"
    assert settings["reasoning-rl"]["grpo"].items() >= {"model": str(out / "cold-start"), "template": "chat",
                                                        "language_weight": 1.0, "general_share": 0.0}.items()
    assert settings["rs-sft"]["sft"]["model"] == "pretrain"
    assert settings["rs-sft"]["sft"]["data"] == [str(out / "sample" / "data.jsonl")]
    assert settings["rm"]["rm"]["model"] == str(out / "rs-sft")
    assert settings["all-scenario"]["grpo"].items() >= {"model": str(out / "rs-sft"), "reward_model": str(out / "rm"),
                                                        "general_share": 0.5, "template": "chat"}.items()
    assert settings["r1-zero"]["grpo"].items() >= {"model": "pretrain", "template": "question",
                                                   "language_weight": 0.0}.items()
    summary = json.loads((out / "sample" / "summary.json").read_text())
    assert summary["model"].startswith(str(out / "reasoning-rl")) and summary["k"] == 2
    assert summary["instructions"] == 8 and summary["samples"] == 14

    # The evaluations: the language metric is the reasoning's; the reward model scored every stage's replies.
    evaluation = json.loads((out / "eval" / "base.json").read_text())
    assert len(evaluation["instructions"]["replies"]) == 10
    scores = json.loads((out / "eval" / "reward-model.json").read_text())
    assert set(scores) == set(report["stages"]) and report["stages"]["base"]["reward_model"] == scores["base"]

    text = (out / "report.md").read_text()
    for label in ("| base | question |", "| cold start (SFT) | chat |", "| reasoning RL | chat |",
                  "| rejection-sampling SFT | chat |", "| all-scenario RL | chat |", "| R1-Zero | question |"):
        assert label in text
    assert "| stage | template | pass@1 | cons@2 | format | language | length | instructions | RM score |" in text
    assert (out / "stages.png").stat().st_size > 0
    minutes = json.loads((out / "minutes.json").read_text())
    assert {"pretrain", "cold start", "reasoning RL", "rejection sampling", "rejection-sampling SFT", "reward model",
            "all-scenario RL", "R1-Zero", "evaluate base", "evaluate r1-zero"} <= set(minutes)


def test_a_second_run_reuses_every_finished_stage(finished, work, capsys):
    out = work / "r1"
    checkpoints = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*/model/model.safetensors")}
    minutes = (out / "minutes.json").read_text()
    capsys.readouterr()
    report = run_r1(tiny(), settings=TINY, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 15 and "] ...\n" not in printed
    assert (out / "minutes.json").read_text() == minutes
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoints/*/model/model.safetensors")} == checkpoints
    assert report["stages"] == finished[1]["stages"]


def test_an_interrupted_stage_needs_resume_and_continues_from_its_checkpoint(work):
    out = work / "r1"
    stage = out / "all-scenario"  # as if stopped after its first step's checkpoint
    shutil.rmtree(next((stage / "checkpoints").glob("step_*2")))
    (stage / "checkpoints" / "latest").write_text(next((stage / "checkpoints").glob("step_*1")).name)
    for name in ("report.json", "metrics.jsonl"):
        (stage / name).unlink()
    for name in ("eval/all-scenario.json", "eval/reward-model.json"):
        (out / name).unlink()
    with pytest.raises(TrainingError, match="--resume"):
        run_r1(tiny(), settings=TINY, progress=False)
    report = run_r1(tiny(), resume=True, settings=TINY, progress=False)
    steps = [r["step"] for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "train"]
    assert steps == [2]  # only the second step was trained again
    assert report["steps"]["all-scenario"] == 2 and (out / "eval" / "reward-model.json").is_file()


def test_a_run_of_another_seed_is_refused(work, capsys):
    before = (work / "r1" / "report.json").read_text()
    for resume in (False, True):
        with pytest.raises(SeedMismatch, match="seed 0 .*not 1"):
            run_r1(tiny(seed=1), resume=resume, settings=TINY, progress=False)
    assert main(["r1", "--out-dir", "r1", "--base", "pretrain", "--seed", "1"]) == 2
    assert "nanoseek: error: " in capsys.readouterr().err
    assert (work / "r1" / "report.json").read_text() == before


def test_r1_zero_is_reused_from_the_pipeline_when_its_base_and_settings_match(work):
    shutil.copytree(work / "r1" / "r1-zero", work / "grpo")  # where `nanoseek pipeline` puts R1-Zero
    base = work / "pretrain"
    zero = replace(TINY.grpo, model=str(base))
    train = replace(TINY.grpo_train, max_steps=2, out_dir="elsewhere")
    assert r1_zero_run(work / "new", base, zero, train) == work / "grpo"
    assert r1_zero_run(work / "r1", base, zero, train) == work / "r1" / "r1-zero"  # already started there
    assert r1_zero_run(work / "new", base, zero, replace(train, seed=1)) == work / "new" / "r1-zero"
    assert r1_zero_run(work / "new", base, zero, replace(train, max_steps=3)) == work / "new" / "r1-zero"
    assert r1_zero_run(work / "new", base, replace(zero, group_size=4), train) == work / "new" / "r1-zero"


def test_instruction_accuracy_checks_the_reply_after_the_thinking(finished, monkeypatch):
    tokenizer = Tokenizer.load(resolve_checkpoint(finished[0] / "pretrain"))
    eos = tokenizer.decode([tokenizer.eos_id])
    conversations = instruction_conversations(5, 0, split="heldout")
    right = [c.messages[1]["content"] for c in conversations]

    def replies(model, tok, prompts, cfg, max_batch, progress):  # every other sample right, ended by eos
        texts = [f"\n\n</think>\n\n{reply}{eos}" if i % 2 == 0 else f"{reply}</think> no" for reply in right
                 for i in range(cfg.k)]
        return [Completion([], [1, tokenizer.eos_id], text=text) for text in texts], []

    monkeypatch.setattr(evaluation, "sample_prompts", replies)
    result = evaluation.evaluate_instructions(None, tokenizer, 5, EvalConfig(k=2))
    assert result["accuracy"] == 0.5 and set(result["per_kind"].values()) == {0.5}
    assert result["prompts"][:2] == [conversations[0].messages[0]["content"]] * 2
    assert result["replies"][:2] == [right[0], "no"]
    assert all(tasks.split_of(question) == "heldout" for question in result["prompts"])

    class Scorer:
        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    assert evaluation.reward_model_score(Scorer(), result) == sum(map(len, result["replies"])) / 10


def test_the_language_metric_is_the_reasonings_share_of_english_words(finished, monkeypatch):
    tokenizer = Tokenizer.load(resolve_checkpoint(finished[0] / "pretrain"))
    problems = heldout_problems(1)[:1]

    def completions(model, tok, prompts, cfg, max_batch, progress):
        texts = ["add them 是的 </think> <answer>的 的 的</answer>", "</think> <answer>1</answer>"]
        return [Completion([], [1, 2, 3], text=text) for text in texts], []

    monkeypatch.setattr(evaluation, "sample_prompts", completions)
    report = evaluation.evaluate(None, tokenizer, problems, EvalConfig(k=2, greedy=False, language="en"))
    assert report["overall"]["language"] == pytest.approx((2 / 4 + 1) / 2)  # no words: 1
    assert "language" not in evaluation.evaluate(None, tokenizer, problems, EvalConfig(k=2, greedy=False))["overall"]


def test_help_lists_every_option_with_its_default(capsys):
    assert main(["r1", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(R1Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text
        after = text.split(flag + " ", 2)[-1]
        assert f"(default: {f.default})" in after[:400], flag
    assert "--resume" in text


@pytest.mark.parametrize(("option", "value"), [("--cold-start-steps", "0"), ("--general-share", "1"),
                                               ("--sft-epochs", "-1"), ("--seed", "x"), ("--language-weight", "-0.5"),
                                               ("--eval-instructions", "0")])
def test_bad_values_exit_2_before_anything_runs(option, value, tmp_path, capsys):
    assert main(["r1", "--out-dir", str(tmp_path / "r1"), "--base", str(tmp_path / "base"), option, value]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "r1").exists() and not (tmp_path / "base").exists()
