"""A static, preallocated key/value cache for incremental decoding (gpt-fast style).

Keys and values are stored once per key/value head, before grouped-query attention shares them among the
query heads, so the 135M model caches 3 heads per layer rather than 9. The buffers are allocated once at their
full length; each forward pass writes its new positions in place and attends over the filled prefix.
"""

from __future__ import annotations

import torch

from .config import Config


class LayerCache:
    """Keys and values of one decoder layer: two (B, n_kv_head, max_len, head_dim) buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(
        self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at positions start..start+T-1; return positions 0..length-1.

        start is an int, or a one-element tensor (a compiled step's: the write is then an index_copy_ at
        positions that are data, so one graph serves them all).
        """
        T = k.shape[2]
        if isinstance(start, int):
            self.k[:, :, start : start + T] = k
            self.v[:, :, start : start + T] = v
        else:
            slots = start + torch.arange(T, device=start.device)
            self.k.index_copy_(2, slots, k.to(self.k.dtype))
            self.v.index_copy_(2, slots, v.to(self.v.dtype))
            torch._check(length <= self.k.shape[2])  # tells the compiler the slice below needs no clamping
        return self.k[:, :, :length], self.v[:, :, :length]


class KVCache:
    """One LayerCache per decoder layer, all of the same batch size and length."""

    def __init__(
        self,
        config: Config,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} exceeds the model's context length {config.max_position_embeddings}"
            )
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def from_layers(cls, layers: list[LayerCache]) -> KVCache:
        """A cache over existing buffers (a view of some rows of another cache, or a compiled step's inputs)."""
        cache = cls.__new__(cls)
        cache.layers = layers
        cache.batch_size, cache.max_len = layers[0].k.shape[0], layers[0].k.shape[2]
        return cache

    def check_room(self, start: int, length: int) -> None:
        if start < 0 or start + length > self.max_len:
            raise ValueError(f"positions {start}..{start + length - 1} do not fit a cache of length {self.max_len}")
