"""DeepSeek-R1's reasoning RL and all-scenario RL as options of `nanoseek grpo`: the language-consistency reward
summed with accuracy and format (hand-computed), a mixed batch whose general prompts are scored only by a reward
model and whose reasoning problems only by the rule rewards, short runs that log per-term and per-source rewards and
resume exactly, bad inputs named, and the options in --help."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_config, train_tokenizer, write_jsonl

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.data.chat import instruction_kind
from nanoseek.data.preferences import final_summary
from nanoseek.data.tasks import Problem
from nanoseek.data.tokenizer import apply_chat_template
from nanoseek.model import DeepSeekV3
from nanoseek.rewards import (GENERAL, REASONING, GeneralPrompt, RewardRouter, RewardSet, Sample, language_reward,
                              prompt_source, r1_zero_rewards, reward_model_reward)
from nanoseek.train.grpo import (GRPO_TRAIN_DEFAULTS, GRPOConfig, MixedPromptStream, grpo_rewards, grpo_trainer,
                                 problem_source)
from nanoseek.train.loop import TrainingError
from nanoseek.train.metrics import read_metrics
from nanoseek.train.reward_model import new_head, save_head

WORDS = "What is the answer? Say hello to Repeat after me last word of Write number in words capital letters brief"
ADDITION = Problem("addition", "What is 7 + 8?", "15", "7 + 8 = 15", 1)
HELLO = GeneralPrompt(({"role": "user", "content": "Say hello to Ada."},), "test")
# A constant learning rate: the resume tests extend --max-steps, which moves a decaying schedule (GRPO's default).
GRPO = ["--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "6", "--lr", "1e-2", "--warmup-steps",
        "0", "--decay-start", "1", "--no-drop-uninformative", "--save-every", "1", "--no-tensorboard"]
GENERAL_PROMPTS = [{"prompt": "Say hello to Ada."},
                   {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Write apple in capital letters."}]},
                   {"messages": [{"role": "user", "content": "Say hello to Alan."},
                                 {"role": "assistant", "content": "Hello, Alan!"},
                                 {"role": "user", "content": "Repeat after me: green river"}]}]


class LengthScorer:
    """A fake reward model: a response's score is its length; it records what it was asked."""

    def __init__(self):
        self.seen: list[tuple] = []

    def score(self, prompts, responses):
        self.seen += list(zip(prompts, responses))
        return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base"), tok)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tok):
    """A tiny reward model as `nanoseek rm` writes a checkpoint: model/ and the head next to it."""
    directory = tmp_path_factory.mktemp("rm")
    save_tiny_checkpoint(directory / "model", tok)
    save_head(new_head(tiny_config().hidden_size, seed=0), directory)
    return directory


# ---------------------------------------------------------------------- 1. the language-consistency term
@pytest.mark.parametrize("completion,english,chinese", [
    ("We add seven and eight.\n</think>\n<answer>15</answer>", 1.0, 0.0),
    ("我们把七和八相加。\n</think>\n<answer>15</answer>", 0.0, 1.0),  # 8 CJK characters, 8 words
    ("We add 七 and 八.\n</think>\n<answer>15</answer>", 3 / 5, 2 / 5),  # We, add, and; 七, 八
    ("<think>七加八</think><answer>15</answer>", 0.0, 1.0),  # its own <think> tag is no English word
    ("7 + 8 = 15\n</think>\n<answer>15</answer>", 1.0, 1.0),  # no words: consistent
])
def test_language_reward_is_summed_with_accuracy_and_format(completion, english, chinese):
    sample = Sample(ADDITION, completion)
    assert language_reward(sample, "en") == pytest.approx(english)
    assert language_reward(sample, "zh") == pytest.approx(chinese)
    for language, share in (("en", english), ("zh", chinese)):
        scores = grpo_rewards(GRPOConfig(format_weight=0.2, language_weight=0.5, language=language)).score([sample])[0]
        assert scores.keys() == {"accuracy", "format", "language", "total"}
        assert (scores["accuracy"], scores["format"]) == (1.0, 1.0)
        assert scores["total"] == pytest.approx(1.0 + 0.2 * 1.0 + 0.5 * share)
    assert "language" not in grpo_rewards(GRPOConfig()).score([sample])[0]  # weight 0: no term at all


# ---------------------------------------------------------------------- 2. each prompt scored by its own source
def test_the_router_scores_each_sample_only_by_its_sources_rewards():
    scorer = LengthScorer()
    router = grpo_rewards(GRPOConfig(general_share=0.5, reward_model="unused", prompts_per_step=2), reward_model=scorer)
    right = "7 + 8 = 15\n</think>\n<answer>15</answer>"
    samples = [Sample(ADDITION, right), Sample(HELLO, "Greet her.\n</think>\n\nHello, Ada!"),
               Sample(HELLO, right), Sample(ADDITION, "Hello, Ada!")]
    assert [prompt_source(s.problem) for s in samples] == [REASONING, GENERAL, GENERAL, REASONING]
    rows = router.score(samples)
    assert rows[0] == {"accuracy": 1.0, "format": 1.0, "total": 1.2}
    assert rows[1] == {"helpfulness": 11.0, "total": 11.0}  # len("Hello, Ada!"): the text after </think> only
    assert rows[2] == {"helpfulness": 19.0, "total": 19.0}  # a right answer to a general prompt: no accuracy
    assert rows[3] == {"accuracy": 0.0, "format": 0.0, "total": 0.0}
    assert scorer.seen == [([HELLO.messages[0]], "Hello, Ada!"), ([HELLO.messages[0]], "<answer>15</answer>")]
    with pytest.raises(ValueError, match="no rewards for general prompts"):
        RewardRouter({REASONING: r1_zero_rewards()}).score(samples)


def test_a_mixed_grpo_batch_gives_each_prompt_its_own_reward(tok, tmp_path):
    """One step of 4 prompts, half general: every general sample gets exactly the reward model's score of its text
    after </think> and nothing else, every reasoning sample exactly the rule rewards; the general prompts are asked
    in the chat template, and the log holds each source's and each term's mean."""
    cfg = GRPOConfig(group_size=2, prompts_per_step=4, max_new_tokens=6, general_share=0.5, reward_model="unused",
                     drop_uninformative=False)
    scorer = LengthScorer()
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    train = replace(GRPO_TRAIN_DEFAULTS, out_dir=str(tmp_path), tensorboard=False)
    trainer = grpo_trainer(model, tok, train, cfg, grpo_rewards(cfg, reward_model=scorer))
    stage = trainer.stage
    assert isinstance(stage.problems, MixedPromptStream)
    scored, prompts = [], []
    score = stage.rewards.score

    def spy(samples):
        scored.append((samples, score(samples)))
        return scored[-1][1]
    stage.rewards.score = spy
    stage.prepare(trainer)
    generate = stage.engine.generate
    stage.engine.generate = lambda ids, params: prompts.extend(ids) or generate(ids, params)
    record = trainer.train_step()

    (samples, rows), = scored
    assert [prompt_source(s.problem) for s in samples[::2]] == [REASONING, GENERAL, REASONING, GENERAL]  # spread
    rules = r1_zero_rewards(format_weight=0.2)
    for sample, row, prompt in zip(samples, rows, prompts, strict=True):
        if isinstance(sample.problem, GeneralPrompt):
            assert instruction_kind(sample.problem.question) is not None  # the built-in instructions
            assert row == {"helpfulness": float(len(final_summary(sample.completion))),
                           "total": float(len(final_summary(sample.completion)))}
            assert prompt == tok.encode(apply_chat_template(list(sample.problem.messages)))
        else:
            assert row == rules(sample)
    general = [row["total"] for sample, row in zip(samples, rows) if prompt_source(sample.problem) == GENERAL]
    assert scorer.seen == [([s.problem.messages[0]], final_summary(s.completion)) for s in samples
                           if prompt_source(s.problem) == GENERAL]  # only the general samples, once each
    assert record["reward_general"] == pytest.approx(sum(general) / 4)
    assert record["reward_helpfulness"] == record["reward_general"]
    assert record["reward_reasoning"] == pytest.approx(sum(r["total"] for r in rows if "accuracy" in r) / 4)
    assert record["reward"] == pytest.approx(sum(r["total"] for r in rows) / 8)
    assert "accuracy_general" not in record and {"accuracy", "format_rate", "reward_format"} <= record.keys()


def test_general_prompts_resume_in_the_same_order(tmp_path):
    cfg = GRPOConfig(general_share=0.25, reward_model="unused", prompts_per_step=4)
    stream = problem_source(cfg, seed=1)
    first = stream.next_batch(4)
    assert [prompt_source(p) for p in first] == [REASONING, REASONING, REASONING, GENERAL]
    state = stream.state_dict()
    assert state["general"]["cursor"] == 1 and state["reasoning"]["cursor"] == 3
    again = problem_source(cfg, seed=1)
    again.load_state_dict(state)
    assert again.next_batch(8) == stream.next_batch(8)
    path = write_jsonl(tmp_path / "general.jsonl", GENERAL_PROMPTS)
    mine = problem_source(replace(cfg, general_prompts=(str(path),)), seed=1)
    assert [p.messages for p in mine.general.problems] == [({"role": "user", "content": "Say hello to Ada."},),
                                                          tuple(GENERAL_PROMPTS[1]["messages"]),
                                                          tuple(GENERAL_PROMPTS[2]["messages"])]
    with pytest.raises(TrainingError, match=re.escape(f"the general prompts of {path} differ from the ones the run was "
                                                      "trained on (1000 general prompts then, 3 now")):
        mine.load_state_dict(state)


# ---------------------------------------------------------------------- 3. the command
def test_grpo_with_the_language_reward_logs_it(base, tmp_path):
    out = tmp_path / "run"
    assert main(["grpo", "--model", str(base), *GRPO, "--language-weight", "0.5", "--language", "zh",
                 "--max-steps", "2", "--out-dir", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())["grpo"]
    assert (run["language_weight"], run["language"]) == (0.5, "zh")
    for r in read_metrics(out / "metrics.jsonl"):
        assert 0 <= r["reward_language"] <= 1
        assert r["reward"] == pytest.approx(r["reward_accuracy"] + 0.2 * r["reward_format"]
                                            + 0.5 * r["reward_language"], abs=1e-6)
        assert "reward_general" not in r


def test_all_scenario_grpo_logs_each_source_and_resumes_exactly(base, reward_model, tmp_path, capsys):
    """2 steps straight equal 1 step, a resume, and 1 more: the same reasoning and general prompts, rewards (the
    real reward model's), metrics and weights; a resume on other general prompts is refused."""
    general = write_jsonl(tmp_path / "general.jsonl", GENERAL_PROMPTS)
    args = ["grpo", "--model", str(base), *GRPO, "--general-share", "0.5", "--reward-model", str(reward_model),
            "--general-prompts", str(general)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, "--max-steps", "2", "--out-dir", str(straight)]) == 0
    assert main([*args, "--max-steps", "1", "--out-dir", str(resumed)]) == 0
    assert main(["grpo", "--resume", "--out-dir", str(resumed), "--max-steps", "2"]) == 0, capsys.readouterr().err

    a, b = (read_metrics(out / "metrics.jsonl") for out in (straight, resumed))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if "time" not in k and "per_s" not in k} == \
            {k: v for k, v in y.items() if "time" not in k and "per_s" not in k}
        assert {"reward_general", "reward_reasoning", "reward_helpfulness", "reward_accuracy"} <= x.keys()
        assert x["reward"] == pytest.approx((x["reward_general"] + x["reward_reasoning"]) / 2, abs=1e-5)
    weights = [load_pretrained(out / "checkpoints" / "step_000002" / "model").state_dict()
               for out in (straight, resumed)]
    initial = load_pretrained(base).state_dict()
    assert any(not torch.equal(weights[0][name], value) for name, value in initial.items())  # it did learn
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name

    write_jsonl(general, GENERAL_PROMPTS[:2])
    assert main(["grpo", "--resume", "--out-dir", str(resumed), "--max-steps", "3"]) == 2
    assert f"the general prompts of {general} differ from the ones the run was trained on (3 general prompts " \
           "then, 2 now" in capsys.readouterr().err


# ---------------------------------------------------------------------- 4. bad inputs and options
@pytest.mark.parametrize("args,message", [
    (["--general-share", "0.5"], ("invalid GRPO option 'general_share' = 0.5: needs a reward model to score the "
                                  "general prompts: pass --reward-model")),
    (["--reward-model", "runs/rm"], ("invalid GRPO option 'reward_model' = 'runs/rm': scores only general prompts: "
                                     "pass --general-share > 0 too")),
    (["--general-share", "0.2", "--reward-model", "runs/rm"], "'general_share' = 0.2: gives 0 general prompts of"),
    (["--general-share", "1", "--reward-model", "runs/rm"], "'general_share' = 1.0: must be in [0, 1)"),
    (["--language-weight", "-1"], "invalid GRPO option 'language_weight' = -1.0: must be >= 0"),
    (["--language", "fr"], "argument --language: invalid choice: 'fr'"),
])
def test_bad_options_exit_2_naming_them(base, tmp_path, args, message, capsys):
    assert main(["grpo", "--model", str(base), *GRPO, *args, "--out-dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_or_wrong_reward_model_is_a_message(base, tmp_path, capsys):
    args = ["grpo", "--model", str(base), *GRPO, "--general-share", "0.5", "--out-dir", str(tmp_path / "o")]
    assert main([*args, "--reward-model", str(tmp_path / "nothing")]) == 2
    assert f"no reward model at {tmp_path / 'nothing'} (--reward-model): no such file or directory" \
        in capsys.readouterr().err
    assert main([*args, "--reward-model", str(base)]) == 2  # a plain checkpoint has no reward head
    assert f"{base} is not a reward model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line,message", [
    ("not json", "not valid JSON"),
    ('{"prompt": "  "}', '"prompt" must be a non-empty string'),
    ('{"question": "hi"}', 'expected a JSON object with either a "prompt" string or a "messages" list'),
    ('{"prompt": "hi", "messages": []}', 'either a "prompt" string or a "messages" list'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "the last message must be a non-empty user message"),
])
def test_a_bad_general_prompts_line_is_named_by_file_and_line(base, reward_model, tmp_path, line, message, capsys):
    path = write_jsonl(tmp_path / "general.jsonl", [GENERAL_PROMPTS[0], line])
    assert main(["grpo", "--model", str(base), *GRPO, "--general-share", "0.5", "--reward-model", str(reward_model),
                 "--general-prompts", str(path), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: " in err and message in err, err


def test_grpo_help_shows_the_new_options_with_defaults(capsys):
    assert main(["grpo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--language-weight FLOAT R1's language-consistency reward weight", "0 = off (default: 0.0)",
                  "--language {en,zh} the target language of the reasoning", "(default: en)",
                  "--reward-model STR a reward model of `nanoseek rm`", "empty = none (default: )",
                  "--general-share FLOAT share of each step's prompts that are general prompts",
                  "--general-prompts STR [STR ...] general prompts JSONL files", "instructions) (default: ())"):
        assert shown in out, shown


def test_a_reward_set_given_to_the_stage_scores_only_reasoning(tok, tmp_path):
    """A plain RewardSet (as tests and benchmarks pass) is the reasoning source's; a mixed run then needs more."""
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=4, general_share=0.5, reward_model="unused")
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    train = replace(GRPO_TRAIN_DEFAULTS, out_dir=str(tmp_path), tensorboard=False)
    trainer = grpo_trainer(model, tok, train, cfg, RewardSet({"helpfulness": reward_model_reward(LengthScorer())},
                                                             {"helpfulness": 1.0}))
    assert trainer.stage.rewards.sets.keys() == {REASONING}
    with pytest.raises(TrainingError, match="the rewards score no general prompts"):
        trainer.stage.prepare(trainer)
