import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import ModelConfig, get_preset
from nanoseek.data import tasks
from nanoseek.data.tokenizer import Tokenizer


def tiny_config(**overrides) -> ModelConfig:
    """The `tiny` preset with some fields changed (validated like any config)."""
    return get_preset("tiny").replace(**overrides)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Give every tensor (norm weights and balancing biases included) distinct, non-trivial values, so
    that a parity test sees a mismatched norm, a swapped expert or an ignored bias."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq") or not tensor.is_floating_point():
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=gen))
        elif name.endswith("e_score_correction_bias"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
        else:
            tensor.copy_(std * torch.randn(tensor.shape, generator=gen))


def train_tokenizer(extra_text: str = "") -> Tokenizer:
    """A 400-token BPE of the built-in corpus (plus extra_text, so its words get tokens too)."""
    return Tokenizer.train(list(tasks.corpus(400, seed=0)) + [extra_text] * 5, 400)


def save_tiny_checkpoint(path: Path, tokenizer: Tokenizer) -> Path:
    """A random `tiny` model of the tokenizer's vocabulary and the tokenizer, saved as a checkpoint directory."""
    torch.manual_seed(0)
    nanoseek.save_pretrained(nanoseek.DeepSeekV3(tiny_config(vocab_size=tokenizer.vocab_size)), path)
    tokenizer.save(path)
    return path


def sigkill_once_logged(command: list[str], metrics: Path, step: int, timeout: float = 240) -> int:
    """Run `nanoseek COMMAND...` in a child process and SIGKILL it as soon as its metrics.jsonl logs a record of
    `step` or later: a death with no chance to save. -> its return code (-SIGKILL, unless it ended first)."""
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def crash_training_at(monkeypatch, step: int):
    """Make the shared Trainer die when it reaches `step`, without saving: a KeyboardInterrupt raised from the step
    itself, not a signal, so the SIGINT handler never saves, as after SIGKILL. -> the real train_step, to put back."""
    from nanoseek.train.loop import Trainer

    real = Trainer.train_step

    def crash(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", crash)
    return real


def write_jsonl(path: Path, rows: list) -> Path:
    """rows (dicts as JSON, strings as they are) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
