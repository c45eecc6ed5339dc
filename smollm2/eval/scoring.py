"""Zero-shot multiple-choice scoring with our model: the model half of `smollm2 evaluate`.

`tasks.py` turns the benchmark files into `Item`s (query, choices, gold) and holds lighteval's
context/continuation split and the acc / acc_norm arithmetic. This file runs the model over them the way
lighteval scored SmolLM2's model card: each choice gets the summed log-probability of its continuation
tokens given the context, and with the chat template the context is the query rendered as one user turn
plus the assistant header (`add_generation_prompt=True`; see shared/data/eval/README.txt).

Speed, since a full run is ~18k items on a laptop CPU:
- The choices of an item share their context, so the context runs through the model once, filling a KV
  cache, and only the continuations run once per choice over the cached context (right-padded). `batch_size`
  items go through together: what all their contexts share (the chat template's ~30-token system turn) runs
  once, then each item's own context, then every choice's continuation. Items whose contexts differ in
  length leave gaps in the cache, which the attention mask hides.
- The output projection (49152 x 576: a fifth of the model's FLOPs per token) is applied only at the
  positions whose next token is scored.
`score_groups` is the general form, also used by the lm-eval adapter (`lm_eval_adapter.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..kv_cache import KVCache
from ..model import SmolLM2
from ..tokenizer import Tokenizer
from .tasks import Item, predict, split_context_continuation

Request = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)

# Positions per output-projection call: bounds the (positions x 49152) fp32 logits to ~200 MB.
_LOGITS_CHUNK = 1024


@dataclass(frozen=True)
class Score:
    """The score of one continuation."""

    logprob: float  # sum over its tokens of log p(token | everything before it)
    greedy: bool  # every token is the argmax of its distribution (lm-eval's `is_greedy`)
    n_tokens: int


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def _select_rows(cache: KVCache, index: torch.Tensor) -> None:
    """Make row r of the cache a copy of row index[r]: one copy of each item's context per choice."""
    for layer in cache.layers:
        layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
    cache.batch_size = len(index)


@torch.no_grad()
def score_groups(model: SmolLM2, groups: Sequence[Sequence[Request]], pad_id: int = 0) -> list[list[Score]]:
    """Score every (context, continuation) request: each group's shared context runs through the model once.

    A group is requests whose contexts (usually all of them) share a prefix: one multiple-choice item. All
    groups go through in at most three forward passes. Results equal scoring each request alone with a
    full forward pass, up to float rounding.
    """
    max_len = model.config.max_position_embeddings
    rows: list[tuple[int, list[int], int]] = []  # (group, context + continuation ids, context length)
    prefix_lens: list[int] = []  # per group: the context tokens all its rows share
    for g, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {g} has no requests")
        for context, continuation in group:
            if not context or not continuation:
                raise ValueError(f"group {g}: empty context or continuation (context {len(context)} tokens, "
                                 f"continuation {len(continuation)}); score a text's first token after a BOS/EOS")
            # The last token is only predicted, never fed in, so a row needs len - 1 positions.
            if len(context) + len(continuation) - 1 > max_len:
                raise ValueError(f"group {g}: {len(context) + len(continuation)} tokens exceed the model's "
                                 f"context length {max_len} (+1 predicted token)")
            rows.append((g, [*context, *continuation], len(context)))
        prefix_lens.append(_common_prefix([context for context, _ in group]))
    # A row's suffix is everything after its group's prefix, less the last token (whose successor isn't scored).
    suffix_lens = [len(ids) - 1 - prefix_lens[g] for g, ids, _ in rows]
    P, S = max(prefix_lens), max(suffix_lens)
    if P + S > max_len and len(groups) > 1:
        # A long prefix in one group and a long suffix in another don't fit one cache: halve the batch.
        half = len(groups) // 2
        return score_groups(model, groups[:half], pad_id) + score_groups(model, groups[half:], pad_id)

    G, R = len(groups), len(rows)
    # The prefix every group shares (the chat template's system turn and user header): run once, for all.
    C = _common_prefix([group[0][0][: prefix_lens[g]] for g, group in enumerate(groups)])
    device = model.model.embed_tokens.weight.device
    group_of_row = torch.tensor([g for g, _, _ in rows], device=device)
    cache = KVCache(model.config, 1, P + S, model.model.embed_tokens.weight.dtype, device)
    # Three passes, each attending to the cache the ones before it filled; their hidden states are
    # flattened into one (positions, hidden) tensor: shared (C), then per group (G x (P - C)), then per row (R x S).
    hiddens = []
    if C:
        shared = torch.as_tensor(list(groups[0][0][0][:C]), device=device)[None]  # (1, C)
        hiddens.append(model.hidden(shared, cache=cache)[0])
    if P > C:
        _select_rows(cache, torch.zeros(G, dtype=torch.long, device=device))  # each group continues it
        ids = torch.full((G, P - C), pad_id, dtype=torch.long)
        for g, group in enumerate(groups):
            ids[g, : prefix_lens[g] - C] = torch.as_tensor(list(group[0][0][C : prefix_lens[g]]))
        # Right padding needs no mask here: causal attention keeps real tokens from seeing the pads after them.
        hiddens.append(model.hidden(ids.to(device), cache=cache, start=C).flatten(0, 1))
    if S:
        _select_rows(cache, group_of_row if P > C else torch.zeros(R, dtype=torch.long, device=device))
        ids = torch.full((R, S), pad_id, dtype=torch.long)
        mask = torch.zeros((R, P + S), dtype=torch.long)  # 1 = a real key: own prefix, then own suffix tokens
        positions = torch.zeros((R, S), dtype=torch.long)
        for r, (g, row_ids, _) in enumerate(rows):
            p, s = prefix_lens[g], suffix_lens[r]
            ids[r, :s] = torch.as_tensor(row_ids[p : p + s])
            mask[r, :p] = 1
            mask[r, P : P + s] = 1
            # RoPE positions continue from the row's own prefix, not from the padded cache slot P.
            positions[r] = torch.arange(p, p + S).clamp(max=max_len - 1)
        h = model.hidden(ids.to(device), cache=cache, start=P, positions=positions.to(device),
                         attention_mask=mask.to(device))
        hiddens.append(h.flatten(0, 1))

    # The hidden state at position t predicts token t + 1: gather those that predict continuation tokens.
    index: list[int] = []
    targets: list[int] = []
    counts: list[int] = []
    for r, (g, row_ids, n_context) in enumerate(rows):
        p = prefix_lens[g]
        for t in range(n_context - 1, len(row_ids) - 1):
            if t < C:
                index.append(t)
            elif t < p:
                index.append(C + g * (P - C) + (t - C))
            else:
                index.append(C + G * (P - C) + r * S + (t - p))
            targets.append(row_ids[t + 1])
        counts.append(len(row_ids) - n_context)
    flat = torch.cat(hiddens)
    index_t, targets_t = torch.tensor(index, device=device), torch.tensor(targets, device=device)
    logprobs, greedy = [], []
    for i in range(0, len(index), _LOGITS_CHUNK):
        logits = model.lm_head(flat[index_t[i : i + _LOGITS_CHUNK]]).float()  # (chunk, vocab)
        target = targets_t[i : i + _LOGITS_CHUNK]
        logprobs.append(logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(-1))
        greedy.append(logits.argmax(-1) == target)
    logprob_rows, greedy_rows = torch.cat(logprobs).double().cpu().split(counts), torch.cat(greedy).cpu().split(counts)
    per_row = zip(logprob_rows, greedy_rows, counts, strict=True)
    scores = [Score(float(lp.sum()), bool(gr.all()), n) for lp, gr, n in per_row]
    out: list[list[Score]] = [[] for _ in groups]
    for (g, _, _), score in zip(rows, scores, strict=True):
        out[g].append(score)
    return out


# --- benchmark items --------------------------------------------------------------------------------------


def default_chat_template(tokenizer: Tokenizer, model_name: str) -> bool:
    """Score through the chat template by default only for an Instruct model whose tokenizer has one.

    The card's Instruct column used it; its base column did not (the base tokenizer has no template).
    """
    return bool(tokenizer.chat_template) and "instruct" in model_name.lower()


def render_context(query: str, tokenizer: Tokenizer, chat_template: bool) -> str:
    """The text the choices are scored after: the query, or the query as a user turn plus the assistant header."""
    if not chat_template:
        return query
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template: score without one (--no-chat-template)")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True)
    assert isinstance(rendered, str)
    return rendered


def encode_item(item: Item, tokenizer: Tokenizer, chat_template: bool) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per choice, split as lighteval's tok_encode_pair does.

    With the chat template the context ends in "assistant\\n"; the split moves that "\\n" onto every
    continuation (lighteval rstrips the context), so the scored tokens start with it.
    """
    context = render_context(item.context, tokenizer, chat_template)
    try:
        return [split_context_continuation(context, choice, tokenizer.encode) for choice in item.choices]
    except ValueError as e:
        raise ValueError(f"item {item.id!r}: {e}") from None


@dataclass(frozen=True)
class ItemResult:
    item: Item
    logprobs: tuple[float, ...]  # summed continuation log-probs, one per choice
    n_tokens: tuple[int, ...]  # continuation tokens per choice
    pred: int  # argmax of logprobs: acc
    pred_norm: int  # argmax of logprobs / characters: acc_norm, the card's metric

    def to_json(self) -> dict[str, Any]:
        return {"id": self.item.id, "gold": self.item.gold, "pred": self.pred, "pred_norm": self.pred_norm,
                "logprobs": list(self.logprobs), "n_tokens": list(self.n_tokens)}


def score_items(
    model: SmolLM2, tokenizer: Tokenizer, items: Sequence[Item], *, chat_template: bool, batch_size: int = 8
) -> Iterator[ItemResult]:
    """Score items in order, `batch_size` items per forward pass; yields one result per item as it is done."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    pad_id = tokenizer.pad_id or 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        groups = [encode_item(item, tokenizer, chat_template) for item in batch]
        for item, scores in zip(batch, score_groups(model, groups, pad_id), strict=True):
            sums = [s.logprob for s in scores]
            yield ItemResult(item, tuple(sums), tuple(s.n_tokens for s in scores),
                             predict(sums, item.choices, normalize=False), predict(sums, item.choices, normalize=True))
