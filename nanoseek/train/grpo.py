"""Group Relative Policy Optimization (DeepSeekMath / DeepSeek-R1): the advantage, the loss, the update.

For each prompt, G completions are sampled; a completion's advantage is its reward relative to its group,
A = (r - mean) / (std + eps), or r - mean without the std scaling (Dr. GRPO). No value model. The loss per
token is the clipped surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) (separate epsilons are
DAPO's clip-higher) plus beta times the k3 estimate of KL(policy || reference), aggregated per sequence
(GRPO), over all tokens (DAPO), or over a constant token budget (Dr. GRPO).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_pretrained, resolve_checkpoint
from nanoseek.config import require
from nanoseek.data import tasks
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import DeepSeekV3
from nanoseek.train.loop import TrainConfig, Trainer, TrainingError, learning_rate
from nanoseek.train.metrics import read_metrics
from nanoseek.train.rewards import RewardSet, Sample, r1_zero_rewards

AGGREGATIONS = ("sequence", "token", "constant")


@dataclass
class GRPOLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28  # > eps_low is DAPO's clip-higher
    beta: float = 0.0  # KL coefficient; 0 keeps no reference model
    aggregation: str = "token"  # "sequence" (GRPO), "token" (DAPO), "constant" (Dr. GRPO: / (B * max_tokens))
    max_tokens: int = 256  # the constant of "constant" aggregation: the completion length budget
    scale_std: bool = True  # False is Dr. GRPO's unscaled advantage
    std_eps: float = 1e-4

    def __post_init__(self) -> None:
        _need(self, self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        _need(self, 0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
        _need(self, self.eps_high >= 0, "eps_high", "must be >= 0")
        _need(self, self.beta >= 0, "beta", "must be >= 0 (0 keeps no reference model)")
        _need(self, self.max_tokens > 0, "max_tokens", "must be > 0")
        _need(self, self.std_eps > 0, "std_eps", "must be > 0")


_need = partial(require, kind="GRPO option")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (prompts, G) -> advantages (prompts, G), relative to each prompt's group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts,) True where the group's rewards differ: an all-equal group has zero advantage everywhere and
    only dilutes the batch (DAPO's dynamic sampling drops it)."""
    return rewards.max(dim=1).values > rewards.min(dim=1).values


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) at tokens sampled from the policy:
    exp(ref - logp) - (ref - logp) - 1, unbiased and never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOLossConfig, ref_logp: torch.Tensor | None = None, batch: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp, mask (B, T) over completion tokens; advantages (B,) -> loss, stats.

    batch = (sequences, completion tokens) of the whole update when these B rows are one micro-batch of it:
    the loss and the stats are then this micro-batch's shares, which add up to the whole batch's values.
    """
    mask = mask.to(logp.dtype)
    rows, n = batch or (mask.shape[0], int(mask.sum()))
    n = max(1, n)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if cfg.beta:
        per_token = per_token + cfg.beta * kl
    if cfg.aggregation == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    elif cfg.aggregation == "token":
        loss = (per_token * mask).sum() / n
    else:  # "constant" (GRPOLossConfig checks the name)
        loss = (per_token * mask).sum() / (rows * cfg.max_tokens)
    is_clipped = ((ratio < 1 - cfg.eps_low) & (adv < 0)) | ((ratio > 1 + cfg.eps_high) & (adv > 0))
    stats = {"clip_fraction": float((is_clipped * mask).sum() / n), "kl": float((kl * mask).sum() / n)}
    return loss, stats


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


def completion_logprobs(model: DeepSeekV3, sequences: torch.Tensor, prompt_lens: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sequences (B, S) = prompt + completion, right-padded; prompt_lens (B,).

    -> log-probabilities (B, S-1) of each next token, the mask of completion tokens (B, S-1) (padding is
    marked by the caller with -1 in `sequences`), and the entropy of each next-token distribution (B, S-1).
    """
    valid = sequences >= 0
    inputs = sequences.clamp(min=0)
    logits = model(inputs[:, :-1]).float()
    logp_all = F.log_softmax(logits, dim=-1)
    targets = inputs[:, 1:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(1, sequences.shape[1], device=sequences.device)[None]
    mask = (positions >= prompt_lens[:, None]) & valid[:, 1:]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, mask, entropy


# ---------------------------------------------------------------------- the stage: `nanoseek grpo`
@dataclass
class GRPOConfig:
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 16
    max_new_tokens: int = 160  # the evaluation's budget
    temperature: float = 1.0
    top_p: float = 1.0
    mu: int = 1  # policy updates per batch of rollouts (> 1 makes the ratio against the sampler matter)
    drop_uninformative: bool = True  # skip groups whose rewards are all equal (zero advantage)
    format_weight: float = 0.2  # the base model already writes the format; accuracy is what is to be learned
    difficulty: int | None = 1  # the held-out evaluation's level; None: the corpus's mix of levels
    update_tokens: int = 4096  # padded tokens per forward/backward of the update (micro-batches of similar length)
    stop_at_answer: bool = True  # rollouts end at </answer> as the evaluation's do (else only at eos or the limit)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)

    def __post_init__(self) -> None:
        _need(self, self.group_size >= 2, "group_size", "must be >= 2: the advantage compares completions of a prompt")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "update_tokens"):
            _need(self, getattr(self, name) > 0, name, "must be > 0")
        _need(self, self.temperature > 0, "temperature", "must be > 0: GRPO needs different samples per prompt")
        _need(self, 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _need(self, self.format_weight >= 0, "format_weight", "must be >= 0")
        _need(self, self.difficulty in (None, 1, 2, 3), "difficulty", "must be 1, 2, 3 or None (the corpus's mix)")


class ProblemStream:
    """Training problems of the built-in tasks, drawn in a seeded order; the position resumes exactly."""

    def __init__(self, seed: int = 0, difficulty: int | None = None):
        self.seed, self.difficulty, self.cursor = seed, difficulty, 0

    def next_batch(self, n: int) -> list[tasks.Problem]:
        names = list(tasks.TASKS)
        batch = [tasks.generate(names[(self.cursor + i) % len(names)], 1, seed=self.seed * 1_000_003 +
                                self.cursor + i, split="train", difficulty=self.difficulty)[0] for i in range(n)]
        self.cursor += n
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = state["cursor"]


class GRPOTrainer(Trainer):
    """The shared Trainer (optimizer, schedule, checkpoints, signals, logs) with a GRPO step: sample G
    completions per prompt on the engine, score them with the rewards, update the policy."""

    def __init__(self, model: DeepSeekV3, tokenizer: Tokenizer, problems: ProblemStream, cfg: TrainConfig,
                 grpo: GRPOConfig, rewards: RewardSet | None = None, model_files: dict[str, Path] | None = None):
        super().__init__(model, problems, cfg, heldout=None, model_files=model_files)
        self.grpo, self.tokenizer = grpo, tokenizer
        self.rewards = rewards or r1_zero_rewards(format_weight=grpo.format_weight)
        self.engine = Engine(self.model, max_batch=grpo.prompts_per_step * grpo.group_size,
                             max_len=512 + grpo.max_new_tokens, tokenizer=tokenizer)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if grpo.loss.beta else None

    def train_step(self) -> dict[str, Any]:
        cfg, g, tok = self.cfg, self.grpo, self.tokenizer
        start = time.perf_counter()
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        problems = self.data.next_batch(g.prompts_per_step)
        prompts = [tok.encode(tasks.format_prompt(p), bos=True) for p in problems]
        outs = self.engine.generate([p for p in prompts for _ in range(g.group_size)], SamplingParams(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, stop_ids=(tok.eos_id,),
            stop_strings=("</answer>",) if g.stop_at_answer else (), seed=cfg.seed * 1_000_003 + self.step * 10_007))
        generated = time.perf_counter()
        scores = []
        for i, out in enumerate(outs):
            text = tok.decode([t for t in out.tokens if t != tok.eos_id])
            scores.append(self.rewards(Sample(problems[i // g.group_size], text, len(out.tokens))))
        rewards = torch.tensor([s["total"] for s in scores]).view(g.prompts_per_step, g.group_size)
        advantages = group_advantages(rewards, g.loss.scale_std, g.loss.std_eps)
        keep = informative_groups(rewards) if g.drop_uninformative else torch.ones(len(problems), dtype=torch.bool)
        rows = [i for i in range(len(outs)) if keep[i // g.group_size]]
        stats: dict[str, float] = {"clip_fraction": 0.0, "kl": 0.0}
        loss_value, entropy = 0.0, float("nan")
        self.model.train()
        if rows:
            micro = [self._pack([rows[j] for j in bucket], prompts, outs, advantages.flatten()) for bucket in
                     length_buckets([len(prompts[i // g.group_size]) + len(outs[i].tokens) for i in rows],
                                    g.update_tokens)]
            batch = (len(rows), sum(len(outs[i].tokens) for i in rows))
            autocast = self.autocast or torch.autocast("cpu", enabled=False)  # bf16 on CUDA, as in pretraining
            with torch.no_grad(), autocast:
                old = [completion_logprobs(self.model, seq, lens)[0] if g.mu > 1 else None for seq, lens, _ in micro]
                ref = [completion_logprobs(self.reference, seq, lens)[0] if self.reference else None
                       for seq, lens, _ in micro]
            for _ in range(g.mu):
                loss_value, entropy_sum = 0.0, 0.0
                stats = {"clip_fraction": 0.0, "kl": 0.0}
                for (seq, lens, adv), old_logp, ref_logp in zip(micro, old, ref, strict=True):
                    with autocast:
                        logp, mask, ent = completion_logprobs(self.model, seq, lens)
                    loss, part = policy_loss(logp, logp.detach() if old_logp is None else old_logp, adv, mask,
                                             g.loss, ref_logp, batch=batch)
                    loss.backward()
                    loss_value += float(loss.detach())
                    entropy_sum += float((ent.detach() * mask).sum())
                    stats = {k: stats[k] + part[k] for k in stats}
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                entropy = entropy_sum / max(1, batch[1])
        self.step += 1
        lengths = [len(o.tokens) for o in outs]
        sample_tasks = [problems[i // g.group_size].task for i in range(len(outs))]
        elapsed = time.perf_counter() - start
        self.tokens += sum(lengths)
        record = {"kind": "train", "step": self.step, "lr": lr, "loss": loss_value,
                  "reward": float(rewards.mean()), "accuracy": _mean(s["accuracy"] for s in scores),
                  "format_rate": _mean(s["format"] for s in scores),
                  **{f"reward_{k}": _mean(s[k] for s in scores) for k in scores[0] if k != "total"},
                  **{f"accuracy_{name}": _mean(s["accuracy"] for s, task in zip(scores, sample_tasks) if task == name)
                     for name in dict.fromkeys(sample_tasks)},
                  "length_mean": _mean(lengths), "length_max": max(lengths), "groups_kept": int(keep.sum()),
                  "entropy": entropy, **stats, "generation_time": generated - start,
                  "update_time": elapsed - (generated - start), "step_time": elapsed,
                  "tokens_per_s": sum(lengths) / elapsed}
        return record

    def _pack(self, rows: list[int], prompts: list[list[int]], outs: list, advantages: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Completions `rows` with their prompts -> sequences (rows, longest) right-padded with -1, prompt
        lengths (rows,) and advantages (rows,), on the model's device."""
        g = self.grpo.group_size
        sequences = torch.full((len(rows), max(len(prompts[i // g]) + len(outs[i].tokens) for i in rows)), -1,
                               dtype=torch.long)
        for r, i in enumerate(rows):
            seq = prompts[i // g] + outs[i].tokens
            sequences[r, :len(seq)] = torch.tensor(seq)
        prompt_lens = torch.tensor([len(prompts[i // g]) for i in rows])
        return sequences.to(self.device), prompt_lens.to(self.device), advantages[rows].to(self.device)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


# The shared loop's options with RL's defaults: a small constant learning rate, no weight decay.
GRPO_TRAIN_DEFAULTS = TrainConfig(out_dir="runs/grpo", max_steps=300, lr=1.5e-4, warmup_steps=5, decay_start=1.0,
                                  weight_decay=0.0, save_every=20, eval_every=0, keep_last=2)


def run_grpo(model_path: str | Path = "runs/pretrain", train: TrainConfig | None = None,
             grpo: GRPOConfig | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """`nanoseek grpo`: R1-Zero from the base model at model_path (a checkpoint, or a run's latest one)."""
    train, grpo = train or GRPO_TRAIN_DEFAULTS, grpo or GRPOConfig()
    out = Path(train.out_dir)
    latest = out / "checkpoints" / "latest"
    if latest.exists() and not resume:
        raise TrainingError(f"{out} already holds a run (at {latest.read_text().strip()}); pass --resume to "
                            "continue it, or --out-dir for a new run")
    path = resolve_checkpoint(model_path)
    tokenizer = Tokenizer.load(path)
    model = load_pretrained(path)
    trainer = GRPOTrainer(model, tokenizer, ProblemStream(train.seed, grpo.difficulty), train, grpo,
                          model_files={"tokenizer.json": path / "tokenizer.json"})
    if resume:
        trainer.resume()
    started = time.perf_counter()
    result = trainer.fit(progress=progress)
    if result["stopped"] is None:
        last = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"][-10:]
        summary = {k: _mean(r[k] for r in last) for k in ("reward", "accuracy", "format_rate", "length_mean")}
        (out / "report.json").write_text(json.dumps({
            "base_model": str(path), "steps": result["step"], "minutes_this_run": (time.perf_counter() - started) / 60,
            "last_10_steps": summary}, indent=2) + "\n")
    return result
