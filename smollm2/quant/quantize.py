"""Weight-only quantisation for CPU inference: `quantize_model(model, mode)` with mode in MODES.

    none   float32, as loaded
    bf16   every weight and activation in bfloat16; on a CPU with AVX-512 BF16 the linears are our packed
           bf16 layers (kernels.py: ~4x torch's bf16 speed at one row), fused as below; elsewhere plain
    int8   the linear weights as int8: per group of 32 input channels with an fp16 scale (llama.cpp's Q8_0) on
           our kernels, per output channel on torch's
    int4   the blocks' linear weights as 4-bit codes with a scale and a zero per group of 32 input channels
           (asymmetric, min/max: llama.cpp's Q4_1); the output projection as int8

Decoding one token reads every weight once, so on a CPU its speed is set by the bytes of weights: 4 per
parameter in fp32, 2 in bf16, ~1.06 in int8, ~0.63 in int4 (codes plus per-group scales). The rest of the
model (embedding, norms, attention, KV cache) runs in bf16 in the quantised modes.

Three sets of kernels, the first that works here is used (`backend()`, recorded in model.quantization):
  vnni   smollm2's own kernels (kernels.py, built by `python -m smollm2.kernels`): activations quantised to
         int8 per group of 32 and integer dot products, as llama.cpp does; AVX-512 VNNI or, on CPUs without
         it, AVX2 (`kernels.isa()`: the same numbers up to float rounding; the name "vnni" covers both)
  torch  torch's weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`, as
         gpt-fast and torchao use them): bf16 activations, int8 per output channel only
  bf16   neither (another CPU, an older torch): plain bf16 linears holding the dequantised weights, the same
         numbers as the torch kernels without their memory and speed gain

Groups of 32 match the bundled GGUF, whose blocks are Q4_1 (and Q8_0 for the embedding): re-quantising its
weights with the same rules gives back the file's own codes, so int4 runs the GGUF's quantised blocks, up to
rounding the scales to the kernels' formats. `load(gguf, quantize="int4")` takes them from the file as they
are (gguf_int4.py; the same model, bit for bit, ~1 s sooner and without a float copy). Group 64 mixes two
blocks and costs ~40% perplexity on these weights; 128 does not divide 576.

The output projection (49152 x 576, tied to the embedding) is the largest matrix and is read for every
token, so it is quantised too: the quantised copy replaces `model.lm_head`, while the embedding keeps its
bf16 matrix for lookups. In int4 mode it stays int8 (`head=`): 4 bits for it cost ~4.6% perplexity.

The projections that read the same input are also fused (q, k, v into `qkv_proj`; gate, up into
`gate_up_proj`, `fuse_projections`): one matmul call instead of three (two), which the model's forward uses
when it finds them. The separate layers remain, as views of the fused layer's rows, so the module tree keeps
the original's names.

A quantised model is for inference: it has no gradients, its state dict holds the quantised tensors, and it
must not be re-tied (`tie_weights`) or cast (`.to(dtype)`) afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# MODES, and the CLI's default mode: the fastest decoding on a CPU that keeps quality (BENCHMARKS.md). They live
# in defaults.py, which --help reads without torch. The library's load() keeps "none", the exact model.
from ..defaults import DEFAULT_QUANTIZE as DEFAULT_MODE  # noqa: F401 (re-exported)
from ..defaults import QUANTIZE_MODES as MODES

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64)  # must divide every in_features (576, 1536); 128 does not divide 576
_INT4_INNER_K_TILES = 2  # the packing layout argument; the CPU kernel reads any of 1, 2, 4, 8 the same way


# ---- the kernels, behind one function each (tests replace these to exercise the fallback) ---------------


def _int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ (weight (N, K) int8 * scales (N,)).T -> (M, N) bf16."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def _int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) int32 in 0..15 -> the kernel's packed layout, (N, K/2) uint8."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_INNER_K_TILES)


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ dequant(packed).T -> (M, N) bf16; dequant = (code - 8) * scale + zero per group."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


# ---- quantise / dequantise (pure functions on float weights) -----------------------------------------------


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: weight (N, K) ~ codes (N, K) int8 * scales, one scale per output channel (N,) or, with
    group_size, per group of input channels (N, K / group_size) as llama.cpp's Q8_0. Scales are float32."""
    N, K = weight.shape
    size = group_size or K
    w = weight.float().reshape(N, K // size, size)
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12)  # an all-zero group must not divide by zero
    codes = torch.round(w / scales[..., None]).clamp(-128, 127).to(torch.int8).reshape(N, K)
    return codes, scales if group_size else scales[:, 0]


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes (N, K) * scales (N,) per channel or (N, groups) per group."""
    N, K = codes.shape
    s = scales.float().reshape(N, -1)
    return (codes.float().reshape(N, s.shape[1], -1) * s[..., None]).reshape(N, K)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of input channels, min/max as Q4_1: codes (N, K) int32 in 0..15, and
    scales, zeros (N, K / group_size) float32 such that weight ~ (code - 8) * scale + zero.

    (zero = min + 8 * scale is the value of the middle code: the form the torch kernel takes.)
    """
    N, K = weight.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide in_features={K}; "
                         f"use one of {INT4_GROUP_SIZES}")
    w = weight.float().reshape(N, K // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, groups)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return codes.reshape(N, K), scales, low + 8 * scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    N, K = codes.shape
    groups = scales.shape[1]
    w = (codes.reshape(N, groups, K // groups).float() - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K)


# ---- the quantised linear layers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """What `quantize_model` did to a model (`model.quantization`): its mode, and the kernels it runs on."""

    mode: str  # one of MODES
    backend: str  # "vnni" (ours), "torch" (torch's kernels) or "bf16" (dequantised bf16 weights): see backend()


class PackedLinear(nn.Module):
    """What every layer below shares: `matmul(x)`, and the choice to take float32 inputs.

    quantize_model sets float_input on the output projection: our kernels (and torch's int8 one, whose output
    follows the input's dtype) then give float32 logits, over which picking the next token (argmax) runs twice
    as fast as over bf16 ones, and sampling needs float32 anyway.
    """

    float_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x.float() if self.float_input else x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(PackedLinear):
    """y = x @ (weight * scales).T with int8 weight (N, K) and bf16 scales (N,); output in x's dtype."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes.contiguous())  # (N, K) int8
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())  # (N,)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        return cls(*quantize_int8(weight))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = _int8_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.scales)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K) this layer computes with."""
        return dequantize_int8(self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(PackedLinear):
    """y = x @ dequant(weight).T with 4-bit codes in the kernel's packed layout (N, K/2) uint8 and bf16
    scales_and_zeros (K / group_size, N, 2); output in x's dtype."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int) -> Int4Linear:
        codes, scales, zeros = quantize_int4(weight, group_size)
        # (K/G, N, 2): a group's scale and zero side by side, as the kernel reads them.
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(_int4_pack(codes), scales_and_zeros, group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = _int4_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.group_size,
                     self.scales_and_zeros)  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


class Q8Linear(PackedLinear):
    """int8 codes per group of 32 with an fp16 scale (llama.cpp's Q8_0), run by smollm2's own VNNI kernel
    (kernels.py): weight holds the codes + 128 in the kernel's packed layout. Output in x's dtype."""

    group_size = 32

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Q8Linear:
        from . import kernels

        codes, scales = quantize_int8(weight, cls.group_size)
        return cls(kernels.pack_q8(codes), kernels.pack_groups(scales), *weight.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.smollm2.q8_mm(x.reshape(-1, self.in_features), self.weight, self.scales, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, start: int, stop: int) -> Q8Linear:
        """A layer for output rows start..stop-1 (multiples of 16), viewing this one's storage."""
        codes, groups = self.in_features, self.in_features // self.group_size  # per row
        return Q8Linear(self.weight[start * codes : stop * codes], self.scales[start * groups : stop * groups],
                        stop - start, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 group_size=32 (vnni)"


class Q4Linear(PackedLinear):
    """4-bit codes per group of 32 with fp16 scale and zero (llama.cpp's Q4_1), run by smollm2's own VNNI
    kernel (kernels.py): weight holds the codes in the kernel's packed layout. Output in x's dtype."""

    group_size = 32

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, out_features: int,
                 in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Q4Linear:
        from . import kernels

        codes, scales, zeros = quantize_int4(weight, cls.group_size)
        return cls(kernels.pack_q4(codes), kernels.pack_groups(scales), kernels.pack_groups(zeros),
                   *weight.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.smollm2.q4_mm(x.reshape(-1, self.in_features), self.weight, self.scales, self.zeros,
                                    self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, start: int, stop: int) -> Q4Linear:
        """A layer for output rows start..stop-1 (multiples of 16), viewing this one's storage."""
        codes, groups = self.in_features // 2, self.in_features // self.group_size  # per row
        return Q4Linear(self.weight[start * codes : stop * codes], self.scales[start * groups : stop * groups],
                        self.zeros[start * groups : stop * groups], stop - start, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size=32 (vnni)"


class BF16Linear(PackedLinear):
    """A bf16 weight in the packed layout of smollm2's AVX-512 BF16 kernel (kernels.py): sums in fp32, output
    in bf16. At one row it runs ~4x faster than torch's bf16 linear on a CPU without AMX."""

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("weight", packed)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> BF16Linear:
        from . import kernels

        return cls(kernels.pack_bf16(weight), *weight.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.smollm2.bf16_mm(x.reshape(-1, self.in_features), self.weight, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, start: int, stop: int) -> BF16Linear:
        """A layer for output rows start..stop-1 (multiples of 16), viewing this one's storage."""
        return BF16Linear(self.weight[start * self.in_features : stop * self.in_features], stop - start,
                          self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 (packed)"


QUANTIZED = (Int8Linear, Int4Linear, Q8Linear, Q4Linear)  # integer weights
PACKED = (*QUANTIZED, BF16Linear)  # every layer quantize_model puts in place of an nn.Linear


def _bf16_linear(weight: torch.Tensor) -> nn.Linear:
    """The fallback layer: a plain bias-free bf16 linear holding `weight`."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    return linear


# ---- which kernels work here -----------------------------------------------------------------------------


def kernel_available(mode: str, group_size: int = 32) -> bool:
    """Whether this torch build runs mode's kernel on this CPU: one tiny matmul, checked against float."""
    if mode in ("none", "bf16"):
        return True
    w = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
    x = torch.linspace(-1, 1, 2 * 64).reshape(2, 64).to(torch.bfloat16)
    try:
        layer = Int8Linear.from_float(w) if mode == "int8" else Int4Linear.from_float(w, group_size)
        y = layer(x).float()
    except (RuntimeError, NotImplementedError) as e:  # "no kernel for this CPU/dtype", missing op, ...
        log.info("%s kernel unavailable: %s", mode, e)
        return False
    expected = x.float() @ w.T
    return bool(torch.allclose(y, expected, rtol=0.1, atol=0.1))


def backend(mode: str, group_size: int = 32) -> str:
    """Which kernels a quantised mode runs on here: "vnni" (smollm2's own, kernels.py, when built and the CPU
    runs them: AVX-512 VNNI, or AVX2 for int8 / int4), "torch" (torch's weight-only kernels), or "bf16"
    (neither: dequantised bf16 weights). bf16 mode's kernel needs AVX-512 BF16 (`kernels.bf16_supported`)."""
    from . import kernels

    if mode == "bf16":
        return "vnni" if kernels.bf16_supported() else "torch"
    if kernels.available() and (mode == "int8" or group_size == Q4Linear.group_size):
        return "vnni"
    return "torch" if kernel_available(mode, group_size) else "bf16"


# ---- the model transform ---------------------------------------------------------------------------------


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, *, group_size: int = 32, head: str | None = None) -> nn.Module:
    """Quantise a loaded model in place (and return it); see the module docstring for the modes.

    Every nn.Linear (the 7 projections of each block and the output projection) is replaced by its quantised
    version; the embedding, norms and rotary tables are cast to bf16. Returns the same model object.
    head: the output projection's mode, "int8" or "int4" (default: int8 for both quantised modes).
    """
    check_mode(mode)
    head = head or ("int8" if mode in ("int8", "int4") else mode)
    if mode in ("int8", "int4") and head not in ("int8", "int4"):
        raise ValueError(f"head must be 'int8' or 'int4', got {head!r}")
    if mode not in ("int8", "int4") and head != mode:
        raise ValueError(f"head applies to the int8 and int4 modes only (mode={mode!r})")
    if mode not in ("int8", "int4") and group_size != 32:
        raise ValueError(f"group_size applies to int4 only (mode={mode!r})")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if any(isinstance(m, PACKED) for m in model.modules()):
        raise ValueError("model is already quantised; quantise a freshly loaded float model")
    if mode == "int4":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        odd = sorted({m.in_features for m in linears if m.in_features % group_size})
        if odd:
            raise ValueError(f"int4 quantises groups of {group_size} inputs, which do not divide this model's "
                             f"layer widths {odd}; use int8, bf16 or none for it")
    device = next(model.parameters()).device
    if mode in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"quantize mode {mode!r} runs on the CPU only (the model is on {device}); "
                         "use 'bf16' on a GPU")
    model.requires_grad_(False)
    if mode == "none":
        return model
    if mode == "bf16" and (device.type != "cpu" or backend(mode) != "vnni"):
        model.quantization = Quantization(mode, "torch")
        return model.to(torch.bfloat16)

    backends = {m: backend(m, group_size) for m in {mode, head}}
    for m, b in backends.items():
        if b == "bf16":
            log.warning("no %s kernel runs on this machine; using bf16 linears with %s-rounded weights instead "
                        "(same results, bf16 speed)", m, m)
    model.quantization = Quantization(mode, backends[mode])
    if backends[mode] != "bf16":
        for block in getattr(getattr(model, "model", None), "layers", ()):
            fuse_projections(block, lambda parts: _quantize(_cat(parts), mode, group_size, backends[mode]))
    lm_head = getattr(model, "lm_head", None)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                m = head if child is lm_head else mode
                layer = _quantize(_float_weight(child), m, group_size, backends[m])
                # (the tied lm_head gets its own quantised copy; the embedding keeps the bf16 matrix)
                layer.float_input = child is lm_head and isinstance(layer, PackedLinear)
                setattr(parent, name, layer)
    # The embedding, norms and rotary tables to bf16; the quantised layers keep their scales' dtypes.
    for module in model.modules():
        if not isinstance(module, PACKED):
            module._apply(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, recurse=False)
    return model


def fuse_projections(block: nn.Module, make: Callable[[list[nn.Linear]], nn.Module]) -> None:
    """q, k, v into one layer (`qkv_proj`) and gate, up into another (`gate_up_proj`), each `make(parts)`: one
    matmul instead of three (two) for the projections that read the same input. The separate layers stay, as
    views of the fused layer's rows where its layout allows, so the module tree keeps the original's names.
    The one fusion path: quantize_model and the int4-from-GGUF loader (gguf_int4.py) both call it."""
    attn, mlp = block.self_attn, block.mlp
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    attn.qkv_proj = make(parts)
    attn.q_proj, attn.k_proj, attn.v_proj = _split(attn.qkv_proj, parts)
    parts = [mlp.gate_proj, mlp.up_proj]
    mlp.gate_up_proj = make(parts)
    mlp.gate_proj, mlp.up_proj = _split(mlp.gate_up_proj, parts)


def _float_weight(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        raise ValueError(f"{linear}: linear layers with a bias are not supported by quantize_model")
    return linear.weight.detach().float()  # quantise the loaded weights, not a bf16 rounding of them


def _cat(linears: list[nn.Linear]) -> torch.Tensor:
    """The weights of layers that read the same input, stacked: quantisation is per row (int8) or per group
    within a row (int4), so one quantised layer of these rows holds exactly the separate layers' codes."""
    return torch.cat([_float_weight(linear) for linear in linears])


def _quantize(weight: torch.Tensor, mode: str, group_size: int, kernels: str) -> nn.Module:
    from .kernels import bf16_shapes_supported, shapes_supported

    if mode == "bf16":  # (on our kernel: quantize_model keeps plain bf16 layers where it does not run)
        return BF16Linear.from_float(weight) if bf16_shapes_supported(*weight.shape) else _bf16_linear(weight)
    if kernels == "vnni" and shapes_supported(*weight.shape):
        return Q8Linear.from_float(weight) if mode == "int8" else Q4Linear.from_float(weight)
    if kernels != "bf16":
        return Int8Linear.from_float(weight) if mode == "int8" else Int4Linear.from_float(weight, group_size)
    if mode == "int8":  # the weight the kernels would compute with: bf16 scales (and zeros)
        codes, scales = quantize_int8(weight)
        return _bf16_linear(dequantize_int8(codes, scales.to(torch.bfloat16)))
    codes, scales, zeros = quantize_int4(weight, group_size)
    return _bf16_linear(dequantize_int4(codes, scales.to(torch.bfloat16), zeros.to(torch.bfloat16)))


def _split(fused: nn.Module, linears: list[nn.Linear]) -> list[nn.Module]:
    """The separate layers, sharing the fused layer's codes where its storage layout allows."""
    out, row = [], 0
    for linear in linears:
        start, stop = row, row + linear.out_features
        row = stop
        if isinstance(fused, (Q8Linear, Q4Linear, BF16Linear)) and start % 16 == 0 and stop % 16 == 0:
            out.append(fused.rows(start, stop))  # blocks of 16 rows: views, no copy
        elif isinstance(fused, Int8Linear):
            out.append(Int8Linear(fused.weight[start:stop], fused.scales[start:stop]))  # row views
        elif isinstance(fused, Int4Linear):
            own = Int4Linear.from_float(_float_weight(linear), fused.group_size)
            # torch's packed layout interleaves blocks of rows: share the codes only if this part's rows are
            # whole blocks (576 and 192 are). Its kernel needs contiguous scales: those are a (small) copy.
            if torch.equal(own.weight, fused.weight[start:stop]):
                own = Int4Linear(fused.weight[start:stop], own.scales_and_zeros, fused.group_size)
            out.append(own)
        else:
            out.append(type(fused).from_float(_float_weight(linear)))
    return out


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a one-token decode step reads: every linear weight and its scales once (a fused layer
    instead of the layers that view it), one row of the embedding and of the rotary tables, the norms.
    The memory-bandwidth limit on decoding is bandwidth / this."""
    total = 0
    for module in model.modules():
        fused = getattr(module, "qkv_proj", None) is not None or getattr(module, "gate_up_proj", None) is not None
        for name, child in module.named_children():
            if fused and name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                continue  # the fast path reads the fused layer instead
            if isinstance(child, nn.Embedding):
                total += child.weight[0].numel() * child.weight.element_size()  # one row per token
                continue
            for tensor in list(child.parameters(recurse=False)) + list(child.buffers(recurse=False)):
                total += tensor.numel() * tensor.element_size()
    for name, buffer in model.named_buffers():
        if name.endswith(("rope_cos", "rope_sin")):  # counted whole above: a step reads one row
            total -= (buffer.shape[0] - 1) * buffer[0].numel() * buffer.element_size()
    return total
