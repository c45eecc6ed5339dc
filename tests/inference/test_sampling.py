"""Sampling filters against distributions worked out by hand, and against transformers' logits processors."""

from __future__ import annotations

import math

import pytest
import torch

from smollm2.inference.sampling import (
    apply_repetition_penalty,
    min_p_filter,
    probabilities,
    sample,
    top_k_filter,
    top_p_filter,
)


def softmax_by_hand(logits: list[float], keep: list[int]) -> list[float]:
    """exp(l) / sum(exp) over the kept indices, 0 elsewhere: plain Python, no torch."""
    total = sum(math.exp(logits[i]) for i in keep)
    return [math.exp(x) / total if i in keep else 0.0 for i, x in enumerate(logits)]


def probs_of(logits: torch.Tensor) -> list[float]:
    return logits.softmax(-1)[0].tolist()


# Probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled vocabulary order, so no filter can rely on sorted input.
PROBS = [0.15, 0.5, 0.05, 0.3]
LOGITS = [math.log(p) for p in PROBS]


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(6, 100)
    assert sample(logits, temperature=0.0).tolist() == logits.argmax(-1).tolist()
    # Filters do not matter for greedy decoding either.
    assert sample(logits, temperature=0.0, top_k=3, top_p=0.1, min_p=0.9).tolist() == logits.argmax(-1).tolist()


def test_temperature_scales_logits() -> None:
    logits = [1.0, 2.0, -0.5, 0.25]
    got = probabilities(torch.tensor([logits]), temperature=2.0)[0].tolist()
    expected = softmax_by_hand([x / 2.0 for x in logits], keep=[0, 1, 2, 3])
    assert got == pytest.approx(expected, abs=1e-6)


def test_top_k_keeps_the_k_largest() -> None:
    logits = [1.0, 3.0, 2.0, 0.5, 2.5]
    got = probs_of(top_k_filter(torch.tensor([logits]), 2))
    assert got == pytest.approx(softmax_by_hand(logits, keep=[1, 4]), abs=1e-6)
    assert probs_of(top_k_filter(torch.tensor([logits]), 0)) == pytest.approx(softmax_by_hand(logits, [0, 1, 2, 3, 4]))


@pytest.mark.parametrize(
    ("p", "keep"),
    [
        (0.45, [1]),  # the top token alone (0.5) already reaches 0.45
        (0.7, [1, 3]),  # 0.5 < 0.7 <= 0.5 + 0.3
        (0.9, [1, 3, 0]),  # 0.8 < 0.9 <= 0.95
        (0.99, [1, 3, 0, 2]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, keep: list[int]) -> None:
    got = probs_of(top_p_filter(torch.tensor([LOGITS]), p))
    assert got == pytest.approx(softmax_by_hand(LOGITS, keep), abs=1e-6)


@pytest.mark.parametrize(
    ("min_p", "keep"),
    [
        (0.0, [0, 1, 2, 3]),
        (0.25, [0, 1, 3]),  # threshold 0.125: 0.05 goes
        (0.5, [1, 3]),  # threshold 0.25: 0.15 goes too
        (1.0, [1]),  # only the most likely token is as likely as itself
    ],
)
def test_min_p_keeps_tokens_relative_to_the_best(min_p: float, keep: list[int]) -> None:
    got = probs_of(min_p_filter(torch.tensor([LOGITS]), min_p))
    assert got == pytest.approx(softmax_by_hand(LOGITS, keep), abs=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5], [2.0, -1.0, 0.5, -0.5]])
    seen = torch.tensor([[True, True, False, False], [False, False, True, True]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -2.0, 0.5, -0.5], [2.0, -1.0, 0.25, -1.0]]
    assert apply_repetition_penalty(logits, seen, 1.0).tolist() == logits.tolist()


def test_filters_combine_in_order() -> None:
    # temperature 0.5 squares the odds; then top-k 3 drops the 0.05 token; then top-p 0.8 keeps what reaches 0.8.
    scaled = [x / 0.5 for x in LOGITS]
    after_k = softmax_by_hand(scaled, keep=[0, 1, 3])
    ranked = sorted(((q, i) for i, q in enumerate(after_k)), reverse=True)
    keep, mass = [], 0.0
    for q, i in ranked:
        keep.append(i)
        mass += q
        if mass >= 0.8:
            break
    got = probabilities(torch.tensor([LOGITS]), temperature=0.5, top_k=3, top_p=0.8)[0].tolist()
    assert got == pytest.approx(softmax_by_hand(scaled, keep), abs=1e-6)
    assert len(keep) == 2  # the case is not trivial: top-p removed a token top-k kept


@pytest.mark.hf
def test_filters_match_transformers() -> None:
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 3
    input_ids = torch.randint(0, 300, (4, 20))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, input_ids, True)
    pairs = [
        (top_k_filter(logits, 17), lp.TopKLogitsWarper(17)(input_ids, logits.clone())),
        (top_p_filter(logits, 0.6), lp.TopPLogitsWarper(0.6)(input_ids, logits.clone())),
        (min_p_filter(logits, 0.08), lp.MinPLogitsWarper(0.08)(input_ids, logits.clone())),
        (apply_repetition_penalty(logits, seen, 1.3),
         lp.RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.isinf(ours).any() or not torch.equal(ours, logits)  # each processor changed something
        torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_sample_draws_from_the_filtered_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([LOGITS]).expand(20_000, 4)
    draws = sample(logits, temperature=1.0, top_p=0.9, generator=generator)
    counts = torch.bincount(draws, minlength=4).tolist()
    expected = softmax_by_hand(LOGITS, keep=[1, 3, 0])
    assert counts[2] == 0  # filtered out: never drawn
    for i in (0, 1, 3):  # binomial standard deviation is at most ~0.0035 here; allow 4 of them
        assert counts[i] / 20_000 == pytest.approx(expected[i], abs=0.015)


def test_sample_is_reproducible_with_a_seeded_generator() -> None:
    logits = torch.randn(3, 1000)

    def draw(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [t for _ in range(20) for t in sample(logits, temperature=1.0, generator=generator).tolist()]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
