"""An untrusted config.json (or GGUF metadata) is checked against the file's tensors before anything is sized by
it: a million layers, a vocabulary of 10**12 or 10**8 positions are one-line errors naming the field, its value
and the limit, in well under a second, never a hang or a many-GB allocation."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import smollm2
from conftest import ORIGINAL_TOKENIZER, require
from smollm2.config import MAX_ROPE_TABLE_ELEMENTS, Config
from smollm2.model import SmolLM2
from smollm2.weights import expected_shapes, save_pretrained


@pytest.fixture
def model_dir(tmp_path: Path, tiny_config: Config) -> Path:
    model = SmolLM2(tiny_config)
    model.init_weights()
    directory = save_pretrained(model, tmp_path / "model")
    shutil.copy(require(ORIGINAL_TOKENIZER), directory)
    return directory


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def fails_fast(source: Path, match: str) -> str:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as raised:
        smollm2.load(source)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    return str(raised.value)


@pytest.mark.parametrize("tied", [True, False])
def test_expected_shapes_are_the_models_own(tiny_config: Config, tied: bool) -> None:
    # computed from the numbers (no model built), they must still be exactly the model's state dict
    config = dataclasses.replace(tiny_config, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = SmolLM2(config)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if tied:
        del shapes["lm_head.weight"]
    assert expected_shapes(config) == shapes


@pytest.mark.parametrize(("field", "value", "match"), [
    ("num_hidden_layers", 1_000_000, r"num_hidden_layers=1000000 does not match the weights \(the weights hold 2 "
                                     r"layers, implying num_hidden_layers=2\)"),
    ("vocab_size", 10**12, r"vocab_size=1000000000000 does not match the weights \(model.embed_tokens.weight has "
                           r"shape \[256, 64\], implying vocab_size=256\)"),
    ("intermediate_size", 10**9, r"intermediate_size=1000000000 does not match .*implying intermediate_size=128"),
    ("num_key_value_heads", 4, r"tensor model.layers.0.self_attn.k_proj.weight has shape \[32, 64\], "
                               r"expected \[64, 64\]"),
])
def test_config_contradicting_the_weights(model_dir: Path, field: str, value: int, match: str) -> None:
    edit_config(model_dir, **{field: value})
    message = fails_fast(model_dir, match)
    assert message.startswith(str(model_dir / "config.json")) or str(model_dir) in message


@pytest.mark.parametrize("positions", [100_000_000, 10**12])
def test_absurd_context_length_is_bounded(model_dir: Path, positions: int) -> None:
    edit_config(model_dir, max_position_embeddings=positions)
    limit = MAX_ROPE_TABLE_ELEMENTS // 16  # tiny_config's head_dim
    message = fails_fast(model_dir, f"max_position_embeddings={positions} exceeds the limit {limit} for head_dim=16")
    assert "GiB" in message


def test_the_limit_admits_real_contexts() -> None:
    # SmolLM2's own 8192, and far beyond it, still load; only the absurd is refused
    assert Config(max_position_embeddings=8192).max_position_embeddings == 8192
    assert Config(max_position_embeddings=MAX_ROPE_TABLE_ELEMENTS // 64).max_position_embeddings == 262144
    with pytest.raises(ValueError, match="exceeds the limit 262144"):
        Config(max_position_embeddings=262145)


def test_hostile_gguf_metadata(tmp_path: Path, tiny_config: Config) -> None:
    pytest.importorskip("gguf")
    from test_gguf import write_gguf

    model = SmolLM2(tiny_config)
    model.init_weights()
    model.config = dataclasses.replace(tiny_config, num_hidden_layers=1_000_000)  # the metadata lies
    write_gguf(tmp_path / "layers.gguf", model)
    fails_fast(tmp_path / "layers.gguf", r"layers.gguf: config field num_hidden_layers=1000000 does not match the "
                                         r"weights \(the weights hold 2 layers")
    model.config = dataclasses.replace(tiny_config)
    model.config.max_position_embeddings = 100_000_000  # set after the Config's own check (GGUF holds a uint32)
    write_gguf(tmp_path / "context.gguf", model)
    fails_fast(tmp_path / "context.gguf", r"context.gguf: config field max_position_embeddings=100000000 "
                                          r"exceeds the limit")


def test_hostile_checkpoint_config_is_caught_before_training_builds_a_model(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from test_checkpoint import _save

    from smollm2.checkpoint_format import COMPLETE, completion_marker
    from smollm2.train import load_checkpoint

    path = _save(tmp_path, 1)
    edit_config(path, num_hidden_layers=1_000_000)
    (path / COMPLETE).write_text(json.dumps(completion_marker(path, 1)))  # a marker that matches the lie
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"step_000001: config field num_hidden_layers=1000000 does not match"):
        load_checkpoint(tmp_path)
    assert time.perf_counter() - start < 1.0
