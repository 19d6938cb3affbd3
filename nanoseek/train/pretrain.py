"""`nanoseek pretrain`: data -> tokenizer -> shards -> the shared training loop -> a report.

With no arguments it trains the `small` preset on the built-in corpus of verifiable reasoning problems
(nanoseek/data/tasks.py), sized to finish on a 2-core CPU in about a quarter of an hour, and reports the
held-out loss against the unigram baseline and the greedy accuracy on easy held-out problems.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from nanoseek.config import ModelConfig, get_preset, require
from nanoseek.data import tasks
from nanoseek.data.shards import TokenLoader, heldout_batches, prepare_documents, prepare_files, unigram_entropy
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import EvalConfig, evaluate, heldout_problems
from nanoseek.model import DeepSeekV3, build_model
from nanoseek.model.params import flops_per_token
from nanoseek.train.loop import (LossTerms, StepBatch, TrainConfig, Trainer, TrainingError, add_stage_options,
                                 run_settings, stage_arguments)
from nanoseek.train.metrics import plot_run


class PretrainError(NanoseekError, ValueError):
    pass


class BatchSource(Protocol):
    """Token batches: (inputs, targets) of (n, seq_len), targets -100 where there is no next token."""

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class PretrainConfig:
    """The pretraining stage's own options: its data, its batches and its loss weights."""

    preset: str = "narrow"  # the model preset to pretrain (`nanoseek info --preset NAME` shows it)
    data: tuple[str, ...] = ()  # text/JSONL/Parquet files or directories, or one prepared shard directory
                                # (none: the built-in corpus of verifiable reasoning problems)
    tokenizer: str | None = None  # a tokenizer.json to use; none trains a BPE of the preset's vocabulary size
    builtin_docs: int = 90_000  # documents of the built-in corpus when no data is given
    difficulty: int = 1  # level of the built-in corpus's problems (0: mixed, tasks.LEVEL_WEIGHTS)
    # Share of built-in documents that state the answer with no worked steps: the base model then sometimes
    # reasons and sometimes guesses, and R1-Zero learns, task by task, which of the two pays (docs/pretraining.md).
    direct_rate: float = 0.5
    # Share of the built-in corpus's worked documents whose steps are narrated partly or wholly in Chinese
    # (DeepSeek-R1-Zero's language mixing; numbers and symbols unchanged), so that GRPO's language-consistency
    # reward (--language-weight) has mixing to remove, and for its ablation; 0: English only.
    chinese_rate: float = 0.0
    # Share of built-in documents written as a DeepSeek chat turn (the question as the user's message, the steps
    # as the assistant's reasoning), so that the base already knows the format `nanoseek sft` and the R1 stages
    # fine-tune it in; 0: every document in the Question: format.
    chat_rate: float = 0.0
    fim_rate: float = 0.1  # share of documents rearranged for fill-in-the-middle
    heldout_fraction: float = 0.02  # share of documents kept out of training for the held-out loss
    eval_problems: int = 50  # easy held-out problems per task for the final greedy accuracy on the built-in
                             # corpus (0: skip; never done for your own data)
    eval_max_new_tokens: int = 128  # the length limit of that check's completions
    seq_len: int = 256  # tokens per training sequence
    # Each training window opens on a document's bos, so no document is trained on without its start (its
    # question); False: windows at multiples of seq_len, cutting documents wherever they fall.
    align_windows: bool = True
    # Each packed document attends only within itself, as at inference where a prompt starts at its own bos;
    # False: attention runs across the window's documents. Together with align_windows it lifted the embedded
    # default's base pass@1 on seeds 0 and 1 from 16.5%/14.7% (aligned windows alone) to 26.3%/26.1%
    # (docs/pretraining.md).
    document_mask: bool = True
    batch_size: int = 8  # sequences per optimizer step once the ramp is over (many small steps learn
                         # the built-in tasks faster than few large ones in a fixed CPU budget)
    micro_batch_size: int = 8  # sequences per forward/backward; the step accumulates gradients over them
    batch_ramp_start: int = 0  # sequences per step at the start (0: no ramp) ...
    batch_ramp_steps: int = 0  # ... growing linearly to batch_size over this many steps (DeepSeek-V3 ramps too)
    mtp_weight: float = 0.3  # MTP loss lambda ...
    mtp_weight_late: float = 0.1  # ... dropped to this after mtp_switch of the run (V3: 0.3 then 0.1)
    mtp_switch: float = 0.7  # the fraction of the run where the MTP weight drops
    eval_batches: int = 8  # held-out micro-batches per periodic held-out loss

    def __post_init__(self) -> None:
        # Checked here, before a run directory or any data is made.
        if self.difficulty not in (0, *tasks.DIFFICULTIES):
            raise PretrainError(f"difficulty {self.difficulty} is not a level of the built-in corpus; choose 0 "
                                f"(mixed) or one of {', '.join(map(str, tasks.DIFFICULTIES))}")
        if not 0.0 <= self.direct_rate <= 1.0:
            raise PretrainError(f"direct_rate {self.direct_rate} must be between 0 and 1")
        for name in ("chinese_rate", "chat_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PretrainError(f"{name} {getattr(self, name)} must be between 0 and 1")
        self.data = tuple(self.data)
        for name in ("seq_len", "batch_size", "micro_batch_size", "eval_batches"):
            require(self, getattr(self, name) > 0, name, "must be > 0", kind="pretraining option")
        require(self, 0 <= self.batch_ramp_start <= self.batch_size, "batch_ramp_start",
                f"must be in [0, batch_size={self.batch_size}]", kind="pretraining option")
        require(self, 0 <= self.mtp_switch <= 1, "mtp_switch", "is a fraction of the run, in [0, 1]",
                kind="pretraining option")
        require(self, self.eval_problems >= 0, "eval_problems", "must be >= 0", kind="pretraining option")


def batch_size_at(step: int, cfg: PretrainConfig) -> int:
    if not cfg.batch_ramp_start or step >= cfg.batch_ramp_steps:
        return cfg.batch_size
    return int(cfg.batch_ramp_start + (cfg.batch_size - cfg.batch_ramp_start) * step / cfg.batch_ramp_steps)


def mtp_weight_at(step: int, max_steps: int, cfg: PretrainConfig) -> float:
    return cfg.mtp_weight if step < cfg.mtp_switch * max_steps else cfg.mtp_weight_late


class TokenBatch(NamedTuple):
    input_ids: torch.Tensor  # (micro_batch, S)
    targets: torch.Tensor  # (micro_batch, S), -100 where there is no next token
    share: float  # its target tokens / the step's (all data-parallel ranks)
    document_mask: bool  # each packed document attends only within itself


class LanguageModelStage:
    """Next-token prediction (+ MTP, + the sequence-wise balance loss) on token batches: pretraining's part of the
    shared step. Under data parallelism every rank reads the same global batch and keeps its own rows."""

    name = "pretrain"

    def __init__(self, source: BatchSource, cfg: PretrainConfig, model_config: ModelConfig,
                 heldout_data: Path | None = None):
        """heldout_data: a prepared shard directory whose held-out split the periodic evaluation reads."""
        self.source, self.cfg, self.heldout_data = source, cfg, heldout_data
        self.flops_per_token = flops_per_token(model_config, cfg.seq_len)
        self.has_mtp = model_config.num_nextn_predict_layers > 0
        self.weights = (cfg.mtp_weight, 0.0)  # this step's (MTP lambda, balance alpha)

    def settings(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def next_batch(self, trainer: Trainer) -> StepBatch:
        cfg = self.cfg
        n_seq = batch_size_at(trainer.step, cfg)
        inputs, targets = self.source.next_batch(n_seq)
        n_tokens = int((targets != -100).sum())
        parts, mb = trainer.dp_size, cfg.micro_batch_size
        if n_seq % parts or (n_seq // parts) % mb and parts > 1:
            raise TrainingError(f"a step of {n_seq} sequences does not split into {parts} data-parallel ranks x "
                                f"micro-batches of {mb}; make batch_size (and the ramp) a multiple of {parts * mb}")
        rows = slice(trainer.dp_rank * n_seq // parts, (trainer.dp_rank + 1) * n_seq // parts)
        inputs, targets = inputs[rows].to(trainer.device), targets[rows].to(trainer.device)
        mtp_weight = mtp_weight_at(trainer.step, trainer.cfg.max_steps, cfg)
        self.weights = (mtp_weight, trainer.aux_alpha)
        micro = [TokenBatch(inputs[i:i + mb], targets[i:i + mb],
                            int((targets[i:i + mb] != -100).sum()) / max(1, n_tokens),  # its share of the step
                            cfg.document_mask)
                 for i in range(0, len(inputs), mb)]
        record = {"batch_size": n_seq, "mtp_weight": mtp_weight}
        if mtp_weight == 0 or not self.has_mtp:
            record["mtp_loss"] = None
        return StepBatch(micro, n_tokens, record)

    def loss(self, model: DeepSeekV3, batch: TokenBatch) -> LossTerms:
        mtp_weight, alpha = self.weights
        out = model.compute_loss(batch.input_ids, batch.targets, mtp_weight=mtp_weight, balance_alpha=alpha,
                                 document_mask=batch.document_mask)
        stats = {key: float(value.detach()) * batch.share for key in ("loss", "lm_loss", "mtp_loss", "balance_loss")
                 if (value := getattr(out, key)) is not None}
        return LossTerms(out.loss * batch.share, stats, out.expert_counts)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, Any] | None:
        """The held-out loss (next-token cross-entropy of the main model)."""
        if self.heldout_data is None:
            return None
        trainer.model.eval()
        total, weight = 0.0, 0
        for x, y in heldout_batches(self.heldout_data, self.cfg.seq_len, self.cfg.micro_batch_size,
                                    self.cfg.eval_batches):
            with trainer.autocast_context():
                out = trainer.model.compute_loss(x.to(trainer.device), y.to(trainer.device), mtp_weight=0.0,
                                                 balance_alpha=0.0, document_mask=self.cfg.document_mask)
            n = int((y != -100).sum())
            total, weight = total + float(out.lm_loss) * n, weight + n
        return {"kind": "heldout", "step": trainer.step, "tokens": trainer.tokens, "loss": total / max(1, weight)}

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The pretraining command's options (`nanoseek pretrain`, and the torchrun entry's `pretrain`)."""
    add_stage_options(parser, PretrainConfig)


def arguments(args: argparse.Namespace) -> dict[str, Any]:
    """pretrain()'s keyword arguments from the parsed options."""
    return stage_arguments(args, PretrainConfig, "config")


def prepare_data(setup: PretrainConfig, data_dir: Path, vocab_size: int, seed: int) -> Path:
    """-> a directory of prepared shards (with its tokenizer.json)."""
    if len(setup.data) == 1 and (Path(setup.data[0]) / "meta.json").is_file():
        return Path(setup.data[0])
    if (data_dir / "meta.json").is_file():
        return data_dir  # prepared by an earlier run in this directory
    if setup.data:
        if setup.tokenizer is None:
            raise PretrainError("training on your files needs a tokenizer: pass --tokenizer tokenizer.json "
                                "(make one with `nanoseek tokenizer train`)")
        prepare_files(list(setup.data), Tokenizer.load(setup.tokenizer), data_dir, fim_rate=setup.fim_rate,
                      heldout_fraction=setup.heldout_fraction, seed=seed)
        return data_dir
    docs = list(tasks.corpus(setup.builtin_docs, seed=seed, difficulty=setup.difficulty or None,
                             direct_rate=setup.direct_rate, chinese_rate=setup.chinese_rate,
                             chat_rate=setup.chat_rate))
    tokenizer = Tokenizer.load(setup.tokenizer) if setup.tokenizer else Tokenizer.train(docs, vocab_size)
    prepare_documents(docs, tokenizer, data_dir, fim_rate=setup.fim_rate, heldout_fraction=setup.heldout_fraction,
                      seed=seed)
    return data_dir


def task_accuracy(model: DeepSeekV3, tokenizer: Tokenizer, n_per_task: int, seed: int = 0,
                  max_new_tokens: int = 160) -> dict[str, Any]:
    """Greedy accuracy on easy held-out problems of each built-in task (questions the model never trained on)."""
    report = evaluate(model, tokenizer, heldout_problems(n_per_task, difficulty=1, seed=seed),
                      EvalConfig(k=1, temperature=0.0, max_new_tokens=max_new_tokens, greedy=False))
    per_task = {name: values["pass@1"] for name, values in report["per_task"].items()}
    return {"difficulty": 1, "per_task": per_task, "mean": report["overall"]["pass@1"],
            "format": report["overall"]["format"]}


def pretrain(config: PretrainConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
             progress: bool = True, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """`nanoseek pretrain`. resume: continue the run in train.out_dir with the settings it was started with;
    changes: option name -> value over config and train (on a resume, only RESUMABLE_CHANGES)."""
    config, train = run_settings("pretrain", PretrainConfig, config, train, resume, changes)
    out = Path(train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    preset = get_preset(config.preset)
    data_dir = prepare_data(config, out / "data", preset.vocab_size, train.seed)
    tokenizer = Tokenizer.load(data_dir)
    model_config = preset.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                  eos_token_id=tokenizer.eos_id)
    torch.manual_seed(train.seed)
    model = build_model(model_config)  # a DenseTransformer for a dense student's preset (qwen2-small)
    loader = TokenLoader(data_dir, "train", seq_len=config.seq_len, seed=train.seed,
                         align_token=tokenizer.bos_id if config.align_windows else None)
    stage = LanguageModelStage(loader, config, model_config, heldout_data=data_dir)
    trainer = Trainer(model, stage, train, model_files={"tokenizer.json": data_dir / "tokenizer.json"})
    result = trainer.fit(progress=progress, resume=resume)
    if result["stopped"] is not None:
        return result

    baseline = unigram_entropy(data_dir, split="heldout")
    heldout_loss = (result["heldout"] or stage.evaluate(trainer))["loss"]
    # The greedy check is on the built-in tasks: it says nothing about a model of the user's own text.
    accuracy = (task_accuracy(trainer.model, tokenizer, config.eval_problems, seed=train.seed,
                              max_new_tokens=config.eval_max_new_tokens)
                if config.eval_problems and not config.data else None)
    latest = out / "checkpoints" / "latest"
    report = {
        "preset": config.preset, "params": sum(p.numel() for p in model.parameters()),
        "steps": trainer.step, "tokens": trainer.tokens, "heldout_loss": heldout_loss, "unigram_loss": baseline,
        "task_accuracy": accuracy, "minutes": (time.perf_counter() - started) / 60, "seed": train.seed,
        "device": str(trainer.device), "checkpoint": str(out / "checkpoints" / latest.read_text().strip()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = plot_run(out, baseline=baseline)
    (out / "report.md").write_text(_report_markdown(report, [Path(p).name for p in plots]))
    return report


def _report_markdown(r: dict[str, Any], plots: list[str]) -> str:
    """The report in Markdown, showing the plots that plot_run wrote (a dense model has no expert load)."""
    acc = r["task_accuracy"]
    if acc is None:
        accuracy = "No greedy check on the built-in tasks (--eval-problems 0, or trained on your own data).\n"
    else:
        rows = "\n".join(f"| {task} | {100 * a:.0f}% |" for task, a in acc["per_task"].items())
        accuracy = (f"Greedy accuracy on easy (difficulty {acc['difficulty']}) held-out problems, mean "
                    f"{100 * acc['mean']:.0f}%:\n\n| task | accuracy |\n|---|---|\n{rows}\n")
    titles = {"loss.png": "loss", "expert_load.png": "expert load", "lr.png": "learning rate",
              "grad_norm.png": "gradient norm"}
    images = "\n".join(f"![{titles[name]}](plots/{name})" for name in titles if name in plots)
    return f"""# Pretraining report

{r['preset']} preset, {r['params'] / 1e6:.1f}M parameters, {r['steps']} steps, {r['tokens']:,} tokens,
{r['minutes']:.1f} minutes on {r['device']}, seed {r['seed']}. Weights: `{r['checkpoint']}/model`.

| held-out loss | unigram baseline |
|---|---|
| {r['heldout_loss']:.3f} | {r['unigram_loss']:.3f} |

{accuracy}
{images}
"""
