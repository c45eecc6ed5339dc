"""Training SmolLM2 from scratch: `train(TrainConfig(...))`, checkpoints, and the data sampler.

    config.py      TrainConfig: every knob, defaults from the official SmolLM2-135M recipe
    prepare.py     `smollm2 prepare`: a text corpus -> uint16 token files and a manifest
    data.py        the prepared token files and the deterministic, resumable batch sampler
    loss.py        cross-entropy of the output projection without materialising the full logits
    loop.py        the training loop (DDP / FSDP2, bf16 autocast, compile, eval, samples, plot)
    checkpoint.py  crash-safe checkpoints, safetensors + JSON only
    dist.py        torchrun environment, process group, rank-0 output
    chat_data.py   fine-tuning data: JSONL chats in the model's chat template, the assistant-token loss mask
    sft_config.py  SFTConfig: `smollm2 finetune`'s knobs (TrainConfig's, plus source, epochs, LoRA)
    sft.py         fine-tuning (full or LoRA) through loop.Trainer's steps, checkpoints and output

The names below are imported on first use (PEP 562): `smollm2 train --help` reads TrainConfig (config.py, no
torch) without loading the training loop.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint import checkpoint_model, latest_checkpoint, load_checkpoint
    from .config import TrainConfig
    from .loop import NonFiniteLossError, train

_EXPORTS = {
    "NonFiniteLossError": "loop", "TrainConfig": "config", "checkpoint_model": "checkpoint",
    "latest_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "train": "loop",
}

__all__ = ["NonFiniteLossError", "TrainConfig", "checkpoint_model", "latest_checkpoint", "load_checkpoint", "train"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
