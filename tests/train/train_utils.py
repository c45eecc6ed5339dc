"""Helpers shared by the training tests: small token corpora, a tiny model config, quick run settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINYSHAKESPEARE, require
from smollm2.train.checkpoint import latest_checkpoint
from smollm2.train.config import TrainConfig

# 2 layers, GQA 4/2 heads, a byte vocabulary: a training step takes milliseconds.
TINY_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.1)


def write_tokens(directory: Path, train: np.ndarray, val: np.ndarray, vocab_size: int = 256,
                 tokenizer_source: str = "none") -> Path:
    """A data directory in `smollm2 prepare`'s format."""
    directory.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype="<u2").tofile(directory / "train.bin")
    np.asarray(val, dtype="<u2").tofile(directory / "val.bin")
    manifest = {"format": "smollm2-tokens-v1", "dtype": "uint16", "vocab_size": vocab_size, "eot_id": 0,
                "train_tokens": len(train), "val_tokens": len(val),
                "tokenizer": {"source": tokenizer_source, "sha256": ""}}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


def byte_corpus(directory: Path, n_train: int = 600, n_val: int = 300) -> Path:
    """Tiny Shakespeare's bytes as token ids (< 256): real structure for a byte-vocabulary model."""
    ids = np.frombuffer(require(TINYSHAKESPEARE).read_bytes()[: n_train + n_val], dtype=np.uint8)
    return write_tokens(directory, ids[:n_train], ids[n_train:])


def tiny_model_json(directory: Path) -> Path:
    path = directory / "tiny_model.json"
    path.write_text(json.dumps(TINY_MODEL), encoding="utf-8")
    return path


def quick_config(data: Path, out: Path, model: Path | str, **overrides: object) -> TrainConfig:
    """Settings for a run of a few seconds: batch 4 x 32, short warmup, no eval/samples, quiet."""
    settings = dict(data=str(data), out=str(out), model=str(model), steps=40, batch_size=4, seq_len=32, warmup=5,
                    eval_every=0, sample_every=0, save_every=0, log_every=1000, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


def checkpoint_tensors(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / name))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs (max diff {(a[key] - b[key]).abs().max().item()})"


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine (no waiting for a second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
