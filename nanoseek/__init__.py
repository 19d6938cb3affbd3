"""nanoseek: DeepSeek-V3 and DeepSeek-R1, rebuilt as one hackable PyTorch package."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.config import DENSE_PRESETS, PRESETS, ConfigError, ModelConfig, get_preset
from nanoseek.model import DeepSeekV3, build_model

__version__ = "0.1.0"


def from_pretrained(path_or_preset: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, seed: int = 0) -> DeepSeekV3:
    """A checkpoint directory (HF DeepSeek-V3 layout, or a dense student's Qwen2/Llama one) loaded, or a preset name
    initialised from `seed` (a dense preset's is a DenseTransformer, itself a DeepSeekV3)."""
    if str(path_or_preset) in PRESETS or str(path_or_preset) in DENSE_PRESETS:
        torch.manual_seed(seed)
        model = build_model(get_preset(str(path_or_preset)))
        return model.to(device=device, dtype=dtype)
    path = Path(path_or_preset)
    if not path.exists():
        raise FileNotFoundError(f"{str(path_or_preset)!r} is neither a checkpoint directory nor a preset "
                                f"({', '.join([*PRESETS, *DENSE_PRESETS])})")
    return load_pretrained(path, dtype=dtype, device=device)


__all__ = ["DeepSeekV3", "ModelConfig", "ConfigError", "PRESETS", "get_preset", "from_pretrained", "save_pretrained"]
