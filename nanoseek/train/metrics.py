"""What a training run reports: a JSONL line per step, TensorBoard scalars, and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PLOT_FILES = ("loss.png", "lr.png", "grad_norm.png", "expert_load.png")


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors the numbers to TensorBoard."""

    def __init__(self, out_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            # Records past the checkpoint we resume from were never saved: they will be produced again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        # A non-finite number (a NaN loss, a step with no completion tokens to take an entropy of) is written as
        # null: NaN and Infinity are not JSON, and jq or a browser would reject the line.
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(strict, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(out_dir: Path, baseline: float | None = None) -> list[Path]:
    """Loss (train, held-out, and a baseline such as the unigram loss), learning rate, gradient norm, and expert
    load (MaxVio per MoE layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    heldout = [r for r in records if r.get("kind") == "heldout"]
    if not train:
        return []
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    steps = [r["step"] for r in train]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        written.append(plots / name)

    if "reward" in train[0]:
        _plot_rl(plt, train, steps, save)
        return written

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["lm_loss"] for r in train], label="train (next token)", alpha=0.8)
    if any(r.get("mtp_loss") is not None for r in train):
        ax.plot(steps, [r.get("mtp_loss") or float("nan") for r in train], label="train MTP", alpha=0.6)
    if heldout:
        ax.plot([r["step"] for r in heldout], [r["loss"] for r in heldout], "o-", label="held-out")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline {baseline:.2f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    for key, title, name in (("lr", "learning rate", "lr.png"), ("grad_norm", "gradient norm (before clipping)",
                                                                    "grad_norm.png")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, [r[key] for r in train])
        ax.set(xlabel="step", title=title)
        if key == "grad_norm":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        save(fig, name)

    if train[0].get("max_violation"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer in range(len(train[0]["max_violation"])):
            ax.plot(steps, [r["max_violation"][layer] for r in train], label=f"MoE layer {layer}", alpha=0.8)
        ax.set(xlabel="step", ylabel="max load / mean load - 1", title="expert load imbalance (MaxVio)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "expert_load.png")
    return written


def _plot_rl(plt, train: list[dict], steps: list[int], save) -> None:
    """GRPO runs: reward, accuracy and format rate; completion length (R1-Zero's "length grows" curve)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("reward", "reward (total)"), ("accuracy", "accuracy"), ("format_rate", "format rate")):
        values = [r[key] for r in train]
        line, = ax.plot(steps, values, alpha=0.25)
        ax.plot(steps, _moving_average(values), color=line.get_color(), label=f"{label}, mean of 10 steps")
    ax.set(xlabel="step", title="GRPO rewards on training prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "reward.png")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, _moving_average([r["length_mean"] for r in train]), label="mean (of 10 steps)")
    ax.plot(steps, [r["length_max"] for r in train], label="max", alpha=0.5)
    ax.set(xlabel="step", ylabel="tokens", title="completion length")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "length.png")


def _moving_average(values: list[float], window: int = 10) -> list[float]:
    """The mean of each value and the (up to) window - 1 before it."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
