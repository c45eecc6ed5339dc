"""`smollm2 finetune`: supervised fine-tuning on chats, full or LoRA, or continue a fine-tuning run.

    smollm2 finetune --data CHATS.jsonl --out RUN_DIR [--source SOURCE] [--lora [--lora-rank 16 ...]] ...
    smollm2 finetune --resume RUN_DIR [--steps N] [any setting a resumed run may change]

Every flag is an SFTConfig field (smollm2/train/sft_config.py), where its default and meaning live.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..train.sft_config import UNUSED, SFTConfig
from .options import add_config_arguments, resumed_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the fine-tuning run in RUN_DIR from its newest complete checkpoint; flags "
                             "given alongside override its settings (batch size, length limit, seed, source and "
                             "LoRA settings must stay the same)")
    add_config_arguments(parser, SFTConfig, skip=UNUSED)


def run(args: argparse.Namespace) -> int:
    from ..train.sft import finetune

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if hasattr(args, f.name)}
    if args.resume is None:
        finetune(SFTConfig(**given))
        return 0
    config = resumed_config(SFTConfig, Path(args.resume), given)
    finetune(config, resume=True)
    return 0
