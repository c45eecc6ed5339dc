"""Perplexity of a language model on a token stream: `perplexity(model, token_ids, seq_len, batch_size)`.

Windows. Every token but the first is predicted exactly once, from the tokens before it in its window:
  stride == seq_len (the default)  non-overlapping windows: window k reads tokens [k*L, k*L + L) and predicts
                                   tokens [k*L + 1, k*L + L + 1), so context restarts every L tokens
                                   (nanoGPT's validation loss over consecutive blocks).
  stride < seq_len                 a sliding window (as in the transformers perplexity guide): after the first
                                   window, window k starts at k*stride and scores only its last `stride`
                                   predictions, so every scored token sees at least L - stride tokens of context.
The last window may be shorter. loss = mean negative log-likelihood (nats) over all predicted tokens, and
perplexity = exp(loss).

Memory: logits are computed only for the scored positions, `LOGIT_ROWS` at a time, so a batch never holds the
full [B*T, vocab] float32 logits (4 x 1024 x 49152 x 4 bytes = 805 MB at the defaults).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model import SmolLM2

LOGIT_ROWS = 512  # positions whose logits are computed at once: 512 x 49152 x 4 bytes = 100 MB


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean negative log-likelihood per predicted token, in nats
    ppl: float  # exp(nll)
    tokens: int  # how many tokens were predicted (scored)


@dataclass(frozen=True)
class Window:
    start: int  # the first input token's index in the stream
    length: int  # T: inputs are tokens[start : start + T], targets tokens[start + 1 : start + T + 1]
    scored_from: int  # only targets at offsets >= scored_from within the window count


def windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """The windows that predict tokens 1..n_tokens-1 of a stream, each exactly once (see the module doc)."""
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    out = []
    next_target = 1  # the first token not yet scored
    while next_target < n_tokens:
        context = 0 if next_target == 1 else seq_len - stride  # tokens kept from the window before
        start = max(0, next_target - 1 - context)
        end = min(start + seq_len + 1, n_tokens)  # inputs [start, end - 1), targets [start + 1, end)
        out.append(Window(start, end - 1 - start, next_target - 1 - start))
        next_target = end
    return out


def _batches(wins: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, at most batch_size at a time (only the last window is shorter)."""
    batch: list[Window] = []
    for w in wins:
        if batch and (len(batch) == batch_size or w.length != batch[0].length):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.inference_mode()
def perplexity(
    model: SmolLM2,
    token_ids: np.ndarray | torch.Tensor,
    seq_len: int = 1024,
    batch_size: int = 4,
    *,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Mean NLL and perplexity of model on a 1-D token stream (a np.memmap is read one batch at a time)."""
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    n = int(token_ids.shape[0])
    if n < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_positions = model.config.max_position_embeddings
    if seq_len > max_positions:
        raise ValueError(f"seq_len {seq_len} is longer than the model's {max_positions} positions")
    wins = windows(n, seq_len, stride)
    device = model.model.embed_tokens.weight.device
    vocab = model.config.vocab_size

    from tqdm import tqdm

    nll_sum, scored = 0.0, 0
    with tqdm(total=n - 1, unit="tok", desc="perplexity", disable=not progress) as bar:
        for batch in _batches(wins, batch_size):
            T = batch[0].length
            rows = torch.stack([_slice(token_ids, w.start, T + 1) for w in batch]).to(device)  # (B, T + 1)
            x, y = rows[:, :-1], rows[:, 1:]  # inputs and next-token targets, (B, T) each
            if int(rows.max()) >= vocab or int(rows.min()) < 0:
                raise ValueError(f"token ids must be in [0, {vocab}) for this model, found "
                                 f"{int(rows.min())}..{int(rows.max())}")
            scored_mask = torch.arange(T, device=device)[None, :] >= torch.tensor(
                [w.scored_from for w in batch], device=device)[:, None]  # (B, T)
            h = model.hidden(x)[scored_mask]  # (n_scored, hidden)
            targets = y[scored_mask]  # (n_scored,)
            for i in range(0, h.shape[0], LOGIT_ROWS):
                logits = model.lm_head(h[i:i + LOGIT_ROWS]).float()  # (rows, vocab)
                nll_sum += F.cross_entropy(logits, targets[i:i + LOGIT_ROWS], reduction="sum").item()
            scored += targets.numel()
            bar.update(targets.numel())
    assert scored == n - 1, (scored, n)
    nll = nll_sum / scored
    return PerplexityResult(nll=nll, ppl=math.exp(nll) if nll < 700 else math.inf, tokens=scored)


def _slice(token_ids: np.ndarray | torch.Tensor, start: int, length: int) -> torch.Tensor:
    """tokens[start : start + length] as int64 (fewer at the end of the stream never happens: see windows)."""
    if isinstance(token_ids, torch.Tensor):
        return token_ids[start:start + length].to(torch.int64)
    return torch.from_numpy(np.asarray(token_ids[start:start + length], dtype=np.int64))
