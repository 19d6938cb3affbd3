"""The shared training loop: schedules, recomputation, balancing, non-finite steps, checkpoints, signals."""

import math
import os
import signal

import pytest
import torch

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint
from nanoseek.model import DeepSeekV3
from dataclasses import fields

from nanoseek.train.loop import TrainConfig, Trainer, TrainingError, apply_recomputation, learning_rate
from nanoseek.train.pretrain import LanguageModelStage, PretrainConfig, batch_size_at, mtp_weight_at

from conftest import randomize, tiny_config


class PatternSource:
    """A learnable stream: each sequence counts up from a seeded start (mod vocab). Position = batches served."""

    def __init__(self, vocab: int = 512, seq_len: int = 16):
        self.vocab, self.seq_len, self.cursor = vocab, seq_len, 0

    def next_batch(self, n):
        g = torch.Generator().manual_seed(1000 + self.cursor)
        self.cursor += 1
        start = torch.randint(0, self.vocab, (n, 1), generator=g)
        seq = (start + torch.arange(self.seq_len + 1)) % self.vocab
        return seq[:, :-1], seq[:, 1:]

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def make_trainer(tmp_path, seed=0, **overrides):
    """The shared Trainer with the language-model stage; overrides go to whichever config has the field."""
    torch.manual_seed(seed)
    settings = {**dict(out_dir=str(tmp_path), max_steps=8, seq_len=16, batch_size=8, micro_batch_size=4, lr=1e-2,
                       warmup_steps=2, eval_every=0, save_every=0, tensorboard=False, device="cpu"), **overrides}
    stage_fields = {f.name for f in fields(PretrainConfig)}
    stage_cfg = PretrainConfig(**{k: v for k, v in settings.items() if k in stage_fields})
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in stage_fields})
    model = DeepSeekV3(tiny_config())
    return Trainer(model, LanguageModelStage(PatternSource(seq_len=16), stage_cfg, model.config), cfg)


def test_learning_rate_schedule_hand_computed():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, decay_start=0.5, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(0.1)  # linear warmup: (step + 1) / 10
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(30, cfg) == pytest.approx(1.0)  # constant until step 55
    assert learning_rate(55, cfg) == pytest.approx(1.0)
    assert learning_rate(55 + 55 // 2, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 27 / 55)))
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_batch_ramp_and_mtp_weight_schedule():
    cfg = PretrainConfig(batch_size=32, batch_ramp_start=8, batch_ramp_steps=4, mtp_weight=0.3,
                         mtp_weight_late=0.1, mtp_switch=0.7)
    assert [batch_size_at(s, cfg) for s in range(6)] == [8, 14, 20, 26, 32, 32]
    assert [mtp_weight_at(s, 10, cfg) for s in (0, 6, 7, 9)] == [0.3, 0.3, 0.1, 0.1]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_keeps_losses_gradients_and_expert_counts(mode):
    ids = torch.randint(0, 512, (2, 12))
    results = []
    for m in ("none", mode):
        model = DeepSeekV3(tiny_config()).train()
        randomize(model, seed=7)
        apply_recomputation(model, m)
        out = model.compute_loss(ids, torch.roll(ids, -1, 1), balance_alpha=0.01)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.expert_counts, b.expert_counts)  # recomputation never counts twice
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_training_learns_and_balances(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=30)
    records = [trainer.train_step() for _ in range(30)]
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.5
    assert len(records[0]["max_violation"]) == 3  # 2 MoE layers + the MTP block
    biases = torch.stack([r.e_score_correction_bias for r in trainer.model.routers()])
    assert biases.abs().sum() > 0  # the aux-free bias moved


def test_bias_update_can_be_switched_off(tmp_path):
    trainer = make_trainer(tmp_path, bias_update_speed=0.0)
    trainer.train_step()
    assert all(r.e_score_correction_bias.abs().sum() == 0 for r in trainer.model.routers())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    trainers = [make_trainer(tmp_path / "a", micro_batch_size=8), make_trainer(tmp_path / "b", micro_batch_size=3)]
    for t in trainers:  # keep the step's gradients for inspection
        t.optimizer.step = lambda: None
        t.optimizer.zero_grad = lambda set_to_none=True: None
    (a, ra), (b, rb) = [(t, t.train_step()) for t in trainers]
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_bad_steps=3)
    trainer.train_step()
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    real = trainer.model.compute_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(trainer.model, "compute_loss", poisoned)
    assert trainer.train_step()["skipped"] and trainer.train_step()["skipped"]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(TrainingError, match="non-finite for 3 consecutive steps .* Lower the learning rate"):
        trainer.train_step()


def test_resume_continues_exactly(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    expected = [straight.train_step()["loss"] for _ in range(6)]
    first = make_trainer(tmp_path / "split")
    losses = [first.train_step()["loss"] for _ in range(3)]
    first.save()
    second = make_trainer(tmp_path / "split", seed=123)  # different init: everything must come from disk
    assert second.resume() and second.step == 3
    losses += [second.train_step()["loss"] for _ in range(3)]
    assert losses == expected


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, keep_last=2)
    trainer.train_step()
    trainer.save()
    trainer.train_step()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    resumed = make_trainer(tmp_path)
    assert resumed.resume() and resumed.step == 1


def test_keep_last_rotation(tmp_path):
    trainer = make_trainer(tmp_path, keep_last=2)
    for _ in range(4):
        trainer.train_step()
        trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]


def test_sigterm_saves_before_exit(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=50)
    real = trainer.train_step

    def step_then_signal():
        record = real()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return record
    trainer.train_step = step_then_signal
    result = trainer.fit(progress=False)
    assert result["stopped"] == signal.SIGTERM and result["step"] == 3
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000003"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back


def test_cpu_ema(tmp_path):
    trainer = make_trainer(tmp_path, ema_decay=0.9)
    w0 = trainer.model.lm_head.weight.detach().clone()
    trainer.train_step()
    w1 = trainer.model.lm_head.weight.detach()
    torch.testing.assert_close(trainer.ema["lm_head.weight"], 0.9 * w0 + 0.1 * w1)
    assert trainer.ema["lm_head.weight"].device.type == "cpu"


def test_the_ema_is_saved_as_the_runs_model_and_resumes_exactly(tmp_path):
    """Each checkpoint holds ema/, a model directory of the EMA's weights (the oracle: the EMA computed by hand
    from the weights after each step), which a run's directory resolves to; model/ keeps the trained weights; a
    resumed run continues the EMA exactly."""
    straight = make_trainer(tmp_path / "straight", ema_decay=0.8)
    by_hand = {k: v.detach().clone() for k, v in straight.model.state_dict().items()}
    for _ in range(4):
        straight.train_step()
        for k, v in straight.model.state_dict().items():
            by_hand[k] = 0.8 * by_hand[k] + 0.2 * v.detach()
    checkpoint = straight.save()
    assert resolve_checkpoint(tmp_path / "straight") == checkpoint / "ema"
    saved_ema = load_pretrained(checkpoint / "ema").state_dict()
    for k, v in by_hand.items():
        torch.testing.assert_close(saved_ema[k], v, rtol=1e-6, atol=1e-7)
    saved_weights = load_pretrained(checkpoint / "model").state_dict()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(saved_weights[k], v), k

    first = make_trainer(tmp_path / "split", ema_decay=0.8)
    for _ in range(2):
        first.train_step()
    first.save()
    second = make_trainer(tmp_path / "split", seed=123, ema_decay=0.8)  # another init: the EMA comes from disk
    assert second.resume() and second.step == 2
    for _ in range(2):
        second.train_step()
    for k, v in straight.ema.items():
        assert torch.equal(second.ema[k], v), k


def test_a_run_without_an_ema_resolves_to_its_weights(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    checkpoint = trainer.save()
    assert not (checkpoint / "ema").exists()
    assert resolve_checkpoint(tmp_path) == checkpoint / "model"


def test_training_with_mtp_off_still_balances(tmp_path):
    trainer = make_trainer(tmp_path, mtp_weight=0.0, mtp_weight_late=0.0)
    record = trainer.train_step()
    assert record["mtp_loss"] is None and len(record["max_violation"]) == 2
