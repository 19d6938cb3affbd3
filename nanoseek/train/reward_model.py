"""`nanoseek rm`: a reward model on preference pairs (DeepSeek-R1's helpfulness reward model), as a stage of the
shared training step.

The reward model is the DeepSeek-V3 model of a checkpoint with a scalar head, a Linear(hidden, 1) on the final-norm
hidden state of the last token of prompt + response rendered with the chat template, `...<｜User｜>{prompt}
<｜Assistant｜>{response}<｜end▁of▁sentence｜>`: the reward is read at the end of sentence. As DeepSeek-R1's
helpfulness reward model it judges only a response's final summary, the text after `</think>`
(data/preferences.final_summary). The hidden state comes from the model's own pieces (embed_tokens, run_layers,
norm), so the output head and the MTP modules never run and the model code is unchanged.

Training: the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), the mean over a step's pairs, on the shared
Trainer; RewardModelTrainer only adds the head to what it optimizes, clips, saves and resumes. Batching as SFT's:
each response right-padded to a row of its own (attention is causal: its last real token never sees the padding),
a step's pairs sorted by length and cut into micro-batches of at most micro_batch_tokens padded tokens, a pair's
two responses in the same one. Held out: the pairwise accuracy (the share of pairs whose chosen response gets the
higher reward), per kind of rejected response for the built-in pairs.

A checkpoint directory (checkpoints/step_N) holds the head, reward_head.safetensors, next to the model files in its
model/ (config.json, model.safetensors, tokenizer.json: still a plain DeepSeek-V3 checkpoint, as the checkpoint
reader takes every safetensors file of that directory for the model's) and trainer.pt. load_reward_model reads
them back as a RewardModel, whose score(prompts, responses) GRPO's rewards.reward_model_reward calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint, tokenizer_files
from nanoseek.config import ModelConfig, require
from nanoseek.data.chat import encode_conversations
from nanoseek.data.preferences import (REJECTED_KINDS, PreferencePair, as_messages, builtin_pairs, final_summary,
                                       read_pairs)
from nanoseek.data.tokenizer import ASSISTANT, USER, Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.model import DeepSeekV3
from nanoseek.model.losses import bradley_terry_loss
from nanoseek.model.params import flops_per_token
from nanoseek.train.loop import (EpochOrder, LossTerms, StepBatch, TrainConfig, Trainer, TrainingError,
                                 add_stage_options, length_buckets, load_start_model, padding_id, run_settings,
                                 stage_arguments, steps_for_epochs)
from nanoseek.train.metrics import _moving_average, read_metrics

HEAD_FILE = "reward_head.safetensors"


class RMError(NanoseekError, ValueError):
    pass


@dataclass
class RMConfig:
    """The reward-model stage's own options: the model it starts from, its preference pairs and batches."""

    model: str = "runs/pretrain"  # the model to start from: a checkpoint directory, or a run directory (its latest)
    data: tuple[str, ...] = ()  # preference JSONL files or directories of them ({"prompt", "chosen", "rejected"}
                                # per line, responses as text or chat messages; none: the built-in pairs of the
                                # built-in instructions)
    heldout_data: tuple[str, ...] = ()  # preference JSONL files for the held-out accuracy (none: hold out
                                        # heldout_fraction)
    heldout_fraction: float = 0.1  # share of the pairs held out of training for the held-out accuracy
    builtin_pairs: int = 2000  # built-in pairs to train on when no data is given
    seq_len: int = 256  # tokens per prompt + response at most; pairs with a longer one are skipped and counted
    batch_size: int = 16  # pairs per optimizer step
    micro_batch_tokens: int = 1024  # padded tokens per forward/backward (a pair's two responses in the same one;
                                    # a step's pairs sorted by length; larger on a GPU)
    epochs: float = 0.0  # passes over the training pairs: > 0 sets max_steps (0: max_steps decides)

    def __post_init__(self) -> None:
        self.data, self.heldout_data = tuple(self.data), tuple(self.heldout_data)
        _need(self, 0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)")
        for name in ("builtin_pairs", "seq_len", "batch_size", "micro_batch_tokens"):
            _need(self, getattr(self, name) > 0, name, "must be > 0")
        _need(self, self.epochs >= 0, "epochs", "must be >= 0")


def _need(config: Any, ok: bool, name: str, why: str) -> None:
    require(config, ok, name, why, kind="reward-model option")


# ---------------------------------------------------------------------- the reward of a sequence
def new_head(hidden_size: int, seed: int) -> nn.Linear:
    """The scalar head, from the seed: weights N(0, 1 / (hidden + 1)) as OpenAI's reward models, a zero bias."""
    head = nn.Linear(hidden_size, 1)
    with torch.no_grad():
        head.weight.normal_(0.0, 1 / math.sqrt(hidden_size + 1), generator=torch.Generator().manual_seed(seed))
        head.bias.zero_()
    return head


def sequence_rewards(model: DeepSeekV3, head: nn.Linear, input_ids: torch.Tensor, lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids (R, S) right-padded, lengths (R,) their real tokens -> each row's reward (R,), in float32: the
    head on the final-norm hidden state of its last real token; and the MoE layers' tokens per expert (MoE layers,
    E) for the balancing biases (None for a dense model)."""
    cos, sin = model.rope(input_ids.shape[1])
    x, routed = model.run_layers(model.embed_tokens(input_ids), cos, sin)  # (R, S, H)
    last = x[torch.arange(len(x), device=x.device), lengths - 1]  # (R, H); RMSNorm is per token, so norm it alone
    rewards = head(model.norm(last).to(head.weight.dtype)).squeeze(-1).float()  # (R,)
    counts = torch.stack([r.counts for r in routed.values()]) if routed else None
    return rewards, counts


def pad_rows(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ids (R, longest) right-padded with pad_id, and each row's length (R,)."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(row) for row in rows])


@torch.no_grad()
def score_rows(model: DeepSeekV3, head: nn.Linear, rows: Sequence[list[int]], max_tokens: int, pad_id: int,
               device: torch.device | str = "cpu", autocast: Callable | None = None) -> torch.Tensor:
    """The reward of each token row (R,) on the CPU, in eval mode (the modes are restored), rows sorted by length
    into micro-batches of at most max_tokens padded tokens."""
    modes = model.training, head.training
    model.eval()
    head.eval()
    out = torch.empty(len(rows))
    try:
        for bucket in length_buckets([len(row) for row in rows], max_tokens):
            ids, lengths = pad_rows([rows[i] for i in bucket], pad_id)
            with autocast() if autocast else nullcontext():
                rewards, _ = sequence_rewards(model, head, ids.to(device), lengths.to(device))
            out[bucket] = rewards.cpu()
    finally:
        model.train(modes[0])
        head.train(modes[1])
    return out


def encode(tokenizer: Tokenizer, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> list[list[int]]:
    """Each (prompt, response) -> the ids the reward model reads: the chat rendering of the prompt's turns (a string
    is a user turn) and an assistant turn holding the response's final summary, ending with the end of sentence."""
    conversations = [[*as_messages(prompt), {"role": "assistant", "content": final_summary(response)}]
                     for prompt, response in zip(prompts, responses, strict=True)]
    return [ids for ids, _ in encode_conversations(tokenizer, conversations)]


# ---------------------------------------------------------------------- a trained reward model
def save_head(head: nn.Linear, checkpoint: Path) -> None:
    """The head's weight (1, H) and bias (1,) as checkpoint/reward_head.safetensors."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()},
              str(checkpoint / HEAD_FILE), metadata={"format": "pt"})


class RewardModel:
    """A trained reward model: the model, its head and its tokenizer (load_reward_model)."""

    def __init__(self, model: DeepSeekV3, head: nn.Linear, tokenizer: Tokenizer, max_tokens: int = 4096):
        self.model, self.head, self.tokenizer, self.max_tokens = model, head, tokenizer, max_tokens
        self.pad_id = padding_id(tokenizer)

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> list[float]:
        """The reward of each response to its prompt (a string, or chat messages), judged on its final summary
        (the text after `</think>`); in eval mode, without gradients, in micro-batches of max_tokens padded tokens.
        The reward is read at the last token, so an input longer than the model's context loses its start."""
        if not prompts:
            return []
        limit = self.model.config.max_position_embeddings
        rows = [ids[-limit:] for ids in encode(self.tokenizer, prompts, responses)]
        device = self.head.weight.device
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
        return score_rows(self.model, self.head, rows, self.max_tokens, self.pad_id, device, autocast).tolist()


def load_reward_model(path: str | Path, device: str | torch.device | None = None) -> RewardModel:
    """The reward model of a `nanoseek rm` run directory (its latest checkpoint), of a checkpoint directory
    (checkpoints/step_N), or of its model/ directory, in eval mode."""
    directory = resolve_checkpoint(path)
    if (directory / "model").is_dir():  # a checkpoint directory
        directory = directory / "model"
    head_file = directory.parent / HEAD_FILE
    if not head_file.is_file():
        raise RMError(f"{path} is not a reward model: no {head_file}; train one with `nanoseek rm` and pass its run "
                      "directory or one of its checkpoints")
    model = load_pretrained(directory, device=device)
    state = load_file(str(head_file))
    head = nn.Linear(model.config.hidden_size, 1)
    if tuple(state.get("weight", torch.empty(0)).shape) != tuple(head.weight.shape):
        raise RMError(f"{head_file} does not fit the model: expected a (1, {model.config.hidden_size}) weight and a "
                      f"bias, found {', '.join(f'{k} {tuple(v.shape)}' for k, v in state.items())}")
    head.load_state_dict(state)
    return RewardModel(model.eval(), head.to(model.norm.weight.device).eval(), Tokenizer.load(directory))


# ---------------------------------------------------------------------- the stage
class EncodedPair(NamedTuple):
    """A pair's two token rows (encode), the kind of its rejected response, and where it came from."""

    chosen: list[int]
    rejected: list[int]
    kind: str | None
    source: str


class RMBatch(NamedTuple):
    input_ids: torch.Tensor  # (2P, S): the P pairs' chosen responses, then their rejected ones
    lengths: torch.Tensor  # (2P,) real tokens per row
    share: float  # its pairs / the step's


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs -> (2P, longest) ids and (2P,) lengths: the chosen rows, then the rejected ones."""
    return pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def fingerprint(pairs: list[EncodedPair]) -> str:
    """A digest of the training pairs' tokens: a resume checks that its data is the run's."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.chosen, pair.rejected]).encode())
    return digest.hexdigest()[:16]


class RMStage:
    """The reward model's part of the shared step: this step's pairs as padded, length-sorted micro-batches, and the
    Bradley-Terry loss of their rewards. The stage owns the head; RewardModelTrainer trains it with the model."""

    name = "rm"

    def __init__(self, train: list[EncodedPair], heldout: list[EncodedPair], cfg: RMConfig,
                 model_config: ModelConfig, pad_id: int, seed: int = 0):
        if not train:
            raise RMError("no training pairs")
        self.train_pairs, self.heldout_pairs, self.cfg, self.pad_id = train, heldout, cfg, pad_id
        self.head = new_head(model_config.hidden_size, seed)
        self.order = EpochOrder(len(train), seed, "rm")
        self.fingerprint = fingerprint(train)
        mean_len = sum(len(p.chosen) + len(p.rejected) for p in train) / (2 * len(train))
        self.flops_per_token = flops_per_token(model_config, max(1, round(mean_len)))

    def settings(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def next_batch(self, trainer: Trainer) -> StepBatch:
        if trainer.dp_size != 1:
            raise TrainingError("nanoseek rm runs in one process (its batches have no data-parallel split yet)")
        cfg = self.cfg
        pairs = [self.train_pairs[i] for i in self.order.next(cfg.batch_size)]
        # A micro-batch of k pairs padded to L tokens is 2 k L tokens.
        longest = [max(len(p.chosen), len(p.rejected)) for p in pairs]
        buckets = length_buckets(longest, max(1, cfg.micro_batch_tokens // 2))
        micro = []
        for bucket in buckets:
            ids, lengths = pair_batch([pairs[i] for i in bucket], self.pad_id)
            micro.append(RMBatch(ids.to(trainer.device), lengths.to(trainer.device), len(bucket) / len(pairs)))
        real = sum(len(p.chosen) + len(p.rejected) for p in pairs)
        padded = sum(b.input_ids.numel() for b in micro)
        # lm_loss: none; Trainer.fit's plot_run draws it (the report redraws loss.png with the pairwise loss).
        record = {"pairs": len(pairs), "pad_fraction": 1 - real / padded, "micro_batches": len(micro),
                  "epoch": self.order.cursor / self.order.n, "lm_loss": None}
        return StepBatch(micro, real, record)

    def loss(self, model: DeepSeekV3, batch: RMBatch) -> LossTerms:
        """The micro-batch's mean Bradley-Terry loss weighted by its share of the step's pairs (the shares sum to
        the step's mean, whatever the split); also the share of its pairs ranked right. No sequence-wise balance
        loss (as SFT's); the bias balancing, from the expert counts, stays."""
        rewards, counts = sequence_rewards(model, self.head, batch.input_ids, batch.lengths)
        chosen, rejected = rewards.view(2, -1)  # (P,) each
        loss = bradley_terry_loss(chosen, rejected)
        stats = {"loss": float(loss.detach()) * batch.share,
                 "accuracy": float((chosen > rejected).float().mean()) * batch.share,
                 "margin": float((chosen - rejected).mean().detach()) * batch.share}
        return LossTerms(loss * batch.share, stats, counts)

    def evaluate(self, trainer: Trainer) -> dict[str, Any] | None:
        """The held-out pairwise accuracy (per kind of rejected response where the pairs have kinds) and loss."""
        if not self.heldout_pairs:
            return None
        metrics = heldout_metrics(trainer.model, self.head, self.heldout_pairs, self.cfg, self.pad_id,
                                  trainer.device, trainer.autocast_context)
        per_kind = {f"accuracy_{kind}": value for kind, value in metrics.pop("per_kind").items()}
        return {"kind": "heldout", "step": trainer.step, "tokens": trainer.tokens, **metrics, **per_kind}

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.order.cursor, "pairs": self.order.n, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"the training pairs differ from the run's ({state.get('pairs')} then, "
                                f"{self.order.n} now, or their text or tokenizer changed); a resume needs the same "
                                "data to continue with the same batches")
        self.order.cursor = state["cursor"]


def heldout_metrics(model: DeepSeekV3, head: nn.Linear, pairs: list[EncodedPair], cfg: RMConfig, pad_id: int,
                    device: torch.device | str = "cpu", autocast: Callable | None = None) -> dict[str, Any]:
    """Over the pairs, in eval mode: the pairwise accuracy (chosen reward strictly higher), its value per kind of
    rejected response (REJECTED_KINDS order; none for a user's pairs), the Bradley-Terry loss, the mean margin."""
    rewards = score_rows(model, head, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                         cfg.micro_batch_tokens, pad_id, device, autocast)
    chosen, rejected = rewards.view(2, -1)
    right = (chosen > rejected).float()
    kinds = [p.kind for p in pairs]
    per_kind = {kind: float(right[[i for i, k in enumerate(kinds) if k == kind]].mean())
                for kind in REJECTED_KINDS if kind in kinds}
    return {"accuracy": float(right.mean()), "per_kind": per_kind, "loss": float(bradley_terry_loss(chosen, rejected)),
            "margin": float((chosen - rejected).mean())}


class RewardModelTrainer(Trainer):
    """The shared Trainer, with the stage's reward head trained alongside the model: in the optimizer (weight decay
    on its weight, as on every matrix) and the gradient clipping, saved as reward_head.safetensors in each
    checkpoint directory and loaded back on resume."""

    def __init__(self, model: DeepSeekV3, stage: RMStage, cfg: TrainConfig,
                 model_files: dict[str, Path] | None = None):
        super().__init__(model, stage, cfg, model_files=model_files)
        self.head = stage.head.to(self.device)
        self.optimizer.add_param_group({"params": [self.head.weight], "weight_decay": cfg.weight_decay})
        self.optimizer.add_param_group({"params": [self.head.bias], "weight_decay": 0.0})

    def clip_gradients(self) -> float:
        parameters = [*self.model.parameters(), *self.head.parameters()]
        return float(torch.nn.utils.clip_grad_norm_(parameters, self.cfg.grad_clip))

    def _write_checkpoint(self, directory: Path) -> None:
        super()._write_checkpoint(directory)
        save_head(self.head, directory)

    def resume(self) -> bool:
        if not super().resume():
            return False
        latest = self.checkpoint_dir / (self.checkpoint_dir / "latest").read_text().strip()
        self.head.load_state_dict(load_file(str(latest / HEAD_FILE)))
        return True


# ---------------------------------------------------------------------- the data of a run
@dataclass
class RMData:
    train: list[EncodedPair]
    heldout: list[EncodedPair]
    skipped: dict[str, dict[str, int]]  # "identical" responses, and "longer_than_seq_len": per split
    first_skipped: dict[str, str | None]  # where the first pair of each reason is
    builtin: bool


def encode_pairs(tokenizer: Tokenizer, pairs: list[PreferencePair], seq_len: int
                 ) -> tuple[list[EncodedPair], list[tuple[str, int]]]:
    """-> the encoded pairs whose responses both fit seq_len tokens, and (source, tokens) of the others."""
    responses = [response for p in pairs for response in (p.chosen, p.rejected)]
    rows = encode(tokenizer, [p.prompt for p in pairs for _ in range(2)], responses)
    kept, skipped = [], []
    for pair, chosen, rejected in zip(pairs, rows[::2], rows[1::2], strict=True):
        if max(len(chosen), len(rejected)) > seq_len:
            skipped.append((pair.source, max(len(chosen), len(rejected))))
        else:
            kept.append(EncodedPair(chosen, rejected, pair.kind, pair.source))
    return kept, skipped


def load_data(cfg: RMConfig, tokenizer: Tokenizer, seed: int) -> RMData:
    """The run's training and held-out pairs, encoded. Pairs whose responses are the same after `</think>` and
    pairs longer than seq_len are skipped and counted; a run none of whose pairs fit is an error."""
    builtin = not cfg.data
    identical: dict[str, list[str]] = {"train": [], "heldout": []}
    train, identical["train"] = (builtin_pairs(cfg.builtin_pairs, seed), []) if builtin else read_pairs(cfg.data)
    if cfg.heldout_data:
        heldout, identical["heldout"] = read_pairs(cfg.heldout_data)
    elif builtin:  # questions the training pairs never ask
        n_heldout = max(1, round(cfg.builtin_pairs * cfg.heldout_fraction)) if cfg.heldout_fraction else 0
        heldout = builtin_pairs(n_heldout, seed, split="heldout")
    else:  # a seeded share of the pairs, at least one when there are two or more
        n_heldout = min(len(train) - 1, max(1, round(len(train) * cfg.heldout_fraction))) \
            if cfg.heldout_fraction and len(train) > 1 else 0
        chosen = set(random.Random(f"rm-heldout/{seed}").sample(range(len(train)), n_heldout))
        heldout = [p for i, p in enumerate(train) if i in chosen]
        train = [p for i, p in enumerate(train) if i not in chosen]
    if not train:
        raise RMError(f"no training pairs: all {len(identical['train'])} pairs of {', '.join(cfg.data)} have the same "
                      "chosen and rejected response (after </think>)")
    train_rows, train_long = encode_pairs(tokenizer, train, cfg.seq_len)
    heldout_rows, heldout_long = encode_pairs(tokenizer, heldout, cfg.seq_len)
    if not train_rows:
        raise RMError(f"all {len(train)} training pairs are longer than seq_len={cfg.seq_len} tokens (the first: "
                      f"{train_long[0][0]}, {train_long[0][1]} tokens); raise --seq-len")
    long = train_long + heldout_long
    first_identical = (identical["train"] + identical["heldout"] or [None])[0]
    return RMData(train_rows, heldout_rows,
                  {"identical": {k: len(v) for k, v in identical.items()},
                   "longer_than_seq_len": {"train": len(train_long), "heldout": len(heldout_long)}},
                  {"identical": first_identical, "longer_than_seq_len": f"{long[0][0]} ({long[0][1]} tokens)"
                   if long else None}, builtin)


# ---------------------------------------------------------------------- the command
# The shared options with fine-tuning's defaults: a small constant learning rate after a short warmup.
RM_TRAIN_DEFAULTS = TrainConfig(out_dir="runs/rm", max_steps=200, lr=1e-4, warmup_steps=10, decay_start=1.0,
                                weight_decay=0.0, save_every=50, eval_every=50, keep_last=2)
# Shared options the reward model has no use for: its loss has no sequence-wise balance term, and the CPU EMA
# would average the model without its head.
RM_UNUSED_OPTIONS = ("aux_alpha", "ema_decay")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The reward model command's options (`nanoseek rm`)."""
    add_stage_options(parser, RMConfig, RM_TRAIN_DEFAULTS, RM_UNUSED_OPTIONS)


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """run_rm()'s keyword arguments from the parsed options."""
    return stage_arguments(args, RMConfig, "rm")


def rm_trainer(model: DeepSeekV3, tokenizer: Tokenizer, data: RMData, rm: RMConfig, train: TrainConfig,
               model_files: dict[str, Path] | None = None) -> RewardModelTrainer:
    """The shared Trainer (with the head) and the reward-model stage on `data`."""
    stage = RMStage(data.train, data.heldout, rm, model.config, padding_id(tokenizer), seed=train.seed)
    return RewardModelTrainer(model, stage, train, model_files=model_files)


def run_rm(rm: RMConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
           progress: bool = True, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`nanoseek rm`: train a reward model from rm.model (a checkpoint, or a run's latest one) on preference pairs.
    resume: continue the run in train.out_dir with its own saved settings (changes: see run_settings)."""
    rm, train = run_settings("rm", RMConfig, rm, train, resume, changes, defaults=RM_TRAIN_DEFAULTS)
    out = Path(train.out_dir)
    path, tokenizer, model = load_start_model(rm.model, rm.seq_len, (USER, ASSISTANT), RMError)
    data = load_data(rm, tokenizer, train.seed)
    for reason, what in (("identical", "whose chosen and rejected responses are the same after </think>"),
                         ("longer_than_seq_len", f"longer than seq_len={rm.seq_len} tokens")):
        counts = data.skipped[reason]
        if counts["train"] or counts["heldout"]:
            print(f"nanoseek: warning: skipped {counts['train']} training and {counts['heldout']} held-out pairs "
                  f"{what} (the first: {data.first_skipped[reason]})", file=sys.stderr)
    if not resume:
        train = steps_for_epochs(rm.epochs, len(data.train), rm.batch_size, train, RM_TRAIN_DEFAULTS.max_steps,
                                 RMError)
    trainer = rm_trainer(model, tokenizer, data, rm, train, model_files=tokenizer_files(path))
    result = trainer.fit(progress=progress, resume=resume)
    if result["stopped"] is not None:
        return result
    return write_report(out, path, trainer, tokenizer, data, rm, train, result["minutes"])


def write_report(out: Path, base: Path, trainer: RewardModelTrainer, tokenizer: Tokenizer, data: RMData,
                 rm: RMConfig, train: TrainConfig, minutes: float) -> dict[str, Any]:
    """report.json and report.md of a finished run: the held-out accuracy (per kind for the built-in pairs) of the
    base model with the untrained head and of the trained reward model, the data's counts, the plots."""
    pad_id = padding_id(tokenizer)
    heldout = None
    if data.heldout:
        before = load_pretrained(base).to(trainer.device)
        heldout = {"before": heldout_metrics(before, new_head(before.config.hidden_size, train.seed).to(trainer.device),
                                             data.heldout, rm, pad_id, trainer.device, trainer.autocast_context),
                   "after": heldout_metrics(trainer.model, trainer.head, data.heldout, rm, pad_id, trainer.device,
                                            trainer.autocast_context)}
    last = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"][-10:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    report = {"base_model": str(base), "steps": trainer.step, "seed": train.seed, "minutes_this_run": minutes,
              "data": "built-in instruction pairs" if data.builtin else list(rm.data),
              "pairs": {"train": len(data.train), "heldout": len(data.heldout), "skipped": data.skipped,
                        "first_skipped": data.first_skipped},
              "epochs": trainer.stage.order.cursor / len(data.train),
              "train_last_10_steps": {k: sum(r[k] for r in last) / max(1, len(last)) for k in ("loss", "accuracy")},
              "heldout": heldout, "checkpoint": str(out / "checkpoints" / latest)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_pairwise(out)
    (out / "report.md").write_text(_report_markdown(report))
    return report


def plot_pairwise(out: Path) -> None:
    """plots/loss.png (the train and held-out Bradley-Terry loss; plot_run's shows a next-token loss) and
    plots/accuracy.png (the held-out pairwise accuracy, overall and per kind; the train one, 10-step means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    heldout = [r for r in records if r.get("kind") == "heldout"]
    steps = [r["step"] for r in train]
    (out / "plots").mkdir(exist_ok=True)
    for key, title, ylabel in (("loss", "Bradley-Terry loss", "-log sigmoid(r_chosen - r_rejected)"),
                               ("accuracy", "pairwise accuracy", "share of pairs ranked right")):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, _moving_average([r[key] for r in train]), label="train, mean of 10 steps")
        for name in [key] + ([f"accuracy_{kind}" for kind in REJECTED_KINDS] if key == "accuracy" else []):
            if heldout and name in heldout[0]:
                ax.plot([r["step"] for r in heldout], [r[name] for r in heldout], "o-",
                        label="held-out" + (f" ({name.removeprefix('accuracy_')})" if name != key else ""))
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "plots" / f"{key}.png", dpi=110)
        plt.close(fig)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _report_markdown(r: dict[str, Any]) -> str:
    p, held = r["pairs"], r["heldout"]
    if held is None:
        accuracy = "No held-out pairs (--heldout-fraction 0), so no held-out accuracy.\n"
    else:
        rows = "".join(f"| {kind} | {_percent(held['before']['per_kind'][kind])} | {_percent(a)} |\n"
                       for kind, a in held["after"]["per_kind"].items())
        accuracy = ("Held-out pairwise accuracy (the share of pairs whose chosen response gets the higher reward; "
                    "before: the base model with the untrained head):\n\n| rejected response | before | after |\n"
                    f"|---|---|---|\n{rows}| all | {_percent(held['before']['accuracy'])} | "
                    f"{_percent(held['after']['accuracy'])} |\n\nHeld-out Bradley-Terry loss: "
                    f"{held['before']['loss']:.3f} before, {held['after']['loss']:.3f} after (log 2 = 0.693: no "
                    "preference).\n")
    identical, long = p["skipped"]["identical"], p["skipped"]["longer_than_seq_len"]
    data = r["data"] if isinstance(r["data"], str) else ", ".join(r["data"])
    return f"""# Reward model report

Trained `{r['base_model']}` with a reward head for {r['steps']} steps ({r['epochs']:.2f} epochs; seed {r['seed']}) on
{p['train']} pairs ({data}), {p['heldout']} held out; {r['minutes_this_run']:.1f} minutes in this run.
Reward model: `{r['checkpoint']}` (`load_reward_model`).

Skipped, not trained on: {identical['train']} training and {identical['heldout']} held-out pairs whose responses are
the same after `</think>`; {long['train']} training and {long['heldout']} held-out pairs longer than seq_len.

{accuracy}
![loss](plots/loss.png)
![accuracy](plots/accuracy.png)
![learning rate](plots/lr.png)
"""
