"""Direct Preference Optimization (`smollm2 dpo`), full or LoRA, through the fine-tuning trainer.

DPOTrainer is sft.SFTTrainer with pairs for conversations and dpo.py's loss for cross-entropy; the rest is the
trainers' own: loading --source, LoRA, the step (gradient accumulation, NaN/inf stop, clipping, AdamW), the
schedule, SIGINT/SIGTERM, metrics.jsonl, the loss plot and crash-safe checkpoints with bitwise-exact resume.

The reference model is the starting weights, frozen. With LoRA it is the same model with its adapters switched
off (no second copy of the weights: the base is frozen anyway); a full run loads --source a second time, with
requires_grad off, outside the trained module (so it is in no optimizer, state dict or checkpoint). A resumed
run checks that --source is still the reference it started from (sha256 of the weights).

A micro-batch is its pairs' chosen sequences then their rejected ones, right-padded; the loss module returns the
summed -log sigmoid(margin) of its pairs, which the trainer divides by the step's pair count: the mean over the
step's pairs, whatever the micro-batching. Validation runs before the first step (the starting model: the
rewards are zero there by construction) and every --eval-every steps; the reference's log-probabilities of the
held-out pairs are computed once and kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..lora import set_adapters_enabled
from ..model import SmolLM2
from ..tokenizer import Tokenizer
from . import dist
from .checkpoint import latest_checkpoint
from .dpo import SUMMED, dpo_loss, pair_sums, reply_logprobs, summarize
from .dpo_config import DPOConfig
from .loop import PLOT, LossModel, plot_losses
from .preference_data import PreferenceData, PreferencePair, collate_pairs, load_pairs
from .sft import SFTTrainer, weights_sha256

log = logging.getLogger(__name__)

Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, labels) -> (rows,) log-probabilities


class DPOLossModel(LossModel):
    """The policy and DPO's loss in one forward: DDP wraps this. With labels it returns the summed loss of the
    micro-batch's pairs and keeps their pair_sums in `sums`; without, the model's forward (for samples)."""

    def __init__(self, model: SmolLM2, compute_dtype: torch.dtype, beta: float) -> None:
        super().__init__(model, compute_dtype)
        self.beta = beta
        self.reference: Reference | None = None  # set by the trainer; a function, not a submodule
        self.sums: list[torch.Tensor] = []

    def logprobs(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(rows,) the policy's log-probability of each row's counted labels."""
        h = self.model(input_ids, output="hidden")  # (rows, T, hidden)
        return reply_logprobs(h, self.model.lm_head.weight, labels, self.compute_dtype)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **options: object) -> torch.Tensor:
        if labels is None:
            return self.model(input_ids, **options)
        assert self.reference is not None, "the trainer sets the reference model"
        with torch.no_grad():
            reference = self.reference(input_ids, labels)
        policy = self.logprobs(input_ids, labels)
        pairs = len(policy) // 2  # the chosen rows, then the rejected
        out = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
        self.sums.append(pair_sums(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:],
                                   self.beta))
        return out.loss * pairs


class DPOTrainer(SFTTrainer):
    """DPO on preference pairs; the model, steps, checkpoints and output are SFTTrainer's and Trainer's."""

    def __init__(self, config: DPOConfig, ctx: dist.DistContext, resume: bool = False) -> None:
        saved = None  # the resumed checkpoint's trainer.json
        if resume:  # before the model loads: is it a DPO run at all?
            newest = latest_checkpoint(Path(config.out))
            if newest is None:
                raise ValueError(f"--resume {config.out}: no checkpoint there to continue from")
            saved = json.loads((newest / "trainer.json").read_text(encoding="utf-8"))
            if not saved.get("dpo"):
                raise ValueError(f"cannot resume from {newest}: not a DPO run (continue it with "
                                 "`smollm2 finetune --resume` or `smollm2 train --resume`)")
        super().__init__(config, ctx, resume=resume)
        self.config: DPOConfig
        self.core: DPOLossModel
        self.reference_sha256 = None
        if config.lora:
            self.core.reference = self._adapters_off
        else:
            self.core.reference = self._frozen_copy(config, saved)
        self._val_reference: list[torch.Tensor] | None = None  # per validation micro-batch, computed once
        self._step_pairs: list[PreferencePair] = []

    # ---- the reference model -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _adapters_off(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """LoRA: the reference is the policy with its adapters switched off (the base weights, frozen)."""
        set_adapters_enabled(self.core.model, False)
        try:
            return self.core.logprobs(input_ids, labels)
        finally:
            set_adapters_enabled(self.core.model, True)

    def _frozen_copy(self, config: DPOConfig, saved: dict[str, Any] | None) -> Reference:
        """Full DPO: the starting weights loaded again from --source, frozen, in no optimizer or checkpoint."""
        from ..loading import load

        with torch.random.fork_rng(devices=[]):  # building a model may draw random numbers: not the run's
            model, _ = load(config.source, quantize="none")
        model.requires_grad_(False)
        model.eval().to(self.device)
        self.reference_sha256 = weights_sha256(model)
        if saved is not None and saved.get("reference_sha256") != self.reference_sha256:
            raise ValueError(f"cannot resume from {config.out}: the model at --source "
                             f"{config.source or '(the bundled model)'} is not the reference the run started from")
        dtype = self.core.compute_dtype

        @torch.no_grad()
        def reference(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            h = model(input_ids, output="hidden")
            return reply_logprobs(h, model.lm_head.weight, labels, dtype)

        reference.model = model  # type: ignore[attr-defined] (for tests: the reference's weights)
        return reference

    # ---- SFTTrainer's seams --------------------------------------------------------------------------------------

    def read_data(self, config: DPOConfig, tokenizer: Tokenizer) -> PreferenceData:  # type: ignore[override]
        return load_pairs(config.data, tokenizer, config.max_len, config.val_fraction, config.seed)

    def sequences(self) -> list[Any]:
        return [e for p in self.data.train + self.data.val for e in (p.chosen, p.rejected)]

    def loss_model(self, model: SmolLM2, compute_dtype: torch.dtype) -> LossModel:
        return DPOLossModel(model, compute_dtype, self.config.beta)

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.sampler.next_global_batch()  # every process computes the whole step's pairs
        self._step_pairs = [self.data.train[i] for i in indices]
        mine = indices.reshape(self.config.grad_accum, self.ctx.world_size, self.sampler.micro_batch)
        return [collate_pairs([self.data.train[j] for j in mine[i, self.ctx.rank]], self.pad_id)
                for i in range(self.config.grad_accum)]

    def step_tokens(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
        """(tokens read, pairs): the loop divides the summed loss by the second, giving the mean over pairs."""
        read = sum(len(p.chosen.ids) - 1 + len(p.rejected.ids) - 1 for p in self._step_pairs)
        return read, len(self._step_pairs)

    def train_step(self, step: int) -> dict[str, float]:
        self.core.sums.clear()
        metrics = super().train_step(step)  # the loss: the mean over the step's pairs, all processes
        sums = dist.all_reduce_sum(torch.stack(self.core.sums).sum(0))
        self.core.sums.clear()
        return {**metrics, **{k: v for k, v in summarize(sums).items() if k != "loss"}}

    def trainer_state(self) -> dict[str, Any]:
        state = {**super().trainer_state(), "dpo": True}
        if self.reference_sha256 is not None:
            state["reference_sha256"] = self.reference_sha256
        return state

    # ---- output ------------------------------------------------------------------------------------------------

    def header(self) -> str:
        config = self.config
        what = "resuming DPO of" if self.start_step else "DPO of"
        source = config.source or "the bundled SmolLM2-135M-Instruct"
        trained = sum(p.numel() for p in self.params)
        kind = (f"LoRA r={config.lora_rank}: {trained / 1e6:.2f}M parameters train, reference = adapters off"
                if config.lora else f"full: {trained / 1e6:.1f}M parameters, reference = a frozen copy")
        skipped = "".join(f", {len(lines)} skipped ({why})" for why, lines in self.data.skipped.items())
        return (f"{what} {source} ({kind}) on {self.device} x {self.ctx.world_size}: steps {self.start_step + 1}-"
                f"{self.end_step} of {config.steps}, {config.batch_size} pairs per step, {len(self.data.train)} "
                f"training / {len(self.data.val)} validation pairs{skipped}, beta {config.beta}, {config.dtype}")

    def step_line_extra(self, metrics: dict[str, float]) -> str:
        return f" | reward acc {metrics['reward_accuracy']:.3f} | margin {metrics['reward_margin']:.4f}"

    def before_steps(self) -> None:
        if self.start_step == 0 and self.config.eval_every:
            self.validate(0)  # the starting model: policy == reference, rewards 0 (logp_accuracy is its own)

    def plot(self) -> None:
        if self.ctx.is_main and self.plotting and not plot_losses(self.run_dir / PLOT, self.history,
                                                                  ylabel="DPO loss: -log sigmoid(reward margin)"):
            self.plotting = False
            log.warning("matplotlib is not installed: no %s (pip install matplotlib)", PLOT)

    @torch.no_grad()
    def evaluate_pairs(self, before_training: bool = False) -> dict[str, float] | None:
        """The SUMMED quantities' means over the held-out pairs (None without any)."""
        if not self.data.val:
            return None
        micro = self.sampler.micro_batch
        mine = self.data.val[self.ctx.rank :: self.ctx.world_size]
        batches = [collate_pairs(mine[i : i + micro], self.pad_id) for i in range(0, len(mine), micro)]
        sums = torch.zeros(1 + len(SUMMED), dtype=torch.float64, device=self.device)
        self.core.eval()  # no adapter dropout
        try:
            with self.autocast(), self.eager():
                if self._val_reference is None:
                    self._val_reference = [self.core.reference(x.to(self.device), y.to(self.device))
                                           for x, y in batches]
                for (x, y), reference in zip(batches, self._val_reference, strict=True):
                    # Before the first update the policy is the reference (a LoRA update starts at zero, a full
                    # run's reference is the same weights), bit for bit (tests/train/test_dpo_trainer.py):
                    # one pass instead of two.
                    policy = reference if before_training else self.core.logprobs(x.to(self.device),
                                                                                   y.to(self.device))
                    n = len(policy) // 2
                    sums += pair_sums(policy[:n], policy[n:], reference[:n], reference[n:], self.config.beta)
        finally:
            self.core.train()
        return summarize(dist.all_reduce_sum(sums))

    def validate(self, step: int) -> None:
        metrics = self.evaluate_pairs(before_training=step == 0)
        if metrics is None:
            return
        self.record({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
        self.echo(f"step {step}: val loss {metrics['loss']:.4f} | reward acc {metrics['reward_accuracy']:.3f} | "
                  f"margin {metrics['reward_margin']:.4f} | chosen/rejected reward {metrics['chosen_reward']:.4f}"
                  f"/{metrics['rejected_reward']:.4f} | logp {metrics['chosen_logp']:.2f}/"
                  f"{metrics['rejected_logp']:.2f} | chosen likelier {metrics['logp_accuracy']:.3f}")
        self.plot()


def dpo(config: DPOConfig, *, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train with DPO (or, with resume, continue the run in config.out); returns this invocation's step metrics."""
    ctx = dist.setup(config.device)
    try:
        return DPOTrainer(config, ctx, resume=resume).run(progress=progress)
    finally:
        if ctx.owns_group:
            dist.teardown()
