"""Inference KV caches: per layer and slot (one running sequence), what attention needs of the tokens so far.

Two caches behind one interface (SlotCache: bind, positions, layer, advance, move, reset), differing only in
the tensors they store:

- LatentKVCache, MLA's (DeepSeek-V3): only the normalised KV latent and the rotated shared RoPE key,
  kv_lora_rank + qk_rope_head_dim values per token per layer (576 for DeepSeek-V3, against 2 x 128 x 128 = 32,768
  for the up-projected keys and values of standard multi-head attention).
- GQAKVCache, a dense student's (Qwen2/Llama, model/dense.py): the rotated keys and the values of the
  num_key_value_heads heads, 2 x kv_heads x head_dim values per token per layer (512 for R1-Distill-Qwen-1.5B).

`make_cache(config, ...)` picks the one a model config needs. Reserved up front for `slots` sequences of at most
`max_len` tokens each. Every store is laid out (layers, slots, ..., max_len, values) (the token axis second to
last), and a layer's update writes each new tensor (B, S, ..., values) at the rows' next positions and returns
each store's rows up to the attended span, with the attention mask: one layer view serves both caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from nanoseek.config import DenseConfig, ModelConfig

__all__ = ["CacheLayer", "GQAKVCache", "LatentKVCache", "LeadingRows", "SlotCache", "make_cache"]


class SlotCache:
    """The bookkeeping shared by the caches: tokens cached per slot, the rows the next forward works on, their
    positions, and slot moves. Subclasses only allocate their stores: tensors of (layers, slots, ..., max_len, d)."""

    def __init__(self, stores: Sequence[torch.Tensor], max_len: int, static_span: bool = False):
        self._stores = tuple(stores)
        layers, slots = self._stores[0].shape[:2]
        device = self._stores[0].device
        if any(s.shape[:2] != (layers, slots) or s.shape[-2] != max_len for s in self._stores):
            raise ValueError("cache stores must all be (layers, slots, ..., max_len, values)")
        self.max_len = max_len
        # static_span: attend over all max_len entries (masked) instead of up to the longest row, so a forward's
        # shapes never depend on the data and no length is read back to the host (what CUDA graphs need).
        self.static_span = static_span
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens cached per slot
        self.active = torch.arange(slots, device=device)  # the slots (rows) the next forward works on
        self.rows: slice | torch.Tensor = slice(0, slots)  # the same as an index: a slice where they are consecutive
        self._positions: torch.Tensor | None = None
        self._span = 0

    @property
    def values_per_token(self) -> int:
        """Cached values per token, all layers together."""
        return sum(s.numel() for s in self._stores) // (self.lengths.shape[0] * self.max_len)

    @property
    def bytes_reserved(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._stores)

    def bind(self, slots: torch.Tensor | Sequence[int]) -> Self:
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
        for store in self._stores:
            store[:, target, ..., :n, :] = store[:, source, ..., :n, :]
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

    def layer(self, index: int) -> CacheLayer:
        return CacheLayer(self, index)

    def leading(self, rows: int, span: int) -> LeadingRows:
        """The first `rows` slots, attending `span` cached entries (at least the longest row's length after the
        forward, known to the caller): the engine's decode step's binding (nanoseek/infer/engine.py)."""
        return LeadingRows(self, rows, span)

    def advance(self, counts: torch.Tensor | int) -> None:
        """After a forward: each active slot now holds `counts` more tokens (a prompt's true length, or 1;
        negative to drop rejected speculative tokens, whose stale entries are then masked and overwritten)."""
        self.lengths[self.rows] += counts


def _write(store: torch.Tensor, layer: int, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """store (layers, slots, ..., max_len, d)[layer, rows (B, 1), ..., positions (B, S), :] = values (B, S, ..., d)."""
    store[layer][rows, ..., positions, :] = values


@torch.library.custom_op("nanoseek::write_cache", mutates_args=("store",))
def _write_opaque(store: torch.Tensor, layer: int, rows: torch.Tensor, positions: torch.Tensor,
                  values: torch.Tensor) -> None:
    """_write as one op that torch.compile keeps in place: traced as it is, the write becomes a copy of the whole
    store at every layer (a write into a graph input through a view)."""
    _write(store, layer, rows, positions, values)


class LeadingRows:
    """A forward's binding of the first `rows` slots, with the attended span given rather than read back from the
    lengths. A fresh object per forward that changes nothing of the cache's Python state: torch.compile traces it
    without specialising on the number of rows or the span (SlotCache.bind writes attributes, which a compiled
    graph would have to fix). The caller advances the cache after the forward, as after bind."""

    def __init__(self, cache: SlotCache, rows: int, span: int):
        self._stores = cache._stores
        self.lengths = cache.lengths
        self.active = torch.arange(rows, device=cache.lengths.device)
        self.rows = slice(0, rows)
        self._span = span
        self._positions: torch.Tensor | None = None

    def positions(self, seq_len: int) -> torch.Tensor:
        self._positions = self.lengths[self.rows, None] + torch.arange(seq_len, device=self.lengths.device)
        return self._positions

    def layer(self, index: int) -> CacheLayer:
        return CacheLayer(self, index)


class CacheLayer:
    """One layer's view of a cache: update(*new) stores one new tensor per store and returns them all cached."""

    def __init__(self, cache: SlotCache | LeadingRows, index: int):
        self.cache, self.index = cache, index

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """new: one tensor (B, S, ..., d) per store (the store's layout without its token axis moved) -> each store's
        rows up to the attended span (B, ..., T, d), and the attention mask (B, S, T), True where a query may see a
        key. A query sees the keys at or before its position; entries beyond a row's length hold stale values (a
        right-padded prompt's pads, a dropped draft), masked until they are overwritten."""
        c, pos, span = self.cache, self.cache._positions, self.cache._span
        if len(new) != len(c._stores):
            raise ValueError(f"this cache stores {len(c._stores)} tensors per token; update got {len(new)}")
        rows = c.active[:, None]
        write = _write_opaque if torch.compiler.is_compiling() else _write
        cached = []
        for store, values in zip(c._stores, new):
            write(store, self.index, rows, pos, values.to(store.dtype))
            cached.append(store[self.index, c.rows, ..., :span, :])
        mask = torch.arange(span, device=pos.device)[None, None, :] <= pos[:, :, None]  # (B, S, span)
        return (*cached, mask)


class LatentKVCache(SlotCache):
    """MLA's cache: per layer the latent (slots, max_len, kv_lora_rank) and the RoPE key (slots, max_len,
    rope_dim). A layer's update(latent (B, S, r), k_rope (B, S, rope_dim)) -> (latent (B, T, r), k_rope
    (B, T, rope_dim), mask (B, S, T))."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, layers: int | None = None, static_span: bool = False):
        layers = config.num_hidden_layers if layers is None else layers  # 1 for an MTP module's own cache
        self.latent = torch.zeros(layers, slots, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(layers, slots, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        super().__init__((self.latent, self.k_rope), max_len, static_span)


class GQAKVCache(SlotCache):
    """A grouped-query attention's cache: per layer the rotated keys and the values (slots, kv_heads, max_len,
    head_dim), head-major so that a row's heads are the (B, kv_heads, T, head_dim) SDPA takes without a copy.
    A layer's update(k, v (B, S, kv_heads, head_dim)) -> (k, v (B, kv_heads, T, head_dim), mask (B, S, T))."""

    def __init__(self, config: DenseConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, layers: int | None = None, static_span: bool = False):
        layers = config.num_hidden_layers if layers is None else layers
        shape = (layers, slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        super().__init__((self.k, self.v), max_len, static_span)


def make_cache(config: ModelConfig | DenseConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, layers: int | None = None) -> SlotCache:
    """The cache a model of `config` attends with: MLA's latent cache, or a dense student's key/value cache."""
    cls = GQAKVCache if isinstance(config, DenseConfig) else LatentKVCache
    return cls(config, slots, max_len, device, dtype, layers)
