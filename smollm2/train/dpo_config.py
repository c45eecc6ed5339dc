"""DPOConfig: the knobs of a DPO run (`smollm2 dpo`), SFTConfig's plus --beta, with DPO's defaults.

The defaults are TRL's DPOConfig where they fit a laptop: beta 0.1, learning rate 1e-6 for every weight (TRL's
default; a LoRA run wants far more, ~1e-4), max length 1024, cosine schedule with 10% warmup (the SmolLM2
recipes'). Checkpoints store it as a fine-tuning run's (sft_config.py): train_config.json and
trainer.json["finetune"]. Torch-free: `smollm2 dpo --help` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import knob
from .sft_config import SFTConfig


@dataclass
class DPOConfig(SFTConfig):
    # ---- overridden fields (same names, DPO's meanings and defaults) --------------------------------------------
    data: str = knob("", "JSONL or .jsonl.gz, one pair a line: {\"prompt\" (text or messages) or \"messages\", "
                         "\"chosen\", \"rejected\"} (replies as text or assistant messages), or Anthropic HH "
                         "transcripts {\"chosen\": \"\\n\\nHuman: ...\\n\\nAssistant: ...\", \"rejected\": ...}",
                     metavar="PAIRS.jsonl")
    steps: int | None = knob(None, "optimizer steps (default: --epochs over the training pairs)")
    batch_size: int = knob(8, "preference pairs per optimizer step, all processes and micro-batches together")
    lr: float = knob(1e-6, "peak learning rate (TRL's default, for every weight; with --lora try 1e-4)")
    eval_every: int = knob(100, "validation (loss, reward accuracy and margin on the held-out pairs) every N "
                                "steps, before the first and at the end; 0 = never")
    sample_every: int = knob(0, "greedy replies to the prompts every N steps and at the end; 0 = never")
    seed: int = knob(42, "seed of the data order, the validation split and the LoRA initialisation")
    epochs: float = knob(1.0, "passes over the training pairs when --steps is not given")
    max_len: int = knob(1024, "pairs with a side longer than this many tokens are skipped (counted and reported)")
    val_fraction: float = knob(0.1, "fraction of the pairs held out for validation (seeded)")
    # ---- DPO ---------------------------------------------------------------------------------------------------
    beta: float = knob(0.1, "DPO's beta: reward = beta x (log pi - log pi_ref); higher keeps the model nearer "
                            "the reference")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and math.isfinite(self.beta)
                and self.beta > 0):
            raise ValueError(f"--beta {self.beta!r}: must be a positive number")
