"""GGUF -> our config, state dict and tokenizer, through the `gguf` package (llama.cpp's own reader).

A GGUF file holds the architecture as `llama.*` metadata, the tokenizer as `tokenizer.ggml.*`, and the tensors
under llama.cpp's names (`blk.0.attn_q.weight`), often quantised (Q4_1, Q8_0, ...). We dequantise every tensor
to float32 and rename it to Hugging Face's key. One trap: llama.cpp's converter permutes the rows of the
query and key projections from the rotate-half RoPE layout into the interleaved one that ggml uses
(`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py:
https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py). We undo it, since our RoPE, like
the original's, rotates halves.

The reader trusts the file: a truncated file or an absurd count sends IndexErrors from deep inside numpy.
We check the header first and wrap whatever the reader raises, so a bad file is one clear ValueError.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key/value count
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-char name, n_dims, one dim, type, offset
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-char key, value type, smallest value

# llama.cpp tensor name (with {i} for the layer) -> Hugging Face key.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def is_gguf(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _reader_class():  # -> a gguf.GGUFReader subclass
    import gguf
    import numpy as np

    class Reader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map: same bytes, still mapped, but slicing a
        np.memmap costs a Python-level __array_finalize__ per slice, and parsing 49152 token strings takes
        ~800k slices (3.5 s against 1 s)."""

        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


def read_gguf(path: str | Path):  # -> gguf.GGUFReader
    """Open a GGUF file after checking its header, turning the reader's low-level failures into ValueErrors."""

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as e:
        raise ValueError(f"{path}: cannot read GGUF file ({e.strerror})") from None
    if len(head) < _HEADER.size:
        raise ValueError(f"{path}: truncated GGUF file ({size} bytes, shorter than the header)")
    magic, version, n_tensors, n_kv = _HEADER.unpack(head)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
    if n_tensors > size // _MIN_TENSOR_INFO_BYTES or n_kv > size // _MIN_KV_BYTES:
        raise ValueError(
            f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} metadata entries cannot fit in {size} bytes"
        )
    try:
        return _reader_class()(str(path))
    except (IndexError, ValueError, KeyError, struct.error, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, path: Path, default: object = ...) -> object:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata lacks {key}")
        return default
    try:
        return field.contents()
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: GGUF metadata {key} is corrupt ({e})") from None


def config_from_gguf(reader, path: Path) -> Config:
    """The llama.* metadata as our Config. Anything we don't implement (rope scaling, ...) is an error."""
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported (only 'llama')")
    scaling = _field(reader, "llama.rope.scaling.type", path, "none")
    if scaling not in ("none", ""):
        raise ValueError(f"{path}: llama.rope.scaling.type={scaling!r} (RoPE scaling) is not supported")
    n_vocab = _field(reader, "llama.vocab_size", path, None)
    if n_vocab is None:
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path))
    names = {t.name for t in reader.tensors}
    fields = _config_fields(reader, path, n_vocab, eps, names)
    try:
        config = Config(**fields)
    except ValueError as e:  # the Config's own checks, which name the field
        raise ValueError(f"{path}: {e}") from None
    rope_dims = _field(reader, "llama.rope.dimension_count", path, config.head_dim)
    if rope_dims != config.head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count={rope_dims} but head_dim={config.head_dim}: "
                         "partial rotary embeddings are not supported")
    from .weights import check_config_fits

    # the metadata against the tensors, before anything is sized by it (a block_count of a million, say)
    check_config_fits(config, {key: shape for t in reader.tensors if (key := hf_key(t.name)) is not None
                               for shape in [tuple(int(n) for n in reversed(t.shape))]}, str(path))
    return config


def _config_fields(reader, path: Path, n_vocab: object, eps: float, names: set[str]) -> dict[str, object]:
    return dict(
        vocab_size=int(n_vocab),
        hidden_size=int(_field(reader, "llama.embedding_length", path)),
        intermediate_size=int(_field(reader, "llama.feed_forward_length", path)),
        num_hidden_layers=int(_field(reader, "llama.block_count", path)),
        num_attention_heads=int(_field(reader, "llama.attention.head_count", path)),
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", path,
                                       _field(reader, "llama.attention.head_count", path))),
        max_position_embeddings=int(_field(reader, "llama.context_length", path)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", path, 10000.0)),
        # stored as float32 (9.99999974e-06): round back to the decimal the original config.json says
        rms_norm_eps=float(f"{eps:.7g}"),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_optional_int(_field(reader, "tokenizer.ggml.bos_token_id", path, None)),
        eos_token_id=_optional_int(_field(reader, "tokenizer.ggml.eos_token_id", path, None)),
        pad_token_id=_optional_int(_field(reader, "tokenizer.ggml.padding_token_id", path, None)),
    )


def hf_key(name: str) -> str | None:
    """The Hugging Face key of a llama.cpp tensor name (blk.7.attn_q.weight -> model.layers.7...), or None."""
    if name.startswith("blk."):
        layer, _, rest = name[4:].partition(".")
        template = TENSOR_NAMES.get("blk.{i}." + rest)
        return template.format(i=int(layer)) if template is not None and layer.isdigit() else None
    return TENSOR_NAMES.get(name)


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a query/key projection (out_features, in_features).

    Within each head, llama.cpp reorders rows from [first half, second half] to interleaved pairs
    (h0, h_{d/2}, h1, h_{d/2+1}, ...). Reshaping to (heads, d/2, 2) and swapping back restores the halves.
    """
    out_features = weight.shape[0]
    return (
        weight.reshape(n_heads, out_features // n_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def permute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (the inverse of unpermute_qk), for writing GGUF files in tests and exports."""
    out_features = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, out_features // n_heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def state_dict_from_gguf(reader, config: Config, path: Path) -> dict[str, torch.Tensor]:
    """Dequantised float32 tensors under Hugging Face's keys, with Q/K rows un-permuted."""
    from gguf.quants import dequantize

    names = {}
    for i in range(config.num_hidden_layers):
        for ours, theirs in TENSOR_NAMES.items():
            names[ours.format(i=i)] = theirs.format(i=i)
    state_dict = {}
    for tensor in reader.tensors:
        key = names.get(tensor.name)
        if key is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} (not part of a {config.num_hidden_layers}"
                             "-layer llama model)")
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions fastest-first
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name} has quantisation type {tensor.tensor_type.name}, "
                             "which the gguf package cannot dequantise") from None
        except (ValueError, IndexError) as e:
            raise ValueError(f"{path}: tensor {tensor.name} is truncated or corrupt ({e})") from None
        if array.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {tensor.name} holds {array.size} values, expected shape {shape}")
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        weight = torch.from_numpy(array if array.flags.writeable else array.copy())  # F32 tensors are mmap views
        if key.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, config.num_key_value_heads)
        state_dict[key] = weight
    return state_dict


def tokenizer_from_gguf(reader, path: Path) -> Tokenizer:
    if _field(reader, "tokenizer.ggml.model", path) != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={_field(reader, 'tokenizer.ggml.model', path)!r} "
                         "is not supported (only byte-level BPE, 'gpt2')")
    return Tokenizer.from_gguf_vocab(
        _field(reader, "tokenizer.ggml.tokens", path),
        _field(reader, "tokenizer.ggml.merges", path, []),
        _field(reader, "tokenizer.ggml.token_type", path),
        pre=_field(reader, "tokenizer.ggml.pre", path, "gpt-2"),
        bos_id=_optional_int(_field(reader, "tokenizer.ggml.bos_token_id", path, None)),
        eos_id=_optional_int(_field(reader, "tokenizer.ggml.eos_token_id", path, None)),
        pad_id=_optional_int(_field(reader, "tokenizer.ggml.padding_token_id", path, None)),
        chat_template=_field(reader, "tokenizer.chat_template", path, None),
        source=str(path),
    )


def load_gguf(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], Tokenizer]:
    """Everything a GGUF file holds, as our types."""
    path = Path(path)
    reader = read_gguf(path)
    config = config_from_gguf(reader, path)
    return config, state_dict_from_gguf(reader, config, path), tokenizer_from_gguf(reader, path)
