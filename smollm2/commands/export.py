"""`smollm2 export RUN_DIR[/checkpoints/step_N] --out DIR`: a training checkpoint in the original's layout.

DIR gets config.json, generation_config.json, model.safetensors and the tokenizer files, as the original
SmolLM2 repositories have them: `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`smollm2 generate --source DIR` both load it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

_DTYPES = ("fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_DIR[/checkpoint]",
                        help="a run directory (its newest complete checkpoint) or one checkpoint directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--dtype", choices=_DTYPES, default="fp32", help="weight dtype to write (default: fp32)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..tokenizer import Tokenizer
    from ..train.checkpoint import checkpoint_model, resolve_checkpoint
    from ..weights import build_model, save_pretrained

    path = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.resolve() == path.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; choose another directory")
    config, state_dict = checkpoint_model(path)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(config, state_dict, str(path), dtype=dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    save_pretrained(model, out, tokenizer)
    note = "" if tokenizer is not None else " (the checkpoint has no tokenizer: none written)"
    print(f"exported {path} ({config.num_parameters() / 1e6:.1f}M parameters, {args.dtype}) to {out}{note}")
    return 0
