"""Where a measured number came from: the device it ran on and the git commit, and the result file it goes in
(the benchmarks in bench/ write one JSON each under bench/results/)."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def git_commit() -> str:
    """The checked-out commit (full hash), or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path
