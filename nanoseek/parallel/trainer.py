"""The shared training step (nanoseek.train.loop.Trainer) on a (pipeline, data, expert) mesh, for any stage.

A stage takes this rank's share of each step's batch (Trainer.dp_rank / dp_size) and weights each micro-batch's
loss by its share of the *global* batch, so summed gradients are the single-process gradients of the same
batch. With pipeline parallelism the language-model stage's micro-batches run through the DualPipeV schedule
instead of the plain forward/backward loop; everything after (clipping, the non-finite guard, the optimizer,
the balancing biases, the record) is the shared step's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanoseek.atomic import write_text
from nanoseek.model import DeepSeekV3
from nanoseek.parallel import checkpoint
from nanoseek.parallel.data import GradSync, ZeroAdamW, clip_grad_norm
from nanoseek.parallel.expert import shard_experts
from nanoseek.parallel.mesh import ParallelContext
from nanoseek.parallel.pipeline import Pipeline
from nanoseek.train.loop import Stage, StepBatch, TrainConfig, Trainer, TrainingError


class ParallelTrainer(Trainer):
    def __init__(self, model: DeepSeekV3, stage: Stage, cfg: TrainConfig, ctx: ParallelContext,
                 model_files: dict[str, Path] | None = None, seq_len: int | None = None,
                 micro_batch_size: int | None = None):
        """`model` holds the full initial weights on every rank (the same seed); this rank keeps its part.
        seq_len and micro_batch_size: the fixed micro-batch shape a pipeline (pp > 1) sends between stages."""
        if cfg.ema_decay > 0 and (ctx.layout.pp > 1 or ctx.layout.ep > 1):
            raise TrainingError(f"ema_decay {cfg.ema_decay} needs every rank to hold the whole model, and this layout "
                                f"({ctx.layout}) splits it: pass --ema-decay 0, or run with pp = ep = 1")
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.dp_rank, self.dp_size = ctx.data_rank, ctx.layout.data_parallel
        model.to(ctx.device)
        if ctx.layout.ep > 1:
            shard_experts(model, ctx.ep_group)
        self.pipeline = None
        if ctx.layout.pp > 1:
            if seq_len is None or micro_batch_size is None:
                raise TrainingError("pipeline parallelism needs the micro-batch shape: pass seq_len and "
                                    "micro_batch_size")
            self.pipeline = Pipeline(model, ctx, micro_batch_size, seq_len)
        super().__init__(model, stage, cfg, model_files)
        self.optimizer = ZeroAdamW(self.model, ctx, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.grad_sync = GradSync(self.model, ctx)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.grad_sync.enabled = last  # the last micro-batch's backward all-reduces as gradients become final
        loss.backward()

    def reduce_step(self, totals: dict[str, float], counts: Any) -> tuple[dict[str, float], Any]:
        if self.pipeline is not None:
            return totals, counts  # forward_backward reduced them with the pipeline's own layout
        self.grad_sync.wait()
        values = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=self.ctx.data_group)
        if counts is not None:
            dist.all_reduce(counts, group=self.ctx.data_group)  # every rank moves its biases alike
        return dict(zip(totals, values.tolist())), counts

    def clip_gradients(self) -> float:
        return clip_grad_norm(self.model, self.ctx, self.cfg.grad_clip)

    def all_gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.dp_size
        dist.all_gather_object(gathered, value, group=self.ctx.data_group)
        return gathered

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.ctx.data_group)
        return tensor.tolist()

    # ------------------------------------------------------------------ pipeline parallel
    def forward_backward(self, batch: StepBatch) -> tuple[dict[str, float], Any]:
        """With a pipeline: the step's micro-batches (TokenBatch: input_ids, targets, share) through DualPipeV ->
        the step's totals over all ranks, and (router layer ids, loads (layers, experts)) of this rank's routers."""
        if self.pipeline is None:
            return super().forward_backward(batch)
        mtp_weight = batch.record["mtp_weight"]
        sums, counts = self.pipeline.step(batch.micro_batches, mtp_weight, self.aux_alpha)
        self.grad_sync.reduce_all()  # the schedule's backward runs in pieces: reduce once it is done
        dist.all_reduce(sums)  # lm and MTP from the last chunk, balance from every chunk, over all data ranks
        routers = sorted(self.pipeline.routers())
        loads = torch.stack([counts[i] for i in routers]) if routers else None
        if loads is not None:
            dist.all_reduce(loads, group=self.ctx.data_group)
        lm, mtp, balance = sums.tolist()
        use_mtp = mtp_weight > 0 and self.model.config.num_nextn_predict_layers > 0
        totals = {"loss": lm + (mtp_weight * mtp if use_mtp else 0.0) + self.aux_alpha * balance, "lm_loss": lm,
                  "balance_loss": balance, **({"mtp_loss": mtp} if use_mtp else {}),
                  "pipeline_time": self.pipeline.last_step_time}
        return totals, (routers, loads) if loads is not None else None

    def update_router_biases(self, counts: Any) -> None:
        if self.pipeline is None:
            return super().update_router_biases(counts)
        routers = self.pipeline.routers()
        for layer_id, load in zip(*counts):
            routers[layer_id].update_bias(load, self.bias_speed)

    def load_per_layer(self, counts: Any) -> torch.Tensor:
        return counts if self.pipeline is None else counts[1]

    # ------------------------------------------------------------------ distributed checkpoints
    def save(self) -> Path:
        """Collective. checkpoints/step_N is a DCP directory any layout can load (plus, when no rank splits the
        model, its model/ as a Hugging Face checkpoint); `latest` names the newest."""
        root = self.checkpoint_dir
        path = root / f"step_{self.step:06d}"
        extra = {"step": self.step, "tokens": self.tokens, "data": self.stage.state_dict(),
                 "layout": str(self.ctx.layout)}
        checkpoint.save(path, self.model, self.optimizer, self.ctx, extra)
        if self.is_main and self.ctx.layout.pp == 1 and self.ctx.layout.ep == 1:
            # Every rank holds the whole model (and the same EMA): also Hugging Face directories, for eval, chat and
            # transformers; a resume reads the EMA back from ema/.
            self.save_models(path)
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
        path = self.checkpoint_dir / latest.read_text().strip()
        extra = checkpoint.load(path, self.model, self.optimizer, self.ctx)
        self.restore_ema(path)
        self.step, self.tokens = extra["step"], extra["tokens"]
        self.stage.load_state_dict(extra["data"])
        return True
