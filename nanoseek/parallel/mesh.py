"""The parallel layout and its device mesh: pipeline x data x expert, from torchrun's environment.

DeepSeek-V3's decomposition (no tensor parallelism): world = pp * dp * ep ranks on a mesh of shape
(pp, dp, ep), expert dim innermost. Expert parallelism is carved out of data parallelism:
  - every (dp, ep) coordinate reads its own slice of the global batch, so the data-parallel degree of
    the dense weights is dp * ep (their gradients are all-reduced over the flattened "dp_ep" group);
  - the routed experts are split into ep shards, each replicated dp times (gradients all-reduced over "dp");
  - the layers are split into 2 * pp pipeline stages, two per rank in DualPipe's V layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError


class LayoutError(NanoseekError, ValueError):
    """A parallel layout that does not fit the world size or the model; the message names the mismatch."""


@dataclass(frozen=True)
class Layout:
    pp: int = 1  # pipeline ranks (2 * pp stages, DualPipe V layout)
    dp: int = 1  # data-parallel replicas of each expert shard
    ep: int = 1  # expert-parallel ranks (routed experts split ep ways)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep

    @property
    def data_parallel(self) -> int:
        """How many ranks read distinct slices of each global batch."""
        return self.dp * self.ep

    def __str__(self) -> str:
        return f"PP{self.pp} x DP{self.dp} x EP{self.ep}"

    def check(self, config: ModelConfig, world_size: int | None = None) -> None:
        """Raise LayoutError if this layout cannot run `config` on `world_size` ranks."""
        for name in ("pp", "dp", "ep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LayoutError(f"{name} = {getattr(self, name)!r}: each parallel degree must be an integer >= 1")
        if world_size is not None and world_size != self.world_size:
            raise LayoutError(f"layout {self} needs pp*dp*ep = {self.world_size} ranks, but the world has "
                              f"{world_size}; pick degrees whose product is {world_size}")
        if self.ep > 1:
            e, g = config.n_routed_experts, max(1, config.n_group)
            if e % self.ep:
                raise LayoutError(f"{e} routed experts do not split over ep = {self.ep} ranks; "
                                  "ep must divide n_routed_experts")
            if self.ep % g and g % self.ep:
                # Node-limited routing: a token visits <= topk_group groups, and a group must map onto
                # whole ranks (ep % n_group == 0: a group spans ep/n_group ranks, i.e. a node) or
                # several groups onto one rank (n_group % ep == 0).
                raise LayoutError(f"ep = {self.ep} and n_group = {g}: one must divide the other so that each "
                                  "expert group lives on whole ranks (node-limited routing)")
        if self.pp > 1:
            stages = 2 * self.pp
            if config.num_hidden_layers % stages:
                raise LayoutError(f"{config.num_hidden_layers} layers do not split into 2 * pp = {stages} "
                                  "pipeline stages (DualPipeV holds two stages per rank); pick pp so that "
                                  "2 * pp divides num_hidden_layers")
            if config.tie_word_embeddings:
                raise LayoutError("tie_word_embeddings with pp > 1 is not supported")


@dataclass
class ParallelContext:
    """This rank's place in the mesh and the process groups each kind of traffic uses."""

    layout: Layout
    mesh: DeviceMesh  # (pp, dp, ep)
    device: torch.device
    rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    pp_group: dist.ProcessGroup  # the pipeline: activations and their gradients, point to point
    dp_group: dist.ProcessGroup  # replicas of one expert shard: expert gradients are all-reduced here
    ep_group: dist.ProcessGroup  # the ranks that exchange tokens with all-to-all
    data_group: dist.ProcessGroup  # dp x ep: dense gradients, expert loads and loss totals are reduced here

    @property
    def data_rank(self) -> int:
        """Which slice of the global batch this rank reads (0 .. dp*ep - 1)."""
        return self.dp_rank * self.layout.ep + self.ep_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_parallel(layout: Layout, config: ModelConfig, device: str = "auto") -> ParallelContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) and build the mesh.

    nccl on GPUs (one per LOCAL_RANK), gloo on the CPU. A caller that already initialised the default
    process group (a test spawning processes) keeps it.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise LayoutError("no distributed environment: launch with torchrun (it sets RANK, WORLD_SIZE, "
                              "MASTER_ADDR, MASTER_PORT)")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    layout.check(config, dist.get_world_size())
    mesh = init_device_mesh(dev.type, (layout.pp, layout.dp, layout.ep), mesh_dim_names=("pp", "dp", "ep"))
    return ParallelContext(
        layout, mesh, dev, dist.get_rank(), mesh.get_local_rank("pp"), mesh.get_local_rank("dp"),
        mesh.get_local_rank("ep"), mesh.get_group("pp"), mesh.get_group("dp"), mesh.get_group("ep"),
        mesh["dp", "ep"]._flatten("dp_ep").get_group())
