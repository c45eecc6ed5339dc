"""Supervised fine-tuning (`smollm2 finetune`): full or LoRA, on chats, through the pre-training loop.

SFTTrainer is loop.Trainer with a different start and different batches: it loads the model from any source
`smollm2.load` accepts (the bundled GGUF dequantised to fp32, a directory, a run, a hub id) instead of
initialising one, and reads conversations (chat_data.py) instead of token windows. Everything else is the
Trainer's own: the step (gradient accumulation, the all-reduced loss, NaN/inf stop, clipping, AdamW), the
learning-rate schedule, SIGINT/SIGTERM, metrics.jsonl, the loss plot, samples and crash-safe checkpoints.

The loss is the mean cross-entropy over the step's assistant tokens (every micro-batch's, all processes
together): only those rows reach the output projection. With LoRA the base weights are frozen and shared,
not copied; the optimizer holds state for the adapters alone. A LoRA checkpoint holds the merged weights
(model.safetensors: `smollm2.load(RUN)` runs the fine-tuned model) and the adapter in PEFT's format
(adapter_config.json, adapter_model.safetensors); resuming rebuilds the base from --source, checks that it is
the same (sha256 of its weights), and loads the adapter. Resuming is exact: N steps straight equal K steps,
a stop and a resume, bit for bit on the CPU in fp32 (tests/train/test_sft.py).
"""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.generate import decode_step, generate
from ..lora import apply_lora, lora_layers, merged_state_dict, save_adapter
from ..model import SmolLM2
from ..tokenizer import Tokenizer
from . import dist
from .chat_data import IGNORE, ChatData, ExampleSampler, collate, end_of_turn_id, load_chats
from .checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, restore_rng
from .loop import LossModel, Trainer, make_optimizer
from .loss import linear_cross_entropy
from .sft_config import SFTConfig

_PREFIX = "model."


class SFTLossModel(LossModel):
    """LossModel whose labels may be IGNORE: those rows never reach the output projection or the loss."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **options: object) -> torch.Tensor:
        if labels is None:
            return self.model(input_ids, **options)
        h = self.model(input_ids, output="hidden").flatten(0, 1)  # (B*T, hidden)
        labels = labels.flatten()
        keep = labels != IGNORE
        return linear_cross_entropy(h[keep], self.model.lm_head.weight, labels[keep], self.compute_dtype)


def weights_sha256(model: SmolLM2) -> str:
    """A fingerprint of the base weights (every tensor's bytes, in key order): a resumed LoRA run must find the
    same base at --source."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if "lora_" in key:
            continue
        digest.update(key.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class SFTTrainer(Trainer):
    """Fine-tunes a loaded model on conversations; the steps, checkpoints and output are Trainer's."""

    def __init__(self, config: SFTConfig, ctx: dist.DistContext, resume: bool = False) -> None:
        # Trainer.__init__ is not called: it builds a fresh model on token files. This sets the same attributes.
        from ..loading import load

        if not config.data:
            raise ValueError("--data is required: a JSONL file of conversations")
        if not config.out:
            raise ValueError("--out is required: the run directory to write")
        if not Path(config.data).expanduser().is_file():  # before the seconds a model takes to load
            raise FileNotFoundError(f"--data {config.data}: no such file (expected JSONL, one conversation a line)")
        if config.fsdp:
            raise ValueError("fine-tuning does not support --fsdp (DDP, under torchrun, works)")
        self.ctx, self.device = ctx, ctx.device
        self.run_dir = Path(config.out)
        checkpoint = None
        if resume:
            checkpoint = load_checkpoint(self.run_dir)
            saved = type(config).from_checkpoint(checkpoint.train_config.to_dict(), checkpoint.trainer,
                                                 str(checkpoint.path / "trainer.json"))
            check_sft_resume(config, saved, checkpoint, ctx.world_size)
        else:
            existing = latest_checkpoint(self.run_dir)
            if existing is not None:
                raise ValueError(f"{self.run_dir} already holds a run (at {existing.name}): continue it with "
                                 f"--resume {self.run_dir}, or choose another --out")
        lora = config.lora_config() if config.lora else None

        # The model: a full run resumes from its checkpoint's weights; a LoRA run from its base, again.
        model_source = checkpoint.path if checkpoint is not None and lora is None else config.source
        model, tokenizer = load(model_source, quantize="none")
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.base_sha256 = None
        if lora is not None:
            self.base_sha256 = weights_sha256(model)
            if checkpoint is not None and checkpoint.trainer.get("base_sha256") != self.base_sha256:
                raise ValueError(f"cannot resume from {checkpoint.path}: the base model at --source "
                                 f"{config.source or '(the bundled model)'} is not the one the adapter was trained on")

        self.data = self.read_data(config, tokenizer)
        sequences = self.sequences()
        top = max(max(e.ids) for e in sequences)
        if top >= self.model_config.vocab_size:
            raise ValueError(f"--data {config.data}: token id {top} is outside the model's vocabulary of "
                             f"{self.model_config.vocab_size}")
        longest = max(len(e.ids) for e in sequences)
        if longest - 1 > self.model_config.max_position_embeddings:
            raise ValueError(f"--max-len {config.max_len}: a conversation of {longest} tokens exceeds the model's "
                             f"context length {self.model_config.max_position_embeddings}")
        if checkpoint is not None and checkpoint.trainer.get("train_examples") != len(self.data.train):
            raise ValueError(f"cannot resume from {checkpoint.path}: --data {config.data} has {len(self.data.train)} "
                             f"training conversations, but the run was trained on "
                             f"{checkpoint.trainer.get('train_examples')}")
        self.config = config = config.resolved(len(self.data.train))
        self.start_step = checkpoint.step if checkpoint is not None else 0
        self.end_step = min(config.steps, config.stop_at or config.steps)
        if self.start_step >= self.end_step:
            raise ValueError(f"the run in {self.run_dir} is at step {self.start_step}; nothing to do with --steps "
                             f"{config.steps}" + (f" --stop-at {config.stop_at}" if config.stop_at else ""))
        self.sampler = ExampleSampler(len(self.data.train), config.batch_size, config.grad_accum, ctx.rank,
                                      ctx.world_size, config.seed)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.end_ids = tuple({end_of_turn_id(tokenizer), *([tokenizer.eos_id] if tokenizer.eos_id is not None
                                                           else [])})
        self.bf16 = config.dtype == "bf16"

        torch.manual_seed(config.seed)  # the adapters' initialisation (a resumed run loads them instead)
        random.seed(config.seed)
        np.random.seed(config.seed)
        if lora is not None:
            apply_lora(model, lora)
            if checkpoint is not None:
                self._load_adapter(model, checkpoint)
        model.train()
        if config.compile:
            for i, block in enumerate(model.model.layers):  # as Trainer._build_model does
                model.model.layers[i] = torch.compile(block)
        self.core = self.loss_model(model, torch.bfloat16 if self.bf16 else torch.float32).to(self.device)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.core, device_ids=device_ids, broadcast_buffers=False)
        else:
            self.wrapped = self.core
        self.optimizer = make_optimizer(self.core, config, self.device)
        self.params = [p for p in self.core.parameters() if p.requires_grad]
        self.tokens_seen = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        self._apply_hyperparameters()
        self.history: list[dict[str, Any]] = self._read_history() if ctx.is_main else []
        self.stop = threading.Event()
        self.plotting = True
        self._step_examples: list[Any] = []

    # ---- what a DPO trainer (dpo_trainer.py) replaces ----------------------------------------------------------

    def read_data(self, config: SFTConfig, tokenizer: Tokenizer) -> ChatData:
        return load_chats(config.data, tokenizer, config.max_len, config.val_fraction, config.seed)

    def sequences(self) -> list[Any]:
        """Every rendered sequence of the data (Examples), training and validation: checked against the model."""
        return self.data.train + self.data.val

    def loss_model(self, model: SmolLM2, compute_dtype: torch.dtype) -> LossModel:
        return SFTLossModel(model, compute_dtype)

    # ---- resuming ----------------------------------------------------------------------------------------------

    @staticmethod
    def _load_adapter(model: SmolLM2, checkpoint: Checkpoint) -> None:
        from safetensors.torch import load_file

        from ..lora import ADAPTER_WEIGHTS, adapter_state_dict

        tensors = load_file(str(checkpoint.path / ADAPTER_WEIGHTS))
        expected = adapter_state_dict(model)
        if tensors.keys() != expected.keys():
            raise ValueError(f"{checkpoint.path / ADAPTER_WEIGHTS}: the adapter does not fit --lora-targets")
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key])

    def _restore(self, checkpoint: Checkpoint) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = checkpoint.optimizer_state
        optimizer_state = {
            "state": {_PREFIX + k: v for k, v in saved["state"].items()},
            "param_groups": [dict(g, params=[_PREFIX + p for p in g["params"]]) for g in saved["param_groups"]],
        }
        set_optimizer_state_dict(self.core, self.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
        self.sampler.load_state_dict(checkpoint.trainer["data"])
        self.tokens_seen = int(checkpoint.trainer.get("tokens_seen", 0))
        restore_rng(checkpoint.trainer["rng"], checkpoint.rng_tensors)

    # ---- the trainer's seams -----------------------------------------------------------------------------------

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.sampler.next_global_batch()  # every process computes the whole step's examples
        self._step_examples = [self.data.train[i] for i in indices]
        mine = indices.reshape(self.config.grad_accum, self.ctx.world_size, self.sampler.micro_batch)
        return [collate([self.data.train[j] for j in mine[i, self.ctx.rank]], self.pad_id)
                for i in range(self.config.grad_accum)]

    def step_tokens(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
        read = sum(len(e.ids) - 1 for e in self._step_examples)
        counted = sum(sum(e.trained[1:]) for e in self._step_examples)
        return read, counted

    def trainer_state(self) -> dict[str, Any]:
        state = {"train_examples": len(self.data.train), "data": self.sampler.state_dict(),
                 "tokens_seen": self.tokens_seen, "finetune": self.config.finetune_part()}
        if self.base_sha256 is not None:
            state["base_sha256"] = self.base_sha256
        return state

    def checkpoint_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.config.lora:
            return state
        return merged_state_dict(self.core.model)  # the original's layout: smollm2.load(RUN) runs the result

    def write_checkpoint_files(self, directory: Path) -> None:
        if self.config.lora:
            save_adapter(self.core.model, directory, base_model=self.config.source)

    def header(self) -> str:
        config, model = self.config, self.core.model
        what = "resuming" if self.start_step else "fine-tuning"
        source = config.source or "the bundled SmolLM2-135M-Instruct"
        if config.lora:
            trained = sum(p.numel() for p in self.params)
            kind = (f"LoRA r={config.lora_rank} on {len(lora_layers(model))} layers: {trained / 1e6:.2f}M "
                    f"parameters train, {(model.num_parameters() - trained) / 1e6:.1f}M frozen")
        else:
            kind = f"full: {model.num_parameters() / 1e6:.1f}M parameters"
        skipped = f", {len(self.data.skipped_long)} too long skipped" if self.data.skipped_long else ""
        return (f"{what} {source} ({kind}) on {self.device} x {self.ctx.world_size}: steps "
                f"{self.start_step + 1}-{self.end_step} of {config.steps}, {config.batch_size} conversations per "
                f"step, {len(self.data.train)} training / {len(self.data.val)} validation{skipped}, {config.dtype}")

    # ---- evaluation and samples --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy over the held-out conversations' assistant tokens (None without any)."""
        if not self.data.val:
            return None
        world, micro = self.ctx.world_size, self.sampler.micro_batch
        mine = self.data.val[self.ctx.rank :: world]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.core.eval()  # no adapter dropout
        try:
            for i in range(0, len(mine), micro):
                x, y = collate(mine[i : i + micro], self.pad_id)
                with self.autocast(), self.eager():
                    total += self.core(x.to(self.device), y.to(self.device)).double()
        finally:
            self.core.train()
        counted = sum(sum(e.trained[1:]) for e in self.data.val)
        return dist.all_reduce_sum(total).item() / counted

    @torch.no_grad()
    def sample(self, prompt: str) -> str | None:
        """The model's greedy reply to a user message, rendered with its chat template."""
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
        new_tokens = min(self.config.sample_tokens, self.model_config.max_position_embeddings - len(ids))
        if new_tokens < 1:
            return ""
        self.core.eval()
        try:
            with self.autocast(), self.eager():
                out = list(generate(self.core, ids, max_new_tokens=new_tokens, eos_ids=self.end_ids,
                                    step=decode_step))
        finally:
            self.core.train()
        return self.tokenizer.decode([t for t in out if t not in self.end_ids])

    def samples(self, step: int) -> None:
        if not self.ctx.is_main:
            return
        results = {prompt: self.sample(prompt) for prompt in self.config.prompts}
        self.record({"step": step, "samples": results})
        lines = [f"step {step} samples:"]
        for prompt, text in results.items():
            lines += [f"  > {prompt}"] + ["  | " + line for line in (text or "").strip().splitlines()]
        self.echo("\n".join(lines))


def check_sft_resume(config: SFTConfig, saved: SFTConfig, checkpoint: Checkpoint, world_size: int) -> None:
    """A resumed run must read the same conversations in the same order into the same model."""
    where = f"cannot resume from {checkpoint.path}"
    for name in ("batch_size", "seed", "max_len", "val_fraction", "source", "lora", "lora_rank",
                 "lora_alpha", "lora_dropout", "lora_targets"):
        ours, theirs = getattr(config, name), getattr(saved, name)
        if ours != theirs:
            raise ValueError(f"{where}: --{name.replace('_', '-')} is {ours}, but the run was trained with {theirs}")
    if checkpoint.trainer.get("world_size") != world_size:
        raise ValueError(f"{where}: world size (number of processes) is {world_size}, but the run was "
                         f"trained with {checkpoint.trainer.get('world_size')}")


def finetune(config: SFTConfig, *, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Fine-tune (or, with resume, continue the run in config.out); returns this invocation's per-step metrics."""
    ctx = dist.setup(config.device)
    try:
        return SFTTrainer(config, ctx, resume=resume).run(progress=progress)
    finally:
        if ctx.owns_group:
            dist.teardown()
