"""`smollm2 train`: train a model from scratch on prepared data, or continue a run.

    smollm2 train --data DATA_DIR --out RUN_DIR [--model 135m] [--steps 5000] [--batch-size 8] ...
    smollm2 train --resume RUN_DIR [--steps N] [any setting a resumed run may change]
    smollm2 train --autoresume --data DATA_DIR --out RUN_DIR ...   (the same command, relaunched after a crash)
    torchrun --nproc-per-node 2 -m smollm2 train ...        (DDP; add --fsdp to shard the model)

Every flag is a TrainConfig field (smollm2/train/config.py), where its default and meaning live.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..train.config import TrainConfig
from .options import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest complete checkpoint; flags given "
                             "alongside override its settings (batch size, sequence length, model, seed and "
                             "process count must stay the same)")
    parser.add_argument("--autoresume", action="store_true",
                        help="for a job scheduler that relaunches the same command: continue the run in --out from "
                             "its newest verified checkpoint if it has one (every setting must agree with the "
                             "run's), else start it")
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.checkpoint import verified_checkpoint

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.autoresume:
        if args.resume is not None:
            raise ValueError("--autoresume and --resume: give one (--autoresume takes the run's settings as flags)")
        return autoresume(TrainConfig(**given))
    if args.resume is None:
        train(TrainConfig(**given))
        return 0
    run_dir = Path(args.resume)
    if "out" in given and Path(given["out"]) != run_dir:
        raise ValueError(f"--out {given['out']} and --resume {run_dir}: a resumed run writes to its own directory")
    checkpoint, _ = verified_checkpoint(run_dir)
    if checkpoint.parent.parent != run_dir:
        raise ValueError(f"--resume {run_dir}: pass the run directory ({checkpoint.parent.parent}); a run "
                         "continues from its newest checkpoint")
    saved = json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8"))
    # stop_at belongs to one invocation: a resumed run goes to --steps unless told otherwise.
    config = TrainConfig.from_dict({**saved, "out": str(run_dir), "stop_at": None, **given})
    train(config, resume=checkpoint)
    return 0


# Settings that belong to one invocation, not to the run (a relaunch may stop elsewhere).
_PER_INVOCATION = ("stop_at",)


def autoresume(config: TrainConfig) -> int:
    """The same command, relaunched: continue from the newest verified checkpoint, or start when there is none."""
    from ..train import train
    from ..train.checkpoint import list_checkpoints, verified_checkpoint

    if not config.out:
        raise ValueError("--autoresume needs --out RUN_DIR (and the run's other settings, as when it started)")
    run_dir = Path(config.out)
    if not list_checkpoints(run_dir):  # killed before its first checkpoint, or never started: start afresh
        train(config)
        return 0
    checkpoint, step = verified_checkpoint(run_dir)  # an error naming the files when none verifies
    saved = TrainConfig.from_dict(json.loads((checkpoint / "train_config.json").read_text(encoding="utf-8")),
                                  str(checkpoint / "train_config.json"))
    for field in dataclasses.fields(TrainConfig):
        ours, theirs = getattr(config, field.name), getattr(saved, field.name)
        if field.name not in _PER_INVOCATION and ours != theirs:
            flag = "--" + field.name.replace("_", "-")
            raise ValueError(f"--autoresume: {flag} is {ours!r}, but the run in {run_dir} was started with {theirs!r} "
                             f"(at {checkpoint.name}); relaunch the same command, or change settings with --resume")
    if step >= min(config.steps, config.stop_at or config.steps):
        print(f"{run_dir} is already at step {step}: nothing to do")
        return 0
    train(config, resume=checkpoint)
    return 0
