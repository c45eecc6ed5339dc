"""`smollm2 lens "PROMPT"`: the logit lens, printed as a table of each layer's top token per position and the
answer's rank per layer; `--plot FILE.png` draws it as a heat map, `--attention LAYER` that layer's attention
patterns per head, `--json FILE` writes the data. The exact float32 model by default (`--quantize none`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_quantize_argument, add_source_argument

LENS_TOP_K = 5  # top tokens kept per layer and position (the table shows the first)
LENS_POSITIONS = 6  # the table's columns: the last positions of the prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to look at")
    add_source_argument(parser)
    add_quantize_argument(parser, "none", help="weights: none (float32, the exact model; default), bf16, int8 or "
                                               "int4")
    parser.add_argument("--answer", default=None, metavar="TEXT",
                        help="follow this token's rank per layer (one token, e.g. ' Paris'; default: the model's "
                             "own prediction after the prompt)")
    parser.add_argument("--top-k", type=int, default=LENS_TOP_K, metavar="K",
                        help="top tokens kept per layer and position, in --json (default: %(default)s)")
    parser.add_argument("--positions", type=int, default=LENS_POSITIONS, metavar="N",
                        help="the table shows the last N positions (default: %(default)s)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the lens as a heat map")
    parser.add_argument("--attention", type=int, default=None, metavar="LAYER",
                        help="also draw block LAYER's attention patterns per head, to FILE.attnLAYER.png "
                             "(needs --plot)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the lens as JSON")


def single_token(tokenizer: object, text: str, what: str) -> int:
    """The id of text, which must be one token."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{what} {text!r} is {len(ids)} tokens ({pieces}); give one token (mind the leading space)")
    return ids[0]


def check_paths(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{path}: the directory {path.parent} does not exist")


def attention_path(plot: Path, layer: int) -> Path:
    return plot.with_name(f"{plot.stem}.attn{layer}{plot.suffix or '.png'}")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..interp.lens import logit_lens
    from ..interp.plots import show_token

    if not args.prompt:
        raise ValueError("the prompt is empty")
    if args.top_k < 1 or args.positions < 1:
        raise ValueError("--top-k and --positions must be at least 1")
    if args.attention is not None and args.plot is None:
        raise ValueError("--attention draws into a file next to --plot FILE.png: give --plot")
    check_paths(args.plot, args.json)
    if args.plot is not None:
        _import_matplotlib()
    import torch

    from .. import hooks
    from ..loading import load

    model, tokenizer = load(args.source, quantize=args.quantize)
    model.eval()
    L = model.config.num_hidden_layers
    if args.attention is not None and not 0 <= args.attention < L:
        raise ValueError(f"--attention {args.attention}: the model has blocks 0..{L - 1}")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    answer = single_token(tokenizer, args.answer, "--answer") if args.answer is not None else None
    lens = logit_lens(model, ids, answer=answer, k=args.top_k)

    tokens = [tokenizer.decode([i]) for i in ids]
    shown = range(max(0, len(ids) - args.positions), len(ids))
    console = Console()
    table = Table(title=f"logit lens: top token per layer (answer {tokenizer.decode([lens.answer_id])!r}: rank and "
                        "probability at the last position)", title_justify="left")
    table.add_column("after", justify="right")
    for t in shown:
        table.add_column(show_token(tokens[t]), justify="left")
    table.add_column("rank", justify="right")
    table.add_column("p", justify="right")
    for b in range(L + 1):
        cells = [show_token(tokenizer.decode([int(lens.top_ids[b, t, 0])])) for t in shown]
        table.add_row(lens.layer_label(b), *cells, str(lens.answer_ranks[b]), f"{lens.answer_probs[b]:.3f}")
    console.print(table)
    first = next((b for b, r in enumerate(lens.answer_ranks) if r == 1), None)
    if first is not None:
        console.print(f"the answer is the top token from the residual stream after {lens.layer_label(first)} on")

    if args.json is not None:
        args.json.write_text(json.dumps(lens.to_dict(tokenizer), indent=1))
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        from ..interp.plots import plot_attention, plot_lens

        top_text = [[tokenizer.decode([int(i)]) for i in lens.top_ids[b, :, 0]] for b in range(L + 1)]
        plot_lens(lens, tokens, top_text, args.plot, title=f"logit lens: {args.prompt!r}")
        console.print(f"wrote {args.plot}")
        if args.attention is not None:
            name = f"blocks.{args.attention}.attn.hook_pattern"
            with torch.no_grad(), hooks.capture(model, name) as acts:
                model(torch.tensor([ids]))
            path = attention_path(args.plot, args.attention)
            plot_attention(acts[name][0], tokens, args.attention, path)
            console.print(f"wrote {path}")
    return 0


def _import_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'smollm2[plot]'") from None
