"""The training loop: SmolLM2 from scratch with the official recipe, in one process or several.

One step: the learning rate from the schedule, this process's micro-batches forward and backward (gradients
averaged over processes by DDP, or reduce-scattered by FSDP2), the summed loss all-reduced, a NaN/inf check,
the global gradient norm clipped, AdamW. Around the steps: a progress bar and a line every log_every steps,
metrics.jsonl, validation loss every eval_every steps, greedy samples of fixed prompts every sample_every steps,
loss.png, and crash-safe checkpoints. SIGINT/SIGTERM finish the current step, save and return normally.

Resuming restores the weights, the AdamW state, the data-loader position and the RNG states, and the learning
rate is a function of the step alone, so N steps straight and K steps + stop + resume to N are bitwise
identical on the CPU in fp32 (tests/train/test_train.py). Anchors: nanoGPT train.py (loop, DDP, grad accumulation),
nanochat (checkpoint metadata, loader state), torchtitan (init_weights, FSDP2, distributed state dicts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import PRESETS, Config, preset
from ..inference.generate import decode_step, generate
from ..loading import load_tokenizer
from ..model import SmolLM2
from ..tokenizer import Tokenizer
from . import dist
from .checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from .config import TrainConfig
from .data import BatchSampler, TokenData, val_starts, windows
from .loss import linear_cross_entropy

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
PLOT = "loss.png"
_PREFIX = "model."  # LossModel's name for the SmolLM2 inside it; checkpoints use the SmolLM2's own keys


class NonFiniteLossError(ValueError):
    """The loss or the gradient norm became NaN or infinite: the run stops before saving anything."""


# ---- pieces --------------------------------------------------------------------------------------------------


def resolve_model_config(name: str) -> Config:
    """--model: a preset name or a config.json path."""
    if name in PRESETS:
        return preset(name)
    if name.endswith(".json") or Path(name).is_file():
        return Config.from_json(name)
    raise ValueError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}) or a config.json file")


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule.

    wsd (warmup-stable-decay, the official SmolLM2 schedule): constant, then a linear decay to min_lr over the
    last decay_fraction of the steps. Unlike cosine, the stable phase does not depend on the run length, so a
    run can be extended while it is in it.
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = round(config.decay_fraction * config.steps)
    if step < config.steps - decay_steps:
        return config.lr
    return config.min_lr + (config.lr - config.min_lr) * (config.steps - step) / decay_steps


class LossModel(nn.Module):
    """SmolLM2 and its loss in one forward pass: the module that DDP and FSDP2 wrap.

    With labels: the summed cross-entropy, computed without the full logits (see loss.py). Without: the model's
    forward, which the greedy samples decode through. Going through forward matters under DDP (which prepares
    gradient sync there) and FSDP2 (which gathers the shared weights there).
    """

    def __init__(self, model: SmolLM2, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype

    @property
    def config(self) -> Config:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **options: object) -> torch.Tensor:
        """The summed loss with labels; without, the model's own forward (options: SmolLM2.forward's), so that
        `generate` can decode through this module (the trainer's samples do)."""
        if labels is None:
            return self.model(input_ids, **options)
        h = self.model(input_ids, output="hidden")  # (B, T, hidden)
        return linear_cross_entropy(h.flatten(0, 1), self.model.lm_head.weight, labels.flatten(),
                                    self.compute_dtype)


def make_optimizer(module: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on every matrix (linears and the embedding) and none on the norm weights."""
    params = [p for p in module.parameters() if p.requires_grad]  # a tied matrix appears once
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": config.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)  # one kernel for all parameters
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return torch.optim.AdamW(groups, **kwargs)


def check_resume(config: TrainConfig, checkpoint: Checkpoint, world_size: int, train_tokens: int) -> None:
    """A resumed run must compute the same batches on the same model: name the first field that differs."""
    saved = checkpoint.train_config
    where = f"cannot resume from {checkpoint.path}"
    for name in ("batch_size", "seq_len", "seed"):
        ours, theirs = getattr(config, name), getattr(saved, name)
        if ours != theirs:
            raise ValueError(f"{where}: --{name.replace('_', '-')} is {ours}, but the run was trained with {theirs}")
    if checkpoint.trainer.get("world_size") != world_size:
        raise ValueError(f"{where}: world size (number of processes) is {world_size}, but the run was trained "
                         f"with {checkpoint.trainer.get('world_size')}")
    if checkpoint.trainer.get("train_tokens") != train_tokens:
        raise ValueError(f"{where}: the training split of --data {config.data} has {train_tokens} tokens, but the "
                         f"run was trained on {checkpoint.trainer.get('train_tokens')}")
    if config.model != saved.model:  # only a --model given again is compared; the checkpoint's config rules
        ours_config, theirs_config = resolve_model_config(config.model).to_dict(), checkpoint.model_config.to_dict()
        for name, value in ours_config.items():
            if value != theirs_config.get(name):
                raise ValueError(f"{where}: model {name} is {value} in --model {config.model}, but the run's model "
                                 f"has {theirs_config.get(name)}")


@contextlib.contextmanager
def stop_on_signals(flag: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `flag` (the loop finishes its step, saves and returns); a second one acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        flag.set()
        if dist.is_main():
            os.write(2, b"\nstopping after this step, then saving (press Ctrl-C again to abort)\n")
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def plot_losses(path: Path, history: list[dict[str, Any]], ylabel: str = "cross-entropy (nats per token)") -> bool:
    """Train and validation loss against step as a PNG (replaced atomically). False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set (Linux, macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _CheckpointFiles:
    """The files save_checkpoint writes beside the weights, through its `tokenizer` argument (it calls
    `.save(directory)` before sealing the checkpoint): the tokenizer, then the trainer's own (a LoRA adapter)."""

    def __init__(self, tokenizer: Tokenizer | None, write: Any) -> None:
        self.tokenizer, self.write = tokenizer, write

    def save(self, directory: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        self.write(directory)


# ---- the trainer ---------------------------------------------------------------------------------------------


class Trainer:
    """Builds the run (model, wrappers, optimizer, data, resumed state) and runs its steps."""

    def __init__(self, config: TrainConfig, ctx: dist.DistContext, resume: bool | Path = False) -> None:
        if not config.data:
            raise ValueError("--data is required: a directory written by `smollm2 prepare`")
        if not config.out:
            raise ValueError("--out is required: the run directory to write")
        self.config, self.ctx, self.device = config, ctx, ctx.device
        self.run_dir = Path(config.out)
        self.data = TokenData.open(config.data)

        checkpoint = None
        if resume:
            # a Path: the checkpoint the caller resolved (and verified) to read its settings, not hashed again
            checkpoint = load_checkpoint(resume, verify=False) if isinstance(resume, Path) else \
                load_checkpoint(self.run_dir)
            check_resume(config, checkpoint, ctx.world_size, len(self.data.train))
            self.model_config = checkpoint.model_config
        else:
            existing = latest_checkpoint(self.run_dir)
            if existing is not None:
                raise ValueError(f"{self.run_dir} already holds a run (at {existing.name}): continue it with "
                                 f"--resume {self.run_dir}, or choose another --out")
            self.model_config = resolve_model_config(config.model)
        if self.data.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"--data {config.data} has token ids up to {self.data.vocab_size - 1}, but the model "
                             f"({config.model}) has only {self.model_config.vocab_size} embeddings")
        self.data.check_ids(self.model_config.vocab_size, config.model)  # the files' ids, before the first step
        if config.seq_len > self.model_config.max_position_embeddings:
            raise ValueError(f"--seq-len {config.seq_len} exceeds the model's context length "
                             f"{self.model_config.max_position_embeddings}")
        if config.fsdp and not torch.distributed.is_initialized():
            raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N")
        self.start_step = checkpoint.step if checkpoint is not None else 0
        self.end_step = min(config.steps, config.stop_at or config.steps)
        if self.start_step >= self.end_step:
            raise ValueError(f"the run in {self.run_dir} is at step {self.start_step}; nothing to do with --steps "
                             f"{config.steps}" + (f" --stop-at {config.stop_at}" if config.stop_at else ""))

        self.sampler = BatchSampler(len(self.data.train), config.seq_len, config.batch_size, config.grad_accum,
                                    ctx.rank, ctx.world_size, config.seed)
        self.val_starts, self.val_len = val_starts(len(self.data.val), config.seq_len, config.eval_tokens)
        self.bf16 = config.dtype == "bf16"
        self._build_model()
        if checkpoint is not None:
            self._restore(checkpoint)
        self._apply_hyperparameters()
        self.tokenizer = self._tokenizer(checkpoint)
        self.history: list[dict[str, Any]] = self._read_history() if ctx.is_main else []
        self.stop = threading.Event()
        self.plotting = True  # until matplotlib turns out to be missing
        self.tokens_seen = self.start_step * config.tokens_per_step  # inputs read, all processes together

    # ---- setup -------------------------------------------------------------------------------------------------

    def _build_model(self) -> None:
        config = self.config
        # Every process builds the same weights from the seed, so a sharded or replicated model starts where a
        # single process does. (The whole model is built on the CPU first: fine up to a few billion parameters.)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        model = SmolLM2(self.model_config)
        model.init_weights()
        if config.compile:
            # Each decoder block is compiled on its own (torchtitan's per-block compile): the blocks are alike, so
            # one graph serves all of them and compiles once; the chunked loss and its custom autograd function
            # stay eager. Checkpoint keys are unchanged: the state-dict API drops the wrappers' `_orig_mod.`.
            for i, block in enumerate(model.model.layers):
                model.model.layers[i] = torch.compile(block)
        self.core = LossModel(model, torch.bfloat16 if self.bf16 else torch.float32)
        if config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:
                fully_shard(block)  # each block's weights are gathered just for its forward and backward
            fully_shard(self.core)  # the rest: embedding (= lm_head), final norm
        else:
            self.core.to(self.device)
        if self.ctx.distributed and not config.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # The buffers (rotary tables) are the same constants everywhere: no need to broadcast them each step.
            self.wrapped: nn.Module = DistributedDataParallel(self.core, device_ids=device_ids,
                                                              broadcast_buffers=False)
        else:
            self.wrapped = self.core
        self.optimizer = make_optimizer(self.core, config, self.device)
        self.params = [p for p in self.core.parameters() if p.requires_grad]

    def _apply_hyperparameters(self) -> None:
        """Settings a resumed run may change (--lr is set every step)."""
        for group, decay in zip(self.optimizer.param_groups, (self.config.weight_decay, 0.0), strict=True):
            group.update(weight_decay=decay, betas=(self.config.beta1, self.config.beta2), eps=self.config.eps)

    def _restore(self, checkpoint: Checkpoint) -> None:
        # Imported here: torch.distributed.checkpoint takes about a second to import, which every `smollm2`
        # command would pay (the CLI imports this module for TrainConfig's flags).
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        state = {_PREFIX + k: v for k, v in checkpoint.model_state.items()}
        if self.model_config.tie_word_embeddings:
            state[_PREFIX + "lm_head.weight"] = state[_PREFIX + "model.embed_tokens.weight"]
        set_model_state_dict(self.core, state, options=options)
        saved = checkpoint.optimizer_state
        optimizer_state = {
            "state": {_PREFIX + k: v for k, v in saved["state"].items()},
            "param_groups": [dict(g, params=[_PREFIX + p for p in g["params"]]) for g in saved["param_groups"]],
        }
        set_optimizer_state_dict(self.core, self.optimizer, optimizer_state, options=options)
        self.sampler.load_state_dict(checkpoint.trainer["data"])
        restore_rng(checkpoint.trainer["rng"], checkpoint.rng_tensors)

    def _tokenizer(self, checkpoint: Checkpoint | None) -> Tokenizer | None:
        """For samples, and saved into every checkpoint: the resumed checkpoint's copy, else the data directory's,
        else the one the data manifest names."""
        try:
            for directory in (checkpoint.path if checkpoint is not None else None, self.data.directory):
                if directory is not None and (directory / "tokenizer.json").is_file():
                    return load_tokenizer(directory / "tokenizer.json")[0]
            source = (self.data.manifest.get("tokenizer") or {}).get("source")
            if not source:
                raise ValueError("the data manifest names no tokenizer")
            return load_tokenizer(str(source))[0]
        except (ValueError, FileNotFoundError, ConnectionError) as e:
            if self.ctx.is_main:
                log.warning("no tokenizer (%s): no samples, and checkpoints will not include one", e)
            return None

    def _read_history(self) -> list[dict[str, Any]]:
        """metrics.jsonl up to the step this run starts from (rows of a crashed run's lost steps are dropped)."""
        path = self.run_dir / METRICS
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.start_step:
                    rows.append(row)
        # aside, then renamed: a process killed here (and relaunched) must not lose the history it keeps
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
        return rows

    # ---- output (rank 0) ---------------------------------------------------------------------------------------

    def echo(self, text: str) -> None:
        if self.ctx.is_main:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)

    def record(self, row: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.history.append(row)
            with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        if self.ctx.is_main and self.plotting and not plot_losses(self.run_dir / PLOT, self.history):
            self.plotting = False
            log.warning("matplotlib is not installed: no %s (pip install matplotlib)", PLOT)

    # ---- one step ----------------------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def eager(self) -> contextlib.AbstractContextManager:
        """Evaluation and sampling run uncompiled: their shapes differ from training's and would recompile."""
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        return set_stance("force_eager") if self.config.compile and set_stance else contextlib.nullcontext()

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients over processes only after the last micro-batch of a step."""
        if self.config.fsdp:
            self.core.set_requires_gradient_sync(sync)
        elif not sync and self.wrapped is not self.core:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches (inputs, labels) of the next step. A fine-tuning trainer (sft.py) reads
        conversations here instead of token windows."""
        return self.sampler.next_batches(self.data.train)

    def step_tokens(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
        """(input tokens the step reads, labels its loss averages over), all processes together."""
        return self.config.tokens_per_step, self.config.tokens_per_step

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step `step` (0-based): returns its loss, learning rate and gradient norm."""
        lr = lr_at(self.config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.next_batches()
        read, counted = self.step_tokens(batches)
        self.tokens_seen += read
        self.last_step_tokens = read
        # Each micro-batch returns a summed loss; scaling by the labels the step counts, times the processes,
        # makes the gradients, once DDP averages them over processes, those of the mean loss over the whole step.
        scale = self.ctx.world_size / counted
        loss_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._gradient_sync(i == len(batches) - 1):
                with self.autocast():
                    loss = self.wrapped(x, y)
                (loss * scale).backward()
            loss_sum += loss.detach()
        loss = dist.all_reduce_sum(loss_sum).item() / counted
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"step {step + 1}: the loss is {loss}; stopping without saving (lower --lr? "
                                     f"the last good checkpoint is {latest_checkpoint(self.run_dir)})")
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.clip or math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"step {step + 1}: the gradient norm is {grad_norm}; stopping without saving "
                                     f"(lower --lr? the last good checkpoint is {latest_checkpoint(self.run_dir)})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    # ---- evaluation and samples --------------------------------------------------------------------------------

    def validate(self, step: int) -> None:
        """The validation loss at `step`, recorded, printed and plotted (a DPO run reports its own metrics)."""
        val = self.evaluate()
        if val is not None:
            self.record({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 700.0))})
            self.echo(f"step {step}: val loss {val:.4f} | val ppl {math.exp(min(val, 700.0)):.2f}")
            self.plot()

    def before_steps(self) -> None:
        """Runs once, after the header and before the first step (a DPO run validates the starting model)."""

    def step_line_extra(self, metrics: dict[str, float]) -> str:
        """More of a step's metrics for its log line, each as " | name value" (none here)."""
        return ""

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy over the fixed validation windows (None without validation data)."""
        if len(self.val_starts) == 0:
            return None
        world, micro = self.ctx.world_size, self.sampler.micro_batch
        mine = self.val_starts[self.ctx.rank :: world]
        batches = math.ceil(math.ceil(len(self.val_starts) / world) / micro)  # the most any process has
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(batches):
            starts = mine[i * micro : (i + 1) * micro]
            if len(starts) == 0 and not self.config.fsdp:
                continue
            # Under FSDP every process must join every forward pass: one that ran out evaluates a window and
            # drops the result.
            x, y = windows(self.data.val, starts if len(starts) else self.val_starts[:1], self.val_len)
            with self.autocast(), self.eager():
                loss = self.core(x.to(self.device), y.to(self.device)).double()
            total += loss if len(starts) else 0.0 * loss
        return dist.all_reduce_sum(total).item() / (len(self.val_starts) * self.val_len)

    @torch.no_grad()
    def sample(self, prompt: str) -> str | None:
        """Greedy continuation of a prompt (None when its tokens do not fit the model's vocabulary)."""
        ids = self.tokenizer.encode(prompt)
        if not ids or max(ids) >= self.model_config.vocab_size:
            return None
        new_tokens = min(self.config.sample_tokens, self.model_config.max_position_embeddings - len(ids))
        if new_tokens < 1:
            return ""
        eot = self.data.manifest["eot_id"]
        with self.autocast(), self.eager():
            # the eager step, through self.core: under FSDP, its forward gathers the sharded weights
            out = list(generate(self.core, ids, max_new_tokens=new_tokens, eos_ids=(eot,), step=decode_step))
        return self.tokenizer.decode(out)

    def samples(self, step: int) -> None:
        # Under FSDP every process must take part in every forward pass; otherwise rank 0 samples alone.
        if self.tokenizer is None or not (self.ctx.is_main or self.config.fsdp):
            return
        results = {prompt: self.sample(prompt) for prompt in self.config.prompts}
        self.record({"step": step, "samples": results})
        lines = [f"step {step} samples:"]
        for prompt, text in results.items():
            if text is None:
                lines.append(f"  | {prompt!r}: (prompt tokens outside the vocabulary)")
                continue
            # Shown with runs of blank lines folded (an early model often emits nothing but newlines);
            # metrics.jsonl keeps the exact text.
            shown = re.sub(r"\n[ \t]*(?:\n[ \t]*)+\n", "\n\n", prompt + text).rstrip().splitlines()
            lines += ["  > " + shown[0]] + ["  | " + line for line in shown[1:]]  # > marks where a sample starts
        self.echo("\n".join(lines))

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """What trainer.json records beyond the step, the world size and the RNG states."""
        return {"train_tokens": len(self.data.train), "data": self.sampler.state_dict()}

    def checkpoint_model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights a checkpoint's model.safetensors holds, in the original's layout (a LoRA run: merged)."""
        return state

    def write_checkpoint_files(self, directory: Path) -> None:
        """More files for a checkpoint, written before it is sealed (a LoRA run: its adapter)."""

    def save(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict import (  # slow to import: see _restore
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP: gathered onto rank 0
        model_state = get_model_state_dict(self.core, options=options)
        optimizer_state = get_optimizer_state_dict(self.core, self.optimizer, options=options)
        if self.ctx.is_main:
            bad = [k for k, v in model_state.items() if not torch.isfinite(v).all()]
            if bad:
                raise NonFiniteLossError(f"step {step}: non-finite weights in {bad[0]}; not saving")
            path = save_checkpoint(
                self.run_dir,
                step,
                model_state=self.checkpoint_model_state({k.removeprefix(_PREFIX): v for k, v in model_state.items()}),
                model_config=self.model_config,
                train_config=self.config,
                optimizer_state={
                    "state": {k.removeprefix(_PREFIX): v for k, v in optimizer_state["state"].items()},
                    "param_groups": [dict(g, params=[p.removeprefix(_PREFIX) for p in g["params"]])
                                     for g in optimizer_state["param_groups"]],
                },
                trainer={"world_size": self.ctx.world_size, "torch_version": torch.__version__,
                         **self.trainer_state()},
                tokenizer=_CheckpointFiles(self.tokenizer, self.write_checkpoint_files),
                keep_last=self.config.keep_last,
            )
            self.echo(f"step {step}: saved {path}")
        dist.barrier()

    def _stop_requested(self) -> bool:
        """Any process signalled: all of them stop after the same step."""
        if not self.ctx.distributed:
            return self.stop.is_set()
        flag = torch.tensor(float(self.stop.is_set()), device=self.device)
        return dist.all_reduce_sum(flag).item() > 0

    # ---- the loop ----------------------------------------------------------------------------------------------

    def header(self) -> str:
        """The run's first line: what trains, where, for how long."""
        config = self.config
        what = "resuming" if self.start_step else "training"
        return (f"{what} {config.model} ({self.core.model.num_parameters() / 1e6:.1f}M parameters) on {self.device} "
                f"x {self.ctx.world_size}: steps {self.start_step + 1}-{self.end_step} of {config.steps}, "
                f"{config.batch_size} x {config.seq_len} tokens per step, {config.dtype}")

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """Train from start_step to end_step; returns this invocation's per-step metrics."""
        from tqdm import tqdm

        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.echo(self.header())
        self.before_steps()
        bar = tqdm(total=self.end_step, initial=self.start_step, unit="step", dynamic_ncols=True,
                   disable=not (progress and self.ctx.is_main and sys.stderr.isatty()))
        rows: list[dict[str, Any]] = []
        step_times: list[float] = []
        try:
            with stop_on_signals(self.stop):
                for step in range(self.start_step, self.end_step):
                    started = time.perf_counter()
                    metrics = self.train_step(step)
                    seconds = time.perf_counter() - started
                    step_times.append(seconds)
                    done = step + 1
                    row = {"step": done, **metrics, "tokens": self.tokens_seen,
                           "tokens_per_s": self.last_step_tokens / seconds,
                           "peak_memory_gb": peak_memory_gb(self.device)}
                    rows.append(row)
                    self.record(row)
                    timed = step_times[1:] or step_times  # the first step includes warm-up (and compilation)
                    eta = (self.end_step - done) * sum(timed) / len(timed)
                    bar.set_postfix_str(f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                                        f"gnorm {metrics['grad_norm']:.2f} {row['tokens_per_s']:,.0f} tok/s")
                    bar.update(1)
                    if done % config.log_every == 0 or done == self.end_step:
                        self.echo(f"step {done}/{self.end_step} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} "
                                  f"| grad norm {metrics['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s "
                                  f"| peak mem {row['peak_memory_gb']:.2f} GB | ETA {_format_duration(eta)}"
                                  f"{self.step_line_extra(metrics)}")
                    stop = self._stop_requested()
                    if stop:
                        self.echo(f"step {done}: stopping on a signal")
                    last = done == self.end_step or stop
                    if not stop and config.eval_every and (done % config.eval_every == 0 or last):
                        self.validate(done)
                    if not stop and config.sample_every and (done % config.sample_every == 0 or last):
                        self.samples(done)
                    if last or (config.save_every and done % config.save_every == 0):
                        self.save(done)
                        self.plot()
                    if stop:
                        break
        finally:
            bar.close()
        return rows


def train(config: TrainConfig, *, resume: bool | Path = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train (or, with resume, continue the run in config.out) and return this invocation's per-step metrics.

    resume: True for the run's newest checkpoint that verifies, or the Path of a checkpoint already verified.
    """
    ctx = dist.setup(config.device)
    try:
        return Trainer(config, ctx, resume=resume).run(progress=progress)
    finally:
        if ctx.owns_group:
            dist.teardown()
