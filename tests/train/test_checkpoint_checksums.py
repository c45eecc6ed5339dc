"""Checkpoint checksums: one flipped byte in a checkpoint's weights is detected by every reader (resume, `load(RUN)`,
export); a run falls back to its newest checkpoint that verifies, saying so, and stops naming the file if none does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_checkpoint import _save
from train_utils import (
    byte_corpus,
    one_thread,  # noqa: F401 (fixture)
    quick_config,
    tiny_model_json,
)

from smollm2.checkpoint_format import DIGEST, file_digest
from smollm2.train import load_checkpoint, train
from smollm2.train.checkpoint import COMPLETE, checkpoint_model, resolve_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def flip_byte(file: Path, from_end: int = 100) -> None:
    """Flip one bit in the tensor data (near the end, past the safetensors header): the size stays the same."""
    data = bytearray(file.read_bytes())
    data[-from_end] ^= 0x01
    file.write_bytes(bytes(data))


def test_marker_records_a_checksum_of_every_file(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    marker = json.loads((path / COMPLETE).read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != COMPLETE)
    assert sorted(marker[DIGEST]) == sorted(marker["files"]) == files
    assert marker[DIGEST]["model.safetensors"] == file_digest(path / "model.safetensors")
    assert len(marker[DIGEST]["model.safetensors"]) == 64  # sha256, hex


def test_corrupt_newest_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    flip_byte(newest / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.step == 1 and torch.all(checkpoint.model_state["model.norm.weight"] == 1.0)
    warning = caplog.text
    assert str(newest / "model.safetensors") in warning and "corrupt" in warning
    assert "falling back to" in warning and "step_000001" in warning
    # the same for smollm2.load(RUN) and export's checkpoint_model
    assert resolve_checkpoint(tmp_path).name == "step_000001"
    assert torch.all(checkpoint_model(tmp_path)[1]["model.norm.weight"] == 1.0)
    # the corrupt checkpoint named directly is an error naming the file, never read
    with pytest.raises(ValueError, match=r"step_000002/model.safetensors: corrupt \(sha256 checksum differs"):
        load_checkpoint(newest)


def test_no_checkpoint_verifies_is_an_error_naming_the_files(tmp_path: Path) -> None:
    first, second = _save(tmp_path, 1), _save(tmp_path, 2)
    flip_byte(first / "optimizer.safetensors", from_end=3)
    flip_byte(second / "model.safetensors")
    with pytest.raises(ValueError, match="no checkpoint verifies") as raised:
        load_checkpoint(tmp_path)
    assert str(first / "optimizer.safetensors") in str(raised.value)
    assert str(second / "model.safetensors") in str(raised.value)


def test_corrupt_json_file_is_caught_too(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    trainer = path / "trainer.json"
    trainer.write_text(trainer.read_text().replace('"position": 1', '"position": 7'))  # same size, other value
    with pytest.raises(ValueError, match="trainer.json: corrupt"):
        load_checkpoint(tmp_path)


def test_resume_and_load_never_use_corrupt_weights(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """`train --resume` continues from the last good checkpoint; `smollm2.load(RUN)` resolves to it."""
    from smollm2.cli import main
    from smollm2.loading import resolve

    data, model = byte_corpus(tmp_path / "data"), tiny_model_json(tmp_path)
    run = tmp_path / "run"
    train(quick_config(data, run, model, steps=6, save_every=2, keep_last=5))
    flip_byte(run / "checkpoints" / "step_000006" / "model.safetensors")
    assert resolve(run) == ("dir", run / "checkpoints" / "step_000004")
    with pytest.raises(ValueError, match="step_000006/model.safetensors: corrupt"):
        resolve(run / "checkpoints" / "step_000006")  # a checkpoint directory has a config.json: still verified
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", str(run), "--steps", "8"]) == 0
    assert "resuming" in (out := capsys.readouterr().out) and "steps 5-8 of 8" in out
    assert caplog.text.count("falling back to") == 1  # said once, and the checkpoint hashed once
    assert load_checkpoint(run).step == 8
