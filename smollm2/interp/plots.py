"""Heat maps for the logit lens, activation patching and attention patterns (the [plot] extra: matplotlib).

Each function returns a matplotlib Figure built without pyplot (no global figure state, no GUI backend), and
writes it to `path` when one is given. matplotlib is imported inside them, so this module imports without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .lens import LogitLens
from .patching import Patching

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'smollm2[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def show_token(text: str, width: int = 10) -> str:
    """A token's text for a label: whitespace made visible, cut to width."""
    shown = text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def plot_lens(lens: LogitLens, tokens: Sequence[str], top_text: Sequence[Sequence[str]], path: str | Path | None = None,
              title: str = "logit lens") -> Figure:
    """Layers (rows, the embedding at the bottom) by positions: the top token's probability, its text written in.

    tokens: the prompt's tokens as text; top_text[b][t]: the text of the top token at layer b, position t."""
    probs = lens.top_probs[:, :, 0].numpy()  # (L + 1, T)
    n_layers, T = probs.shape
    fig = _figure(1.0 + 0.9 * T, 1.0 + 0.28 * n_layers)
    ax = fig.subplots()
    image = ax.imshow(probs, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for b in range(n_layers):
        for t in range(T):
            ax.text(t, b, show_token(top_text[b][t], 8), ha="center", va="center", fontsize=6,
                    color="white" if probs[b, t] < 0.6 else "black")
    ax.set_xticks(range(T), [show_token(tok) for tok in tokens], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_layers), [LogitLens.layer_label(b) for b in range(n_layers)], fontsize=6)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("residual stream after")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="probability of the top token")
    return _save(fig, path)


def plot_patching(result: Patching, tokens: Sequence[str], path: str | Path | None = None,
                  title: str = "activation patching") -> Figure:
    """The residual stream's effect (layers by positions) and, where computed, the heads' (layers by heads)."""
    panels = 2 if result.heads is not None else 1
    L, T = result.resid.shape
    fig = _figure(2.0 + 0.45 * T + (3.5 if panels == 2 else 0.0), 1.5 + 0.18 * L)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    limit = float(max(1.0, result.resid.abs().max(), 0.0 if result.heads is None else result.heads.abs().max()))
    image = axes[0].imshow(result.resid.numpy(), origin="lower", aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit)
    axes[0].set_xticks(range(T), [show_token(tok) for tok in tokens], rotation=60, ha="right", fontsize=7)
    axes[0].set_yticks(range(0, L, 2), [str(i) for i in range(0, L, 2)], fontsize=7)
    axes[0].set_xlabel("position")
    axes[0].set_ylabel("block (its resid_pre patched)")
    axes[0].set_title("residual stream")
    if result.heads is not None:
        H = result.heads.shape[1]
        axes[1].imshow(result.heads.numpy(), origin="lower", aspect="auto", cmap="RdBu", vmin=-limit, vmax=limit)
        axes[1].set_xticks(range(H), [str(h) for h in range(H)], fontsize=7)
        axes[1].set_yticks(range(0, L, 2), [str(i) for i in range(0, L, 2)], fontsize=7)
        axes[1].set_xlabel("head (its z patched, every position)")
        axes[1].set_title("attention heads")
    fig.colorbar(image, ax=list(axes), label="logit difference recovered (0 corrupt, 1 clean)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_attention(pattern: torch.Tensor, tokens: Sequence[str], layer: int, path: str | Path | None = None) -> Figure:
    """One layer's attention patterns, a panel per head: pattern (heads, query_pos, key_pos) of one prompt."""
    if pattern.ndim != 3:
        raise ValueError(f"pattern must be (heads, query_pos, key_pos), got shape {tuple(pattern.shape)}")
    H, T, S = pattern.shape
    cols = min(H, 3)
    rows = -(-H // cols)
    size = 1.2 + 0.22 * max(T, S)
    fig = _figure(cols * size, rows * size)
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = [show_token(tok, 8) for tok in tokens]
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(pattern[h].float().numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=8)
        ax.set_xticks(range(S), labels[-S:] if len(labels) >= S else [""] * S, rotation=90, fontsize=5)
        ax.set_yticks(range(T), labels[-T:] if len(labels) >= T else [""] * T, fontsize=5)
    fig.suptitle(f"block {layer}: attention patterns (row: query, column: key)")
    return _save(fig, path)
