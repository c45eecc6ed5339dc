"""Training SmolLM2 from scratch: `train(TrainConfig(...))`, checkpoints, and the data sampler.

    config.py      TrainConfig: every knob, defaults from the official SmolLM2-135M recipe
    data.py        the prepared token files and the deterministic, resumable batch sampler
    loss.py        cross-entropy of the output projection without materialising the full logits
    loop.py        the training loop (DDP / FSDP2, bf16 autocast, compile, eval, samples, plot)
    checkpoint.py  crash-safe checkpoints, safetensors + JSON only
    dist.py        torchrun environment, process group, rank-0 output
"""

from .checkpoint import checkpoint_model, latest_checkpoint, load_checkpoint
from .config import TrainConfig
from .loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "TrainConfig", "checkpoint_model", "latest_checkpoint", "load_checkpoint", "train"]
