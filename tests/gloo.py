"""The distributed tests' harness: run a function on N gloo processes and collect the numbers each reports."""

from __future__ import annotations

import math
import os
import socket
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _process(rank: int, world: int, port: int, body: Callable, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, world, *args, report=lambda name, value: results.put((rank, name, value)))
    except Exception:  # noqa: BLE001 (any failure is reported to the parent)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def spawn(body: Callable, world: int, args: tuple, reports_per_rank: int) -> dict[str, float]:
    """body(rank, world, *args, report=...) on `world` processes (a module-level function: it is pickled by name),
    each calling report(name, number) reports_per_rank times -> name -> the largest number any rank reported
    (NaN counts as infinite, so a comparison that failed is never hidden by another rank's max)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_process, args=(r, world, port, body, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[str, float] = {}
    for _ in range(world * reports_per_rank):
        rank, name, value = results.get(timeout=300)
        if name == "error":
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} failed:\n{value}")
        out[name] = max(out.get(name, 0.0), math.inf if math.isnan(value) else value)
    for p in procs:
        p.join(timeout=60)
    return out
