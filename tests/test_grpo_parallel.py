"""GRPO on the shared step: data parallel on gloo (2 ranks) equals one process on the same groups, its EMA too; a
checkpoint written by 2 ranks resumes on 1; a non-finite step is skipped as in pretraining."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import DeepSeekV3
from nanoseek.rewards import RewardSet, format_reward
from nanoseek.train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, GRPOStage, ProblemStream, grpo_trainer
from nanoseek.train.loop import LossTerms, TrainingError

from conftest import tiny_config
from gloo import spawn

STEPS = 3
# A reward that differs between the completions of a random model, so that every step updates the weights.
REWARD = RewardSet({"accuracy": lambda s: float(len(set(s.completion)) % 2), "format": format_reward},
                   {"accuracy": 1.0, "format": 0.0})
# Compared exactly: what the samples were (a rank that generated the wrong share or seeds would differ).
SAMPLE_KEYS = ("reward", "accuracy", "length_mean", "length_max", "groups_kept")


def tokenizer() -> Tokenizer:
    return Tokenizer.train([f"Question: What is {a} + {b}?" for a in range(20) for b in range(20)], 300)


def setup(out_dir: str):
    from dataclasses import replace

    tok = tokenizer()
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    train = replace(GRPO_TRAIN_DEFAULTS, out_dir=out_dir, lr=1e-2, warmup_steps=0, max_steps=STEPS, save_every=0,
                    ema_decay=0.5, tensorboard=False, device="cpu")
    grpo = GRPOConfig(group_size=4, prompts_per_step=4, max_new_tokens=6, drop_uninformative=False)
    return model, tok, train, grpo


def oracle(out_dir: str):
    model, tok, train, grpo = setup(out_dir)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = grpo_trainer(model, tok, train, grpo, REWARD)
    records = [trainer.train_step() for _ in range(STEPS)]
    oracle_ema.update({k: v.clone() for k, v in trainer.ema.items()})
    return records, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, initial


oracle_ema: dict[str, torch.Tensor] = {}  # the one process's EMA after STEPS steps (set by oracle())


def ema_difference(trainer, initial) -> float:
    """Largest difference between a trainer's EMA and the one process's, relative to that EMA's move from the
    initial weights (Frobenius norms, as `difference` compares the weights)."""
    worst = 0.0
    for name, value in trainer.ema.items():
        moved = (oracle_ema[name] - initial[name]).float().norm()
        if moved > 0:
            worst = max(worst, float((value - oracle_ema[name]).norm() / moved))
    return worst


def parallel_trainer(out_dir: str):
    from nanoseek.parallel.mesh import Layout, init_parallel
    from nanoseek.parallel.trainer import ParallelTrainer

    model, tok, train, grpo = setup(out_dir)
    ctx = init_parallel(Layout(dp=dist.get_world_size()), model.config, device="cpu")
    stage = GRPOStage(tok, ProblemStream(train.seed, grpo.difficulty), grpo, REWARD)
    return ParallelTrainer(model, stage, train, ctx)


def difference(records, model, reference) -> tuple[float, float]:
    """Largest difference in the losses and gradient norms (relative), and in the weight updates; infinite if the
    samples differ.

    A weight tensor is compared by its update from the initial weights, relative to the one process's update
    (Frobenius norms): Adam divides each gradient by its own running magnitude, so a last-bit difference in the
    gradient of a barely used row (an embedding of a rare token) can move that one weight by a sizeable share of
    the learning rate; an element-wise maximum would measure that, not whether the step is the same step."""
    ref_records, ref_state, initial = reference
    worst, weights = 0.0, 0.0
    for got, ref in zip(records, ref_records, strict=True):
        if any(got[k] != ref[k] for k in SAMPLE_KEYS):
            return math.inf, math.inf
        worst = max(worst, abs(got["loss"] - ref["loss"]), abs(got["entropy"] - ref["entropy"]),
                    abs(got["grad_norm"] / ref["grad_norm"] - 1))
    for name, value in model.state_dict().items():
        update = (ref_state[name] - initial[name]).float().norm()
        if update > 0:
            weights = max(weights, float((value - ref_state[name]).float().norm() / update))
    return worst, weights


def worker(rank: int, world: int, tmp: str, report) -> None:
    reference = oracle(os.path.join(tmp, f"oracle{world}-{rank}"))
    run_dir = os.path.join(tmp, "dp_run")
    if world == 2:
        trainer = parallel_trainer(os.path.join(tmp, "dp"))
        records = [trainer.train_step() for _ in range(STEPS)]
        steps, weights = difference(records, trainer.model, reference)
        report("dp2 steps", steps)
        report("dp2 weights", weights)
        report("dp2 ema", ema_difference(trainer, reference[2]))
        saver = parallel_trainer(run_dir)  # 2 steps on 2 ranks, then a distributed checkpoint
        for _ in range(STEPS - 1):
            saver.train_step()
        saver.save()
    else:  # 1 rank resumes what 2 ranks wrote and takes the last step
        trainer = parallel_trainer(run_dir)
        assert trainer.resume() and trainer.step == STEPS - 1
        last = trainer.train_step()
        records, state, initial = reference
        steps, weights = difference([last], trainer.model, (records[-1:], state, initial))
        report("resumed steps", steps)
        report("resumed weights", weights)
        report("resumed ema", ema_difference(trainer, initial))


def test_grpo_data_parallel_equals_one_process_and_resumes_on_another_rank_count(tmp_path):
    two = spawn(worker, 2, (str(tmp_path),), 3)
    steps, weights = two["dp2 steps"], two["dp2 weights"]
    print(f"GRPO on 2 data-parallel ranks against one process: losses and gradient norms within {steps:.2e}, "
          f"weight updates within {weights:.2e} (relative)")
    assert steps < 1e-4 and weights < 1e-3 and two["dp2 ema"] < 1e-3
    one = spawn(worker, 1, (str(tmp_path),), 3)
    steps, weights = one["resumed steps"], one["resumed weights"]
    print(f"written on 2 ranks, resumed on 1: losses and gradient norms within {steps:.2e}, weight updates within "
          f"{weights:.2e}; the EMA (read back from ema/) within {one['resumed ema']:.2e}")
    assert steps < 1e-4 and weights < 1e-3 and one["resumed ema"] < 1e-3


def test_grpo_skips_a_non_finite_step_as_pretraining_does(tmp_path, monkeypatch):
    model, tok, train, grpo = setup(str(tmp_path))
    from dataclasses import replace

    trainer = grpo_trainer(model, tok, replace(train, max_bad_steps=2), grpo, REWARD)
    trainer.train_step()
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    real = trainer.stage.loss

    def poisoned(model, micro_batch):
        terms = real(model, micro_batch)
        return LossTerms(terms.loss * float("nan"), {**terms.stats, "loss": float("nan")})
    monkeypatch.setattr(trainer.stage, "loss", poisoned)
    assert trainer.train_step()["skipped"]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(TrainingError, match="non-finite for 2 consecutive steps"):
        trainer.train_step()
