"""Our config, state dict and tokenizer -> a GGUF file that llama.cpp and Ollama run (gguf.py's inverse).

What llama.cpp's own tools would write, through the `gguf` package (llama.cpp's gguf-py):
  - tensors under llama.cpp's names (gguf.TENSOR_NAMES), in the original checkpoint's key order (sorted, as
    safetensors stores them), with the query/key rows permuted into ggml's interleaved RoPE layout
    (`LlamaModel.permute` in convert_hf_to_gguf.py; gguf.permute_qk);
  - the `llama.*` hyperparameters, the tokenizer as `tokenizer.ggml.*` (byte-level BPE: tokens, token types,
    merges, the `smollm` or `gpt-2` pre-tokenizer, bos/eos/unk/pad ids) and the chat template;
  - each tensor in the type llama.cpp picks for the file type (tensor_type below): f16 and q8_0 as
    convert_hf_to_gguf.py's --outtype writes them, q4_1 as llama-quantize (src/llama-quant.cpp) makes it from
    those. Q8_0 and Q4_1 blocks come from gguf.quants, a bit-exact port of ggml's reference quantisers.

Exporting the bundled Q4_1 model (dequantised by load()) as q4_1 gives back the bundled file byte for byte
(tests/quant/test_gguf_export.py): Q4_1 and Q8_0 quantisation of their own dequantised blocks is the identity.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..gguf import TENSOR_NAMES, permute_qk
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

# --quantize name -> (general.file_type: llama.cpp's LLAMA_FTYPE_MOSTLY_*, the type of the 2D weights)
FILE_TYPES = {"f16": (1, "F16"), "q8_0": (7, "Q8_0"), "q4_1": (3, "Q4_1")}
_BLOCK = 32  # weights per Q8_0 / Q4_1 block
_QK_K = 256  # weights per k-quant super-block (Q6_K)
# llama.cpp's token types (llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# general.* keys that describe the file rather than the model: written here, never copied from a source
_FILE_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


def check_file_type(file_type: str) -> str:
    if file_type not in FILE_TYPES:
        raise ValueError(f"--quantize {file_type!r}: not a GGUF type we write (choose from {', '.join(FILE_TYPES)})")
    return file_type


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, tied: bool) -> str:
    """The ggml type llama.cpp gives tensor `name` (llama.cpp's name, shape (rows, columns)) in a file_type file.

    1D tensors and norms stay F32 (convert_hf_to_gguf.py, and llama-quantize never quantises them). f16: the
    rest F16. q8_0: the rest Q8_0 (F16 where a row is not whole blocks, as the converter falls back). q4_1
    (llama_tensor_get_type): Q4_1, except the output projection (token_embd when tied) which gets Q6_K, or
    Q8_0 where a row is not whole 256-weight super-blocks (576 in SmolLM2-135M: hence its Q8_0 embedding).
    """
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return "F32"
    columns = shape[-1]
    default = FILE_TYPES[file_type][1]
    if file_type == "f16":
        return "F16"
    if file_type == "q8_0":
        return "Q8_0" if columns % _BLOCK == 0 else "F16"
    if columns % _BLOCK != 0:  # llama-quantize has no fallback for Q4_1 and stops; so do we
        raise ValueError(f"tensor {name} has rows of {columns} weights, not whole {_BLOCK}-weight Q4_1 blocks; "
                         "export it as f16")
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if columns % _QK_K != 0:
            return "Q8_0"  # llama.cpp: Q6_K, then its fallback for rows that are not whole super-blocks
        # llama.cpp would write Q6_K here; the gguf package cannot quantise Q6_K, so we write what
        # `llama-quantize --output-tensor-type q8_0` does (larger, slightly more accurate)
        log.warning("%s: llama.cpp's q4_1 would store it as Q6_K, which we cannot quantise: writing Q8_0", name)
        return "Q8_0"
    return default


def gguf_tensors(config: Config, state_dict: dict[str, torch.Tensor],
                 file_type: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """(llama.cpp name, data as the file stores it, ggml type) per tensor, in the original's key order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    ours = {theirs.format(i=i): name.format(i=i) for name, theirs in TENSOR_NAMES.items()
            for i in range(config.num_hidden_layers)}
    for key in sorted(state_dict):  # safetensors' order, which convert_hf_to_gguf.py keeps
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding itself: llama.cpp reads a missing output.weight as tied
        name = ours[key]
        weight = state_dict[key].detach().to("cpu", torch.float32)
        if key.endswith("q_proj.weight"):
            weight = permute_qk(weight, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            weight = permute_qk(weight, config.num_key_value_heads)
        kind = tensor_type(name, tuple(weight.shape), file_type, config.tie_word_embeddings)
        array = np.ascontiguousarray(weight.numpy())
        yield name, quantize(array, GGMLQuantizationType[kind]), kind


# ---- the tokenizer ---------------------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: `smollm` (digits split one by one, then GPT-2's byte
    level) or `gpt-2`. llama.cpp's converter finds it by hashing a test string's tokens; we read the pipeline."""
    spec = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [(step.get("type"), step.get("individual_digits"), step.get("add_prefix_space")) for step in steps]
    if kinds == [("Digits", True, None), ("ByteLevel", None, False)]:
        return "smollm"
    if kinds == [("ByteLevel", None, False)]:
        return "gpt-2"
    raise ValueError(f"the tokenizer's pre-tokenizer {[k[0] for k in kinds]} has no llama.cpp name we know "
                     "(we write 'smollm': Digits(individual_digits) + ByteLevel, or 'gpt-2': ByteLevel)")


def tokenizer_fields(tokenizer: Tokenizer, vocab_size: int, bos_id: int | None = None,
                     eos_id: int | None = None) -> dict[str, Any]:
    """The tokenizer.ggml.* values for a byte-level BPE tokenizer, padded to the model's vocab_size; bos_id and
    eos_id (the config's) stand in where the tokenizer names no such token."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer is {model.get('type')!r}, not byte-level BPE: llama.cpp's 'gpt2' "
                         "tokenizer model cannot hold it")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} "
                         "embeddings")
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.backend.id_to_token(i)
        if token is None:  # embeddings past the tokenizer: as convert_hf_to_gguf.py pads them
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(token)
            types.append(_NORMAL if token not in added else _CONTROL if added[token] else _USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ValueError("the tokenizer has no BPE merges; llama.cpp refuses a 'gpt2' vocabulary without them")

    def token_id(token: Any, fallback: int | None = None) -> int | None:
        token = token.get("content") if isinstance(token, dict) else token  # tokenizer_config.json's two forms
        found = tokenizer.backend.token_to_id(token) if isinstance(token, str) else None
        return found if found is not None else fallback

    return {
        "pre": pre_tokenizer_name(tokenizer),
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": token_id(tokenizer.bos_token, bos_id),
        "eos_token_id": token_id(tokenizer.eos_token, eos_id),
        # what SmolLM2's tokenizer_config.json says; our tokenizer has no unknown token of its own
        "unknown_token_id": token_id(tokenizer.config.get("unk_token", "<|endoftext|>")),
        "padding_token_id": tokenizer.pad_id,
        "chat_template": tokenizer.chat_template,
    }


# ---- the file --------------------------------------------------------------------------------------------------


def general_fields(reader) -> dict[str, tuple[Any, list[Any]]]:  # reader: gguf.GGUFReader (gguf.read_gguf)
    """A GGUF file's general.* metadata that describes the model (name, license, languages, ...), as
    (value, gguf value types), to carry into a re-export of the file."""
    return {key: (field.contents(), list(field.types)) for key, field in reader.fields.items()
            if key.startswith("general.") and key not in _FILE_KEYS}


def write_gguf(path: str | Path, config: Config, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
               file_type: str, *, name: str | None = None,
               general: dict[str, tuple[Any, list[Any]]] | None = None) -> dict[str, int]:
    """Write the model as a GGUF file of file_type ("f16", "q8_0", "q4_1"); returns {ggml type: tensors}.

    general: the general.* metadata to write (general_fields of a source GGUF); without it, general.type
    "model" and general.name = name. Written to a temporary file beside path and renamed, so a failed export
    leaves no partial file.
    """
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType

    from ..weights import check_state_dict

    check_file_type(file_type)
    path = Path(path)
    check_state_dict(state_dict, config, str(path))
    vocab = tokenizer_fields(tokenizer, config.vocab_size, config.bos_token_id, config.eos_token_id)
    writer = gguf.GGUFWriter(None, "llama")
    # the key order llama.cpp's converter and quantiser leave (the bundled file's)
    if general is None:
        general = {"general.type": ("model", [GGUFValueType.STRING])}
        if name:
            general["general.name"] = (name, [GGUFValueType.STRING])
    for key, (value, types) in general.items():
        sub_type = types[1] if types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, types[0], sub_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(FILE_TYPES[file_type][0])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)  # our tokenizer never prepends BOS; neither does the chat template
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types: dict[str, int] = {}
    for tensor_name, data, kind in gguf_tensors(config, state_dict, file_type):
        writer.add_tensor(tensor_name, data, raw_dtype=GGMLQuantizationType[kind])
        types[kind] = types.get(kind, 0) + 1

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        writer.write_header_to_file(path=temporary)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        writer.close()
        temporary.unlink(missing_ok=True)
    return types
