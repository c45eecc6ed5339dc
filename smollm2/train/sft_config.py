"""SFTConfig: the knobs of a fine-tuning run (`smollm2 finetune`), TrainConfig's plus the fine-tuning ones.

The defaults are the official SmolLM2-135M/360M SFT settings where they fit a laptop (alignment-handbook
recipes/smollm2, TRL's SFTTrainer): learning rate 1e-3, cosine schedule with a warmup of 10% of the steps,
AdamW with transformers' defaults (beta2 0.999, no weight decay), gradient norm clipped to 1.0. The batch is
shrunk (the recipe trains 128 conversations a step on 8 GPUs) and the length limit too.

Checkpoints store the TrainConfig part in train_config.json (which `load_checkpoint` reads like any run's) and
the fine-tuning part in trainer.json under "finetune", so a fine-tuning checkpoint is a training checkpoint.
Torch-free: `smollm2 finetune --help` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig, knob

# TrainConfig fields a fine-tuning run does not use (no flags): the model comes from --source, sequences are as
# long as their conversations (--max-len), validation is the held-out conversations, FSDP is not supported.
UNUSED = ("model", "seq_len", "eval_tokens", "fsdp")
LORA_TARGETS = "q,k,v,o,gate,up,down"  # every linear of the blocks (the SmolLM2 / alignment-handbook LoRA recipe)


@dataclass
class SFTConfig(TrainConfig):
    # ---- overridden TrainConfig fields (same names, fine-tuning meanings and defaults) ------------------------
    data: str = knob("", "JSONL, one conversation a line: {\"messages\": [{\"role\", \"content\"}, ...]} or "
                         "{\"prompt\", \"completion\"}", metavar="CHATS.jsonl")
    steps: int | None = knob(None, "optimizer steps (default: --epochs over the training conversations)")
    batch_size: int = knob(8, "conversations per optimizer step, all processes and micro-batches together "
                              "(official: 128)")
    lr: float = knob(1e-3, "peak learning rate (official for 135M/360M: 1e-3; 1.7B: 3e-4)")
    schedule: str = knob("cosine", "learning-rate schedule after warmup (official: cosine)",
                         choices=("wsd", "cosine", "constant"))
    warmup: int | None = knob(None, "linear warmup steps (default: --warmup-ratio of the steps)")
    weight_decay: float = knob(0.0, "AdamW weight decay on matrices (TRL's default: 0)")
    beta2: float = knob(0.999, "AdamW beta2 (TRL's default: 0.999)")
    seed: int = knob(42, "seed of the data order, the validation split and the LoRA initialisation (TRL's: 42)")
    eval_every: int = knob(100, "validation loss on the held-out conversations every N steps and at the end; "
                                "0 = never")
    sample_every: int = knob(100, "greedy replies to the prompts every N steps and at the end; 0 = never")
    sample_tokens: int = knob(64, "tokens generated per reply")
    prompts: list[str] = knob(["What is 15 + 27?", "Name three colours."],
                              "user messages to reply to when sampling (repeat the flag for several)",
                              metavar="TEXT")
    save_every: int = knob(200, "checkpoint every N steps; one is also written at the end and on Ctrl-C")
    # ---- fine-tuning ---------------------------------------------------------------------------------------
    source: str | None = knob(None, "the model to fine-tune: a .gguf file (dequantised to fp32), an "
                                    "original-layout directory, a training run or a hub id (default: the bundled "
                                    "SmolLM2-135M-Instruct)", metavar="SOURCE")
    epochs: float = knob(1.0, "passes over the training conversations when --steps is not given "
                              "(official: 2)")
    warmup_ratio: float = knob(0.1, "warmup as a fraction of the steps when --warmup is not given (official: 0.1)")
    max_len: int = knob(2048, "conversations longer than this many tokens are skipped (counted and reported)")
    val_fraction: float = knob(0.02, "fraction of the conversations held out for validation (seeded)")
    lora: bool = knob(False, "train LoRA adapters on a frozen base instead of every weight")
    lora_rank: int = knob(16, "LoRA rank r")
    lora_alpha: float = knob(32.0, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = knob(0.05, "dropout on the adapters' input")
    lora_targets: str = knob(LORA_TARGETS, "comma-separated layers to adapt (q, k, v, o, gate, up, down)")

    def __post_init__(self) -> None:
        # TrainConfig checks steps and warmup as integers; here they may still be None, resolved by `resolved`.
        steps, warmup = self.steps, self.warmup
        self.steps, self.warmup = (1 if steps is None else steps), (0 if warmup is None else warmup)
        try:
            super().__post_init__()
        finally:
            self.steps, self.warmup = steps, warmup

        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {rule}")

        def number(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        check(number(self.epochs) and self.epochs > 0, "epochs", "must be a positive number")
        check(number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(isinstance(self.max_len, int) and not isinstance(self.max_len, bool) and self.max_len >= 2, "max_len",
              "must be an integer >= 2")
        check(number(self.val_fraction) and 0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")

    def lora_config(self) -> Any:  # -> lora.LoRAConfig (lora.py imports torch: checked when a run starts)
        from ..lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=LoRAConfig.parse_targets(self.lora_targets))

    def resolved(self, train_examples: int) -> SFTConfig:
        """steps from --epochs and warmup from --warmup-ratio, where they were not given."""
        steps = self.steps if self.steps is not None else max(1, math.ceil(self.epochs * train_examples
                                                                           / self.batch_size))
        warmup = self.warmup if self.warmup is not None else round(self.warmup_ratio * steps)
        return dataclasses.replace(self, steps=steps, warmup=warmup)

    @property
    def tokens_per_step(self) -> int:  # an upper bound: sequences are as long as their conversations
        return self.batch_size * self.max_len

    # ---- JSON: train_config.json holds the TrainConfig part, trainer.json["finetune"] the rest ---------------

    def train_part(self) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in names}

    def finetune_part(self) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in names}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.train_part(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_checkpoint(cls, train_config: dict[str, Any], trainer: dict[str, Any], source: str) -> SFTConfig:
        finetune = trainer.get("finetune")
        if not isinstance(finetune, dict):
            raise ValueError(f"{source}: not a fine-tuning run (no 'finetune' settings in trainer.json); continue "
                             "it with `smollm2 train --resume`")
        return cls.from_dict({**train_config, **finetune}, source)
