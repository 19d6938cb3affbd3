import pytest
import torch

from nanoseek.config import ModelConfig, get_preset


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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
