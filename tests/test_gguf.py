"""GGUF: a file written by the `gguf` package (Q/K permuted as llama.cpp does) loads back to the same logits;
the real file's metadata maps to the 135M config; every kind of broken file is one clear ValueError."""

from __future__ import annotations

import dataclasses
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm2.config import Config
from smollm2.gguf import load_gguf, permute_qk, read_gguf, unpermute_qk
from smollm2.model import SmolLM2

gguf = pytest.importorskip("gguf")

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(key: str) -> str:
    if key.startswith("model.layers."):
        _, _, layer, rest = key.split(".", 3)
        return f"blk.{layer}.{HF_TO_GGUF[rest]}"
    return HF_TO_GGUF[key]


def write_gguf(path: Path, model: SmolLM2, quant: str = "F32", tokens: int = 256,
               extra_tensor: str | None = None) -> None:
    """What llama.cpp's converter would write for this model (Q and K rows permuted), plus one small tensor
    named extra_tensor if given."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = specials + ["ab"] + [chr(0x100 + i) for i in range(tokens - 6)] + ["a", "b"]
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 3] + [1] * (tokens - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float()
        if key.endswith("q_proj.weight"):
            data = permute_qk(data, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            data = permute_qk(data, config.num_key_value_heads)
        array = data.numpy()
        if quant != "F32" and array.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            writer.add_tensor(gguf_name(key), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(key), array)
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def small_config(tiny_config: Config) -> Config:
    return Config(**{**tiny_config.__dict__, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2})


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_through_gguf_writer(tmp_path: Path, small_config: Config, tied: bool) -> None:
    small_config.tie_word_embeddings = tied
    model = SmolLM2(small_config).eval()
    model.init_weights()
    path = tmp_path / "model.gguf"
    write_gguf(path, model)
    config, state_dict, tokenizer = load_gguf(path)
    # GGUF has no field for the init std; everything else must come back as it was
    assert dataclasses.replace(config, initializer_range=small_config.initializer_range) == small_config
    loaded = SmolLM2(config).eval()
    loaded.load_state_dict(state_dict, strict=True)
    x = torch.randint(0, small_config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert tokenizer.eos_id == 2 and tokenizer.bos_id == 1
    assert tokenizer.encode("<|im_end|>ab") == [2, 3]  # the special token, then the merge a + b


def test_missing_unpermute_would_be_caught(tmp_path: Path, small_config: Config) -> None:
    """The permutation matters: loading permuted Q/K without undoing it changes the logits."""
    model = SmolLM2(small_config).eval()
    model.init_weights()
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(unpermute_qk(permute_qk(q, 6), 6), q)
    assert not torch.equal(permute_qk(q, 6), q)


@pytest.mark.parametrize("quant,tolerance", [("Q8_0", 0.02), ("Q4_1", 0.2), ("F16", 0.01)])
def test_quantised_tensors_dequantise(tmp_path: Path, small_config: Config, quant: str, tolerance: float) -> None:
    small_config.hidden_size, small_config.intermediate_size = 128, 256  # rows divisible by the 32-block size
    small_config.num_attention_heads, small_config.num_key_value_heads = 4, 2
    model = SmolLM2(small_config).eval()
    model.init_weights()
    path = tmp_path / "model.gguf"
    write_gguf(path, model, quant=quant)
    _, state_dict, _ = load_gguf(path)
    for key, expected in model.state_dict().items():
        if key in state_dict:
            error = (state_dict[key] - expected).abs().max().item()
            assert error <= tolerance * expected.abs().max().item(), key


def test_real_file_metadata(bundled_gguf_path: Path) -> None:
    reader = read_gguf(bundled_gguf_path)
    from smollm2.config import preset
    from smollm2.gguf import config_from_gguf

    config = config_from_gguf(reader, bundled_gguf_path)
    assert config == preset("135m")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    assert counts == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


# ---- broken files --------------------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path: Path, small_config: Config) -> Path:
    model = SmolLM2(small_config)
    model.init_weights()
    path = tmp_path / "good.gguf"
    write_gguf(path, model)
    return path


def fails_fast(path: Path, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as info:
        load_gguf(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    fails_fast(path, "not a GGUF file")


def test_empty_and_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    fails_fast(path, "truncated GGUF file")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.97])
def test_truncated_file(good_file: Path, fraction: float) -> None:
    data = good_file.read_bytes()
    good_file.write_bytes(data[: int(len(data) * fraction)])
    fails_fast(good_file, "truncated or corrupt|is truncated")


@pytest.mark.parametrize("field_offset", [8, 16])  # tensor count, metadata count
def test_absurd_counts(good_file: Path, field_offset: int) -> None:
    data = bytearray(good_file.read_bytes())
    data[field_offset:field_offset + 8] = struct.pack("<Q", 2**62)
    good_file.write_bytes(bytes(data))
    fails_fast(good_file, "corrupt GGUF header")


def test_unsupported_version(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    good_file.write_bytes(bytes(data))
    fails_fast(good_file, "unsupported GGUF version 99")


def test_absurd_string_length_in_metadata(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    data[24:32] = struct.pack("<Q", 2**40)  # the first key's length
    good_file.write_bytes(bytes(data))
    fails_fast(good_file, "truncated or corrupt")


def test_unsupported_quantisation_type(tmp_path: Path, small_config: Config, monkeypatch) -> None:
    model = SmolLM2(small_config)
    model.init_weights()
    path = tmp_path / "model.gguf"
    write_gguf(path, model)

    def refuse(data: np.ndarray, qtype) -> np.ndarray:
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    fails_fast(path, "cannot dequantise")


def test_wrong_architecture_and_extra_tensor(tmp_path: Path) -> None:
    path = tmp_path / "gpt.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fails_fast(path, "general.architecture='gpt2' is not supported")
