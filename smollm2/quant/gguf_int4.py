"""The int4 mode straight from a GGUF's quantised blocks, with no float copy of the weights in between.

`load(gguf_file, quantize="int4")` would otherwise dequantise every tensor to float32 and quantise it again,
which gives back exactly the file's codes (quantize.py) after ~1.5 s of work and a 0.5 GB float copy. When the
file's block weights are Q4_1 (as the bundled one's are) and our kernels run here, this module instead
unpacks each Q4_1 block into our kernel's layout:

    Q4_1 block (20 bytes, 32 weights):  d (fp16), m (fp16), 16 bytes of nibbles: byte j holds weight j in its
                                         low nibble and weight j + 16 in its high one; w = d * q + m
    ours (quantize.Q4Linear):           the same codes q, scale d, zero z = m + 8 d; w = d * (q - 8) + z

and the Q8_0 embedding (34 bytes per 32 weights: d (fp16), 32 int8 codes; w = d * code) into the int8
output projection. Everything else (the norms, the embedding matrix for lookups) is small and goes through
float as usual. Any other file (other block types, our kernels not built) takes the general path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..gguf import TENSOR_NAMES, config_from_gguf, read_gguf, tokenizer_from_gguf, unpermute_qk
from ..model import SmolLM2
from ..tokenizer import Tokenizer
from ..weights import expected_shapes

log = logging.getLogger(__name__)

_Q4_1_BYTES, _Q8_0_BYTES = 20, 34  # per block of 32 weights


def q4_1_blocks(raw: np.ndarray, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_1 tensor's bytes (rows, blocks * 20) -> codes (rows, blocks * 32) uint8, d and m (rows, blocks)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, _Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    nibbles = blocks[..., 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)


def q8_0_blocks(raw: np.ndarray, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's bytes (rows, blocks * 34) -> codes (rows, blocks * 32) int8, d (rows, blocks)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, _Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(d)


def load_int4(path: Path) -> tuple[SmolLM2, Tokenizer] | None:
    """The int4 model and tokenizer of a GGUF whose block weights are Q4_1; None where this does not apply."""
    from gguf import GGMLQuantizationType as Q

    from . import kernels
    from .quantize import Q4Linear, Q8Linear, Quantization, backend, fuse_projections

    if backend("int4") != "vnni":
        return None
    reader = read_gguf(path)
    config = config_from_gguf(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    # llama.cpp's name -> the original's key, for every tensor this config has (output.weight only if untied)
    keys = {name.format(i=i): key.format(i=i) for name, key in TENSOR_NAMES.items()
            for i in range(config.num_hidden_layers)}
    shapes = expected_shapes(config)
    if {keys.get(name) for name in tensors} != set(shapes) or any(
            _shape(t) != shapes[keys[name]] for name, t in tensors.items()):
        return None  # missing, unexpected (rope_freqs, ...) or mis-shaped tensors: the general path names them
    linear_names = [n for n in TENSOR_NAMES if n.startswith("blk.") and not n.endswith("norm.weight")]
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    blocks = [tensors[n.format(i=i)] for i in range(config.num_hidden_layers) for n in linear_names]
    if any(t.tensor_type != Q.Q4_1 or not kernels.shapes_supported(*_shape(t)) for t in blocks) \
            or not kernels.shapes_supported(*_shape(head)):
        return None  # other block types, or widths our kernels do not take: dequantised and quantised again

    def q4_parts(name: str, n_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, d, m = q4_1_blocks(tensors[name].data, _shape(tensors[name])[0])
        if n_heads is not None:  # llama.cpp's row order for q and k (see gguf.py)
            codes, d, m = (unpermute_qk(t, n_heads) for t in (codes, d, m))
        return codes, d, m.float() + 8 * d.float()

    def q4_linear(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Q4Linear:
        codes, d, z = (torch.cat(p) for p in zip(*parts, strict=True))
        return Q4Linear(kernels.pack_q4(codes), kernels.pack_groups(d), kernels.pack_groups(z), *codes.shape)

    with torch.device("meta"):
        model = SmolLM2(config)
    for i, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        names = {n.split(".")[2]: n.format(i=i) for n in linear_names}
        blocks_of = {attn.q_proj: q4_parts(names["attn_q"], config.num_attention_heads),
                     attn.k_proj: q4_parts(names["attn_k"], config.num_key_value_heads),
                     attn.v_proj: q4_parts(names["attn_v"]),
                     mlp.gate_proj: q4_parts(names["ffn_gate"]), mlp.up_proj: q4_parts(names["ffn_up"])}
        fuse_projections(block, lambda parts: q4_linear([blocks_of[p] for p in parts]))  # noqa: B023 (called now)
        attn.o_proj = q4_linear([q4_parts(names["attn_output"])])
        mlp.down_proj = q4_linear([q4_parts(names["ffn_down"])])
    model.lm_head = _head(head, Q8Linear)
    model.lm_head.float_input = True  # float32 logits, as quantize_model gives its output projection
    _load_small_tensors(model, tensors, config)
    model.requires_grad_(False)
    model.quantization = Quantization("int4", "vnni")
    return model.eval(), tokenizer_from_gguf(reader, path)


def _shape(tensor) -> tuple[int, ...]:  # (tensor: gguf.ReaderTensor) -> (rows, columns): ggml lists them reversed
    return tuple(int(n) for n in reversed(tensor.shape))


def _float(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(array.reshape(_shape(tensor)).copy())


def _head(tensor, q8_linear: type) -> nn.Module:
    """The output projection as our int8 layer: from the Q8_0 blocks as they are, else from float."""
    from gguf import GGMLQuantizationType as Q

    from . import kernels

    if tensor.tensor_type != Q.Q8_0:
        return q8_linear.from_float(_float(tensor))
    codes, d = q8_0_blocks(tensor.data, _shape(tensor)[0])
    return q8_linear(kernels.pack_q8(codes), kernels.pack_groups(d), *codes.shape)


def _load_small_tensors(model: SmolLM2, tensors: dict, config: Config) -> None:
    """The embedding (for lookups), the norms and the rotary tables, in bf16 as quantize_model leaves them."""

    def parameter(name: str) -> nn.Parameter:
        return nn.Parameter(_float(tensors[name]).to(torch.bfloat16), requires_grad=False)

    model.model.embed_tokens.weight = parameter("token_embd.weight")
    model.model.norm.weight = parameter("output_norm.weight")
    for i, block in enumerate(model.model.layers):
        block.input_layernorm.weight = parameter(f"blk.{i}.attn_norm.weight")
        block.post_attention_layernorm.weight = parameter(f"blk.{i}.ffn_norm.weight")
    for name in ("rope_cos", "rope_sin"):
        setattr(model.model, name, torch.empty_like(getattr(model.model, name), device="cpu"))
    model.init_rope()
    for name in ("rope_cos", "rope_sin"):
        setattr(model.model, name, getattr(model.model, name).to(torch.bfloat16))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"int4 from GGUF blocks: tensors left unset: {left[:5]}")
