"""`smollm2 dpo`: Direct Preference Optimization on chosen/rejected pairs, full or LoRA, or continue such a run.

    smollm2 dpo --data PAIRS.jsonl --out RUN_DIR [--source SFT_RUN_OR_MODEL] [--beta 0.1] [--lora ...] ...
    smollm2 dpo --resume RUN_DIR [--steps N] [any setting a resumed run may change]

Every flag is a DPOConfig field (smollm2/train/dpo_config.py), where its default and meaning live.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..train.dpo_config import DPOConfig
from ..train.sft_config import UNUSED
from .options import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the DPO run in RUN_DIR from its newest complete checkpoint; flags given "
                             "alongside override its settings (batch size, length limit, seed, source and LoRA "
                             "settings must stay the same)")
    add_config_arguments(parser, DPOConfig, skip=UNUSED)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import resolve_checkpoint
    from ..train.dpo_trainer import dpo

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DPOConfig) if hasattr(args, f.name)}
    if args.resume is None:
        dpo(DPOConfig(**given))
        return 0
    run_dir = Path(args.resume)
    if "out" in given and Path(given["out"]) != run_dir:
        raise ValueError(f"--out {given['out']} and --resume {run_dir}: a resumed run writes to its own directory")
    checkpoint = resolve_checkpoint(run_dir)
    if checkpoint.parent.parent != run_dir:
        raise ValueError(f"--resume {run_dir}: pass the run directory ({checkpoint.parent.parent}); a run "
                         "continues from its newest checkpoint")
    saved = DPOConfig.from_checkpoint(json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8")),
                                      json.loads((checkpoint / "trainer.json").read_text(encoding="utf-8")),
                                      str(checkpoint / "trainer.json"))
    # stop_at belongs to one invocation: a resumed run goes to --steps unless told otherwise.
    config = DPOConfig.from_dict({**dataclasses.asdict(saved), "out": str(run_dir), "stop_at": None, **given})
    dpo(config, resume=True)
    return 0
