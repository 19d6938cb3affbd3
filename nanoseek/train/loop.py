"""The training machinery every stage shares: optimizer, schedules, the step, checkpoints, signals, logging.

A stage (pretraining, SFT, ...) hands the Trainer a model and a batch source; the Trainer owns the rest.
Checkpoint layout under out_dir/checkpoints:
  step_000100/model/     the weights as a Hugging Face DeepSeek-V3 checkpoint (nanoseek.from_pretrained reads it)
  step_000100/trainer.pt optimizer, step, data position, RNG states, CPU EMA
  latest                 the name of the newest complete checkpoint (replaced atomically after it is written)
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from nanoseek.atomic import replace_directory, write_text
from nanoseek.checkpoint import load_pretrained
from nanoseek.config import require
from nanoseek.errors import NanoseekError
from nanoseek.model import DeepSeekV3
from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.fp8 import convert_to_fp8_training
from nanoseek.model.layers import RMSNorm
from nanoseek.model.params import flops_per_token
from nanoseek.model.transformer import Block
from nanoseek.train.metrics import MetricsLog, plot_run


class TrainingError(NanoseekError, RuntimeError):
    pass


class BatchSource(Protocol):
    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    max_steps: int = 1400  # the defaults are the embedded CPU run's: ~12 minutes of training on 2 cores
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step once the ramp is over (many small steps learn
                         # the built-in tasks faster than few large ones in a fixed CPU budget)
    micro_batch_size: int = 8  # sequences per forward/backward; the step accumulates gradients over them
    batch_ramp_start: int = 0  # sequences per step at the start (0: no ramp) ...
    batch_ramp_steps: int = 0  # ... growing linearly to batch_size over this many steps (DeepSeek-V3 ramps too)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio (V3: 2.2e-4 -> 2.2e-5)
    warmup_steps: int = 50
    decay_start: float = 0.5  # fraction of max_steps at constant lr before the cosine decay starts
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bias_update_speed: float | None = None  # aux-loss-free balancing gamma; None: the model config's; 0: off
    aux_alpha: float | None = None  # sequence-wise balance loss alpha; None: the model config's; 0: off
    mtp_weight: float = 0.3  # MTP loss lambda ...
    mtp_weight_late: float = 0.1  # ... dropped to this after mtp_switch of the run (V3: 0.3 then 0.1)
    mtp_switch: float = 0.7
    recompute: str = "none"  # "none", "selective" (RMSNorm + MLA up-projections, as V3), "full" (per block)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on the CPU), "bf16", "fp32", or "fp8":
                             # DeepSeek-V3's FP8 GEMMs (nanoseek/model/fp8.py), everything else as "auto"
    ema_decay: float = 0.0  # > 0 keeps an exponential moving average of the weights on the CPU
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = True

    def __post_init__(self) -> None:
        need = partial(require, self, kind="training option")

        need(self.recompute in ("none", "selective", "full"), "recompute", "must be 'none', 'selective' or 'full'")
        need(self.precision in ("auto", "bf16", "fp32", "fp8"), "precision", "must be 'auto', 'bf16', 'fp32' or 'fp8'")
        for name in ("max_steps", "seq_len", "batch_size", "micro_batch_size"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.batch_ramp_start <= self.batch_size, "batch_ramp_start", f"must be in [0, {self.batch_size}]")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(0 <= self.decay_start <= 1 and 0 <= self.mtp_switch <= 1, "decay_start",
             "decay_start and mtp_switch are fractions of the run, in [0, 1]")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak for MFU, for the GPUs whose figure we know; None on the CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                       ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """DeepSeek-V3's shape: linear warmup, constant, then cosine decay to min_lr_ratio * lr at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_from = max(cfg.warmup_steps, int(cfg.decay_start * cfg.max_steps))
    if step < decay_from:
        return cfg.lr
    progress = min(1.0, (step - decay_from) / max(1, cfg.max_steps - decay_from))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_size_at(step: int, cfg: TrainConfig) -> int:
    if not cfg.batch_ramp_start or step >= cfg.batch_ramp_steps:
        return cfg.batch_size
    return int(cfg.batch_ramp_start + (cfg.batch_size - cfg.batch_ramp_start) * step / cfg.batch_ramp_steps)


def mtp_weight_at(step: int, cfg: TrainConfig) -> float:
    return cfg.mtp_weight if step < cfg.mtp_switch * cfg.max_steps else cfg.mtp_weight_late


def apply_recomputation(model: DeepSeekV3, mode: str) -> None:
    """Recompute activations in the backward pass instead of storing them, without touching the model code.

    "selective" is DeepSeek-V3's choice: every RMSNorm and the MLA up-projections (q_b_proj, kv_b_proj),
    cheap to recompute and large to store. "full" recomputes each transformer block.
    """
    if mode not in ("none", "selective", "full"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', not {mode!r}")
    if mode == "none":
        return
    if mode == "full":
        targets = [m for m in model.modules() if isinstance(m, Block)]
    else:
        targets = [m for m in model.modules() if isinstance(m, RMSNorm)]
        for attn in (m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)):
            targets += [attn.kv_b_proj] + ([attn.q_b_proj] if hasattr(attn, "q_b_proj") else [])
    for module in targets:
        forward = module.forward  # bound before the override, so the wrapper calls the original
        module.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def max_violation(counts: torch.Tensor) -> list[float]:
    """Per MoE layer: max over experts of load / mean load - 1 (0 is perfect balance)."""
    load = counts.float()
    return (load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-9) - 1).tolist()


class Trainer:
    is_main = True  # the process that logs and plots (rank 0 of a parallel run)

    def __init__(self, model: DeepSeekV3, data: BatchSource, cfg: TrainConfig,
                 heldout: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 model_files: dict[str, Path] | None = None):
        """heldout: returns the held-out batches to evaluate on; model_files: files (a tokenizer, say) copied
        into every checkpoint's model directory so that it is self-contained."""
        self.cfg = cfg
        self.model_files = model_files or {}
        self.out_dir = Path(cfg.out_dir)
        self.device = pick_device(cfg.device)
        self.model = model.to(self.device)
        self.data = data
        self.heldout = heldout
        self.step = 0
        self.tokens = 0
        self.bad_steps = 0
        self.stop_signal: int | None = None
        bf16 = cfg.precision == "bf16" or (cfg.precision in ("auto", "fp8") and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else None
        if cfg.precision == "fp8":
            convert_to_fp8_training(self.model)  # before recomputation wraps any forward
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda")
        self.ema = ({k: v.detach().to("cpu", copy=True).float() for k, v in model.state_dict().items()}
                    if cfg.ema_decay > 0 else None)
        self.bias_speed = (model.config.bias_update_speed if cfg.bias_update_speed is None
                           else cfg.bias_update_speed)
        self.aux_alpha = model.config.aux_loss_alpha if cfg.aux_alpha is None else cfg.aux_alpha
        self.flops_per_token = flops_per_token(model.config, cfg.seq_len)
        self.peak = peak_flops(self.device)
        apply_recomputation(self.model, cfg.recompute)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.train()
        start = time.perf_counter()
        lr, n_seq, inputs, targets, n_tokens = self.step_batch()
        mtp_weight = mtp_weight_at(self.step, cfg)
        totals: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        counts = None
        for lo in range(0, len(inputs), cfg.micro_batch_size):
            x, y = inputs[lo:lo + cfg.micro_batch_size], targets[lo:lo + cfg.micro_batch_size]
            share = int((y != -100).sum()) / max(1, n_tokens)  # token-weighted mean over micro-batches
            with self.autocast or torch.autocast("cpu", enabled=False):
                out = model.compute_loss(x, y, mtp_weight=mtp_weight, balance_alpha=self.aux_alpha)
            self.backward(out.loss * share, last=lo + cfg.micro_batch_size >= len(inputs))
            for key in totals:
                value = getattr(out, key)
                totals[key] += 0.0 if value is None else float(value.detach()) * share
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        totals, counts = self.reduce_step(totals, counts)
        grad_norm = self.clip_gradients()
        finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if counts is not None and self.bias_speed > 0:
                model.update_router_biases(counts, self.bias_speed)
            self._update_ema()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step += 1
        self.tokens += n_tokens
        record = {"kind": "train", "step": self.step, "tokens": self.tokens, "lr": lr, "grad_norm": grad_norm,
                  "batch_size": n_seq, "mtp_weight": mtp_weight, "step_time": elapsed,
                  "tokens_per_s": n_tokens / elapsed, "skipped": not finite,
                  **{k: v for k, v in totals.items()}}
        if mtp_weight == 0 or not model.mtp:
            record["mtp_loss"] = None
        if self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak
        if counts is not None:
            record["max_violation"] = max_violation(counts)
        if self.bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"the loss or gradient was non-finite for {self.bad_steps} consecutive steps "
                                f"(up to step {self.step}); the optimizer skipped them and the run stops here. "
                                f"Lower the learning rate (now {lr:.2e}) or check the data.")
        return record

    def step_batch(self) -> tuple[float, int, torch.Tensor, torch.Tensor, int]:
        """Set this step's learning rate and draw its global batch -> lr, sequences in the step, this rank's
        inputs and targets, and the tokens of the whole step (all data-parallel ranks)."""
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_seq = batch_size_at(self.step, self.cfg)
        inputs, targets = self.data.next_batch(n_seq)
        n_tokens = int((targets != -100).sum())
        inputs, targets = self.local_batch(inputs.to(self.device), targets.to(self.device))
        return lr, n_seq, inputs, targets, n_tokens

    # ------------------------------------------------------------------ what a parallel trainer overrides
    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the step's global batch (all of them on one process)."""
        return inputs, targets

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's weighted loss; `last`: the step's final micro-batch."""
        loss.backward()

    def reduce_step(self, totals: dict[str, float], counts: torch.Tensor | None):
        """Sum the step's loss totals and tokens per expert over data-parallel ranks (nothing to do on one)."""
        return totals, counts

    def clip_gradients(self) -> float:
        """Clip to cfg.grad_clip by the global norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        for key, value in self.model.state_dict().items():
            self.ema[key].mul_(d).add_(value.detach().to("cpu", torch.float32), alpha=1 - d)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if self.heldout is None:
            return None
        self.model.eval()
        losses, weights = [], []
        for x, y in self.heldout():
            with self.autocast or torch.autocast("cpu", enabled=False):
                out = self.model.compute_loss(x.to(self.device), y.to(self.device), mtp_weight=0.0,
                                              balance_alpha=0.0)
            losses.append(float(out.lm_loss))
            weights.append(int((y != -100).sum()))
        loss = sum(l * w for l, w in zip(losses, weights)) / max(1, sum(weights))
        return {"kind": "heldout", "step": self.step, "tokens": self.tokens, "loss": loss}

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path:
        """Write step_N atomically (staging dir + rename), then point `latest` at it, then rotate old ones."""
        root = self.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.step:06d}"
        staging = root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            self._write_checkpoint(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final = root / name
        replace_directory(staging, final)
        write_text(root / "latest", name)
        kept = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in kept[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_checkpoint(self, directory: Path) -> None:
        self.model.save_pretrained(directory / "model")
        for name, source in self.model_files.items():
            shutil.copyfile(source, directory / "model" / name)
        state = {
            "step": self.step, "tokens": self.tokens, "optimizer": self.optimizer.state_dict(),
            "data": self.data.state_dict(), "ema": self.ema, "train_config": asdict(self.cfg),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        torch.save(state, directory / "trainer.pt")

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any. Returns whether one was found."""
        latest = self.checkpoint_dir / "latest"
        if not latest.exists():
            return False
        path = self.checkpoint_dir / latest.read_text().strip()
        loaded = load_pretrained(path / "model")
        self.model.load_state_dict(loaded.state_dict())
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.data.load_state_dict(state["data"])
        self.step, self.tokens, self.ema = state["step"], state["tokens"], state["ema"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return True

    # ------------------------------------------------------------------ the run
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train to max_steps. SIGINT/SIGTERM finish the current step, save, and return (stopped=signal)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir, resume_step=self.step, tensorboard=cfg.tensorboard) if self.is_main else None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (progress and self.is_main), unit="step",
                   dynamic_ncols=True)
        last_eval = None
        try:
            while self.step < cfg.max_steps and self.stop_signal is None:
                record = self.train_step()
                if log and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    log.write(record)
                postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                if "reward" in record:
                    postfix["reward"] = f"{record['reward']:.3f}"
                if "mfu" in record:
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(postfix)
                bar.update(1)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    last_eval = self.evaluate()
                    if last_eval is not None and log:
                        log.write(last_eval)
                if cfg.save_every and self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
            if self.stop_signal is not None:
                bar.write(f"signal {self.stop_signal}: saving step {self.step} before exiting")
                self.save()
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            if log:
                log.close()
                plot_run(self.out_dir)
        return {"step": self.step, "tokens": self.tokens, "stopped": self.stop_signal, "heldout": last_eval}
