"""Direct Preference Optimization (Rafailov et al. 2023): the loss and the metrics, on sequence log-probabilities.

For a prompt x with a chosen reply y_w and a rejected one y_l, a policy pi and a frozen reference pi_ref:
    reward(y) = beta * (log pi(y | x) - log pi_ref(y | x))
    loss      = -log sigmoid(reward(y_w) - reward(y_l))
where log pi(y | x) sums the log-probabilities of the reply's tokens (the labels that are not IGNORE). The
metrics are those TRL's DPOTrainer logs and the SmolLM2-135M-Instruct DPO card reports: reward accuracy (the
fraction of pairs whose chosen reward is higher), reward margin, and the chosen/rejected rewards and
log-probabilities, and one more: how often the policy gives the chosen reply the higher log-probability (which,
unlike the reward accuracy, says something about the starting model). dpo_trainer.py runs it (`smollm2 dpo`).
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


def reply_logprobs(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sequence_logprobs from the last hidden states h (B, T, hidden) and the output projection `weight`: the
    logits are computed at the counted positions only (a reply is a fraction of its sequence), in compute_dtype,
    with the softmax in fp32."""
    counted = labels != IGNORE  # (B, T)
    rows = counted.nonzero()[:, 0]  # the sequence of each counted position
    logits = (h[counted].to(compute_dtype) @ weight.to(compute_dtype).T).float()  # (counted, vocab)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[counted].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=h.device).index_add(0, rows, logp)


# The per-pair quantities summed over a batch: pair_sums' columns, divided by the pair count in summarize.
SUMMED = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp",
          "rejected_logp", "logp_accuracy")


@torch.no_grad()
def pair_sums(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
              reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 + len(SUMMED),) float64: the pair count, then each SUMMED quantity summed over the pairs, so that
    micro-batches and processes add up (all-reduce) before the means are taken."""
    chosen = beta * (policy_chosen - reference_chosen).double()
    rejected = beta * (policy_rejected - reference_rejected).double()
    margin = chosen - rejected
    columns = (-F.logsigmoid(margin), (chosen > rejected).double(), margin, chosen, rejected,
               policy_chosen.double(), policy_rejected.double(), (policy_chosen > policy_rejected).double())
    counts = torch.tensor([float(len(margin))], dtype=torch.float64, device=margin.device)
    return torch.cat([counts, torch.stack([c.sum() for c in columns])])


def summarize(sums: torch.Tensor) -> dict[str, float]:
    """pair_sums (added up) -> the mean of each SUMMED quantity."""
    pairs = sums[0].item()
    return {name: sums[i + 1].item() / pairs for i, name in enumerate(SUMMED)}
