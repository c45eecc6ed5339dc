"""`smollm2 lens` and `smollm2 patch` end to end on a tiny random model with a byte tokenizer (smollm2.load is
swapped for one that returns them): what they print and write, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smollm2 import loading
from smollm2.cli import main
from smollm2.config import Config
from smollm2.model import SmolLM2


class ByteTokenizer:
    """One token per byte: ids 0..255."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture
def tiny_load(monkeypatch: pytest.MonkeyPatch, tiny_config: Config) -> list[tuple]:
    model = SmolLM2(tiny_config)
    model.init_weights()
    calls = []

    def load(source: str | None = None, **options: object) -> tuple[SmolLM2, ByteTokenizer]:
        calls.append((source, options))
        return model, ByteTokenizer()

    monkeypatch.setattr(loading, "load", load)
    return calls


def test_lens_prints_writes_json_and_plots(tiny_load: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "lens.json", tmp_path / "lens.png"
    assert main(["lens", "hello", "--json", str(out), "--plot", str(plot), "--attention", "1"]) == 0
    assert tiny_load == [(None, {"quantize": "none"})]  # the exact float32 model by default
    printed = capsys.readouterr().out
    assert "logit lens" in printed and "block 1" in printed and "embed" in printed
    data = json.loads(out.read_text())
    assert data["tokens"] == list("hello") and len(data["layers"]) == 3
    assert data["layers"][-1]["answer_rank"] == 1  # the model's own prediction, at the last layer
    for path in (plot, tmp_path / "lens.attn1.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_patch_prints_and_writes_json(tiny_load: list, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "patch.json"
    assert main(["patch", "--clean", "abcdef", "--corrupt", "abXdef", "--answer", "q", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clean" in printed and "resid_pre of block" in printed and "head" in printed
    data = json.loads(out.read_text())
    assert data["answer"]["text"] == "q" and data["wrong"]["id"] != data["answer"]["id"]
    assert len(data["resid_pre"]) == 2 and len(data["resid_pre"][0]) == 6 and len(data["heads_z"][0]) == 4
    assert max(abs(v) for v in data["resid_pre"][0][:2]) <= 1e-4  # before the corrupted byte nothing differs


@pytest.mark.parametrize("argv,message", [
    (["lens", "hi", "--attention", "0"], "give --plot"),
    (["lens", "hi", "--answer", "ab"], "'ab' is 2 tokens"),
    (["lens", "hi", "--plot", "/nonexistent/dir/x.png"], "does not exist"),
    (["lens", "hi", "--plot", "x.png", "--attention", "7"], "blocks 0..1"),
    (["patch", "--clean", "abc", "--corrupt", "abcd", "--answer", "x"], "3 tokens and --corrupt 4"),
    (["patch", "--clean", "abc", "--corrupt", "abd", "--answer", "x", "--wrong", "x"], "must differ"),
])
def test_errors_are_one_line(tiny_load: list, argv: list[str], message: str, capsys: pytest.CaptureFixture,
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if "--plot" in argv:
        pytest.importorskip("matplotlib")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
