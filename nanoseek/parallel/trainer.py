"""The shared training loop (nanoseek.train.loop.Trainer) on a (pipeline, data, expert) mesh.

Every rank reads the same global batch from the same data stream (so the data position in a checkpoint
is one number) and keeps its own rows. Each micro-batch's loss is weighted by its share of the *global*
batch's tokens, so summed gradients are the single-process gradients of the same batch.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.atomic import write_text
from nanoseek.model import DeepSeekV3
from nanoseek.parallel import checkpoint
from nanoseek.parallel.data import GradSync, ZeroAdamW, clip_grad_norm
from nanoseek.parallel.expert import shard_experts
from nanoseek.parallel.mesh import LayoutError, ParallelContext
from nanoseek.parallel.pipeline import MicroBatch, Pipeline
from nanoseek.train.loop import (
    BatchSource,
    TrainConfig,
    Trainer,
    TrainingError,
    max_violation,
    mtp_weight_at,
)


class ParallelTrainer(Trainer):
    def __init__(self, model: DeepSeekV3, data: BatchSource, cfg: TrainConfig, ctx: ParallelContext,
                 heldout: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 model_files: dict[str, Path] | None = None):
        """`model` holds the full initial weights on every rank (the same seed); this rank keeps its part."""
        if cfg.ema_decay > 0:
            raise TrainingError("ema_decay > 0 is not supported with parallelism (the EMA would be sharded too)")
        self.ctx = ctx
        self.is_main = ctx.is_main
        model.to(ctx.device)
        if ctx.layout.ep > 1:
            shard_experts(model, ctx.ep_group)
        self.pipeline = Pipeline(model, ctx, cfg.micro_batch_size, cfg.seq_len) if ctx.layout.pp > 1 else None
        super().__init__(model, data, cfg, heldout, model_files)
        self.optimizer = ZeroAdamW(self.model, ctx, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.grad_sync = GradSync(self.model, ctx)

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, parts = len(inputs), self.ctx.layout.data_parallel
        if n % parts or (n // parts) % self.cfg.micro_batch_size:
            raise LayoutError(f"a step of {n} sequences does not split into {parts} data-parallel ranks x "
                              f"micro-batches of {self.cfg.micro_batch_size}; make batch_size (and the ramp) "
                              f"a multiple of {parts * self.cfg.micro_batch_size}")
        rows = slice(self.ctx.data_rank * n // parts, (self.ctx.data_rank + 1) * n // parts)
        return inputs[rows], targets[rows]

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.grad_sync.enabled = last  # the last micro-batch's backward all-reduces as gradients become final
        loss.backward()

    def reduce_step(self, totals: dict[str, float], counts: torch.Tensor | None):
        self.grad_sync.wait()
        values = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=self.ctx.data_group)
        if counts is not None:
            dist.all_reduce(counts, group=self.ctx.data_group)  # every rank moves its biases alike
        return dict(zip(totals, values.tolist())), counts

    def clip_gradients(self) -> float:
        return clip_grad_norm(self.model, self.ctx, self.cfg.grad_clip)

    # ------------------------------------------------------------------ distributed checkpoints
    def save(self) -> Path:
        """Collective. checkpoints/step_N is a DCP directory any layout can load; `latest` names the newest."""
        root = self.checkpoint_dir
        path = root / f"step_{self.step:06d}"
        extra = {"step": self.step, "tokens": self.tokens, "data": self.data.state_dict(),
                 "layout": str(self.ctx.layout)}
        checkpoint.save(path, self.model, self.optimizer, self.ctx, extra)
        dist.barrier()
        if self.is_main:  # the metadata file is written last: a directory named in `latest` is complete
            write_text(root / "latest", path.name)
            kept = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in kept[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def resume(self) -> bool:
        latest = self.checkpoint_dir / "latest"
        if not latest.exists():
            return False
        extra = checkpoint.load(self.checkpoint_dir / latest.read_text().strip(), self.model, self.optimizer,
                                self.ctx)
        self.step, self.tokens = extra["step"], extra["tokens"]
        self.data.load_state_dict(extra["data"])
        return True

    # ------------------------------------------------------------------ pipeline parallel
    def train_step(self) -> dict:
        if self.pipeline is None:
            return super().train_step()
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        start = time.perf_counter()
        lr, n_seq, inputs, targets, n_tokens = self.step_batch()
        mb = cfg.micro_batch_size
        micro = [MicroBatch(inputs[i:i + mb], targets[i:i + mb], int((targets[i:i + mb] != -100).sum()) / max(1, n_tokens))
                 for i in range(0, len(inputs), mb)]
        mtp_weight = mtp_weight_at(self.step, cfg)
        totals, counts = self.pipeline.step(micro, mtp_weight, self.aux_alpha)
        self.grad_sync.reduce_all()  # the schedule's backward runs in pieces: reduce once it is done
        dist.all_reduce(totals)  # lm and MTP from the last chunk, balance from every chunk, over all data ranks
        routers = self.pipeline.routers()
        loads = torch.stack([counts[i] for i in sorted(routers)]) if routers else None
        if loads is not None:
            dist.all_reduce(loads, group=ctx.data_group)
        grad_norm = self.clip_gradients()
        lm, mtp, balance = totals.tolist()
        use_mtp = mtp_weight > 0 and self.model.config.num_nextn_predict_layers > 0
        loss = lm + (mtp_weight * mtp if use_mtp else 0.0) + self.aux_alpha * balance
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if loads is not None and self.bias_speed > 0:
                for layer_id, load in zip(sorted(routers), loads):
                    routers[layer_id].update_bias(load, self.bias_speed)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.step += 1
        self.tokens += n_tokens
        record = {"kind": "train", "step": self.step, "tokens": self.tokens, "lr": lr, "grad_norm": grad_norm,
                  "batch_size": n_seq, "mtp_weight": mtp_weight, "step_time": elapsed,
                  "tokens_per_s": n_tokens / elapsed, "skipped": not finite, "loss": loss, "lm_loss": lm,
                  "mtp_loss": mtp if use_mtp else None, "balance_loss": balance,
                  "pipeline_time": self.pipeline.last_step_time}
        if loads is not None:
            record["max_violation"] = max_violation(loads)
        if self.bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"the loss or gradient was non-finite for {self.bad_steps} consecutive steps")
        return record
