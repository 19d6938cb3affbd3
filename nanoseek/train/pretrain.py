"""`nanoseek pretrain`: data -> tokenizer -> shards -> the shared training loop -> a report.

With no arguments it trains the `small` preset on the built-in corpus of verifiable reasoning problems
(nanoseek/data/tasks.py), sized to finish on a 2-core CPU in about a quarter of an hour, and reports the
held-out loss against the unigram baseline and the greedy accuracy on easy held-out problems.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import get_preset
from nanoseek.data import tasks
from nanoseek.data.shards import TokenLoader, heldout_batches, prepare_documents, prepare_files, unigram_entropy
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.eval import EvalConfig, evaluate, heldout_problems
from nanoseek.model import DeepSeekV3
from nanoseek.train.loop import TrainConfig, Trainer
from nanoseek.train.metrics import plot_run


class PretrainError(NanoseekError, ValueError):
    pass


@dataclass
class DataConfig:
    preset: str = "small"
    data: tuple[str, ...] = ()  # text/JSONL/Parquet files or directories, or one prepared shard directory
    tokenizer: str | None = None  # a tokenizer.json to use; None trains a BPE of the preset's vocabulary size
    builtin_docs: int = 60_000  # documents of the built-in corpus when no data is given
    difficulty: int = 1  # level of the built-in corpus's problems (0: mixed, tasks.LEVEL_WEIGHTS)
    # Share of built-in documents that state the answer with no worked steps: the base model then sometimes
    # reasons and sometimes guesses, and R1-Zero learns, task by task, which of the two pays (docs/pretraining.md).
    direct_rate: float = 0.5
    fim_rate: float = 0.1
    heldout_fraction: float = 0.02
    eval_problems: int = 50  # easy held-out problems per task for the final greedy accuracy (0: skip)
    eval_max_new_tokens: int = 128

    def __post_init__(self) -> None:
        # Checked here, before a run directory or any data is made.
        if self.difficulty not in (0, *tasks.DIFFICULTIES):
            raise PretrainError(f"difficulty {self.difficulty} is not a level of the built-in corpus; choose 0 "
                                f"(mixed) or one of {', '.join(map(str, tasks.DIFFICULTIES))}")
        if not 0.0 <= self.direct_rate <= 1.0:
            raise PretrainError(f"direct_rate {self.direct_rate} must be between 0 and 1")


def prepare_data(setup: DataConfig, data_dir: Path, vocab_size: int, seed: int) -> Path:
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
                             direct_rate=setup.direct_rate))
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


def pretrain(setup: DataConfig | None = None, train: TrainConfig | None = None, resume: bool = False,
             progress: bool = True) -> dict[str, Any]:
    setup, train = setup or DataConfig(), train or TrainConfig()
    out = Path(train.out_dir)
    latest = out / "checkpoints" / "latest"
    if latest.exists() and not resume:
        raise PretrainError(f"{out} already holds a run (at {latest.read_text().strip()}); pass --resume to "
                            "continue it, or --out-dir for a new run")
    if resume and not latest.exists():
        raise PretrainError(f"nothing to resume: {out} has no checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    preset = get_preset(setup.preset)
    data_dir = prepare_data(setup, out / "data", preset.vocab_size, train.seed)
    tokenizer = Tokenizer.load(data_dir)
    config = preset.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id)
    torch.manual_seed(train.seed)
    model = DeepSeekV3(config)
    loader = TokenLoader(data_dir, "train", seq_len=train.seq_len, seed=train.seed)

    def heldout():
        return list(heldout_batches(data_dir, train.seq_len, train.micro_batch_size, train.eval_batches))

    trainer = Trainer(model, loader, train, heldout=heldout, model_files={"tokenizer.json": data_dir /
                                                                         "tokenizer.json"})
    if resume:
        trainer.resume()
    result = trainer.fit(progress=progress)
    if result["stopped"] is not None:
        return result

    baseline = unigram_entropy(data_dir, split="heldout")
    heldout_loss = (result["heldout"] or trainer.evaluate())["loss"]
    accuracy = (task_accuracy(trainer.model, tokenizer, setup.eval_problems, seed=train.seed,
                              max_new_tokens=setup.eval_max_new_tokens) if setup.eval_problems else None)
    report = {
        "preset": setup.preset, "params": sum(p.numel() for p in model.parameters()),
        "steps": trainer.step, "tokens": trainer.tokens, "heldout_loss": heldout_loss, "unigram_loss": baseline,
        "task_accuracy": accuracy, "minutes": (time.perf_counter() - started) / 60,
        "device": str(trainer.device), "checkpoint": str(out / "checkpoints" / latest.read_text().strip()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_run(out, baseline=baseline)
    if accuracy is not None:
        (out / "report.md").write_text(_report_markdown(report))
    return report


def _report_markdown(r: dict[str, Any]) -> str:
    acc = r["task_accuracy"]
    rows = "\n".join(f"| {task} | {100 * a:.0f}% |" for task, a in acc["per_task"].items())
    return f"""# Pretraining report

{r['preset']} preset, {r['params'] / 1e6:.1f}M parameters, {r['steps']} steps, {r['tokens']:,} tokens,
{r['minutes']:.1f} minutes on {r['device']}. Weights: `{r['checkpoint']}/model`.

| held-out loss | unigram baseline |
|---|---|
| {r['heldout_loss']:.3f} | {r['unigram_loss']:.3f} |

Greedy accuracy on easy (difficulty {acc['difficulty']}) held-out problems, mean {100 * acc['mean']:.0f}%:

| task | accuracy |
|---|---|
{rows}

![loss](plots/loss.png)
![expert load](plots/expert_load.png)
![learning rate](plots/lr.png)
![gradient norm](plots/grad_norm.png)
"""
