"""Cross-entropy of the output projection, computed in row chunks so the full logits never exist at once.

For SmolLM2-135M at batch 8 x 1024 the logits are 8192 x 49152 floats: 1.6 GB, plus as much again for the
softmax autograd keeps for the backward pass. Chunking the rows alone does not help under autograd (every
chunk's softmax is kept), so the gradients are computed during the forward pass, one chunk at a time, as
Liger-Kernel's fused linear cross-entropy does. Per chunk of rows:
    logits = h W^T,  loss = logsumexp(logits) - logits[label],  dlogits = softmax(logits) - onehot(label),
    grad_h = dlogits W,  grad_W += dlogits^T h.
Only grad_h (N x hidden) and grad_W (vocab x hidden) are kept for backward, which scales them by the incoming
gradient. No matmul is spent twice (recomputing chunks in backward, as activation checkpointing would, adds one).
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024  # 1024 x 49152 fp32 logits = 200 MB live at a time


def _chunked(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, compute_dtype: torch.dtype,
             grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(summed loss, grad_h, grad_W) of one pass over the rows; the gradients are None unless asked for."""
    w = weight.to(compute_dtype)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    for start in range(0, h.shape[0], CHUNK_ROWS):
        hc, yc = h[start : start + CHUNK_ROWS].to(compute_dtype), labels[start : start + CHUNK_ROWS]
        logits = (hc @ w.T).float()  # (n, vocab): softmax in fp32 whatever the matmul dtype
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
        if grads:
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(yc), device=yc.device), yc] -= 1.0  # minus the one-hot label
            dlogits = dlogits.to(compute_dtype)
            grad_h[start : start + CHUNK_ROWS] = (dlogits @ w).to(h.dtype)
            grad_w += (dlogits.T @ hc).float()
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                compute_dtype: torch.dtype) -> torch.Tensor:
        loss, grad_h, grad_w = _chunked(h, weight, labels, compute_dtype, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Summed (not averaged) cross-entropy of softmax(h @ weight.T) against labels; h (N, hidden), labels (N,).

    compute_dtype is the matmul dtype (bf16 for mixed precision); the softmax and the loss are always fp32.
    The sum lets the caller divide by the token count of the whole step, across micro-batches and processes.
    """
    with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen explicitly here
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, labels, compute_dtype)
        return _chunked(h, weight, labels, compute_dtype, grads=False)[0]  # evaluation: no gradients to keep
