"""`smollm2 finetune`: supervised fine-tuning on chats, full or LoRA, or continue a fine-tuning run.

    smollm2 finetune --data CHATS.jsonl --out RUN_DIR [--source SOURCE] [--lora [--lora-rank 16 ...]] ...
    smollm2 finetune --resume RUN_DIR [--steps N] [any setting a resumed run may change]

Every flag is an SFTConfig field (smollm2/train/sft_config.py), where its default and meaning live.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from ..train.sft_config import UNUSED, SFTConfig

_HINTS = typing.get_type_hints(SFTConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the fine-tuning run in RUN_DIR from its newest complete checkpoint; flags "
                             "given alongside override its settings (batch size, length limit, seed, source and "
                             "LoRA settings must stay the same)")
    for field in dataclasses.fields(SFTConfig):
        if field.name in UNUSED:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _HINTS[field.name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        options = {k: v for k, v in field.metadata.items() if k != "help"}
        help_text = field.metadata["help"] + ("" if default in ("", None) else f" (default: {default!r})")
        # SUPPRESS: only flags actually given appear in args, so a resumed run keeps its own settings.
        common = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%"), **options}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind == list[str]:
            parser.add_argument(flag.removesuffix("s"), dest=field.name, action="append", **common)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=scalar, **common)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import resolve_checkpoint
    from ..train.sft import finetune

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if hasattr(args, f.name)}
    if args.resume is None:
        finetune(SFTConfig(**given))
        return 0
    run_dir = Path(args.resume)
    if "out" in given and Path(given["out"]) != run_dir:
        raise ValueError(f"--out {given['out']} and --resume {run_dir}: a resumed run writes to its own directory")
    checkpoint = resolve_checkpoint(run_dir)
    if checkpoint.parent.parent != run_dir:
        raise ValueError(f"--resume {run_dir}: pass the run directory ({checkpoint.parent.parent}); a run "
                         "continues from its newest checkpoint")
    saved = SFTConfig.from_checkpoint(json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8")),
                                      json.loads((checkpoint / "trainer.json").read_text(encoding="utf-8")),
                                      str(checkpoint / "trainer.json"))
    # stop_at belongs to one invocation: a resumed run goes to --steps unless told otherwise.
    config = SFTConfig.from_dict({**dataclasses.asdict(saved), "out": str(run_dir), "stop_at": None, **given})
    finetune(config, resume=True)
    return 0
