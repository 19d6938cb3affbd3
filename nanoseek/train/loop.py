"""The one optimizer step every stage shares, and the run around it: schedule, checkpoints, signals, logs.

A stage (pretraining, GRPO, ...) supplies only what is its own (the `Stage` protocol): this step's batch, cut
into micro-batches, and "this micro-batch -> loss and stats". The Trainer owns the rest: accumulation over the
micro-batches, the data-parallel reduction, gradient clipping, the non-finite guard, the optimizer step, the
balancing-bias update, the CPU EMA, the learning-rate schedule and the record of the step.

Run layout under out_dir:
  run.json               the stage and every setting of the run (a resume takes them from here)
  checkpoints/step_000100/model/     the weights as a Hugging Face DeepSeek-V3 checkpoint
  checkpoints/step_000100/ema/       with --ema-decay: the EMA of the weights, likewise (the run's model then)
  checkpoints/step_000100/trainer.pt optimizer, step, data position, RNG states
  checkpoints/latest     the name of the newest complete checkpoint (replaced atomically after it is written)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from nanoseek.atomic import replace_directory, write_text
from nanoseek.checkpoint import load_pretrained, resolve_checkpoint, save_pretrained
from nanoseek.config import require
from nanoseek.data.chat import ChatDataError, chat_template_for
from nanoseek.data.tokenizer import PAD, Tokenizer, TokenizerError
from nanoseek.errors import NanoseekError
from nanoseek.model import DeepSeekV3
from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.fp8 import convert_to_fp8_training
from nanoseek.model.layers import RMSNorm
from nanoseek.model.transformer import Block
from nanoseek.options import add_dataclass_options, from_args, given_options
from nanoseek.train.metrics import MetricsLog, plot_run


def length_buckets(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, shortest first, cut into micro-batches whose padded size (rows x longest)
    stays within max_tokens (a longer sequence gets a micro-batch of its own): sorting first keeps the
    padding, which costs as much compute as real tokens, small."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if buckets and (len(buckets[-1]) + 1) * lengths[i] <= max_tokens:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def padding_id(tokenizer: Tokenizer) -> int:
    """The input id of padding (never a target, and after every real token of its row): DeepSeek's pad token, or
    the end of sentence in a vocabulary without it."""
    try:
        return tokenizer.token_id(PAD)
    except NanoseekError:
        return tokenizer.eos_id


class TrainingError(NanoseekError, RuntimeError):
    pass


class EpochOrder:
    """The order a stage reads n items of its data in (SFT's conversations, GRPO's user problems): a seeded shuffle
    per epoch, read on from a cursor (items served), so a resumed run draws the very same batches. A batch may span
    two epochs. `salt` tells the stages' orders apart."""

    def __init__(self, n: int, seed: int, salt: str):
        self.n, self.seed, self.salt, self.cursor = n, seed, salt, 0
        self._epoch, self._perm = -1, []

    @property
    def epoch(self) -> int:
        """The epoch the next item is of (0 first)."""
        return self.cursor // self.n

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            random.Random(f"{self.salt}/{self.seed}/{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm

    def next(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, position = divmod(self.cursor, self.n)
            out.append(self.permutation(epoch)[position])
            self.cursor += 1
        return out


@dataclass
class LossTerms:
    """One micro-batch's part of the step, as a stage computes it."""

    loss: torch.Tensor  # this micro-batch's share of the step's loss: what to backpropagate
    stats: dict[str, float]  # its shares of the step's logged values (they add up over micro-batches and ranks)
    expert_counts: torch.Tensor | None = None  # (MoE layers, experts) tokens routed, for the bias update


@dataclass
class StepBatch:
    """What a stage hands the step: this rank's micro-batches and what the log needs to know of them."""

    micro_batches: list[Any]  # whatever the stage's loss() takes; none: the step makes no update
    tokens: int  # tokens the step trains on (all data-parallel ranks), for tokens/s
    record: dict[str, Any] = field(default_factory=dict)  # the stage's own values for the log
    updates: int = 1  # optimizer updates over the same micro-batches (GRPO's mu)


class Stage(Protocol):
    """What a training stage supplies to the shared step (nanoseek/train/pretrain.py and grpo.py are two)."""

    name: str  # "pretrain", "grpo", ...: saved in run.json, so a resume in another stage's directory is refused
    flops_per_token: float | None  # model FLOPs per trained token, for MFU on GPUs; None: not reported

    def settings(self) -> dict[str, Any]:
        """The stage's own configuration, saved with the run."""
        ...

    def next_batch(self, trainer: Trainer) -> StepBatch:
        """This step's batch (generated or read), cut into this rank's micro-batches."""
        ...

    def loss(self, model: DeepSeekV3, micro_batch: Any) -> LossTerms: ...

    def evaluate(self, trainer: Trainer) -> dict[str, Any] | None:
        """A periodic held-out measurement for the log, or None."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The data position, restored exactly on resume."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """The options every stage shares (a stage's batches and losses have their own config)."""

    out_dir: str = "runs/pretrain"  # the run's directory: run.json, checkpoints, metrics, plots, tensorboard
    max_steps: int = 1600  # optimizer steps (pretraining's default: 9-11 minutes on a 2-core CPU)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio (V3: 2.2e-4 -> 2.2e-5)
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps
    decay_start: float = 0.5  # fraction of max_steps at constant lr before the cosine decay starts (1: never)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay on matrices (not on norms and biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this
    bias_update_speed: float | None = None  # aux-loss-free balancing gamma; None: the model config's; 0: off
    aux_alpha: float | None = None  # sequence-wise balance loss alpha; None: the model config's; 0: off
    # Activations recomputed in the backward: "none", "selective" (RMSNorm + MLA up-projections, as V3) or "full"
    # (every block).
    recompute: Literal["none", "selective", "full"] = "none"
    # "auto" (bf16 autocast on CUDA, fp32 on the CPU), "bf16", "fp32", or "fp8": DeepSeek-V3's FP8 GEMMs
    # (nanoseek/model/fp8.py), everything else as "auto".
    precision: Literal["auto", "bf16", "fp32", "fp8"] = "auto"
    ema_decay: float = 0.0  # > 0 keeps an exponential moving average of the weights on the CPU, saved as each
                            # checkpoint's ema/: then the run's model (what --model RUN_DIR reads); 0: none
    eval_every: int = 100  # steps between held-out evaluations (0: none)
    save_every: int = 100  # steps between checkpoints (0: only at the end or on a signal)
    keep_last: int = 2  # checkpoints kept (older ones are deleted)
    log_every: int = 1  # steps between metrics records
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 0  # the seed of the model's initialisation, the data order and the sampling
    device: str = "auto"  # "auto" (CUDA when there is one), "cpu", "cuda", "cuda:1", ...
    tensorboard: bool = True  # also write TensorBoard logs (out_dir/tensorboard)

    def __post_init__(self) -> None:
        need = partial(require, self, kind="training option")

        need(self.recompute in ("none", "selective", "full"), "recompute", "must be 'none', 'selective' or 'full'")
        need(self.precision in ("auto", "bf16", "fp32", "fp8"), "precision", "must be 'auto', 'bf16', 'fp32' or 'fp8'")
        need(self.max_steps > 0, "max_steps", "must be > 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(0 <= self.decay_start <= 1, "decay_start", "is a fraction of the run, in [0, 1]")
        need(self.grad_clip > 0, "grad_clip", "must be > 0")
        for name in ("eval_every", "save_every", "keep_last"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.log_every > 0, "log_every", "must be > 0")
        need(self.max_bad_steps > 0, "max_bad_steps", "must be > 0")


# Settings a resumed run may change; every other one is the run's own, read from its run.json.
RESUMABLE_CHANGES = ("out_dir", "max_steps", "eval_every", "save_every", "keep_last", "log_every", "device",
                     "tensorboard")


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    """--resume for a stage's command; the parser is kept on the parsed arguments for resume_arguments."""
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir with its own saved settings (options given now may "
                             "change only " + ", ".join(RESUMABLE_CHANGES) + ")")
    parser.set_defaults(parser=parser)


def resume_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """A stage run function's keyword arguments for a resume: the run's saved settings, changed only by the options
    typed on the command line (args.argv)."""
    return {"resume": True, "changes": given_options(args.parser, args, args.argv)}


def load_start_model(source: str, seq_len: int, tokens: tuple[str, ...], error: type[Exception],
                     template: str = "deepseek") -> tuple[Path, Tokenizer, DeepSeekV3]:
    """The model a fine-tuning stage starts from -> its checkpoint directory, tokenizer and model. source: a
    checkpoint directory, or a run's directory (its latest checkpoint). template: the chat format the stage trains
    in, a `--template` choice (data/chat.chat_template_for); when that is DeepSeek's, the tokenizer must have
    `tokens`, DeepSeek's chat tags (else they would be encoded as text); a checkpoint's own template needs none. The
    model's context must hold seq_len tokens; `error` is the stage's error type."""
    path = resolve_checkpoint(source)
    if not path.is_dir():
        raise error(f"no model at {path}: pass --model a checkpoint directory or a training run's directory "
                    "(`nanoseek pretrain` writes runs/pretrain, `nanoseek sft` runs/sft)")
    tokenizer = Tokenizer.load(path)
    try:
        own = chat_template_for(tokenizer, template)
    except ChatDataError as e:
        raise error(f"{path}: {e}") from None
    missing = []
    for token in tokens if own is None else ():
        try:
            tokenizer.token_id(token)
        except TokenizerError:
            missing.append(token)
    if missing:
        own_template = tokenizer.chat_template
        raise error(f"{path}: its tokenizer has no {', '.join(map(repr, missing))} token, which DeepSeek's chat "
                    "format needs (its tags would be encoded as text)" + (
                        f"; it has a chat template of its own ({own_template.origin}), which `nanoseek sft "
                        "--template auto` trains in" if own_template else ""))
    model = load_pretrained(path)
    if seq_len > model.config.max_position_embeddings:
        raise error(f"seq_len {seq_len} is longer than the model's context "
                    f"({model.config.max_position_embeddings} tokens)")
    return path, tokenizer, model


def steps_for_epochs(epochs: float, items: int, batch_size: int, train: TrainConfig, default_steps: int,
                     error: type[Exception]) -> TrainConfig:
    """train with max_steps set by `epochs` passes over `items` in batches of batch_size (epochs 0: unchanged);
    max_steps given too (not default_steps) is an error."""
    if not epochs:
        return train
    if train.max_steps != default_steps:
        raise error(f"pass --epochs ({epochs}) or --max-steps ({train.max_steps}), not both: epochs set the number "
                    "of steps")
    return replace(train, max_steps=max(1, math.ceil(epochs * items / batch_size)))


def add_stage_options(parser: argparse.ArgumentParser, stage_config: type, defaults: TrainConfig | None = None,
                      skip: tuple[str, ...] = ()) -> None:
    """A stage command's options: --resume, the stage's own config's, and the shared TrainConfig's with the stage's
    defaults (but those in skip, which the stage has no use for)."""
    add_resume_option(parser)
    add_dataclass_options(parser, stage_config)
    add_dataclass_options(parser, TrainConfig, skip=skip, defaults=defaults)


def stage_arguments(args: argparse.Namespace, stage_config: type, name: str) -> dict[str, Any]:
    """A stage run function's keyword arguments from its parsed options: `name` (its config) and train, or a
    resume's (resume_arguments)."""
    if args.resume:
        return resume_arguments(args)
    return {name: from_args(stage_config, args), "train": from_args(TrainConfig, args)}


def saved_settings(out_dir: str | Path, stage: str) -> dict[str, Any]:
    """The settings of the run in out_dir (its run.json), checked to be a `stage` run with a checkpoint."""
    out = Path(out_dir)
    run_file = out / "run.json"
    if not (out / "checkpoints" / "latest").exists():
        raise TrainingError(f"nothing to resume: {out} has no checkpoint")
    if not run_file.is_file():
        raise TrainingError(f"{out} has checkpoints but no run.json (the settings of its run), so it cannot be "
                            "resumed with its own settings; start a new run with --out-dir")
    try:
        saved = json.loads(run_file.read_text())
    except json.JSONDecodeError as e:
        raise TrainingError(f"{run_file} is not valid JSON ({e}); it holds the run's settings, so the run cannot "
                            "be resumed with them") from None
    if not isinstance(saved, dict) or saved.get("stage") is None:
        raise TrainingError(f"{run_file} names no stage; it is not a nanoseek run's settings file")
    if saved.get("stage") != stage:
        raise TrainingError(f"{out} holds a `{saved.get('stage')}` run, not a `{stage}` run; resume it with: "
                            f"nanoseek {saved.get('stage')} --resume --out-dir {out}")
    return saved


def run_settings(stage: str, config_type: type, config: Any, train: TrainConfig | None, resume: bool,
                 changes: dict[str, Any] | None = None, defaults: TrainConfig | None = None
                 ) -> tuple[Any, TrainConfig]:
    """The settings a stage runs with; `defaults` are the stage's shared options when train is None (TrainConfig's
    own if None: pretraining's).

    A new run: config and train (their defaults where None); the run directory must not hold a run already.
    A resume: the run's own saved settings (run.json). `changes` (option name -> value, e.g. what a user typed on
    the command line) and the fields of config/train that differ from the saved ones and from their defaults
    may alter only RESUMABLE_CHANGES; any other difference is refused, naming it.
    """
    changes = dict(changes or {})
    defaults = defaults or TrainConfig()
    out = Path(changes.get("out_dir") or (train or defaults).out_dir)
    if not resume:
        latest = out / "checkpoints" / "latest"
        if latest.exists():
            raise TrainingError(f"{out} already holds a run (at {latest.read_text().strip()}); pass --resume to "
                                "continue it, or --out-dir for a new run")
        return config or config_type(), train or defaults
    saved = saved_settings(out, stage)
    try:
        saved_config = config_type(**saved[stage])
        saved_train = TrainConfig(**{**saved["train"], "out_dir": str(out)})
    except (KeyError, TypeError) as e:  # a section or field missing, or one this version does not know
        raise TrainingError(f"{out}/run.json does not hold the settings this version of nanoseek reads ({e}); "
                            "start a new run with --out-dir") from None
    given: dict[str, Any] = {}
    for config_given, config_saved in ((config, saved_config), (train, saved_train)):
        if config_given is not None:
            default, mine, theirs = _flat(type(config_given)()), _flat(config_given), _flat(config_saved)
            given.update({k: v for k, v in mine.items() if v != theirs[k] and v != default[k]})
    given.update(changes)
    saved_values = {**_flat(saved_config), **_flat(saved_train)}
    refused = sorted(k for k, v in given.items() if k in saved_values and v != saved_values[k]
                     and k not in RESUMABLE_CHANGES)
    if refused:
        raise TrainingError(f"a resumed run keeps its own settings (saved in {out}/run.json); these differ: " +
                            ", ".join(f"{k} = {given[k]!r} (saved: {saved_values[k]!r})" for k in refused) +
                            f". On resume only {', '.join(RESUMABLE_CHANGES)} may change")
    return saved_config, replace(saved_train, **{k: v for k, v in given.items() if k in RESUMABLE_CHANGES})


def _flat(config: Any) -> dict[str, Any]:
    """A config dataclass's fields by name, those of nested config dataclasses included (lists as tuples)."""
    values: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            values.update(_flat(value))
        else:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


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
    dp_rank, dp_size = 0, 1  # this process's place among the data-parallel ranks (a stage takes its share)

    def __init__(self, model: DeepSeekV3, stage: Stage, cfg: TrainConfig, model_files: dict[str, Path] | None = None):
        """model_files: files (a tokenizer, say) copied into every checkpoint's model directory so that it is
        self-contained."""
        self.cfg, self.stage = cfg, stage
        self.model_files = model_files or {}
        self.out_dir = Path(cfg.out_dir)
        self.device = pick_device(cfg.device)
        # The EMA of the weights is a float32 copy of the model on the CPU (copied before the model moves to the
        # device, so that a GPU never holds both), saved as ema/ beside model/ in each checkpoint: the run's model.
        self.ema_model = (copy.deepcopy(model).to("cpu", torch.float32).eval().requires_grad_(False)
                          if cfg.ema_decay > 0 else None)
        self.model = model.to(self.device)
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
        self.ema = self.ema_model.state_dict() if self.ema_model is not None else None  # views of its tensors
        self.bias_speed = (model.config.bias_update_speed if cfg.bias_update_speed is None
                           else cfg.bias_update_speed)
        self.aux_alpha = model.config.aux_loss_alpha if cfg.aux_alpha is None else cfg.aux_alpha
        self.peak = peak_flops(self.device)
        apply_recomputation(self.model, cfg.recompute)

    def autocast_context(self):
        """bf16 autocast on CUDA (and where asked), else a no-op context."""
        return self.autocast or torch.autocast("cpu", enabled=False)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        batch = self.stage.next_batch(self)
        prepared = time.perf_counter()
        totals: dict[str, float] = {}
        counts, grad_norm, finite = None, None, True
        for _ in range(batch.updates if batch.micro_batches else 0):
            self.model.train()
            totals, counts = self.reduce_step(*self.forward_backward(batch))
            grad_norm = self.clip_gradients()
            update_finite = math.isfinite(totals.get("loss", 0.0)) and math.isfinite(grad_norm)
            finite = finite and update_finite
            if update_finite:  # else the optimizer skips it: the guard against a non-finite loss or gradient
                self.optimizer.step()
                if counts is not None and self.bias_speed > 0:
                    self.update_router_biases(counts)
                self._update_ema()
            self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step += 1
        self.tokens += batch.tokens
        record = {"kind": "train", "step": self.step, "tokens": self.tokens, "lr": lr, **batch.record, **totals,
                  "grad_norm": grad_norm, "skipped": not finite, "update_time": elapsed - (prepared - start),
                  "step_time": elapsed, "tokens_per_s": batch.tokens / elapsed}
        if self.peak and self.stage.flops_per_token:
            record["mfu"] = record["tokens_per_s"] * self.stage.flops_per_token / self.peak
        if counts is not None:
            record["max_violation"] = max_violation(self.load_per_layer(counts))
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingError(f"the loss or gradient was non-finite for {self.bad_steps} consecutive steps "
                                f"(up to step {self.step}); the optimizer skipped them and the run stops here. "
                                f"Lower the learning rate (now {lr:.2e}) or check the data.")
        return record

    def forward_backward(self, batch: StepBatch) -> tuple[dict[str, float], Any]:
        """Forward and backward of every micro-batch, gradients accumulating -> this rank's summed stats and
        tokens per expert."""
        totals: dict[str, float] = {}
        counts = None
        for i, micro_batch in enumerate(batch.micro_batches):
            with self.autocast_context():
                terms = self.stage.loss(self.model, micro_batch)
            self.backward(terms.loss, last=i == len(batch.micro_batches) - 1)
            for key, value in terms.stats.items():
                totals[key] = totals.get(key, 0.0) + value
            if terms.expert_counts is not None:
                counts = terms.expert_counts if counts is None else counts + terms.expert_counts
        return totals, counts

    def update_router_biases(self, counts: Any) -> None:
        """Auxiliary-loss-free balancing, once per step, from the step's tokens per expert."""
        self.model.update_router_biases(counts, self.bias_speed)

    def load_per_layer(self, counts: Any) -> torch.Tensor:
        """(MoE layers, experts) tokens per expert, from what forward_backward returned."""
        return counts

    # ------------------------------------------------------------------ what a parallel trainer overrides
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's weighted loss; `last`: the step's final micro-batch."""
        loss.backward()

    def reduce_step(self, totals: dict[str, float], counts: Any) -> tuple[dict[str, float], Any]:
        """Sum the step's stats and tokens per expert over data-parallel ranks (nothing to do on one)."""
        return totals, counts

    def clip_gradients(self) -> float:
        """Clip to cfg.grad_clip by the global norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))

    def all_gather(self, value: Any) -> list[Any]:
        """Every data-parallel rank's `value`, in rank order (a stage's per-rank results for the log)."""
        return [value]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the data-parallel ranks."""
        return values

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        for key, value in self.model.state_dict().items():
            self.ema[key].mul_(d).add_(value.detach().to("cpu", torch.float32), alpha=1 - d)

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

    def save_models(self, directory: Path) -> None:
        """directory/model (the weights) and, with an EMA, directory/ema: Hugging Face directories with the model
        files (a tokenizer), each loadable on its own."""
        for model, name in ((self.model, "model"), (self.ema_model, "ema")):
            if model is not None:
                save_pretrained(model, directory / name)
                for file, source in self.model_files.items():
                    shutil.copyfile(source, directory / name / file)

    def restore_ema(self, checkpoint: Path, saved: dict[str, torch.Tensor] | None = None) -> None:
        """The EMA from the checkpoint's ema/ (float32 safetensors: exact), or from `saved`, the EMA a checkpoint
        written before ema/ existed kept in its trainer.pt; nothing to do without an EMA."""
        if self.ema_model is None:
            return
        if (checkpoint / "ema").is_dir():
            saved = load_pretrained(checkpoint / "ema").state_dict()
        if saved is None:
            raise TrainingError(f"{checkpoint} holds no EMA (no ema/), but the run keeps one (--ema-decay "
                                f"{self.cfg.ema_decay})")
        self.ema_model.load_state_dict(saved)

    def _write_checkpoint(self, directory: Path) -> None:
        self.save_models(directory)
        state = {
            "step": self.step, "tokens": self.tokens, "optimizer": self.optimizer.state_dict(),
            "data": self.stage.state_dict(), "train_config": asdict(self.cfg),
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
        self.stage.load_state_dict(state["data"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.restore_ema(path, state.get("ema"))
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

    def _write_settings(self) -> None:
        """run.json: the stage and all of the run's settings, which a resume reads back."""
        settings = {"stage": self.stage.name, "train": asdict(self.cfg), self.stage.name: self.stage.settings()}
        write_text(self.out_dir / "run.json", json.dumps(settings, indent=2) + "\n")

    def fit(self, progress: bool = True, resume: bool = False) -> dict[str, Any]:
        """Train to max_steps, after resume() when resume is set. SIGINT/SIGTERM finish the current step, save, and
        return (stopped=signal). -> step, tokens, stopped, the last held-out evaluation and the minutes this call
        took (its training, with the resume, without what came before)."""
        from tqdm import tqdm

        started = time.perf_counter()
        if resume:
            self.resume()
        cfg = self.cfg
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_settings()
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
                postfix = {"loss": f"{record.get('loss', float('nan')):.3f}",
                           "tok/s": f"{record['tokens_per_s']:,.0f}"}
                if "reward" in record:
                    postfix["reward"] = f"{record['reward']:.3f}"
                if "mfu" in record:
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(postfix)
                bar.update(1)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    last_eval = self.stage.evaluate(self)
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
        return {"step": self.step, "tokens": self.tokens, "stopped": self.stop_signal, "heldout": last_eval,
                "minutes": (time.perf_counter() - started) / 60}
