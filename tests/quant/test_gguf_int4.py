"""int4 straight from a GGUF's Q4_1 blocks (smollm2/gguf_int4.py) builds exactly the model that dequantising
and quantising again builds, and other files take that general path."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from test_gguf import write_gguf

import smollm2
from smollm2.config import Config
from smollm2.model import SmolLM2
from smollm2.quant.gguf_int4 import load_int4
from smollm2.quant.quantize import quantize_model


def kernels_or_skip() -> None:
    from smollm2.quant import kernels

    if not kernels.available():
        pytest.skip("smollm2's kernels are not built here (python -m smollm2.kernels)")


def assert_same_model(a: SmolLM2, b: SmolLM2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert a.quantization == b.quantization is not None


@pytest.fixture
def block_config(tiny_config: Config) -> Config:
    """Widths that Q4_1 blocks (32) and our kernels' row blocks (16) divide; head_dim 32."""
    return dataclasses.replace(tiny_config, hidden_size=128, intermediate_size=256)


def test_q4_1_file_gives_the_same_model_as_the_general_path(tmp_path: Path, block_config: Config) -> None:
    kernels_or_skip()
    model = SmolLM2(block_config)
    model.init_weights()
    path = tmp_path / "model.gguf"
    write_gguf(path, model, quant="Q4_1")  # every matrix Q4_1, the embedding too: the head then goes via float
    direct, tokenizer = load_int4(path)
    general, _ = smollm2.load(path)
    assert_same_model(direct, quantize_model(general, "int4"))
    assert tokenizer.vocab_size == block_config.vocab_size
    loaded, _ = smollm2.load(path, quantize="int4")  # load() takes this path for such files
    assert_same_model(loaded, direct)
    ids = torch.randint(0, block_config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).float()).all()


def test_other_files_take_the_general_path(tmp_path: Path, block_config: Config, monkeypatch) -> None:
    from smollm2.quant import kernels

    model = SmolLM2(block_config)
    model.init_weights()
    q8, q4 = tmp_path / "q8.gguf", tmp_path / "q4.gguf"
    write_gguf(q8, model, quant="Q8_0")
    write_gguf(q4, model, quant="Q4_1")
    assert load_int4(q8) is None  # Q8_0 blocks: dequantised, then quantised to int4 as any float model
    assert smollm2.load(q8, quantize="int4")[0].quantization.mode == "int4"
    extra = tmp_path / "extra.gguf"  # a tensor the model has no place for: the general path rejects the file
    write_gguf(extra, model, quant="Q4_1", extra_tensor="rope_freqs.weight")
    assert load_int4(extra) is None
    with pytest.raises(ValueError, match="unexpected tensor 'rope_freqs.weight'"):
        smollm2.load(extra, quantize="int4")
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert load_int4(q4) is None  # the blocks are laid out for our kernels only


@pytest.mark.slow
def test_bundled_file_gives_the_same_model_as_the_general_path(real, bundled_gguf_path: Path) -> None:
    """The real weights: Q4_1 blocks and a Q8_0 embedding taken as they are, bit for bit the general path's."""
    kernels_or_skip()
    direct, _ = load_int4(bundled_gguf_path)
    assert_same_model(direct, quantize_model(copy.deepcopy(real[0]), "int4"))
