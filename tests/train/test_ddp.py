"""Several processes: DDP and FSDP2 with 2 CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import (
    assert_bitwise_equal,
    byte_corpus,
    checkpoint_tensors,
    metrics,
    one_thread,  # noqa: F401 (fixture)
    quick_config,
    tiny_model_json,
    train_losses,
)

from conftest import REPO
from smollm2.train import load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(*args: str) -> None:
    """`torchrun --standalone --nproc-per-node 2 -m smollm2 train ARGS`, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "smollm2", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    data, model = byte_corpus(base / "data"), tiny_model_json(base)
    flags = ["--data", str(data), "--model", str(model), "--steps", "6", "--batch-size", "4", "--seq-len", "32",
             "--warmup", "2", "--eval-every", "3", "--sample-every", "0", "--device", "cpu"]
    torchrun(*flags, "--out", str(base / "ddp"))
    torchrun(*flags, "--out", str(base / "ddp_resumed"), "--stop-at", "3")
    torchrun("--resume", str(base / "ddp_resumed"))
    torchrun(*flags, "--out", str(base / "fsdp"), "--fsdp", "--grad-accum", "2")
    # One process, the same global batch of 4 sequences (one micro-batch of 4 instead of 2 x 2 or 2 x 2 x 1).
    train(quick_config(data, base / "single", model, steps=6, warmup=2, eval_every=3), progress=False)
    return {"base": base, "data": data, "model": model, "ddp": base / "ddp", "ddp_resumed": base / "ddp_resumed",
            "fsdp": base / "fsdp", "single": base / "single"}


def test_ddp_losses_equal_one_process(runs: dict[str, Path]) -> None:
    single, ddp = train_losses(runs["single"]), train_losses(runs["ddp"])
    assert len(ddp) == 6 and ddp != [ddp[0]] * 6
    assert ddp == pytest.approx(single, abs=1e-5, rel=0)
    val = [[r["val_loss"] for r in metrics(runs[name]) if "val_loss" in r] for name in ("single", "ddp")]
    assert len(val[0]) == 2 and val[1] == pytest.approx(val[0], abs=1e-5, rel=0)
    assert load_checkpoint(runs["ddp"]).trainer["world_size"] == 2


def test_ddp_resumes_exactly(runs: dict[str, Path]) -> None:
    assert [r["step"] for r in metrics(runs["ddp_resumed"]) if "loss" in r] == list(range(1, 7))
    assert train_losses(runs["ddp_resumed"]) == train_losses(runs["ddp"])
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_bitwise_equal(checkpoint_tensors(runs["ddp_resumed"], name), checkpoint_tensors(runs["ddp"], name))


def test_fsdp_with_grad_accumulation_equals_one_process(runs: dict[str, Path]) -> None:
    assert train_losses(runs["fsdp"]) == pytest.approx(train_losses(runs["single"]), abs=1e-5, rel=0)
    fsdp, single = checkpoint_tensors(runs["fsdp"]), checkpoint_tensors(runs["single"])
    assert fsdp.keys() == single.keys()  # full, unsharded weights under the original's names
    for key in fsdp:
        assert fsdp[key].shape == single[key].shape
        assert (fsdp[key] - single[key]).abs().max() < 1e-4, key


def test_resuming_with_another_process_count_is_an_error(runs: dict[str, Path]) -> None:
    config = quick_config(runs["data"], runs["ddp"], runs["model"], steps=8, warmup=2, eval_every=3)
    with pytest.raises(ValueError, match=r"world size \(number of processes\) is 1, but the run was trained with 2"):
        train(config, resume=True, progress=False)
