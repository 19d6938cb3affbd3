"""Distributed checkpoints (torch.distributed.checkpoint) that load under any other layout.

Every entry names one whole tensor of the unsharded model by its full-model name, so the files do not
depend on the layout that wrote them: routed-expert stacks are saved one expert at a time
("model.layers.3.mlp.experts.down_proj.17"), AdamW moments the same way under "optim.<name>.<state>".
Each rank writes the entries it holds (DCP writes a replicated entry once) and, on loading, asks for the
entries of its own parameters and of the optimizer shards it owns in the new layout: 4 ranks can write
what 2 ranks (or 1) read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from nanoseek.parallel.data import ZeroAdamW
from nanoseek.parallel.expert import is_expert_param
from nanoseek.parallel.mesh import ParallelContext


def _entries(name: str, tensor: torch.Tensor, ctx: ParallelContext, prefix: str) -> dict[str, torch.Tensor]:
    """One entry per whole tensor; an expert stack (local experts, ...) becomes one entry per global expert."""
    if is_expert_param(name) and tensor.dim() > 0:
        first = ctx.ep_rank * tensor.shape[0]
        return {f"{prefix}{name}.{first + j}": tensor[j] for j in range(tensor.shape[0])}
    return {f"{prefix}{name}": tensor}


def _state(model: torch.nn.Module, optimizer: ZeroAdamW, ctx: ParallelContext, for_load: bool) -> dict[str, Any]:
    """The DCP state dict of this rank: views of the live tensors, so that dcp.load fills them in place."""
    state: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        state.update(_entries(name, tensor, ctx, "model."))
    for name, p in optimizer.owned().items():
        moments = optimizer.local.state[p]
        if for_load and not moments:  # the shards this rank owns now: allocate what AdamW would
            fused = optimizer.local.defaults.get("fused")
            moments.update(step=torch.zeros((), device=p.device if fused else "cpu"),
                           exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        for key, value in moments.items():
            state.update(_entries(name, value, ctx, f"optim.{name}.{key}.") if key != "step"
                         else {f"optim.{name}.step": value})
    return state


def save(path: Path, model: torch.nn.Module, optimizer: ZeroAdamW, ctx: ParallelContext,
         extra: dict[str, Any]) -> None:
    """Collective: every rank calls it. `extra` (step, data position, ...: JSON) is the same on every rank."""
    state = _state(model, optimizer, ctx, for_load=False)
    state["trainer"] = json.dumps(extra)  # one opaque entry (DCP would flatten a dict into many)
    dcp.save(state, checkpoint_id=str(path))


def load(path: Path, model: torch.nn.Module, optimizer: ZeroAdamW, ctx: ParallelContext) -> dict[str, Any]:
    """Collective: fill this rank's weights and optimizer shards from `path`; -> the saved `extra`."""
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = _state(model, optimizer, ctx, for_load=True)
    missing = [k for k in state if k not in saved and k.startswith("model.")]
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} weights this model needs, e.g. {missing[:3]}")
    state = {k: v for k, v in state.items() if k in saved}
    state["trainer"] = ""
    dcp.load(state, checkpoint_id=str(path))
    return json.loads(state["trainer"])
