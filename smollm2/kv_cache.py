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

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at positions start..start+T-1; return the filled prefix."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


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

    def check_room(self, start: int, length: int) -> None:
        if start < 0 or start + length > self.max_len:
            raise ValueError(f"positions {start}..{start + length - 1} do not fit a cache of length {self.max_len}")
