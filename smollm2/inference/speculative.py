"""Prompt-lookup speculative decoding: guess the next tokens by copying from the text so far, check the guesses
in one forward pass, keep the ones the model agrees with.

    generate(model, ids, speculative="prompt-lookup")       # draft_tokens=8, draft_ngram=3 by default

A reply often repeats its prompt (a summary quotes it, an extraction copies from it, an edit rewrites most of
it). So the tokens that followed the last occurrence of the current suffix are a cheap, often right, guess of
what comes next (transformers' `prompt_lookup_num_tokens`, Saxena 2023; llama.cpp's lookup decoding):

1. Draft. Find the most recent earlier occurrence of the last n tokens (n = draft_ngram down to 1) in prompt
   + output, and take the k tokens that followed it (`NgramIndex`, a dict per n: O(n) per token; a copy that
   reaches the end of the text goes on copying its own start, so a repeated run or loop is drafted in full).
2. Verify. Feed the last chosen token and the k drafts through the model at once, k + 1 positions over the KV
   cache: one forward reads every weight once, as a one-token step does, so on a memory-bound CPU it costs
   little more than one step and gives the model's distribution at each of the k + 1 positions.
3. Accept, position by position (`accept`): at temperature 0 a draft is kept while it equals the model's own
   choice; sampled, by the speculative-sampling rule (below). The first disagreement is replaced by the
   model's token, and if every draft was kept the last position gives one more token for free.
4. Roll back. The cache now holds keys/values for rejected drafts after the last kept position. The cache is
   static, so rolling back is only where the next write starts: the next forward overwrites those slots, and
   attention never reads them (it reads positions up to the query's own, causally).

Lossless. At temperature 0 each chosen token is the argmax of the model's logits given exactly the tokens
before it, as in plain decoding, so the output is plain greedy's (up to float rounding: a k + 1-row matmul
may round differently from a one-row one, which can flip a near-exact tie). Sampled, a deterministic draft is a
point mass q = 1{t}, and Leviathan et al. 2023 / Chen et al. 2023's rule (accept t with probability
min(1, p(t)/q(t)) = p(t); else draw from max(p - q, 0) normalised, i.e. p without t, renormalised) gives
tokens distributed exactly as p. p is the target as plain sampling has it: repetition penalty, constraint mask,
temperature, top-k, top-p and min-p, by the same functions (sampling.py, stopping.SequenceState).

Stop conditions hold because every token, drafted or not, goes through `SequenceState.push` in order, and the
loop stops at the first one that finishes the sequence: nothing after an EOS, a stop string or
max_new_tokens is ever output, and drafts are cut to the tokens still allowed.

Backing off. On an open-ended prompt lookups still find one-token matches but the copies are wrong, and a
rejected verify costs more than a one-token step. So the draft length adapts (grows by 2 after a fully
accepted draft, shrinks to one past the kept part otherwise), and after a draft with nothing accepted,
drafting pauses for 1, 3, 7, ... up to MAX_PAUSE decode steps; one accepted draft resets that. The rule counts
tokens, never seconds, so a seed still gives the same tokens on a busy machine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..defaults import SPECULATIVE_MODES as MODES
from .sampling import apply_repetition_penalty, probabilities, sample
from .stopping import SequenceState, TokenLogprob

if TYPE_CHECKING:
    from ..kv_cache import KVCache
    from ..model import SmolLM2
    from .config import GenerationConfig

__all__ = ["MODES", "NgramIndex", "PromptLookup", "SpeculationStats", "accept", "accept_or_resample", "choose",
           "drafter_for", "target_probabilities", "verify_forward"]
MAX_PAUSE = 16  # decode steps at most without drafting after repeated misses


class NgramIndex:
    """The tokens so far, and for each n-gram (n = 1..max_ngram) the position of the token that followed its
    most recent occurrence. The n-grams ending at the last token are not indexed yet (nothing follows them),
    so a lookup of the current suffix finds an earlier occurrence, never itself."""

    def __init__(self, tokens: Sequence[int], max_ngram: int) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.follower: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]  # [n][ngram] -> pos
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        L = len(self.tokens)
        for n in range(1, min(self.max_ngram, L) + 1):  # the n-grams ending at the old last token: now followed
            self.follower[n][tuple(self.tokens[L - n :])] = L  # later occurrences overwrite: the most recent wins
        self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix."""
        L = len(self.tokens)
        for n in range(min(self.max_ngram, L), 0, -1):
            follower = self.follower[n].get(tuple(self.tokens[L - n :]))
            if follower is not None:
                # Copy what followed, on past the end of the text as an overlapping copy (LZ77's): the tokens
                # after the end are the draft's own, so a run or a loop of period L - follower continues.
                draft: list[int] = []
                for i in range(follower, follower + k):
                    draft.append(self.tokens[i] if i < L else draft[i - L])
                return draft
        return []


@dataclass
class SpeculationStats:
    """How drafting went: verify forwards run, tokens drafted in them, drafts accepted."""

    verifies: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens that were accepted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """One sequence's drafter: the n-gram index over prompt + output, and the back-off state."""

    def __init__(self, prompt_ids: Sequence[int], max_tokens: int, max_ngram: int) -> None:
        self.index = NgramIndex(prompt_ids, max_ngram)
        self.max_tokens = max_tokens
        self.k = max_tokens  # the current draft length, adapted by record()
        self.misses = 0  # drafts in a row with nothing accepted
        self.pause = 0  # decode steps left without drafting
        self.stats = SpeculationStats()

    def push(self, token: int) -> None:
        """A token was output: index it."""
        self.index.append(token)

    def draft(self, limit: int) -> list[int]:
        """The tokens to verify after the last one output: at most min(k, limit), none while paused."""
        if self.pause > 0:
            self.pause -= 1
            return []
        return self.index.draft(min(self.k, limit)) if limit > 0 else []

    def record(self, drafted: int, accepted: int) -> None:
        """Adapt to how a verify went (drafted > 0 tokens, accepted of them)."""
        self.stats.verifies += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        if accepted == drafted:
            self.k = min(self.k + 2, self.max_tokens)  # the copy runs on: draft further
        else:
            self.k = max(1, accepted + 1)  # it diverged here: next time ask for about as much
        if accepted == 0:
            self.misses += 1
            self.pause = min(2 ** (self.misses - 1) - 1, MAX_PAUSE)  # 0, 1, 3, 7, 15, 16, ...
        else:
            self.misses = 0


def drafter_for(config: GenerationConfig, prompt_ids: Sequence[int]) -> PromptLookup | None:
    """The drafter config.speculative asks for (None when it is off)."""
    if config.speculative == "prompt-lookup":
        return PromptLookup(prompt_ids, config.draft_tokens, config.draft_ngram)
    assert config.speculative is None, config.speculative  # (GenerationConfig checked it)
    return None


# ---- verify and accept -----------------------------------------------------------------------------------


@torch.no_grad()
def verify_forward(model: SmolLM2, token_ids: list[int], cache: KVCache, start: int) -> torch.Tensor:
    """Logits (T, vocab) for T tokens of one sequence written at cache positions start..start+T-1.

    This is the model's eager forward, also on the fast path: the compiled decode step
    (compiled_step.DecodeStep) is traced for exactly one token per row, and its one-token kernels (decode
    attention, matrix-vector linears) only serve that shape, so a k + 1-token graph would be a second compile.
    Plain steps, when there is no draft, still run the compiled step."""
    device = next(model.parameters()).device
    return model(torch.tensor([token_ids], device=device), cache=cache, start=start, output="logits")[0]


def target_probabilities(row: SequenceState, logits: torch.Tensor) -> torch.Tensor:
    """The distribution (vocab,) that plain sampling draws this row's next token from, for logits (1, vocab):
    the same steps as `SequenceState.next_token` (penalty, constraint mask) and `sampling.sample`."""
    c = row.config
    if row.seen is not None:
        logits = apply_repetition_penalty(logits, row.seen[None], c.repetition_penalty)
    if row.mask is not None:
        logits = row.mask.apply(logits)
    return probabilities(logits, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, min_p=c.min_p)[0]


def accept_or_resample(probs: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    """Speculative sampling for a draft that is a point mass on `draft`: the returned token is distributed
    exactly as probs (vocab,). Accept the draft with probability p(draft); otherwise draw from max(p - q, 0)
    normalised, which for q = 1{draft} is p with the draft removed and renormalised. (Check: P(t = draft) =
    p(draft); for any other t, P = (1 - p(draft)) * p(t) / (1 - p(draft)) = p(t).)"""
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device)
    if float(u) < float(probs[draft]):
        return draft
    residual = probs.clone()
    residual[draft] = 0.0  # (p(draft) < 1 here, since u < 1: something else has probability)
    # sample() with temperature 1 on log-probabilities draws from softmax(log r) = r / sum(r).
    return int(sample(residual.log()[None], temperature=1.0, generator=generator)[0])


def _record_logprob(row: SequenceState, raw: torch.Tensor, token: int) -> None:
    """Give push() the TokenLogprob it records, as SequenceState.next_token computes it (raw logits (1, V))."""
    top_n = row.config.logprobs
    logprobs = torch.log_softmax(raw[0].float(), dim=-1)
    top = torch.topk(logprobs, top_n) if top_n else None
    row._logprob = TokenLogprob(token, float(logprobs[token]), tuple(
        zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ())


def choose(row: SequenceState, logits: torch.Tensor, draft: int | None) -> int:
    """The row's token at one position, logits (1, vocab), given the draft proposed there (None: no draft).

    Without a draft, or at temperature 0, this is exactly plain decoding's choice (`next_token`: greedy with
    penalty and mask, or one draw); the draft is then accepted if it equals it. Sampled, the draft goes through
    `accept_or_resample` against plain sampling's distribution."""
    if draft is None or row.config.temperature == 0:
        return row.next_token(logits)
    token = accept_or_resample(target_probabilities(row, logits), draft, row.generator)
    if row.config.logprobs is not None:
        _record_logprob(row, logits, token)
    return token


def accept(
    row: SequenceState, drafter: PromptLookup, logits: torch.Tensor, drafts: list[int]
) -> Iterator[tuple[int, str]]:
    """Choose and push the row's tokens for logits (len(drafts) + 1, vocab), the model's predictions after the
    last token output and after each draft. Yields (token, text) per token pushed (token -1 for a stop token,
    which is not output), up to and including the first that disagrees with its draft or finishes the row."""
    greedy = logits.argmax(dim=-1).tolist() if row.greedy else None  # one call for every position
    accepted = 0
    for i in range(len(drafts) + 1):
        draft = drafts[i] if i < len(drafts) else None
        token = greedy[i] if greedy is not None else choose(row, logits[i : i + 1], draft)
        kept = len(row.new_ids)
        text = row.push(token)
        output = len(row.new_ids) > kept
        if output:
            drafter.push(token)
        yield (token if output else -1), text
        accepted += token == draft
        if row.done or token != draft:
            break
    if drafts:
        drafter.record(len(drafts), accepted)
