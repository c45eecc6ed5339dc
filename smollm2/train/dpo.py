"""Direct Preference Optimization (Rafailov et al. 2023): the loss and the metrics, on sequence log-probabilities.

For a prompt x with a chosen reply y_w and a rejected one y_l, a policy pi and a frozen reference pi_ref:
    reward(y) = beta * (log pi(y | x) - log pi_ref(y | x))
    loss      = -log sigmoid(reward(y_w) - reward(y_l))
where log pi(y | x) sums the log-probabilities of the reply's tokens (the labels that are not IGNORE). The
metrics are those TRL's DPOTrainer logs and the SmolLM2-135M-Instruct DPO card reports: reward accuracy (the
fraction of pairs whose chosen reward is higher), reward margin, and the chosen/rejected rewards and
log-probabilities. (The `smollm2 dpo` trainer around this is not written yet.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chat_data import IGNORE


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum over each row's counted labels of log softmax(logits)[label]; logits (B, T, V), labels (B, T)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, time)")
    counted = labels != IGNORE
    safe = labels.masked_fill(~counted, 0)  # any id: its log-probability is multiplied by zero below
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * counted).sum(-1)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # mean over pairs (differentiable)
    reward_accuracy: float
    reward_margin: float  # mean of chosen reward - rejected reward
    chosen_reward: float
    rejected_reward: float
    chosen_logp: float  # the policy's mean log-probability of the chosen replies
    rejected_logp: float


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """DPO's sigmoid loss and metrics from (pairs,) sequence log-probabilities; the reference's carry no gradient."""
    if not beta > 0:
        raise ValueError(f"--beta {beta}: must be a positive number")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probabilities must be (pairs,) vectors of one length, got shapes {shapes}")
    chosen = beta * (policy_chosen - reference_chosen.detach())
    rejected = beta * (policy_rejected - reference_rejected.detach())
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return DPOOutput(
        loss=loss, reward_accuracy=(chosen > rejected).float().mean().item(), reward_margin=margin.mean().item(),
        chosen_reward=chosen.mean().item(), rejected_reward=rejected.mean().item(),
        chosen_logp=policy_chosen.mean().item(), rejected_logp=policy_rejected.mean().item(),
    )
