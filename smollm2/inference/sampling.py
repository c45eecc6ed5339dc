"""Sampling: pure functions from next-token logits (B, vocab) to the next token ids (B,).

The order is transformers' `generate` order: the repetition penalty on the raw logits, then temperature, then
the top-k, top-p and min-p filters (each sets the logits of the tokens it removes to -inf), then one draw from
the softmax. Temperature 0 means greedy: the argmax of the penalised logits, with no randomness at all.
References: CTRL (Keskar et al. 2019) for the repetition penalty, Holtzman et al. 2019 for top-p ("nucleus"),
Nguyen et al. 2024 for min-p; transformers' `generation/logits_process.py` for the exact rules.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in the sequence less likely (CTRL's rule, as transformers applies it).

    logits: (B, V); seen: (B, V) bool, True for tokens in the prompt or generated so far. A positive logit is
    divided by the penalty and a negative one multiplied, so penalty > 1 lowers both (dividing a negative
    logit would raise it).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (and any tied with the k-th); k = 0 keeps all."""
    if k == 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1): the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p (nucleus sampling).

    The most likely token is always kept; p = 1 keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above each token
    remove_sorted = mass_above >= p  # the tokens above already reach p, so this one is not needed
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least min_p times that of the most likely token; 0 keeps all."""
    if min_p == 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1): scales with the model's confidence
    return logits.masked_fill(probs < threshold, float("-inf"))


def probabilities(
    logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """The distribution (B, V) that `sample` draws from, for temperature > 0."""
    logits = logits.float() / temperature  # sample in fp32 even for a bf16 model: small probabilities matter
    logits = min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)
    return logits.softmax(dim=-1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row (B,) for logits (B, V): argmax when temperature is 0, else one draw."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # One uniform draw per row against the cumulative distribution (inverse transform sampling). The same
    # distribution as torch.multinomial, which draws a random number for every one of the 49152 tokens (~1-10 ms
    # a row on a 2-core CPU, as much as an int4 decode step); this draws one. u is in (0, 1], so x > 0: a
    # token of probability 0 (filtered out, or masked by a constraint) is never the first with cdf >= x.
    cdf = probs.double().cumsum(dim=-1)  # (B, V), float64 so that 49152 small terms add up exactly enough
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
