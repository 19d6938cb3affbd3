"""The MLA latent KV cache: per layer and slot, only the normalised KV latent and the rotated shared RoPE key.

kv_lora_rank + qk_rope_head_dim values per token per layer (576 for DeepSeek-V3, against 2 x 128 x 128 = 32,768
for the up-projected keys and values of standard multi-head attention). Reserved up front for `slots`
sequences of at most `max_len` tokens each; a slot is one running sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoseek.config import ModelConfig


class LatentKVCache:
    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, layers: int | None = None, static_span: bool = False):
        layers = config.num_hidden_layers if layers is None else layers  # 1 for an MTP module's own cache
        self.max_len = max_len
        # static_span: attend over all max_len entries (masked) instead of up to the longest row, so a forward's
        # shapes never depend on the data and no length is read back to the host (what CUDA graphs need).
        self.static_span = static_span
        self.latent = torch.zeros(layers, slots, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(layers, slots, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens cached per slot
        self.active = torch.arange(slots, device=device)  # the slots (rows) the next forward works on
        self.rows: slice | torch.Tensor = slice(0, slots)  # the same as an index: a slice where they are consecutive
        self._positions: torch.Tensor | None = None
        self._span = 0

    @property
    def values_per_token(self) -> int:
        """Cached values per token, all layers together."""
        return self.latent.shape[0] * (self.latent.shape[-1] + self.k_rope.shape[-1])

    @property
    def bytes_reserved(self) -> int:
        return (self.latent.numel() + self.k_rope.numel()) * self.latent.element_size()

    def bind(self, slots: torch.Tensor | Sequence[int]) -> LatentKVCache:
        """Select the rows of the next forward (in the order of its batch). Slots given as host integers that are
        consecutive are read as a view of the cache; other slots are gathered (copied) at every layer."""
        if isinstance(slots, torch.Tensor):
            self.active = self.rows = slots
        elif len(slots) and list(slots) == list(range(slots[0], slots[0] + len(slots))):
            self.active = torch.arange(slots[0], slots[0] + len(slots), device=self.lengths.device)
            self.rows = slice(slots[0], slots[0] + len(slots))
        else:
            self.active = self.rows = torch.tensor(list(slots), dtype=torch.long, device=self.lengths.device)
        return self

    def move(self, source: int, target: int) -> None:
        """Move slot source's sequence into slot target (whose sequence is dropped); source is then free."""
        n = int(self.lengths[source])
        self.latent[:, target, :n] = self.latent[:, source, :n]
        self.k_rope[:, target, :n] = self.k_rope[:, source, :n]
        self.lengths[target] = n
        self.lengths[source] = 0

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def positions(self, seq_len: int) -> torch.Tensor:
        """(B, seq_len) positions of the next tokens of each active slot; fixes them for this forward's layers."""
        self._positions = self.lengths[self.active, None] + torch.arange(seq_len, device=self.lengths.device)
        if self.static_span:
            self._span = self.max_len  # the engine checked every request's length against max_len up front
            return self._positions
        self._span = int(self._positions.max()) + 1  # one host sync per forward, not per layer
        if self._span > self.max_len:
            raise ValueError(f"a sequence would reach {self._span} tokens; this cache holds {self.max_len}")
        return self._positions

    def layer(self, index: int) -> _LayerView:
        return _LayerView(self, index)

    def advance(self, counts: torch.Tensor | int) -> None:
        """After a forward: each active slot now holds `counts` more tokens (a prompt's true length, or 1;
        negative to drop rejected speculative tokens, whose stale entries are then masked and overwritten)."""
        self.lengths[self.rows] += counts


class _LayerView:
    def __init__(self, cache: LatentKVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, pos, span = self.cache, self.cache._positions, self.cache._span
        rows = c.active[:, None]
        c.latent[self.index, rows, pos] = latent.to(c.latent.dtype)
        c.k_rope[self.index, rows, pos] = k_rope.to(c.k_rope.dtype)
        # A query sees the keys at or before its position; slots beyond a row's length hold stale values.
        mask = torch.arange(span, device=pos.device)[None, None, :] <= pos[:, :, None]  # (B, S, span)
        return c.latent[self.index, c.rows, :span], c.k_rope[self.index, c.rows, :span], mask
