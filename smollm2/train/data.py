"""Training data: the token files `smollm2 prepare` writes, and which windows of them each step trains on.

DATA_DIR is a prepared data directory (format and checks in smollm2/data.py): train.bin and val.bin, flat
uint16 token streams with documents separated by <|endoftext|>, and manifest.json. The streams are
memory-mapped, never read whole.

A training example is a window of seq_len + 1 tokens: the model reads the first seq_len and predicts the last
seq_len (labels = inputs shifted by one). Each epoch cuts the stream into windows at a seeded random offset and
visits them in a seeded random order; step after step takes the next batch_size windows of that order, crossing
into the next epoch when one runs out. The position in that order is two integers, saved in every checkpoint,
so a resumed run reads exactly the batches an uninterrupted one would have. Every process computes the same
global batch and keeps its own shard of it (nanoGPT samples random offsets with replacement and saves no data
position, so its resumes are not reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .prepare import load_tokens, read_manifest


@dataclass
class TokenData:
    """The two token streams of a prepared corpus and its manifest."""

    directory: Path
    manifest: dict[str, Any]  # read_manifest()'s checked manifest
    train: np.ndarray  # (train_tokens,) uint16, memory-mapped
    val: np.ndarray  # (val_tokens,) uint16, may be empty

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @classmethod
    def open(cls, directory: str | Path) -> TokenData:
        """A prepared data directory (checked by smollm2.data: manifest fields, file sizes) with training tokens."""
        directory = Path(directory).expanduser()
        manifest = read_manifest(directory)
        train, val = load_tokens(directory, "train", manifest), load_tokens(directory, "val", manifest)
        if len(train) == 0:
            raise ValueError(f"{directory / 'train.bin'}: no training tokens (was the input text empty?)")
        return cls(directory, manifest, train, val)

    def check_ids(self, vocab_size: int, model: str) -> None:
        """Every id of both files below vocab_size, the model's, else a ValueError naming the file and the first
        bad offset (an id past the embedding table would be an IndexError deep inside torch mid-run).

        The files are scanned, not just the manifest's max_id: a file changed after `prepare` is caught too.
        Reading them costs about a second per GB, once, before the first step.
        """
        for split, tokens in (("train", self.train), ("val", self.val)):
            offset = first_id_at_least(tokens, vocab_size)
            if offset is not None:
                raise ValueError(
                    f"{self.directory / f'{split}.bin'}: token {offset} (byte offset {offset * tokens.itemsize}) "
                    f"is id {int(tokens[offset])}, outside the vocabulary of the model ({model}: {vocab_size} ids, "
                    f"0-{vocab_size - 1}); prepare the data with the model's tokenizer"
                )


def first_id_at_least(tokens: np.ndarray, limit: int, chunk: int = 1 << 24) -> int | None:
    """The offset of the first token >= limit, or None; read in pieces of 16M tokens (memory stays flat)."""
    for start in range(0, len(tokens), chunk):
        piece = tokens[start : start + chunk]
        if int(piece.max()) >= limit:
            return start + int(np.argmax(piece >= limit))
    return None


def windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels (len(starts), length): labels are the inputs shifted left by one token."""
    rows = np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int64)  # (B, length + 1)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


class BatchSampler:
    """The windows of every step, for one process: deterministic given (seed, step), resumable from two ints."""

    def __init__(self, n_tokens: int, seq_len: int, batch_size: int, grad_accum: int, rank: int,
                 world_size: int, seed: int) -> None:
        if n_tokens < seq_len + 1:
            raise ValueError(f"the training split has {n_tokens} tokens, fewer than one sequence of --seq-len "
                             f"{seq_len} plus its next token; lower --seq-len or add text")
        if batch_size % (grad_accum * world_size):
            raise ValueError(f"--batch-size {batch_size} must be divisible by --grad-accum {grad_accum} x "
                             f"{world_size} process(es)")
        self.n_tokens, self.seq_len, self.seed = n_tokens, seq_len, seed
        self.batch_size, self.grad_accum, self.rank, self.world_size = batch_size, grad_accum, rank, world_size
        self.micro_batch = batch_size // (grad_accum * world_size)
        self.epoch, self.position = 0, 0  # the next window is order(epoch)[position]
        self._order_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Start offsets of the windows of one epoch, in visiting order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            # A fresh cut each epoch, so a small corpus is not seen as the same windows over and over.
            shift = int(rng.integers(min(self.seq_len, self.n_tokens - self.seq_len)))
            count = (self.n_tokens - 1 - shift) // self.seq_len
            self._order_cache = (epoch, shift + self.seq_len * rng.permutation(count))
        return self._order_cache[1]

    def next_global_batch(self) -> np.ndarray:
        """Start offsets of the next batch_size windows, all processes together; advances the position."""
        starts: list[np.ndarray] = []
        needed = self.batch_size
        while needed:
            order = self.order(self.epoch)
            take = order[self.position : self.position + needed]
            starts.append(take)
            needed -= len(take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(starts)

    def next_batches(self, tokens: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's grad_accum micro-batches of the next step: (inputs, labels), each (micro_batch, seq_len)."""
        starts = self.next_global_batch().reshape(self.grad_accum, self.world_size, self.micro_batch)
        return [windows(tokens, starts[i, self.rank], self.seq_len) for i in range(self.grad_accum)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0:
            raise ValueError(f"bad data-loader state {state!r}")
        if not 0 <= position < len(self.order(epoch)):
            raise ValueError(f"data-loader position {position} is outside epoch {epoch}: the training data changed")
        self.epoch, self.position = epoch, position


def val_starts(n_tokens: int, seq_len: int, max_tokens: int) -> tuple[np.ndarray, int]:
    """The fixed validation windows (start offsets, window length): consecutive, from the start of val.bin.

    They do not depend on the number of processes, so one process and several report the same validation loss.
    """
    length = min(seq_len, n_tokens - 1)
    if length < 1:
        return np.zeros(0, dtype=np.int64), 0
    count = min((n_tokens - 1) // length, max(1, max_tokens // length))
    return np.arange(count, dtype=np.int64) * length, length
