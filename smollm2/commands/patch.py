"""`smollm2 patch --clean "..." --corrupt "..." --answer " Mary" [--wrong " John"]`: activation patching.

The clean run's residual stream (per layer and position) and each head's output (per layer and head) are put
into the corrupted run one at a time (smollm2.interp.patching); each is scored by how much of the logit
difference logit(answer) - logit(wrong) it brings back: 0 = the corrupted run, 1 = the clean one. Prints the
strongest effects, `--plot FILE.png` draws both heat maps, `--json FILE` writes them. The exact float32 model
by default (`--quantize none`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .lens import check_paths, single_token
from .options import add_quantize_argument, add_source_argument

PATCH_SHOW = 8  # strongest effects printed, of each kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", required=True, metavar="TEXT", help="the prompt whose answer is --answer")
    parser.add_argument("--corrupt", required=True, metavar="TEXT",
                        help="a prompt of the same number of tokens whose answer differs")
    parser.add_argument("--answer", required=True, metavar="TEXT", help="the clean answer, one token (e.g. ' Mary')")
    parser.add_argument("--wrong", default=None, metavar="TEXT",
                        help="the token the score compares the answer with, one token (default: the corrupted "
                             "run's most likely token other than the answer)")
    add_source_argument(parser)
    add_quantize_argument(parser, "none", help="weights: none (float32, the exact model; default), bf16, int8 or "
                                               "int4")
    parser.add_argument("--heads", action=argparse.BooleanOptionalAction, default=True,
                        help="also patch each attention head's output (default: %(default)s)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the effects as heat maps")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the effects as JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..interp.plots import show_token

    if not args.clean or not args.corrupt:
        raise ValueError("--clean and --corrupt must not be empty")
    check_paths(args.plot, args.json)
    if args.plot is not None:
        from .lens import _import_matplotlib

        _import_matplotlib()
    import torch

    from ..interp.patching import activation_patching
    from ..loading import load

    model, tokenizer = load(args.source, quantize=args.quantize)
    model.eval()
    clean, corrupt = tokenizer.encode(args.clean), tokenizer.encode(args.corrupt)
    if len(clean) != len(corrupt):
        raise ValueError(f"--clean is {len(clean)} tokens and --corrupt {len(corrupt)}: patching needs the same "
                         f"number (clean: {[tokenizer.decode([i]) for i in clean]}, corrupt: "
                         f"{[tokenizer.decode([i]) for i in corrupt]})")
    answer = single_token(tokenizer, args.answer, "--answer")
    if args.wrong is not None:
        wrong = single_token(tokenizer, args.wrong, "--wrong")
    else:
        with torch.no_grad():
            logits = model(torch.tensor([corrupt]), output="last_logits")[0]
        logits[answer] = float("-inf")
        wrong = int(logits.argmax())
    result = activation_patching(model, clean, corrupt, answer, wrong, heads=args.heads)

    console = Console()
    tokens = [tokenizer.decode([i]) for i in clean]
    console.print(f"logit({tokenizer.decode([answer])!r}) - logit({tokenizer.decode([wrong])!r}) at the last "
                  f"position: clean {result.clean_diff:+.3f}, corrupt {result.corrupt_diff:+.3f}")
    console.print("recovered share (0 = corrupt, 1 = clean), strongest first:")
    L, T = result.resid.shape
    order = result.resid.flatten().abs().argsort(descending=True)[:PATCH_SHOW]
    for flat in order.tolist():
        layer, t = divmod(flat, T)
        console.print(f"  resid_pre of block {layer:2d} at position {t:2d} {show_token(tokens[t]):>10}   "
                      f"{float(result.resid[layer, t]):+.3f}")
    if result.heads is not None:
        H = result.heads.shape[1]
        for flat in result.heads.flatten().abs().argsort(descending=True)[:PATCH_SHOW].tolist():
            layer, h = divmod(flat, H)
            console.print(f"  head {layer:2d}.{h} (its output at every position)         "
                          f"{float(result.heads[layer, h]):+.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(tokenizer), indent=1))
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        from ..interp.plots import plot_patching

        plot_patching(result, tokens, args.plot, title=f"patching {args.clean!r} into {args.corrupt!r}")
        console.print(f"wrote {args.plot}")
    return 0
