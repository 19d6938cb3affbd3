"""GRPO: advantages and losses against hand-computed cases, k3 against the closed form, rewards, a toy update."""

import math

import pytest
import torch

import nanoseek
from nanoseek.data.problems import USER_TASK
from nanoseek.data.tasks import Problem
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DeepSeekV3
from nanoseek.config import ConfigError
from nanoseek.train.loop import length_buckets
from nanoseek.train.grpo import (GRPOConfig, GRPOLossConfig, completion_logprobs, group_advantages,
                                 informative_groups, k3_kl, policy_loss)
from nanoseek.rewards import (RewardSet, Sample, accuracy_reward, boxed_answer, format_reward,
                                    language_consistency, overlong_penalty, r1_zero_rewards)

from conftest import tiny_config


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]) / torch.tensor([[std + 1e-4], [1e-4]])
    torch.testing.assert_close(group_advantages(rewards), expected)
    torch.testing.assert_close(group_advantages(rewards, scale_std=False),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    assert informative_groups(rewards).tolist() == [True, False]


# Two completions of 3 tokens (the second has 2); old policy = reference = log-prob 0 everywhere.
LOGP = torch.tensor([[math.log(1.5), 0.0, 0.0], [math.log(0.5), 0.0, 0.0]])
OLD = torch.zeros(2, 3)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])
# per token, eps 0.2: row 0: -min(1.5, 1.2) = -1.2, -1, -1; row 1 (A = -1): -min(-0.5, -0.8) = 0.8, then 1


@pytest.mark.parametrize("aggregation,expected", [
    ("sequence", ((-1.2 - 1 - 1) / 3 + (0.8 + 1) / 2) / 2),  # GRPO: mean per sequence, then over sequences
    ("token", (-3.2 + 1.8) / 5),  # DAPO: mean over all tokens of the batch
    ("constant", (-3.2 + 1.8) / (2 * 4)),  # Dr. GRPO: sum / (batch * max_tokens)
])
def test_policy_loss_per_aggregation(aggregation, expected):
    cfg = GRPOLossConfig(aggregation=aggregation, max_tokens=4, eps_high=0.2)
    loss, stats = policy_loss(LOGP, OLD, ADV, MASK, cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)  # both first tokens are outside the clip range


def test_clip_higher_and_kl_term():
    loss, _ = policy_loss(LOGP, OLD, ADV, MASK, GRPOLossConfig(aggregation="token", eps_high=0.6))
    assert loss.item() == pytest.approx((-1.5 - 2 + 1.8) / 5)  # ratio 1.5 is inside [0.8, 1.6]: not clipped
    ref = torch.zeros(2, 3)
    loss, stats = policy_loss(LOGP, OLD, ADV, MASK, GRPOLossConfig(aggregation="token", eps_high=0.2, beta=0.1),
                              ref_logp=ref)
    k3 = [1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1]  # exp(-d) + d - 1 at d = log ratio
    assert loss.item() == pytest.approx((-3.2 + 1.8 + 0.1 * sum(k3)) / 5)
    assert stats["kl"] == pytest.approx(sum(k3) / 5)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_micro_batch_shares_add_up_to_the_whole_batch(aggregation):
    """The update runs one micro-batch at a time: each row alone, with the whole batch's size, gives shares
    of the loss and stats that sum to the whole batch's (rows 2 and 3 are rows 0 and 1 with other values)."""
    logp = torch.cat([LOGP, LOGP.flip(1)])
    old, ref, mask = torch.zeros(4, 3), torch.full((4, 3), -0.1), torch.cat([MASK, MASK])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    cfg = GRPOLossConfig(aggregation=aggregation, max_tokens=4, eps_high=0.2, beta=0.1)
    whole, stats = policy_loss(logp, old, adv, mask, cfg, ref)
    parts = [policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], cfg, ref[i:i + 1], batch=(4, 10))
             for i in range(4)]
    assert sum(loss.item() for loss, _ in parts) == pytest.approx(whole.item(), rel=1e-6)
    for key in stats:
        assert sum(part[key] for _, part in parts) == pytest.approx(stats[key], rel=1e-6)


def test_length_buckets_sort_and_respect_the_budget():
    lengths = [50, 10, 30, 10, 100, 20]
    assert length_buckets(lengths, 60) == [[1, 3, 5], [2], [0], [4]]  # 3 x 20 = 60 fits; 2 x 30 does not
    assert length_buckets(lengths, 1000) == [[1, 3, 5, 2, 0, 4]]
    assert sorted(i for b in length_buckets(lengths, 1) for i in b) == list(range(6))


@pytest.mark.parametrize("options,name", [({"group_size": 1}, "group_size"), ({"temperature": 0.0}, "temperature"),
                                          ({"top_p": 1.5}, "top_p"), ({"update_tokens": 0}, "update_tokens"),
                                          ({"difficulty": 4}, "difficulty")])
def test_grpo_config_names_a_bad_option(options, name):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        GRPOConfig(**options)


def test_grpo_loss_config_names_a_bad_option():
    with pytest.raises(ConfigError, match="'aggregation'"):
        GRPOLossConfig(aggregation="mean")
    with pytest.raises(ConfigError, match="'beta'"):
        GRPOLossConfig(beta=-1.0)


def test_k3_expectation_is_the_kl_closed_form():
    gen = torch.Generator().manual_seed(0)
    policy = torch.rand(50, generator=gen).softmax(0)
    reference = torch.rand(50, generator=gen).softmax(0)
    expected = (policy * (policy.log() - reference.log())).sum()  # KL(policy || reference)
    estimate = (policy * k3_kl(policy.log(), reference.log())).sum()  # E over tokens drawn from the policy
    torch.testing.assert_close(estimate, expected)
    assert (k3_kl(policy.log(), reference.log()) >= 0).all()


ADDITION = Problem("addition", "What is 47 + 38?", "85", "...", 1)
HALF = Problem(USER_TASK, "What is 1/2 as a decimal?", "\\frac{1}{2}", "", 1)
REWARD_TABLE = [
    (ADDITION, "7 + 8 = 15.\n</think>\n<answer>85</answer>", 1.0, 1.0),
    (ADDITION, "<think>7 + 8 = 15.</think> <answer> 85 </answer>", 1.0, 1.0),
    (ADDITION, "</think>\n<answer>86</answer>", 0.0, 0.0),  # wrong, and an empty reasoning is not the format
    (ADDITION, "the answer is 85", 0.0, 0.0),  # missing tags
    (ADDITION, "", 0.0, 0.0),  # empty output
    (ADDITION, "x</think><answer></answer>", 0.0, 0.0),
    (ADDITION, "x</think><answer>85</answer> and more", 1.0, 0.0),  # text after the answer breaks the format
    (ADDITION, "x</think><answer>85</answer><answer>85</answer>", 1.0, 0.0),  # two answers
    (HALF, "halve it</think><answer>0.5</answer>", 1.0, 1.0),  # \frac{1}{2} vs 0.5
    (HALF, "so \\boxed{\\frac{1}{2}}", 1.0, 0.0),  # boxed with nested braces
    (HALF, "so \\boxed{\\frac{1}{3}}", 0.0, 0.0),
    (HALF, "so \\boxed{\\frac{1}{2}", 0.0, 0.0),  # unbalanced braces: no answer
    (HALF, "</think><answer>\\frac{{{</answer>", 0.0, 0.0),  # malformed LaTeX
]


@pytest.mark.parametrize("problem,completion,accuracy,fmt", REWARD_TABLE)
def test_reward_table(problem, completion, accuracy, fmt):
    sample = Sample(problem, completion)
    assert accuracy_reward(sample) == accuracy
    assert format_reward(sample) == fmt
    scores = r1_zero_rewards()(sample)
    assert scores["total"] == accuracy + fmt


def test_boxed_nested_braces():
    assert boxed_answer("a \\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"


def test_language_consistency_and_overlong():
    assert language_consistency("we compute 这个", "en") == pytest.approx(2 / 4)
    assert language_consistency("we compute 这个", "zh") == pytest.approx(2 / 4)
    assert language_consistency("12 + 3 = 15", "en") == 1.0
    assert language_consistency("所以 x = 12", "zh") == 1.0  # a single letter is a variable, not a word
    assert language_consistency('字母 r 在 "q r i r"', "en") == 0.0
    assert [overlong_penalty(n, 100, 20) for n in (50, 80, 90, 100, 130)] == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_a_raising_reward_scores_zero():
    def broken(sample):
        raise RuntimeError("boom")
    scores = RewardSet({"broken": broken, "format": format_reward}, {"broken": 1.0, "format": 1.0})(
        Sample(ADDITION, "x</think><answer>85</answer>"))
    assert scores == {"broken": 0.0, "format": 1.0, "total": 1.0}


def test_grpo_steps_raise_the_probability_of_the_rewarded_completion():
    """Toy problem: one prompt, one-token completions, reward 1 for a token in the lower half of the vocab."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(num_nextn_predict_layers=0))
    prompt = [0, 5, 6, 7]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    cfg = GRPOLossConfig(aggregation="token")

    def rewarded_mass():
        with torch.no_grad():
            return model(torch.tensor([prompt]))[0, -1].softmax(-1)[:256].sum().item()

    before = rewarded_mass()
    for step in range(10):
        outs = Engine(model, max_batch=16, max_len=16).generate(
            [prompt] * 16, SamplingParams(max_new_tokens=1, temperature=1.0, seed=100 * step))
        sequences = torch.tensor([prompt + o.tokens for o in outs])
        rewards = torch.tensor([[float(o.tokens[0] < 256) for o in outs]])
        advantages = group_advantages(rewards).flatten()
        model.train()
        logp, mask, _ = completion_logprobs(model, sequences, torch.full((16,), len(prompt)))
        loss, _ = policy_loss(logp, logp.detach(), advantages, mask, cfg)  # mu = 1: the sampler is this policy
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = rewarded_mass()
    assert after > before + 0.2, (before, after)


def test_grpo_stage_runs_logs_and_resumes_exactly(tmp_path):
    """`nanoseek grpo` on a tiny checkpoint: 4 steps straight equal 2 steps + resume + 2 steps."""
    from nanoseek.cli import main
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.train.metrics import read_metrics

    tokenizer = Tokenizer.train([f"Question: What is {a} + {b}?\n<think>\n{a + b}" for a in range(20)
                                 for b in range(20)], 300)
    torch.manual_seed(0)
    nanoseek.save_pretrained(DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size)), tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    args = ["grpo", "--model", str(tmp_path / "base"), "--group-size", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "6", "--no-tensorboard", "--save-every", "2", "--lr", "1e-3", "--no-drop-uninformative"]
    assert main([*args, "--out-dir", str(tmp_path / "a"), "--max-steps", "4"]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "b"), "--max-steps", "2"]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "b"), "--max-steps", "4", "--resume"]) == 0
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    keys = ("reward", "accuracy", "format_rate", "length_mean", "loss", "kl", "clip_fraction")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert all("generation_time" in r and "entropy" in r and "reward_format" in r for r in a)
    assert (tmp_path / "a" / "plots" / "reward.png").is_file() and (tmp_path / "a" / "plots" / "length.png").is_file()
    assert (tmp_path / "a" / "checkpoints" / "step_000004" / "model" / "tokenizer.json").is_file()



# A reward that differs between the completions of a random model, so that advantages are not all zero
# (the built-in tasks' checkers score a random model 0 everywhere, and then no update happens at all).
VARYING_REWARD = RewardSet({"accuracy": lambda s: float(len(set(s.completion)) % 2), "format": format_reward},
                           {"accuracy": 1.0, "format": 0.0})


def _tiny_grpo_trainer(out_dir, train_options=None, **grpo_options):
    from dataclasses import replace

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, grpo_trainer

    tokenizer = Tokenizer.train([f"Question: What is {a} + {b}?" for a in range(20) for b in range(20)], 300)
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size))
    train = replace(GRPO_TRAIN_DEFAULTS, out_dir=str(out_dir), lr=1e-2, tensorboard=False, **(train_options or {}))
    grpo = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6, **grpo_options)
    return grpo_trainer(model, tokenizer, train, grpo, VARYING_REWARD)


def test_micro_batched_update_equals_one_batch(tmp_path):
    """The GRPO step's update one row per micro-batch (gradients accumulated) equals one forward of all rows."""
    def one_step(update_tokens: int):
        trainer = _tiny_grpo_trainer(tmp_path / str(update_tokens), {"warmup_steps": 0, "grad_clip": 1e9},
                                     update_tokens=update_tokens)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        # Plain SGD, unclipped: the step is the gradient itself (Adam would hide a wrongly scaled one).
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=trainer.cfg.lr)
        return trainer.train_step(), initial, trainer.model.state_dict()

    whole, initial, whole_weights = one_step(4096)
    split, _, split_weights = one_step(1)
    assert whole["groups_kept"] > 0  # (the loss value is ~0 at mu = 1: the ratio is 1 and advantages are centred)
    for key in ("loss", "entropy", "kl", "clip_fraction"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7)
    for name, value in whole_weights.items():
        torch.testing.assert_close(split_weights[name], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(value, initial[name]) for name, value in whole_weights.items())


def test_grpo_resume_is_exact_with_real_updates(tmp_path):
    """4 steps straight equal 2 steps, a fresh process's resume, and 2 more: weights, optimizer moments and
    the problem stream all come back (here the updates are not zero, unlike a random model on the tasks)."""
    from nanoseek.train.metrics import read_metrics

    straight = _tiny_grpo_trainer(tmp_path / "a", {"max_steps": 4, "save_every": 2})
    straight.fit(progress=False)
    _tiny_grpo_trainer(tmp_path / "b", {"max_steps": 2, "save_every": 2}).fit(progress=False)
    resumed = _tiny_grpo_trainer(tmp_path / "b", {"max_steps": 4, "save_every": 2})
    assert resumed.resume()
    resumed.fit(progress=False)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["reward"] for r in a] == [r["reward"] for r in b] and len({r["reward"] for r in a}) > 1


@pytest.mark.parametrize("stop_at_answer,expected", [(True, ("</answer>",)), (False, ())])
def test_rollouts_stop_at_the_answer_like_the_evaluation(tmp_path, stop_at_answer, expected):
    trainer = _tiny_grpo_trainer(tmp_path, stop_at_answer=stop_at_answer)
    seen = []
    trainer.stage.prepare(trainer)
    generate = trainer.stage.engine.generate
    trainer.stage.engine.generate = lambda prompts, params: seen.append(params) or generate(prompts, params)
    trainer.train_step()
    assert seen[0].stop_strings == expected and seen[0].stop_ids == (trainer.stage.tokenizer.eos_id,)
