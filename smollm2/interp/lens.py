"""The logit lens (nostalgebraist, 2020): what each layer's residual stream would predict if the model stopped there.

The residual stream after b blocks (b = 0 is the embedding) goes through the model's own final norm and output
head, exactly as the last block's output does, so the lens at the last layer is the model's logits, to the bit.
Per layer and position it keeps the top tokens and their probabilities, and at the last position the rank and
probability of one answer (default: the model's own final prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import hooks
from ..model import SmolLM2


@dataclass
class LogitLens:
    """The lens of one prompt. Layer b (0..L) is the residual stream after b blocks: b = 0 the embedding."""

    input_ids: list[int]
    top_ids: torch.Tensor  # (L + 1, T, k) int64
    top_probs: torch.Tensor  # (L + 1, T, k) float32
    answer_id: int
    answer_ranks: list[int]  # per layer, at the last position: 1 = the most likely token
    answer_probs: list[float]
    entropies: torch.Tensor  # (L + 1, T) the next-token distribution's entropy, in nats

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0] - 1

    @staticmethod
    def layer_label(b: int) -> str:
        return "embed" if b == 0 else f"block {b - 1}"

    def to_dict(self, tokenizer: object | None = None) -> dict:
        """Plain data (JSON): token ids, and their text where a tokenizer is given."""
        text = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: None)
        layers = []
        for b in range(self.n_layers + 1):
            layers.append({
                "layer": self.layer_label(b),
                "answer_rank": self.answer_ranks[b],
                "answer_prob": self.answer_probs[b],
                "positions": [
                    {"top": [{"id": int(i), "text": text(int(i)), "prob": float(p)}
                             for i, p in zip(self.top_ids[b, t], self.top_probs[b, t], strict=True)],
                     "entropy": float(self.entropies[b, t])}
                    for t in range(self.top_ids.shape[1])],
            })
        return {"input_ids": self.input_ids, "tokens": [text(i) for i in self.input_ids],
                "answer": {"id": self.answer_id, "text": text(self.answer_id)}, "layers": layers}


def unembed(model: SmolLM2, resid: torch.Tensor) -> torch.Tensor:
    """Logits of a residual stream (..., d_model): the model's final norm, then its output head."""
    return model.lm_head(model.model.norm(resid))


def residual_streams(model: SmolLM2, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([the residual stream after b blocks, b = 0..L], each (B, T, d_model)) and the model's logits."""
    L = model.config.num_hidden_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.no_grad(), hooks.capture(model, names) as acts:
        logits = model(input_ids)
    return [acts[name] for name in names], logits


def logit_lens(model: SmolLM2, input_ids: torch.Tensor | list[int], *, answer: int | None = None,
               k: int = 5) -> LogitLens:
    """The lens of one prompt (token ids, (T,) or (1, T)). answer: the token whose rank is followed (default:
    the model's own prediction at the last position); k: top tokens kept per layer and position."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"the logit lens takes one non-empty prompt, (T,) or (1, T) token ids; got shape "
                         f"{tuple(ids.shape)}")
    vocab = model.config.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and {vocab}, got {k}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must lie in 0..{vocab - 1}")
    ids = ids.to(next(model.parameters()).device)
    streams, logits = residual_streams(model, ids)
    if answer is None:
        answer = int(logits[0, -1].argmax())
    elif not 0 <= answer < vocab:
        raise ValueError(f"answer must be a token id in 0..{vocab - 1}, got {answer}")
    top_ids, top_probs, entropies, ranks, probs = [], [], [], [], []
    with torch.no_grad():
        for resid in streams:
            logp = unembed(model, resid)[0].float().log_softmax(-1)  # (T, vocab)
            p, i = logp.exp().topk(k, dim=-1)
            top_ids.append(i.cpu())
            top_probs.append(p.cpu())
            entropies.append(-(logp.exp() * logp).nan_to_num().sum(-1).cpu())
            last = logp[-1]
            ranks.append(int((last > last[answer]).sum()) + 1)
            probs.append(float(last[answer].exp()))
    return LogitLens(ids[0].tolist(), torch.stack(top_ids), torch.stack(top_probs), answer, ranks, probs,
                     torch.stack(entropies))
