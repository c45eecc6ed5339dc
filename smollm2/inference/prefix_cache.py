"""Prefix caching for the batching engine: the keys and values of prompt beginnings already prefilled, reused.

Requests to a server often begin alike: the same system prompt, a few-shot preamble, a conversation re-sent
with one more turn. Prefilling that beginning again costs as much as the first time. The engine keeps the
keys/values of every prompt it prefilled, in blocks of `block` tokens, and a new prompt's prefill starts after
the longest run of cached blocks it begins with (vLLM's automatic prefix caching; SGLang's RadixAttention keeps
the same thing as a radix tree).

The blocks form a tree: a block is found by its parent block and its own token ids, compared as tuples (no hash
is trusted), so a hit always means the same ids at the same positions from position 0, hence the same keys and
values as a prefill would compute. A key or value of position i depends only on the tokens 0..i, which is why a
prefix's entries can be reused whatever follows it.

What a cache holds is only valid for the model that computed it: each engine (one model, fixed weights) owns
its own. Memory is bounded by `max_bytes`: when an insertion goes over it, the least recently used blocks that
no other block extends are dropped first (a block is never dropped before the blocks after it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kv_cache import KVCache

BLOCK = 32  # tokens per cached block: the granularity of a hit


@dataclass(eq=False)
class _Block:
    serial: int  # this block's identity in its children's keys (never reused, unlike id())
    parent: _Block | None
    kv: torch.Tensor  # (layers, 2, n_kv_head, block, head_dim): keys [:, 0] and values [:, 1]
    children: int = 0


@dataclass
class PrefixHit:
    """The cached blocks a prompt begins with, in order, and how many of their tokens to use."""

    blocks: list[_Block] = field(default_factory=list)
    tokens: int = 0


class PrefixCache:
    """Keys/values of prompt prefixes, per block of `block` tokens, at most `max_bytes` of them."""

    def __init__(self, max_bytes: int, block: int = BLOCK) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the prefix cache size must be an integer >= 0 bytes, got {max_bytes!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"the prefix cache block must be an integer >= 1 tokens, got {block!r}")
        self.max_bytes, self.block = max_bytes, block
        # (parent serial or 0, the block's token ids) -> block; in order of last use, oldest first
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._serials = 0
        self.bytes = 0
        self.counters = {"lookups": 0, "hits": 0, "hit_tokens": 0, "evicted_blocks": 0}

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, parent: _Block | None, ids: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        return (parent.serial if parent is not None else 0, tuple(ids))

    def lookup(self, prompt_ids: Sequence[int], limit: int) -> PrefixHit:
        """The longest run of cached blocks the prompt begins with, to use for at most `limit` tokens (the
        caller keeps at least one prompt token to prefill, for the logits of the first new token)."""
        self.counters["lookups"] += 1
        hit, parent, B = PrefixHit(), None, self.block
        for start in range(0, min(len(prompt_ids), limit), B):
            if start + B > len(prompt_ids):
                break
            block = self._blocks.get(self._key(parent, prompt_ids[start : start + B]))
            if block is None:
                break
            self._blocks.move_to_end(self._key(parent, prompt_ids[start : start + B]))  # recently used
            hit.blocks.append(block)
            parent = block
        hit.tokens = min(len(hit.blocks) * B, limit)
        if hit.tokens:
            self.counters["hits"] += 1
            self.counters["hit_tokens"] += hit.tokens
        return hit

    def restore(self, hit: PrefixHit, cache: KVCache, row: int = 0) -> None:
        """Write a hit's keys/values into positions 0..hit.tokens-1 of one row of a cache."""
        B = self.block
        for j, block in enumerate(hit.blocks):
            n = min(B, hit.tokens - j * B)
            if n <= 0:
                break
            for layer, kv in zip(cache.layers, block.kv, strict=True):
                layer.k[row, :, j * B : j * B + n] = kv[0, :, :n]
                layer.v[row, :, j * B : j * B + n] = kv[1, :, :n]

    def insert(self, prompt_ids: Sequence[int], cache: KVCache, row: int = 0) -> None:
        """Keep the whole blocks of a prompt whose keys/values fill positions 0..len(prompt_ids)-1 of a row."""
        parent, path, B = None, set(), self.block
        for start in range(0, len(prompt_ids) - B + 1, B):
            key = self._key(parent, prompt_ids[start : start + B])
            block = self._blocks.get(key)
            if block is None:
                size = cache.layers[0].k[row, :, start : start + B].nbytes * 2 * len(cache.layers)
                self._make_room(size, path)
                if self.bytes + size > self.max_bytes:
                    return  # the prompt's earlier blocks are kept; its later ones do not fit
                kv = torch.stack([torch.stack([layer.k[row, :, start : start + B], layer.v[row, :, start : start + B]])
                                  for layer in cache.layers])  # (layers, 2, n_kv_head, B, head_dim), a copy
                self._serials += 1
                block = _Block(self._serials, parent, kv)
                self._blocks[key] = block
                self.bytes += size
                if parent is not None:
                    parent.children += 1
            else:
                self._blocks.move_to_end(key)
            path.add(block.serial)
            parent = block

    def _make_room(self, size: int, protected: set[int]) -> None:
        """Drop least recently used blocks that no block extends (never those in `protected`, the blocks being
        inserted) until `size` more bytes fit, or nothing more can go."""
        while self.bytes + size > self.max_bytes:
            victim = next((k for k, b in self._blocks.items() if b.children == 0 and b.serial not in protected), None)
            if victim is None:
                return
            block = self._blocks.pop(victim)
            self.bytes -= block.kv.nbytes
            if block.parent is not None:
                block.parent.children -= 1
            self.counters["evicted_blocks"] += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_blocks": len(self._blocks), "prefix_cache_bytes": self.bytes,
                **{f"prefix_cache_{k}": v for k, v in self.counters.items()}}
