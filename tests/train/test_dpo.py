"""DPO's loss and metrics against a hand computation; sequence log-probabilities on small logits."""

from __future__ import annotations

import math

import pytest
import torch

from smollm2.train.chat_data import IGNORE
from smollm2.train.dpo import dpo_loss, sequence_logprobs


def test_sequence_logprobs_sum_the_counted_labels_only() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # (1, 3, 3)
    labels = torch.tensor([[IGNORE, 1, 2]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(0.8) + math.log(0.6), abs=1e-6)
    assert sequence_logprobs(logits, torch.full((1, 3), IGNORE)).item() == 0.0
    with pytest.raises(ValueError, match="disagree"):
        sequence_logprobs(logits, labels[:, :2])


def test_dpo_loss_and_metrics_by_hand() -> None:
    policy_chosen = torch.tensor([-1.0, -3.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0, -1.0], requires_grad=True)
    reference_chosen = torch.tensor([-1.5, -2.0], requires_grad=True)
    reference_rejected = torch.tensor([-1.5, -1.5], requires_grad=True)
    out = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)
    # pair 1: chosen reward 0.1 * (-1 + 1.5) = 0.05, rejected 0.1 * (-2 + 1.5) = -0.05, margin 0.1
    # pair 2: chosen 0.1 * (-3 + 2) = -0.1, rejected 0.1 * (-1 + 1.5) = 0.05, margin -0.15
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.15))) / 2  # -log sigmoid(m) = log(1 + e^-m)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.reward_accuracy == 0.5
    assert out.reward_margin == pytest.approx((0.1 - 0.15) / 2, abs=1e-6)
    assert out.chosen_reward == pytest.approx((0.05 - 0.1) / 2, abs=1e-6)
    assert out.rejected_reward == pytest.approx(0.0, abs=1e-6)
    assert out.chosen_logp == pytest.approx(-2.0) and out.rejected_logp == pytest.approx(-1.5)
    out.loss.backward()
    assert reference_chosen.grad is None and reference_rejected.grad is None  # the reference stays frozen
    # d loss / d policy_chosen_i = -beta * sigmoid(-m_i) / pairs
    sigmoid = [1 / (1 + math.exp(0.1)), 1 / (1 + math.exp(-0.15))]
    assert policy_chosen.grad.tolist() == pytest.approx([-0.1 * s / 2 for s in sigmoid], abs=1e-6)
    assert policy_rejected.grad.tolist() == pytest.approx([0.1 * s / 2 for s in sigmoid], abs=1e-6)


def test_dpo_bad_input() -> None:
    v = torch.zeros(3)
    with pytest.raises(ValueError, match="--beta 0"):
        dpo_loss(v, v, v, v, beta=0)
    with pytest.raises(ValueError, match="one length"):
        dpo_loss(v, v, v, torch.zeros(2))
