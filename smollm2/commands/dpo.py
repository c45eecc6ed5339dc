"""`smollm2 dpo`: Direct Preference Optimization on chosen/rejected pairs, full or LoRA, or continue such a run.

    smollm2 dpo --data PAIRS.jsonl --out RUN_DIR [--source SFT_RUN_OR_MODEL] [--beta 0.1] [--lora ...] ...
    smollm2 dpo --resume RUN_DIR [--steps N] [any setting a resumed run may change]

Every flag is a DPOConfig field (smollm2/train/dpo_config.py), where its default and meaning live.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..train.dpo_config import DPOConfig
from ..train.sft_config import UNUSED
from .options import add_config_arguments, resumed_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the DPO run in RUN_DIR from its newest complete checkpoint; flags given "
                             "alongside override its settings (batch size, length limit, seed, source and LoRA "
                             "settings must stay the same)")
    add_config_arguments(parser, DPOConfig, skip=UNUSED)


def run(args: argparse.Namespace) -> int:
    from ..train.dpo_trainer import dpo

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DPOConfig) if hasattr(args, f.name)}
    if args.resume is None:
        dpo(DPOConfig(**given))
        return 0
    config = resumed_config(DPOConfig, Path(args.resume), given)
    dpo(config, resume=True)
    return 0
