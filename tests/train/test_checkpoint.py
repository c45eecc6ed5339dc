"""Checkpoints: round trip, crash safety (SIGKILL mid-write), pruning, no pickles, export to transformers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import (
    TINY_MODEL,
    assert_bitwise_equal,
    byte_corpus,
    checkpoint_tensors,
    metrics,
    one_thread,  # noqa: F401 (fixture)
    quick_config,
    tiny_model_json,
    write_tokens,
)

from conftest import ORIGINAL_TOKENIZER, REPO, require
from smollm2.config import Config
from smollm2.train import checkpoint_model, latest_checkpoint, load_checkpoint, train
from smollm2.train.checkpoint import (
    COMPLETE,
    capture_rng,
    list_checkpoints,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from smollm2.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(run: Path, step: int, keep_last: int = 3) -> Path:
    """A small checkpoint with recognisable contents (every weight equals the step)."""
    config = Config(**TINY_MODEL)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _model_state(config).items()}
    model_state = {k: torch.full(shape, float(step)) for k, shape in shapes.items()}
    optimizer_state = {
        "state": {"model.norm.weight": {"step": torch.tensor(float(step)), "exp_avg": torch.full((64,), 0.5)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0, "params": ["model.norm.weight"]}],
    }
    return save_checkpoint(run, step, model_state=model_state, model_config=config, train_config=TrainConfig(),
                           optimizer_state=optimizer_state, trainer={"world_size": 1, "data": {"epoch": 0,
                                                                                                "position": step}},
                           keep_last=keep_last)


def _model_state(config: Config) -> dict[str, torch.Tensor]:
    from smollm2.model import SmolLM2

    return SmolLM2(config).state_dict()


def test_round_trip(tmp_path: Path) -> None:
    path = _save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_000007"
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.step == 7 and checkpoint.path == path
    assert checkpoint.model_config == Config(**TINY_MODEL)
    assert checkpoint.train_config == TrainConfig()
    assert "lm_head.weight" not in checkpoint.model_state  # tied: stored once, as the original
    assert all(torch.equal(t, torch.full_like(t, 7.0)) for t in checkpoint.model_state.values())
    assert checkpoint.trainer["data"] == {"epoch": 0, "position": 7}
    state = checkpoint.optimizer_state
    assert torch.equal(state["state"]["model.norm.weight"]["exp_avg"], torch.full((64,), 0.5))
    assert state["param_groups"][0]["betas"] == (0.9, 0.95)
    config, weights = checkpoint_model(tmp_path)  # for smollm2.load(RUN_DIR)
    assert config == Config(**TINY_MODEL) and weights.keys() == checkpoint.model_state.keys()


def test_rng_states_restore_exactly() -> None:
    meta, tensors = capture_rng()
    json.dumps(meta)  # plain JSON, no pickle
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.random(), np.random.rand(5), torch.rand(5)  # move on
    restore_rng(meta, tensors)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def test_only_complete_checkpoints_count_and_old_ones_go_last(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    # A write that died before its marker (renamed by hand to look final) and a temp dir are both ignored.
    half = root / "step_000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (root / ".tmp-step_000010-123").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_000003"
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        resolve_checkpoint(half)
    _save(tmp_path, 4)  # keep_last 3: step 1 goes, only after step 4 is complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003", "step_000004"]
    assert not (root / ".tmp-step_000010-123").exists()  # stale temp dirs are cleaned up
    (root / "step_000004" / "optimizer.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="optimizer.safetensors: 9 bytes, but the checkpoint was written with"):
        load_checkpoint(root / "step_000004")
    assert load_checkpoint(tmp_path).step == 3  # the run falls back to its newest checkpoint that verifies


def test_checkpoints_hold_no_pickles(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = _save(tmp_path, 1)
    for file in path.iterdir():
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                assert list(f.keys())
        else:  # everything else is JSON (the COMPLETE marker too)
            json.loads(file.read_text(encoding="utf-8"))
    sources = [*(REPO / "smollm2" / "train").glob("*.py"), REPO / "smollm2/checkpoint_format.py",
               REPO / "smollm2/commands/train.py", REPO / "smollm2/commands/export.py"]
    for source in sources:
        text = source.read_text(encoding="utf-8")
        for call in ("import pickle", "torch.load(", "torch.save(", "np.load(", "allow_pickle"):
            assert call not in text, f"{source} uses {call}"


_KILL_DURING_WRITE = """
import os, signal, sys
import smollm2.train.checkpoint as checkpoint
from smollm2.cli import main

fsync = checkpoint._fsync_file
def fsync_or_die(path):
    # Die while the second checkpoint (step 4) is being written: files written, marker not yet.
    if path.parent.name.startswith(".tmp-step_000004"):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(path)
checkpoint._fsync_file = fsync_or_die
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    from smollm2.cli import main

    data, model = byte_corpus(tmp_path / "data"), tiny_model_json(tmp_path)
    run = tmp_path / "run"
    flags = ["--data", str(data), "--model", str(model), "--batch-size", "4", "--seq-len", "32", "--warmup", "5",
             "--eval-every", "0", "--sample-every", "0", "--device", "cpu", "--steps", "6", "--save-every", "2"]
    result = subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE, "train", *flags, "--out", str(run)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stdout + result.stderr
    partial = list((run / "checkpoints").glob(".tmp-step_000004-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / COMPLETE).exists()
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]
    assert load_checkpoint(run).step == 2
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # steps 3-4 were trained but not saved

    assert main(["train", "--resume", str(run)]) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]  # the lost steps are redone, once each
    assert not partial[0].exists()
    train(quick_config(data, tmp_path / "straight", model, steps=6, save_every=2), progress=False)
    assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(tmp_path / "straight")]
    assert_bitwise_equal(checkpoint_tensors(run), checkpoint_tensors(tmp_path / "straight"))


def test_export_loads_in_transformers_with_equal_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import smollm2
    from smollm2.cli import main
    from smollm2.weights import build_model

    ids = np.frombuffer(b"To be, or not to be, that is the question. " * 20, dtype=np.uint8)
    data = write_tokens(tmp_path / "data", ids[:700], ids[700:], tokenizer_source=str(require(ORIGINAL_TOKENIZER)))
    run = tmp_path / "run"
    train(quick_config(data, run, tiny_model_json(tmp_path), steps=5), progress=False)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    exported = tmp_path / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in exported.iterdir()}

    config, state_dict = checkpoint_model(run)
    ours = build_model(config, state_dict, "run")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    assert reference.config.num_key_value_heads == 2 and reference.config.tie_word_embeddings
    loaded, tokenizer = smollm2.load(exported)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        torch.testing.assert_close(reference(tokens).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(loaded(tokens), expected)
    assert tokenizer.encode("ROMEO:") == smollm2.Tokenizer.from_dir(ORIGINAL_TOKENIZER.parent).encode("ROMEO:")
    assert abs(expected).max() > 0.1  # trained weights, not an all-zero model


def test_export_errors(tmp_path: Path) -> None:
    from smollm2.cli import main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run")
