"""`nanoseek sft`: supervised fine-tuning on chat conversations (DeepSeek-R1's cold start), as a stage of the
shared training step.

Conversations (chat JSONL, or with no data the built-in cold-start conversations of nanoseek/data/chat.py) are
rendered with DeepSeek's chat template and trained with the next-token loss on the assistant's tokens only: its
reasoning, answer and end of sentence; never the system or user text nor the `<｜Assistant｜>` tag
(data/chat.encode_conversations builds the ids and the mask piece by piece). A start model with a chat template of
its own (a Hugging Face student's tokenizer_config.json or chat_template.jinja) is trained in that template instead,
the format it is prompted in (`--template`, default auto; data/chat.template_samples: the assistant's turns,
each with the template's end of turn, found by rendering prefixes; a template that shows earlier turns otherwise
than written, as R1-Distill's, gives each assistant turn a sample of its own, counted as a conversation). A step's
loss is the mean over all of its assistant tokens, however the step is cut into micro-batches.

Batching: each conversation is right-padded to a row of its own (attention is causal, so a row's tokens never see
the padding after them); a step's rows are sorted by length and cut into micro-batches of at most
`micro_batch_tokens` padded tokens, so rows of similar length share a micro-batch and little is padding.
Measured against packing conversations into full rows with a block-diagonal document mask (bench/sft_batching.py,
the `small` preset, 16 steps of 16 built-in conversations, forward + backward, median, one thread of a loaded
2-core CPU; bench/results/sft-batching-cpu.json):

    padded, micro-batches of 4096 / 2048 / 1024 / 512 tokens: 946 / 739 / 718 / 705 ms a step, 32 / 18 / 12 / 5%
        of the tokens padding;
    packed in rows of 512 / 1024 tokens with a document mask: 854 / 1045 ms a step, 16 / 11% padding.

SDPA (torch 2.13's CPU flash kernel takes the mask) still computes every block of a packed row, S^2 scores for a
row of S tokens of which each conversation's own (about 120 tokens here) are a small part, where a padded row
costs its own length squared; and a step's 16 conversations leave the last packed row part empty. So padding with
small length-sorted micro-batches is the simplest and the fastest here: hence the 512-token default (raise it on a
GPU, where larger GEMMs pay). The padding tokens still pass through the router, so the balancing biases count them
among the experts' loads (5% of the tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from nanoseek.checkpoint import load_pretrained, tokenizer_files
from nanoseek.config import ModelConfig, require
from nanoseek.data import tasks
from nanoseek.data.chat import (ChatDataError, Conversation, chat_template_for, cold_start_conversations,
                                 encode_conversations, read_conversations, template_samples)
from nanoseek.data.template import ChatTemplate, ChatTemplateError
from nanoseek.data.tokenizer import ASSISTANT, END_THINK, THINK, USER, Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import EvalConfig, evaluate, heldout_problems
from nanoseek.model import DeepSeekV3
from nanoseek.model.losses import IGNORE_INDEX
from nanoseek.model.params import flops_per_token
from nanoseek.train.loop import (EpochOrder, LossTerms, StepBatch, TrainConfig, Trainer, TrainingError,
                                 add_stage_options, length_buckets, load_start_model, padding_id, run_settings,
                                 stage_arguments, steps_for_epochs)
from nanoseek.train.metrics import plot_run, read_metrics


class SFTError(NanoseekError, ValueError):
    pass


@dataclass
class SFTConfig:
    """The SFT stage's own options: the model it starts from, its conversations, batches and loss."""

    model: str = "runs/pretrain"  # the model to fine-tune: a checkpoint directory, or a run directory (its latest)
    data: tuple[str, ...] = ()  # chat JSONL files or directories of them ({"messages": [...]} per line; none:
                                # the built-in cold-start conversations of the built-in tasks)
    heldout_data: tuple[str, ...] = ()  # chat JSONL files for the held-out loss (none: hold out heldout_fraction)
    heldout_fraction: float = 0.05  # share of the conversations held out of training for the held-out loss
    builtin_conversations: int = 4000  # built-in cold-start conversations to train on when no data is given
    difficulty: int = 1  # level of the built-in conversations' problems (0: mixed, tasks.LEVEL_WEIGHTS)
    seq_len: int = 512  # tokens per conversation at most; longer ones are skipped, counted and reported
    batch_size: int = 16  # conversations per optimizer step
    micro_batch_tokens: int = 512  # padded tokens per forward/backward (a step's rows sorted by length; larger
                                   # on a GPU)
    epochs: float = 0.0  # passes over the training conversations: > 0 sets max_steps (0: max_steps decides)
    mtp_weight: float = 0.1  # MTP loss lambda, on the assistant's tokens too (keeps the MTP draft in step)
    eval_conversations: int = 256  # held-out conversations per held-out loss (0: all of them)
    eval_problems: int = 20  # with the built-in data: held-out problems per task for the greedy accuracy in the
                             # chat format, before and after (0: skip)
    eval_max_new_tokens: int = 160  # the length limit of that check's completions
    template: Literal["auto", "deepseek", "checkpoint"] = "auto"  # the chat format trained in: checkpoint (the
                               # model's own chat template, a Hugging Face checkpoint's: the format it is prompted
                               # in), deepseek (DeepSeek-V3/R1's), auto (the model's own when it has one, else
                               # DeepSeek's)

    def __post_init__(self) -> None:
        self.data, self.heldout_data = tuple(self.data), tuple(self.heldout_data)
        need = _need
        need(self, 0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)")
        need(self, self.difficulty in (0, *tasks.DIFFICULTIES), "difficulty",
             f"must be 0 (mixed) or one of {', '.join(map(str, tasks.DIFFICULTIES))}")
        for name in ("builtin_conversations", "seq_len", "batch_size", "micro_batch_tokens", "eval_max_new_tokens"):
            need(self, getattr(self, name) > 0, name, "must be > 0")
        for name in ("epochs", "mtp_weight", "eval_conversations", "eval_problems"):
            need(self, getattr(self, name) >= 0, name, "must be >= 0")


def _need(config: Any, ok: bool, name: str, why: str) -> None:
    require(config, ok, name, why, kind="SFT option")


# ---------------------------------------------------------------------- rows, masks, micro-batches
class Encoded(NamedTuple):
    """One conversation's tokens: ids, and for each whether the assistant wrote it (what the loss counts)."""

    ids: list[int]
    mask: list[bool]
    source: str

    @property
    def learnt(self) -> int:
        """Tokens the loss counts: assistant tokens after the first position (the first one has no input)."""
        return sum(self.mask[1:])


def pad_batch(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations -> inputs (rows, longest - 1) right-padded with pad_id, and targets: the next token where the
    assistant wrote it, IGNORE_INDEX elsewhere (prompt, system and user tokens, the `<｜Assistant｜>` tag, padding)."""
    width = max(len(ids) for ids, *_ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask, *_) in enumerate(rows):
        ids_t = torch.tensor(ids)
        inputs[r, :len(ids) - 1] = ids_t[:-1]
        targets[r, :len(ids) - 1] = ids_t[1:].where(torch.tensor(mask[1:]), IGNORE_INDEX)
    return inputs, targets


def micro_batches(rows: list[tuple[list[int], list[bool]]], max_tokens: int, pad_id: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows sorted by length and cut into padded micro-batches of at most max_tokens tokens (rows x longest; a
    longer conversation is a micro-batch of its own)."""
    return [pad_batch([rows[i] for i in bucket], pad_id)
            for bucket in length_buckets([len(ids) - 1 for ids, *_ in rows], max_tokens)]


class SFTBatch(NamedTuple):
    input_ids: torch.Tensor  # (rows, S)
    targets: torch.Tensor  # (rows, S): IGNORE_INDEX but at assistant tokens
    share: float  # its assistant tokens / the step's


def fingerprint(rows: list[Encoded]) -> str:
    """A digest of the training set's tokens and masks: a resume checks that its data is the run's."""
    digest = hashlib.sha256()
    for ids, mask, _ in rows:
        digest.update(json.dumps([ids, [int(m) for m in mask]]).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- the stage
class SFTStage:
    """Supervised fine-tuning's part of the shared step: this step's conversations as padded, length-sorted
    micro-batches, and the next-token loss on the assistant's tokens, normalised by the step's assistant tokens."""

    name = "sft"

    def __init__(self, train: list[Encoded], heldout: list[Encoded], cfg: SFTConfig, model_config: ModelConfig,
                 pad_id: int, seed: int = 0):
        if not train:
            raise SFTError("no training conversations")
        self.train_rows, self.heldout_rows, self.cfg, self.pad_id = train, heldout, cfg, pad_id
        self.order = EpochOrder(len(train), seed, "sft")
        self.fingerprint = fingerprint(train)
        mean_len = sum(len(r.ids) for r in train) / len(train)
        self.flops_per_token = flops_per_token(model_config, max(1, round(mean_len)))
        self.has_mtp = model_config.num_nextn_predict_layers > 0

    def settings(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def next_batch(self, trainer: Trainer) -> StepBatch:
        if trainer.dp_size != 1:
            raise TrainingError("nanoseek sft runs in one process (its batches have no data-parallel split yet)")
        cfg = self.cfg
        rows = [self.train_rows[i] for i in self.order.next(cfg.batch_size)]
        learnt = sum(r.learnt for r in rows)
        micro = []
        for inputs, targets in micro_batches(rows, cfg.micro_batch_tokens, self.pad_id):
            n = int((targets != IGNORE_INDEX).sum())
            micro.append(SFTBatch(inputs.to(trainer.device), targets.to(trainer.device), n / learnt))
        real = sum(len(r.ids) - 1 for r in rows)
        padded = sum(b.input_ids.numel() for b in micro)
        record = {"conversations": len(rows), "assistant_tokens": learnt, "pad_fraction": 1 - real / padded,
                  "micro_batches": len(micro), "epoch": self.order.cursor / self.order.n}
        if not (cfg.mtp_weight and self.has_mtp):
            record["mtp_loss"] = None
        # tokens: every real token the step's forward and backward run over (tokens/s), prompts included.
        return StepBatch(micro, real, record)

    def loss(self, model: DeepSeekV3, batch: SFTBatch) -> LossTerms:
        """The micro-batch's assistant-token mean, weighted by its share of the step's assistant tokens: the
        shares sum to the step's mean over all of them, whatever the split (also for MTP depth 1, whose targets
        are the same tokens: position 0's target is never the assistant's). No sequence-wise balance loss: over
        padded rows it would depend on the split; the bias balancing (from the expert counts) stays."""
        out = model.compute_loss(batch.input_ids, batch.targets, mtp_weight=self.cfg.mtp_weight, balance_alpha=0.0)
        stats = {"loss": float(out.loss.detach()) * batch.share, "lm_loss": float(out.lm_loss.detach()) * batch.share}
        if out.mtp_loss is not None:
            stats["mtp_loss"] = float(out.mtp_loss.detach()) * batch.share
        return LossTerms(out.loss * batch.share, stats, out.expert_counts)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, Any] | None:
        """The held-out loss: next-token cross-entropy on the held-out conversations' assistant tokens."""
        if not self.heldout_rows:
            return None
        loss = heldout_loss(trainer.model, self.heldout_rows, self.cfg, self.pad_id, trainer.device,
                            trainer.autocast_context)
        return {"kind": "heldout", "step": trainer.step, "tokens": trainer.tokens, "loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.order.cursor, "conversations": self.order.n, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"the training conversations differ from the run's ({state.get('conversations')} "
                                f"then, {self.order.n} now, or their text or tokenizer changed); a resume needs "
                                "the same data to continue with the same batches")
        self.order.cursor = state["cursor"]


@torch.no_grad()
def heldout_loss(model: DeepSeekV3, rows: list[Encoded], cfg: SFTConfig, pad_id: int,
                 device: torch.device | str = "cpu", autocast=None) -> float:
    """The mean next-token cross-entropy over the assistant tokens of the first cfg.eval_conversations rows (all
    when 0), in eval mode; the model's mode is restored."""
    rows = rows[:cfg.eval_conversations or None]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in micro_batches(rows, cfg.micro_batch_tokens, pad_id):
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                out = model.compute_loss(inputs.to(device), targets.to(device), mtp_weight=0.0, balance_alpha=0.0)
            n = int((targets != IGNORE_INDEX).sum())
            total, count = total + float(out.lm_loss) * n, count + n
    finally:
        model.train(was_training)
    return total / max(1, count)


# ---------------------------------------------------------------------- the data of a run
@dataclass
class SFTData:
    train: list[Encoded]
    heldout: list[Encoded]
    skipped: dict[str, int]  # conversations longer than seq_len, per split
    first_skipped: str | None  # where the first one is, and its length
    builtin: bool


def encode(tokenizer: Tokenizer, conversations: list[Conversation], seq_len: int,
           template: ChatTemplate | None = None) -> tuple[list[Encoded], list[tuple[str, int]]]:
    """-> the encoded conversations of at most seq_len tokens, and (source, tokens) of the longer ones; in DeepSeek's
    chat format, or in `template` (a checkpoint's own: one or more samples a conversation, see
    data/chat.template_samples)."""
    if template is None:
        encoded = [[sample] for sample in encode_conversations(tokenizer, [c.messages for c in conversations])]
    else:
        encoded = []
        for conversation in conversations:
            try:
                encoded.append(template_samples(tokenizer, template, conversation.messages))
            except (ChatDataError, ChatTemplateError) as e:
                raise ChatDataError(f"{conversation.source}: {e}") from None
    kept, skipped = [], []
    for conversation, samples in zip(conversations, encoded, strict=True):
        for ids, mask in samples:
            if len(ids) > seq_len:
                skipped.append((conversation.source, len(ids)))
            else:  # a checked conversation ends with an assistant reply: it has assistant tokens to learn
                kept.append(Encoded(ids, mask, conversation.source))
    return kept, skipped


def load_data(cfg: SFTConfig, tokenizer: Tokenizer, seed: int) -> SFTData:
    """The run's training and held-out conversations, encoded. Too long ones are skipped rather than cut (a cut
    reply would teach the model to stop mid-answer without its end of sentence) and counted; a run none of whose
    conversations fit is an error."""
    builtin = not cfg.data
    if builtin:
        difficulty = cfg.difficulty or None
        train = cold_start_conversations(cfg.builtin_conversations, seed=seed, difficulty=difficulty)
        n_heldout = max(1, round(cfg.builtin_conversations * cfg.heldout_fraction)) if cfg.heldout_fraction else 0
        heldout = (read_conversations(cfg.heldout_data) if cfg.heldout_data else
                   cold_start_conversations(n_heldout, seed=seed, split="heldout", difficulty=difficulty))
    else:
        train = read_conversations(cfg.data)
        if cfg.heldout_data:
            heldout = read_conversations(cfg.heldout_data)
        else:  # a seeded share of the conversations, at least one when there are two or more
            n_heldout = min(len(train) - 1, max(1, round(len(train) * cfg.heldout_fraction))) \
                if cfg.heldout_fraction and len(train) > 1 else 0
            chosen = set(random.Random(f"sft-heldout/{seed}").sample(range(len(train)), n_heldout))
            heldout = [c for i, c in enumerate(train) if i in chosen]
            train = [c for i, c in enumerate(train) if i not in chosen]
    template = chat_template_for(tokenizer, cfg.template)
    train_rows, train_skipped = encode(tokenizer, train, cfg.seq_len, template)
    heldout_rows, heldout_skipped = encode(tokenizer, heldout, cfg.seq_len, template)
    if not train_rows:
        raise SFTError(f"all {len(train)} training conversations are longer than seq_len={cfg.seq_len} tokens "
                       f"(the first: {train_skipped[0][0]}, {train_skipped[0][1]} tokens); raise --seq-len")
    first = (train_skipped or heldout_skipped or [None])[0]
    return SFTData(train_rows, heldout_rows, {"train": len(train_skipped), "heldout": len(heldout_skipped)},
                   f"{first[0]} ({first[1]} tokens)" if first else None, builtin)


# ---------------------------------------------------------------------- the command
# The shared options with fine-tuning's defaults: a small constant learning rate after a short warmup.
SFT_TRAIN_DEFAULTS = TrainConfig(out_dir="runs/sft", max_steps=300, lr=1e-4, warmup_steps=10, decay_start=1.0,
                                 weight_decay=0.0, save_every=50, eval_every=50, keep_last=2)
# Shared options SFT has no use for: its loss has no sequence-wise balance term (see SFTStage.loss).
SFT_UNUSED_OPTIONS = ("aux_alpha",)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The SFT command's options (`nanoseek sft`)."""
    add_stage_options(parser, SFTConfig, SFT_TRAIN_DEFAULTS, SFT_UNUSED_OPTIONS)


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """run_sft()'s keyword arguments from the parsed options."""
    return stage_arguments(args, SFTConfig, "sft")


def sft_trainer(model: DeepSeekV3, tokenizer: Tokenizer, data: SFTData, sft: SFTConfig, train: TrainConfig,
                model_files: dict[str, Path] | None = None) -> Trainer:
    """The shared Trainer with the SFT stage on `data`."""
    stage = SFTStage(data.train, data.heldout, sft, model.config, padding_id(tokenizer), seed=train.seed)
    return Trainer(model, stage, train, model_files=model_files)


def run_sft(sft: SFTConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
            progress: bool = True, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`nanoseek sft`: fine-tune sft.model (a checkpoint, or a run's latest one) on chat conversations.
    resume: continue the run in train.out_dir with its own saved settings (changes: see run_settings)."""
    sft, train = run_settings("sft", SFTConfig, sft, train, resume, changes, defaults=SFT_TRAIN_DEFAULTS)
    out = Path(train.out_dir)
    path, tokenizer, model = load_start_model(sft.model, sft.seq_len, (USER, ASSISTANT, THINK, END_THINK), SFTError,
                                              sft.template)
    data = load_data(sft, tokenizer, train.seed)
    if data.skipped["train"] or data.skipped["heldout"]:
        print(f"nanoseek: warning: skipped {data.skipped['train']} training and {data.skipped['heldout']} held-out "
              f"conversations longer than seq_len={sft.seq_len} tokens (the first: {data.first_skipped})",
              file=sys.stderr)
    if not resume:
        train = steps_for_epochs(sft.epochs, len(data.train), sft.batch_size, train, SFT_TRAIN_DEFAULTS.max_steps,
                                 SFTError)
    trainer = sft_trainer(model, tokenizer, data, sft, train, model_files=tokenizer_files(path))
    result = trainer.fit(progress=progress, resume=resume)
    if result["stopped"] is not None:
        return result
    return write_report(out, path, trainer, tokenizer, data, sft, train, result["minutes"])


def chat_accuracy(model: DeepSeekV3, tokenizer: Tokenizer, sft: SFTConfig, seed: int, template: str = "chat"
                  ) -> dict[str, Any]:
    """Greedy accuracy on held-out problems of the built-in tasks, asked in the chat format (`nanoseek eval
    --template chat`; or another `template`), graded by the evaluation's own answer extraction and checkers."""
    report = evaluate(model, tokenizer, heldout_problems(sft.eval_problems, sft.difficulty or None, seed),
                      EvalConfig(k=1, temperature=0.0, max_new_tokens=sft.eval_max_new_tokens, greedy=False,
                                 template=template))
    return {"per_task": {name: v["pass@1"] for name, v in report["per_task"].items()},
            "mean": report["overall"]["pass@1"], "format": report["overall"]["format"]}


def write_report(out: Path, base: Path, trainer: Trainer, tokenizer: Tokenizer, data: SFTData, sft: SFTConfig,
                 train: TrainConfig, minutes: float) -> dict[str, Any]:
    """report.json and report.md of a finished run: the held-out loss and (built-in data) the greedy chat-format
    accuracy of the base model and of the fine-tuned one, the data's counts, the plots."""
    pad_id = padding_id(tokenizer)
    before_model = load_pretrained(base).to(trainer.device)
    loss = {"before": heldout_loss(before_model, data.heldout, sft, pad_id, trainer.device) if data.heldout else None,
            "after": heldout_loss(trainer.model, data.heldout, sft, pad_id, trainer.device) if data.heldout else None}
    accuracy = None
    if data.builtin and sft.eval_problems:
        accuracy = {"before": chat_accuracy(before_model, tokenizer, sft, train.seed),
                    "after": chat_accuracy(trainer.model, tokenizer, sft, train.seed)}
    last = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"][-10:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    report = {"base_model": str(base), "steps": trainer.step, "seed": train.seed, "minutes_this_run": minutes,
              "data": "built-in cold-start conversations" if data.builtin else list(sft.data),
              "conversations": {"train": len(data.train), "heldout": len(data.heldout),
                                "skipped_longer_than_seq_len": data.skipped, "first_skipped": data.first_skipped},
              "epochs": trainer.stage.order.cursor / len(data.train),
              "train_loss_last_10_steps": sum(r["loss"] for r in last) / max(1, len(last)),
              "heldout_loss": loss, "chat_accuracy": accuracy, "checkpoint": str(out / "checkpoints" / latest)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_run(out)
    (out / "report.md").write_text(_report_markdown(report, out))
    return report


def _report_markdown(r: dict[str, Any], out: Path) -> str:
    c, loss, acc = r["conversations"], r["heldout_loss"], r["chat_accuracy"]
    held = (f"Held-out loss on the assistant's tokens: {loss['before']:.3f} before, {loss['after']:.3f} after.\n"
            if loss["after"] is not None else
            "No held-out conversations (--heldout-fraction 0), so no held-out loss.\n")
    if acc is None:
        accuracy = "No greedy check on the built-in tasks (--eval-problems 0, or trained on your own data).\n"
    else:
        rows = "\n".join(f"| {task} | {100 * acc['before']['per_task'][task]:.0f}% | {100 * a:.0f}% |"
                         for task, a in acc["after"]["per_task"].items())
        accuracy = (f"Greedy accuracy on held-out problems asked in the chat format (`nanoseek eval --template chat`):"
                    f"\n\n| task | before | after |\n|---|---|---|\n{rows}\n"
                    f"| mean | {100 * acc['before']['mean']:.1f}% | {100 * acc['after']['mean']:.1f}% |\n"
                    f"| format | {100 * acc['before']['format']:.1f}% | {100 * acc['after']['format']:.1f}% |\n")
    skipped = c["skipped_longer_than_seq_len"]
    return f"""# SFT report

Fine-tuned `{r['base_model']}` for {r['steps']} steps ({r['epochs']:.2f} epochs; seed {r['seed']}) on {c['train']}
conversations ({r['data'] if isinstance(r['data'], str) else ', '.join(r['data'])}), {c['heldout']} held out;
skipped as longer than seq_len: {skipped['train']} training, {skipped['heldout']} held-out conversations.
{r['minutes_this_run']:.1f} minutes in this run. Checkpoint: `{r['checkpoint']}`.

{held}
{accuracy}
![loss](plots/loss.png)
![learning rate](plots/lr.png)
"""
