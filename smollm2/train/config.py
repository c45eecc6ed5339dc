"""TrainConfig: every knob of a training run, one field each, with its default and what it means.

The defaults are the official SmolLM2-135M pre-training recipe (huggingface/smollm,
pre-training/smollm2/config_smollm2_135M.yaml: nanotron, AdamW, WSD schedule) with the batch shrunk to fit a
laptop: the original trains 2M steps of 512 x 2048 tokens on 64 GPUs. `smollm2 train` builds its flags from
these fields (`--batch-size` is `batch_size`), and every checkpoint saves the config as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULES = ("wsd", "cosine", "constant")
DTYPES = ("fp32", "bf16")


def knob(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field whose help text the CLI shows; `cli` holds extra argparse options (choices, metavar)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    # ---- what to train, on what, where to write -------------------------------------------------------------
    data: str = knob("", "written by `smollm2 prepare` (train.bin, val.bin, manifest.json)", metavar="DATA_DIR")
    out: str = knob("", "run directory: checkpoints/, metrics.jsonl, loss.png", metavar="RUN_DIR")
    model: str = knob("135m", "a preset (135m, 360m, 1.7b, tiny) or a config.json path", metavar="NAME|CONFIG.json")
    # ---- length and batch -----------------------------------------------------------------------------------
    steps: int = knob(5000, "optimizer steps; the schedule spans them (official: 2,000,000)")
    stop_at: int | None = knob(None, "end this invocation after this step (saving) without changing the schedule",
                               metavar="STEP")
    batch_size: int = knob(8, "sequences per optimizer step, all processes and micro-batches together "
                              "(official: 512)")
    seq_len: int = knob(512, "tokens per sequence (official: 2048)")
    grad_accum: int = knob(1, "micro-batches per step in each process: batch_size / (grad_accum x processes) "
                              "sequences go through the model at once")
    # ---- optimizer: AdamW, decay on 2-D weights only, clipped gradients ---------------------------------------
    lr: float = knob(3e-3, "peak learning rate (official: 3e-3)")
    schedule: str = knob("wsd", "learning-rate schedule after warmup: wsd = warmup, stable, decay (official)",
                         choices=SCHEDULES)
    warmup: int = knob(100, "linear warmup steps (official: 2000 of 2M; shorter here so short runs leave it)")
    decay_fraction: float = knob(0.2, "wsd: fraction of the steps, at the end, that decays linearly to min_lr")
    min_lr: float = knob(0.0, "learning rate at the end of the decay (official: 0)")
    weight_decay: float = knob(0.01, "AdamW weight decay on matrices and embeddings, never on norms (official: 0.01)")
    beta1: float = knob(0.9, "AdamW beta1 (official: 0.9)")
    beta2: float = knob(0.95, "AdamW beta2 (official: 0.95)")
    eps: float = knob(1e-8, "AdamW epsilon (official: 1e-8)")
    clip: float = knob(1.0, "clip the global gradient norm to this (official: 1.0); 0 = no clipping")
    seed: int = knob(8, "seed of the initial weights and the data order (official: 8)")
    # ---- numerics and speed -----------------------------------------------------------------------------------
    dtype: str = knob("fp32", "compute dtype: bf16 = autocast matmuls; weights, gradients and optimizer stay fp32",
                      choices=DTYPES)
    compile: bool = knob(False, "torch.compile the model and loss (slow first step, faster after)")
    fsdp: bool = knob(False, "shard weights, gradients and optimizer state over processes (FSDP2) instead of DDP")
    device: str = knob("auto", "cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)")
    # ---- monitoring and checkpoints ---------------------------------------------------------------------------
    log_every: int = knob(10, "print a progress line every N steps (the bar updates every step)")
    eval_every: int = knob(250, "validation loss and perplexity every N steps and at the end; 0 = never")
    eval_tokens: int = knob(65536, "validation tokens per evaluation (the first ones of val.bin)")
    sample_every: int = knob(500, "greedy continuations of the prompts every N steps and at the end; 0 = never")
    sample_tokens: int = knob(48, "tokens generated per sample")
    prompts: list[str] = knob(["ROMEO:", "First Citizen:\n", "The king"],
                              "prompts to continue when sampling (repeat the flag for several)", metavar="TEXT")
    save_every: int = knob(500, "checkpoint every N steps; one is also written at the end and on Ctrl-C")
    keep_last: int = knob(3, "complete checkpoints to keep (at least 2)")

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {rule}")

        def finite(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_tokens", "log_every"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                  "must be a positive integer")
        for name in ("warmup", "eval_every", "sample_every", "sample_tokens", "save_every", "seed"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                  "must be a non-negative integer")
        check(self.stop_at is None or (isinstance(self.stop_at, int) and self.stop_at >= 1), "stop_at",
              "must be a positive step number")
        check(finite(self.lr) and self.lr > 0, "lr", "must be a positive number")
        check(finite(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", f"must be between 0 and --lr {self.lr}")
        check(self.schedule in SCHEDULES, "schedule", f"choose from {list(SCHEDULES)}")
        check(finite(self.decay_fraction) and 0 <= self.decay_fraction <= 1, "decay_fraction", "must be in [0, 1]")
        check(finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(finite(self.beta1) and 0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        check(finite(self.beta2) and 0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        check(finite(self.eps) and self.eps > 0, "eps", "must be a positive number")
        check(finite(self.clip) and self.clip >= 0, "clip", "must be >= 0")
        check(self.dtype in DTYPES, "dtype", f"choose from {list(DTYPES)}")
        check(isinstance(self.keep_last, int) and self.keep_last >= 2, "keep_last",
              "must be at least 2, so a good checkpoint survives a crash while the next one is written")
        check(isinstance(self.prompts, list) and all(isinstance(p, str) and p for p in self.prompts), "prompts",
              "must be non-empty strings")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    # ---- JSON (saved in every checkpoint) ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training setting(s) {unknown}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
