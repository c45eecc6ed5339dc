"""`smollm2 train`: train a model from scratch on prepared data, or continue a run.

    smollm2 train --data DATA_DIR --out RUN_DIR [--model 135m] [--steps 5000] [--batch-size 8] ...
    smollm2 train --resume RUN_DIR [--steps N] [any setting a resumed run may change]
    torchrun --nproc-per-node 2 -m smollm2 train ...        (DDP; add --fsdp to shard the model)

Every flag is a TrainConfig field (smollm2/train/config.py), where its default and meaning live.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from ..train.config import TrainConfig

_HINTS = typing.get_type_hints(TrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest complete checkpoint; flags given "
                             "alongside override its settings (batch size, sequence length, model, seed and "
                             "process count must stay the same)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _HINTS[field.name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        options = {k: v for k, v in field.metadata.items() if k != "help"}
        help_text = field.metadata["help"] + ("" if default in ("", None) else f" (default: {default!r})")
        # SUPPRESS: only flags actually given appear in args, so a resumed run keeps its own settings.
        common = {"default": argparse.SUPPRESS, "help": help_text, **options}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind == list[str]:
            parser.add_argument(flag.removesuffix("s"), dest=field.name, action="append", **common)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=scalar, **common)


def run(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.checkpoint import resolve_checkpoint

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume is None:
        train(TrainConfig(**given))
        return 0
    run_dir = Path(args.resume)
    if "out" in given and Path(given["out"]) != run_dir:
        raise ValueError(f"--out {given['out']} and --resume {run_dir}: a resumed run writes to its own directory")
    checkpoint = resolve_checkpoint(run_dir)
    if checkpoint.parent.parent != run_dir:
        raise ValueError(f"--resume {run_dir}: pass the run directory ({checkpoint.parent.parent}); a run "
                         "continues from its newest checkpoint")
    saved = json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8"))
    # stop_at belongs to one invocation: a resumed run goes to --steps unless told otherwise.
    config = TrainConfig.from_dict({**saved, "out": str(run_dir), "stop_at": None, **given})
    train(config, resume=True)
    return 0
