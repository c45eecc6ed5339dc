"""Original-layout checkpoints: export round trips through transformers, and broken checkpoints fail clearly."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import smollm2
from smollm2.config import Config
from smollm2.model import SmolLM2
from smollm2.weights import read_safetensors, save_pretrained


@pytest.fixture
def saved(tmp_path: Path, tiny_config: Config) -> tuple[SmolLM2, Path]:
    model = SmolLM2(tiny_config).eval()
    model.init_weights()
    save_pretrained(model, tmp_path / "model")
    return model, tmp_path / "model"


def test_our_save_our_load_is_bitwise(saved: tuple[SmolLM2, Path], tmp_path: Path) -> None:
    from smollm2.weights import build_model

    model, directory = saved
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    config = Config.from_json(directory / "config.json")
    loaded = build_model(config, read_safetensors(directory), str(directory))
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_our_export(tmp_path: Path, tiny_config: Config, tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    tiny_config.tie_word_embeddings = tied
    model = SmolLM2(tiny_config).eval()
    model.init_weights()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    x = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-5


def test_real_weights_export_round_trip(real, tmp_path: Path) -> None:
    """The real model, saved with its tokenizer, loads back through smollm2.load() unchanged."""
    model, tokenizer = real
    save_pretrained(model, tmp_path, tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    again, again_tokenizer = smollm2.load(tmp_path)
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert again_tokenizer.encode("Total:  42 😀") == tokenizer.encode("Total:  42 😀")


def test_sharded_checkpoint(saved: tuple[SmolLM2, Path], tmp_path: Path) -> None:
    model, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in halves.items():
        save_file({k: state[k] for k in names}, str(shard_dir / name))
    index = {"weight_map": {k: name for name, names in halves.items() for k in names}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert read_safetensors(shard_dir).keys() == state.keys()


# ---- broken checkpoints --------------------------------------------------------------------------------------


def load_dir(directory: Path, match: str) -> None:
    from smollm2.weights import build_model

    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        build_model(Config.from_json(directory / "config.json"), read_safetensors(directory), str(directory))
    assert time.perf_counter() - start < 1.0


def test_missing_tensor(saved: tuple[SmolLM2, Path]) -> None:
    model, directory = saved
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k and k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    load_dir(directory, r"missing tensor model.layers.1.mlp.up_proj.weight \(expected shape \[128, 64\]\)")


def test_unexpected_tensor(saved: tuple[SmolLM2, Path]) -> None:
    model, directory = saved
    state = dict(model.state_dict())
    del state["lm_head.weight"]
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(8)
    save_file(state, str(directory / "model.safetensors"))
    load_dir(directory, r"unexpected tensor model.layers.0.self_attn.rotary.inv_freq \(shape \[8\]\)")


def test_misshaped_tensor(saved: tuple[SmolLM2, Path]) -> None:
    model, directory = saved
    state = dict(model.state_dict())
    del state["lm_head.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(state, str(directory / "model.safetensors"))
    load_dir(directory, r"tensor model.layers.0.self_attn.k_proj.weight has shape \[64, 64\], expected \[32, 64\]")


@pytest.mark.parametrize("damage", ["truncate", "header_size", "garbage"])
def test_corrupt_safetensors(saved: tuple[SmolLM2, Path], damage: str) -> None:
    _, directory = saved
    path = directory / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "header_size":
        path.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    else:
        path.write_bytes(b"\x00" * 64)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_safetensors(directory)
    assert time.perf_counter() - start < 1.0


def test_missing_weights_and_bad_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        read_safetensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "absent.safetensors"}}')
    with pytest.raises(ValueError, match="absent.safetensors: shard named in"):
        read_safetensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("nope")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        read_safetensors(tmp_path)


def test_bad_config_in_directory(saved: tuple[SmolLM2, Path]) -> None:
    _, directory = saved
    (directory / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match="missing required config field"):
        smollm2.load(directory)
