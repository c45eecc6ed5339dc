"""Crash-safe training checkpoints: written aside, made durable, then renamed into place in one step.

    RUN_DIR/checkpoints/step_000500/
        config.json, model.safetensors     the model in the original's layout (`smollm2.load` and
        tokenizer.json, tokenizer_config.json   transformers read this directory as it is)
        train_config.json                  the TrainConfig of the run
        optimizer.safetensors              AdamW moments and step counts, keyed "<parameter>/<name>"
        rng.safetensors                    torch (and CUDA) generator states
        trainer.json                       step, world size, data-loader position, python/numpy RNG states,
                                           optimizer hyperparameters
        COMPLETE                           written last: the file list with sizes and sha256 checksums

A checkpoint is written into `.tmp-step_000500-<pid>/`, every file and the directory are fsynced, COMPLETE is
written and fsynced, and only then is the directory renamed to its final name (rename is atomic). A crash at any
point leaves either no `step_000500/` at all or a complete one; readers ignore directories without COMPLETE.
Older checkpoints are deleted only after the new one is in place, keeping the newest `keep_last`.
Nothing is ever pickled: tensors go to safetensors (a JSON header and raw bytes), everything else to JSON.
The directory names, the COMPLETE marker and finding a run's newest checkpoint are smollm2/checkpoint_format.py's
(torch-free, shared with `smollm2.load(RUN_DIR)`); they are re-exported here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint_format import (  # the layout and finding checkpoints, shared with smollm2.load (no torch)
    CHECKPOINTS,
    COMPLETE,
    FORMAT,
    check_complete,
    checkpoint_name,
    completion_marker,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    verified_checkpoint,
)
from ..config import Config
from ..weights import check_state_dict
from .config import TrainConfig
from .prepare import fsync_dir

__all__ = [
    "CHECKPOINTS", "COMPLETE", "FORMAT", "Checkpoint", "capture_rng", "check_complete", "checkpoint_model",
    "checkpoint_name", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "resolve_checkpoint",
    "restore_rng", "save_checkpoint", "verified_checkpoint",
]


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read back."""

    path: Path
    step: int
    model_config: Config
    train_config: TrainConfig
    model_state: dict[str, torch.Tensor]  # the original's keys; lm_head.weight is absent when tied
    optimizer_state: dict[str, Any]  # torch's optimizer state-dict layout, parameters named by key
    trainer: dict[str, Any]  # trainer.json
    rng_tensors: dict[str, torch.Tensor]  # rng.safetensors


# ---- writing ---------------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: Config,
    train_config: TrainConfig,
    optimizer_state: dict[str, Any],
    trainer: dict[str, Any],
    tokenizer: Any = None,  # Tokenizer | None: saved alongside so the checkpoint loads on its own
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` crash-safely, then delete all but the newest keep_last complete ones."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while writing: never complete
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()

    model_state = dict(model_state)
    if model_config.tie_word_embeddings:
        model_state.pop("lm_head.weight", None)  # the embedding matrix, stored once as in the original
    save_file(_contiguous(model_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model_config.to_json(tmp / "config.json")
    train_config.to_json(tmp / "train_config.json")
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer_state)
    save_file(_contiguous(optimizer_tensors), str(tmp / "optimizer.safetensors"))
    rng_meta, rng_tensors = capture_rng()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    trainer = {"format": FORMAT, "step": step, **trainer, "optimizer": optimizer_meta, "rng": rng_meta}
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(tmp)

    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for file in files:
        _fsync_file(file)
    marker = completion_marker(tmp, step)  # sizes and checksums, verified by every reader
    (tmp / COMPLETE).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    _fsync_file(tmp / COMPLETE)
    fsync_dir(tmp)

    old = None
    if final.exists():  # the same step saved again (e.g. stopped right after a periodic save)
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's optimizer state dict -> (tensors "<param>/<name>", JSON: hyperparameters and non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value
            else:
                scalars.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    for param, entries in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(entries)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- random number generators ------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(python and numpy states as JSON, torch and CUDA generator states as tensors)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        "python": {"version": version, "state": list(words), "gauss_next": gauss},
        "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = meta["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():  # same machine shape
        torch.cuda.set_rng_state_all(cuda)


# ---- reading -----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint (or a run directory's newest one that verifies) onto the CPU.

    verify=False: for a checkpoint directory the caller has just verified (verified_checkpoint), not hashed twice.
    """
    if verify or not (Path(path) / COMPLETE).is_file():
        path, step = verified_checkpoint(path)
    else:
        path, step = Path(path), int(_read_json(Path(path) / COMPLETE)["step"])
    trainer = _read_json(path / "trainer.json")
    if trainer.get("format") != FORMAT:
        raise ValueError(f"{path / 'trainer.json'}: format {trainer.get('format')!r}, expected {FORMAT!r}")
    optimizer_state = _unflatten_optimizer(_read_tensors(path / "optimizer.safetensors"), trainer["optimizer"])
    model_config, model_state = Config.from_json(path / "config.json"), _read_tensors(path / "model.safetensors")
    check_state_dict(model_state, model_config, str(path))  # before a model is built from the config
    return Checkpoint(
        path=path,
        step=step,
        model_config=model_config,
        train_config=TrainConfig.from_dict(_read_json(path / "train_config.json"), str(path / "train_config.json")),
        model_state=model_state,
        optimizer_state=optimizer_state,
        trainer=trainer,
        rng_tensors=_read_tensors(path / "rng.safetensors"),
    )


def checkpoint_model(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The model config and weights of a checkpoint, or of a run directory's newest checkpoint.

    For `smollm2.load(RUN_DIR)`: build the model with `weights.build_model(config, state_dict, ...)`.
    """
    path = resolve_checkpoint(path)  # verified
    return Config.from_json(path / "config.json"), _read_tensors(path / "model.safetensors")
