"""GGUF export (smollm2/quant/gguf_export.py, `smollm2 export --format gguf`).

  - the bundled SmolLM2-135M-Instruct, loaded unquantised (dequantised from its Q4_1 file) and exported as q4_1,
    is the bundled file byte for byte: every tensor, its type and the metadata in its order
  - an f16 export: metadata as llama.cpp's tools write it (the keys that differ from the bundled file are named
    below), our load() gives the logits of our model with its weights rounded to f16, and so does transformers
  - a q4_1 export loads to exactly the logits of loading the original file
  - a tiny random model round trips through f16, q8_0 and q4_1, tied and untied
  - llama.cpp's type rules per tensor, and every bad input is a one-line error

llama.cpp itself is not installed here: transformers' GGUF reader and ours are the read-back checks.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import smollm2
from conftest import ORIGINAL_TOKENIZER, require
from smollm2.config import Config
from smollm2.gguf import read_gguf
from smollm2.model import SmolLM2
from smollm2.quant.gguf_export import general_fields, tensor_type, tokenizer_fields, write_gguf
from smollm2.tokenizer import Tokenizer, _byte_decoder
from smollm2.weights import build_model

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 2, 198, 1, 4093, 198, 2683, 359, 260, 3575, 282, 4649, 47, 2, 198]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _weights(model: SmolLM2) -> dict[str, torch.Tensor]:
    return model.state_dict()  # detached views of the parameters, which nothing here changes


def _logits(model: SmolLM2, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0]


def _rounded(state_dict: dict[str, torch.Tensor], kind: str, tied: bool = True) -> dict[str, torch.Tensor]:
    """The weights as a kind ("f16", "q8_0", "q4_1") file holds them: what reading it back must give. q4_1's
    output projection (the embedding when tied) is Q8_0."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    out = {}
    for key, w in state_dict.items():
        if w.dim() < 2:
            out[key] = w.clone()
        elif kind == "f16":
            out[key] = w.half().float()
        else:
            output = key == "lm_head.weight" or (tied and key == "model.embed_tokens.weight")
            qtype = Q.Q8_0 if kind == "q8_0" or output else Q.Q4_1
            array = dequantize(quantize(w.numpy(), qtype), qtype)
            out[key] = torch.from_numpy(np.asarray(array, dtype=np.float32).reshape(w.shape).copy())
    return out


# ---- the bundled model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_reader(bundled_gguf_path: Path):  # -> gguf.GGUFReader
    return read_gguf(bundled_gguf_path)


@pytest.fixture(scope="module")
def exports(real, bundled_reader, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled model (the `real` fixture: dequantised, fp32) written as q4_1, carrying the bundled file's
    general.* metadata, and as f16 without it (as from any non-GGUF source)."""
    model, tokenizer = real
    out = tmp_path_factory.mktemp("gguf_export")
    weights = _weights(model)
    general = general_fields(bundled_reader)
    write_gguf(out / "q4_1.gguf", model.config, weights, tokenizer, "q4_1", general=general)
    write_gguf(out / "f16.gguf", model.config, weights, tokenizer, "f16", name="SmolLM2-135M-Instruct")
    return {"q4_1": out / "q4_1.gguf", "f16": out / "f16.gguf"}


@pytest.fixture(scope="module")
def f16_logits(real) -> torch.Tensor:
    """Our logits with the weights rounded to f16: what an f16 export must read back to."""
    model, _ = real
    return _logits(build_model(model.config, _rounded(_weights(model), "f16"), "f16-rounded"), PROMPT)


def test_bundled_model_as_q4_1_is_the_bundled_file_byte_for_byte(exports, bundled_gguf_path: Path,
                                                                 bundled_reader) -> None:
    ours, theirs = exports["q4_1"].read_bytes(), bundled_gguf_path.read_bytes()
    if ours != theirs:  # name what differs: tensors (name, type, bytes), then metadata
        a, b = read_gguf(exports["q4_1"]), bundled_reader
        tensors = [f"{x.name}: {x.tensor_type.name} vs {y.tensor_type.name}, {_blocks_differing(x, y)}"
                   for x, y in zip(a.tensors, b.tensors, strict=False)
                   if x.name != y.name or x.tensor_type != y.tensor_type or not np.array_equal(x.data, y.data)]
        fields = [k for k in {**a.fields, **b.fields} if _value(a, k) != _value(b, k)]
        pytest.fail(f"{len(ours)} vs {len(theirs)} bytes; tensors differing: {tensors[:5]}; metadata: {fields}")
    assert len(ours) == 98_362_432


def _blocks_differing(x, y) -> str:
    if x.data.shape != y.data.shape:
        return f"shapes {x.data.shape} vs {y.data.shape}"
    rows_x, rows_y = np.asarray(x.data).reshape(-1, 20 if x.tensor_type.name == "Q4_1" else x.data.shape[-1]), \
        np.asarray(y.data).reshape(-1, 20 if y.tensor_type.name == "Q4_1" else y.data.shape[-1])
    return f"{int((rows_x != rows_y).any(axis=1).sum())} of {len(rows_x)} blocks/rows differ"


def _value(reader, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else (field.contents(), [t.name for t in field.types])


def test_f16_export_metadata_is_the_bundled_files_but_for_the_file_type_and_model_card(
        exports, bundled_reader) -> None:
    ours, theirs = read_gguf(exports["f16"]), bundled_reader
    differing = {k for k in {**ours.fields, **theirs.fields} if not k.startswith("GGUF.")
                 and _value(ours, k) != _value(theirs, k)}
    # general.file_type: 1 (MOSTLY_F16) against 3 (MOSTLY_Q4_1); the model card's names (organization, finetune,
    # basename, size_label, license, languages) come from the original repository, which only a GGUF source
    # carries (general_fields), and general.name is what the caller says
    card = {"general.name", "general.organization", "general.finetune", "general.basename", "general.size_label",
            "general.license", "general.languages"}
    assert differing == card | {"general.file_type"}
    assert ours.fields["general.file_type"].contents() == 1
    assert ours.fields["general.name"].contents() == "SmolLM2-135M-Instruct"
    assert [k for k in ours.fields if k not in card] == [k for k in theirs.fields if k not in card]  # the order
    assert {t.name: t.tensor_type.name for t in ours.tensors} == {
        t.name: "F32" if t.tensor_type.name == "F32" else "F16" for t in theirs.tensors}


def test_f16_export_loads_back_to_our_logits_within_f16_rounding(real, exports, f16_logits) -> None:
    model, tokenizer = real
    loaded, loaded_tokenizer = smollm2.load(exports["f16"])
    got = _logits(loaded, PROMPT)
    torch.testing.assert_close(got, f16_logits, rtol=0, atol=0)  # exactly the f16 weights' logits
    full = _logits(model, PROMPT)
    assert 0 < (got - full).abs().max() < 0.25  # rounding to f16 moves logits (of ~±20) by a few hundredths
    assert torch.equal(got.argmax(-1), full.argmax(-1))
    text = "<|im_start|>user\nWhat is 2024 + 17?<|im_end|>\n  tabs\t and ünïcödé"
    assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_transformers_reads_the_f16_export_to_our_logits(real, exports, f16_logits,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    import gguf

    from smollm2.gguf import _reader_class

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # transformers' reader, only faster: the same bytes through a plain ndarray view of the memory map (gguf.py),
    # and the name table it builds once per module (397 times) built once
    monkeypatch.setattr(gguf, "GGUFReader", _reader_class())
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    path = exports["f16"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    assert (hf.config.num_key_value_heads, hf.config.tie_word_embeddings) == (3, True)
    with torch.no_grad():
        theirs = hf(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(theirs, f16_logits, rtol=0, atol=1e-4)  # our parity tolerance with transformers
    assert (theirs - _logits(real[0], PROMPT)).abs().max() < 0.25


def test_q4_1_export_loads_to_the_logits_of_the_original_file(real, exports) -> None:
    loaded, _ = smollm2.load(exports["q4_1"])
    torch.testing.assert_close(_logits(loaded, PROMPT), _logits(real[0], PROMPT), rtol=0, atol=0)


def test_the_original_tokenizer_json_gives_the_bundled_files_vocabulary(bundled_reader) -> None:
    """SmolLM2's own tokenizer.json (the base model's: its specials are all <|endoftext|>, no chat template), as an
    original-layout source gives it: the tokens, token types, merges and pre-tokenizer of the bundled file."""
    fields = tokenizer_fields(Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent), 49152)
    for key in ("pre", "tokens", "token_type", "merges"):
        assert fields[key] == bundled_reader.fields[f"tokenizer.ggml.{key}"].contents(), key
    assert fields["token_type"].count(3) == 17  # the added tokens, all special: control
    ids = {k: fields[k] for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")}
    assert ids == dict.fromkeys(ids, 0)  # its tokenizer_config.json: bos = eos = unk = <|endoftext|>, pad unset
    assert fields["chat_template"] is None


@pytest.mark.parametrize("kind", ["f16", "q4_1"])
def test_llama_cpp_runs_the_exports(real, exports, f16_logits, kind: str) -> None:
    """llama.cpp itself (the optional `llamacpp` extra, never in CI): its tokenizer gives our ids, and its logits
    are ours up to its own arithmetic. ggml multiplies F16 weights by activations rounded to f16, and quantised
    ones by activations quantised to 8 bits (Q8_0/Q8_1 blocks), where we multiply dequantised weights in fp32:
    measured here, f16 0.07 at most; q4_1 (the bundled file itself) 2.6 at most, 0.23 on average."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = real
    llm = llama_cpp.Llama(model_path=str(exports[kind]), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    text = "<|im_start|>user\nThe year 2024 had 366 days; naïve café<|im_end|>\n"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    llm.eval(PROMPT)
    theirs = torch.from_numpy(np.array(llm.scores[: len(PROMPT)], dtype=np.float32))
    ours = f16_logits if kind == "f16" else _logits(model, PROMPT)
    assert (theirs - ours).abs().max() < (0.25 if kind == "f16" else 4.0)
    assert (theirs - ours).abs().mean() < (0.05 if kind == "f16" else 0.5)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


# ---- a tiny random model --------------------------------------------------------------------------------------


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE over 256 ids: the specials in ids 0-2 and two merges in 3-4 (bytes 0-4 are lost)."""
    tokens = sorted(_byte_decoder(), key=_byte_decoder().get)  # GPT-2's character for each byte, by byte
    tokens[:5] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "he", "ll"]
    return Tokenizer.from_gguf_vocab(tokens, ["h e", "l l"], [3, 3, 3, 1, 1] + [1] * 251, pre="smollm", bos_id=1,
                                     eos_id=2, pad_id=2, chat_template=TEMPLATE)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_1"])
def test_tiny_model_round_trips(tiny_config: Config, tmp_path: Path, kind: str, tied: bool) -> None:
    from dataclasses import replace

    config = replace(tiny_config, tie_word_embeddings=tied)
    model = SmolLM2(config)
    model.init_weights()
    tokenizer = tiny_tokenizer()
    weights = _weights(model)
    types = write_gguf(tmp_path / "tiny.gguf", config, weights, tokenizer, kind)

    n_2d = 15 if tied else 16  # the embedding and 7 matrices a block (and the output projection if untied)
    if kind == "q4_1":  # the output projection: Q6_K, then its fallback (64 is not whole 256-weight super-blocks)
        assert types == {"F32": 5, "Q4_1": n_2d - 1, "Q8_0": 1}
    else:
        assert types == {"F32": 5, {"f16": "F16", "q8_0": "Q8_0"}[kind]: n_2d}
    reader = read_gguf(tmp_path / "tiny.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    if kind == "q4_1":
        assert (kinds["token_embd.weight"], kinds.get("output.weight")) == (("Q8_0", None) if tied else
                                                                             ("Q4_1", "Q8_0"))

    loaded, loaded_tokenizer = smollm2.load(tmp_path / "tiny.gguf")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(loaded.config, field) == getattr(config, field), field
    ids = [1, 104, 101, 108, 108, 111, 32, 50, 48, 2, 7, 200, 255]
    expected = build_model(config, _rounded(weights, kind, tied), "rounded")
    torch.testing.assert_close(_logits(loaded, ids), _logits(expected, ids), rtol=0, atol=0)
    assert not torch.equal(_logits(loaded, ids), _logits(model, ids))  # the file's rounding is there
    assert loaded_tokenizer.encode("hello 2024<|im_end|>") == tokenizer.encode("hello 2024<|im_end|>") \
        == [3, 4, 111, 32, 50, 48, 50, 52, 2]
    assert (loaded_tokenizer.bos_id, loaded_tokenizer.eos_id, loaded_tokenizer.pad_id) == (1, 2, 2)
    assert loaded_tokenizer.chat_template == TEMPLATE
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.unknown_token_id"].contents() == 0


# ---- llama.cpp's type per tensor ------------------------------------------------------------------------------


def test_tensor_types_follow_llama_cpp(caplog: pytest.LogCaptureFixture) -> None:
    assert tensor_type("blk.0.attn_norm.weight", (576,), "q4_1", True) == "F32"
    assert tensor_type("output_norm.weight", (576,), "f16", True) == "F32"
    assert tensor_type("blk.3.ffn_down.weight", (576, 1536), "q4_1", True) == "Q4_1"
    assert tensor_type("token_embd.weight", (49152, 576), "q4_1", True) == "Q8_0"  # 576 % 256 != 0
    assert tensor_type("token_embd.weight", (49152, 576), "q4_1", False) == "Q4_1"  # untied: not the output
    assert tensor_type("output.weight", (49152, 576), "q4_1", False) == "Q8_0"
    assert tensor_type("token_embd.weight", (49152, 576), "q8_0", True) == "Q8_0"
    assert tensor_type("token_embd.weight", (49152, 576), "f16", True) == "F16"
    assert tensor_type("blk.0.attn_q.weight", (40, 40), "q8_0", True) == "F16"  # the converter's fallback
    assert not caplog.records
    # 1.7B (hidden 2048): llama.cpp would write Q6_K, which gguf-py cannot quantise: Q8_0, said in a warning
    assert tensor_type("token_embd.weight", (49152, 2048), "q4_1", True) == "Q8_0"
    assert "Q6_K" in caplog.text
    with pytest.raises(ValueError, match="not whole 32-weight Q4_1 blocks"):
        tensor_type("blk.0.attn_q.weight", (40, 40), "q4_1", True)


# ---- the command line -----------------------------------------------------------------------------------------


def _export(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    from smollm2.cli import main

    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_an_original_layout_directory(tiny_config: Config, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from smollm2.weights import save_pretrained

    model = SmolLM2(tiny_config)
    model.init_weights()
    save_pretrained(model, tmp_path / "tiny-model", tiny_tokenizer())
    out = tmp_path / "sub" / "tiny.gguf"
    code, stdout, err = _export(capsys, str(tmp_path / "tiny-model"), "--format", "gguf", "--quantize", "q8_0",
                                "--out", str(out))
    assert (code, err) == (0, "")
    assert stdout.startswith("exported ") and "q8_0" in stdout and "tensors 15 Q8_0, 5 F32" in stdout
    assert read_gguf(out).fields["general.name"].contents() == "tiny-model"
    loaded, _ = smollm2.load(out)
    ids = [1, 104, 101, 200]
    expected = build_model(tiny_config, _rounded(_weights(model), "q8_0"), "rounded")
    torch.testing.assert_close(_logits(loaded, ids), _logits(expected, ids), rtol=0, atol=0)
    assert [p.name for p in out.parent.iterdir()] == ["tiny.gguf"]  # no temporary file left


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf", "--quantize", "q5_k", "--out", "x.gguf"],
     "--quantize 'q5_k': not a GGUF type we write (choose from f16, q8_0, q4_1)"),
    (["--format", "gguf", "--out", "model.bin"], "--format gguf writes one file, whose name ends in .gguf"),
    (["--format", "gguf", "--out", "{tmp}/dir.gguf"], "is a directory; --format gguf writes one file"),
    (["{tmp}/missing", "--format", "gguf", "--out", "x.gguf"], "no such file or directory"),
    (["{tmp}/notes.txt", "--format", "gguf", "--out", "x.gguf"], "not a GGUF file"),
    (["{tmp}/bad.gguf", "--format", "gguf", "--out", "x.gguf"], "truncated GGUF file"),
    (["--format", "gguf", "--dtype", "bf16", "--out", "x.gguf"], "--dtype is for --format hf"),
    (["run", "--quantize", "q4_1", "--out", "x"], "--quantize is for --format gguf"),
    (["--out", "x"], "--format hf exports a training run: pass RUN_DIR"),
    (["run", "--out", "x.gguf"], "names a GGUF file, but --format hf writes a directory; add --format gguf"),
], ids=["quantize", "suffix", "directory", "missing", "not-gguf", "corrupt", "dtype", "hf-quantize", "hf-no-run",
        "hf-gguf-out"])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                   message: str) -> None:
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative --out paths land here, if anything were written
    try:
        code, stdout, err = _export(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    finally:
        os.chdir(cwd)
    assert code == 2 and stdout == ""
    assert err.startswith("smollm2 export: error: ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "dir.gguf", "notes.txt"]
