"""smollm2's own C++ kernels (smollm2/kernels.py, C++ in smollm2/csrc/): where the sources are found, how the
build is named (a hash, so that a changed source builds afresh) and that nothing builds unasked; then each op
(q4_mm, q8_mm, bf16_mm, f32_mv, decode_attention) against float maths, torch or SDPA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from smollm2.quant import kernels
from smollm2.quant.quantize import (
    BF16Linear,
    Q4Linear,
    Q8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

OPS = ("q4_mm", "q8_mm", "bf16_mm", "f32_mv", "decode_attention")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def vnni_or_skip() -> None:
    if not kernels.available():
        pytest.skip("smollm2's VNNI kernels are not built here (python -m smollm2.kernels) or the CPU lacks VNNI")


# ---- the sources, the name, the build ---------------------------------------------------------------------


def test_the_sources_are_found_through_the_package() -> None:
    csrc = resources.files("smollm2") / "csrc"
    found = kernels.sources()
    assert {"ops.cpp", "matmul.cpp", "decode_attention.cpp", "simd.h"} <= set(found)
    assert all(text == (csrc / name).read_text(encoding="utf-8") for name, text in found.items())
    assert kernels.source_dir() == Path(str(csrc)) and (kernels.source_dir() / "ops.cpp").is_file()
    assert all(f'm.def("{op}(' in found["ops.cpp"] for op in OPS)  # the ops kernels.py registers fakes for
    assert "#include <" not in Path(kernels.__file__).read_text(encoding="utf-8")  # no C++ left in Python


def test_build_name_is_a_hash_of_sources_flags_and_torch() -> None:
    texts, flags = {"a.cpp": "int f() { return 1; }", "a.h": "#pragma once"}, ["-O3", "-fopenmp"]
    name = kernels.build_name(texts, flags)
    assert re.fullmatch(r"smollm2_kernels_[0-9a-f]{12}", name)
    assert kernels.build_name(dict(reversed(texts.items())), list(flags)) == name  # stable, whatever the order
    others = [
        kernels.build_name({**texts, "a.cpp": "int f() { return 2; }"}, flags),  # a source's text
        kernels.build_name({**texts, "b.h": ""}, flags),  # one more file
        kernels.build_name({"b.cpp": texts["a.cpp"], "a.h": texts["a.h"]}, flags),  # a renamed file
        kernels.build_name({"a.cp": "pint f() { return 1; }", "a.h": texts["a.h"]}, flags),  # the same bytes, cut
        kernels.build_name(texts, ["-O2", "-fopenmp"]),  # a flag
        kernels.build_name(texts, flags, torch_version="0.0.0"),  # another torch
    ]
    assert len({name, *others}) == 1 + len(others)


def test_the_name_is_that_of_the_package_sources() -> None:
    assert kernels.NAME == kernels.build_name(kernels.sources(), kernels._CFLAGS + kernels._LDFLAGS)
    assert kernels.build_dir().name == kernels.NAME


def test_a_build_is_found_under_its_name() -> None:
    vnni_or_skip()
    assert (kernels.build_dir() / f"{kernels.NAME}.so").is_file()  # what available() looks for before loading
    assert all(hasattr(torch.ops.smollm2, op) for op in OPS)


def python_here(code: str, **env: str) -> str:
    """What `python -c code` prints, in a fresh process with no SMOLLM2_* switches set and env on top."""
    base = {k: v for k, v in os.environ.items() if k not in ("SMOLLM2_BUILD_KERNELS", "SMOLLM2_KERNELS")}
    return subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True,
                          timeout=300, check=True).stdout


def test_available_never_builds_unasked(tmp_path: Path) -> None:
    """Without a cached build, available() is False rather than the start of a minute-long compile."""
    code = "from smollm2.quant import kernels; print(kernels.available(), kernels.build_dir())"
    available, where = python_here(code, TORCH_EXTENSIONS_DIR=str(tmp_path)).split()  # an empty build cache
    assert available == "False" and Path(where) == tmp_path / kernels.NAME
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written, nothing compiled


def test_a_cached_build_loads_without_ninja_or_a_compiler(tmp_path: Path) -> None:
    """available() loads NAME.so as it is: no ninja run (which a source's newer mtime alone would send into a
    rebuild), so neither ninja nor c++ is needed once built."""
    vnni_or_skip()
    code = "from smollm2.quant import kernels; print(kernels.available(), kernels.bf16_supported())"
    assert python_here(code, PATH=str(tmp_path)).split() == ["True", str(kernels.bf16_supported())]


# ---- the ops ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("shape", [(64, 64), (960, 576), (576, 1536)])
def test_vnni_kernels_match_float_maths(rows: int, shape: tuple[int, int]) -> None:
    """Our kernels quantise the activations to int8 per group of 32 (as llama.cpp does): ~0.5% error."""
    vnni_or_skip()
    N, K = shape
    w = torch.randn(N, K) * 0.05 + torch.linspace(-0.02, 0.02, K)  # groups with offsets: zeros matter
    x = torch.randn(rows, K)
    q4, q8 = Q4Linear.from_float(w), Q8Linear.from_float(w)
    codes, scales, zeros = quantize_int4(w, 32)
    w4 = dequantize_int4(codes, scales.half(), zeros.half())  # Q4Linear keeps fp16 scales and zeros
    codes8, scales8 = quantize_int8(w, 32)
    w8 = dequantize_int8(codes8, scales8.half())  # Q8Linear: per group of 32, fp16 scales
    assert rel_err(q4(x), x @ w4.T) < 0.01
    assert rel_err(q8(x), x @ w8.T) < 0.01
    y = q4(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and rel_err(y, x @ w4.T) < 0.015
    # Row views of a layer compute exactly the rows of the whole.
    assert torch.equal(q4.rows(16, 48)(x), q4(x)[:, 16:48]) and torch.equal(q8.rows(32, 64)(x), q8(x)[:, 32:64])


def test_vnni_kernels_give_a_row_the_same_result_in_any_batch() -> None:
    """A prefill's rows go through the kernels 4 at a time, a decode step's one: the same numbers either way."""
    vnni_or_skip()
    w, x = torch.randn(96, 128), torch.randn(7, 128)  # 7 rows: one tile of 4, then 3 one by one
    for layer in (Q4Linear.from_float(w), Q8Linear.from_float(w)):
        whole = layer(x)
        assert all(torch.equal(whole[i], layer(x[i : i + 1])[0]) for i in range(7))
        assert torch.equal(whole[4:], layer(x[4:]))


@pytest.mark.parametrize("rows", [1, 6])
def test_bf16_kernel_matches_float_maths(rows: int) -> None:
    """vdpbf16ps sums bf16 products in fp32; the output is rounded to bf16 once."""
    vnni_or_skip()
    from smollm2.quant import kernels

    if not kernels.bf16_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    w, x = torch.randn(96, 128), torch.randn(rows, 128).to(torch.bfloat16)
    layer = BF16Linear.from_float(w)
    y = layer(x)
    expected = x.float() @ w.to(torch.bfloat16).float().T
    assert y.dtype == torch.bfloat16 and rel_err(y, expected) < 4e-3
    assert torch.equal(layer(x.float()).float(), y.float())  # float input: rounded to bf16 first
    assert all(torch.equal(y[i], layer(x[i : i + 1])[0]) for i in range(rows))  # 4-row tiles = one by one
    assert torch.equal(layer.rows(32, 64)(x), y[:, 32:64])
    with pytest.raises(RuntimeError, match="smollm2 bf16_mm: bad shapes"):
        torch.ops.smollm2.bf16_mm(torch.randn(2, 100), layer.weight, 96)  # 100 inputs: not a multiple of 8
    with pytest.raises(RuntimeError, match="bf16_mm: weights do not match"):
        torch.ops.smollm2.bf16_mm(x, layer.weight, 80)


def test_f32_mv_kernel_matches_torch() -> None:
    """The float32 one-row product on nn.Linear's own weights, whatever the strides of a (1, K) input."""
    vnni_or_skip()
    from smollm2.quant import kernels

    w, x = torch.randn(96, 576), torch.randn(1, 576)
    assert kernels.f32_mv_fits(w)
    torch.testing.assert_close(torch.ops.smollm2.f32_mv(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    zero_stride = x.as_strided((1, 576), (0, 1))  # as inductor lays such a row out
    assert torch.equal(torch.ops.smollm2.f32_mv(zero_stride, w), torch.ops.smollm2.f32_mv(x, w))
    for unfit in (torch.randn(8, 576), torch.randn(96, 40), w.to(torch.bfloat16), torch.randn(576, 96).T):
        assert not kernels.f32_mv_fits(unfit)
    with pytest.raises(RuntimeError, match=r"f32_mv: x \(1, K\) and w \(N, K\)"):
        torch.ops.smollm2.f32_mv(torch.randn(2, 576), w)


def sdpa_reference(q, k, v, valid):
    mask = valid[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                            enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "H", "Hkv", "D", "L"), [(1, 9, 3, 64, 576), (2, 4, 4, 128, 70), (3, 8, 2, 64, 17)])
def test_decode_attention_kernel_matches_sdpa(dtype, B, H, Hkv, D, L) -> None:
    """Our one-token attention (chunks of 64 positions merged as in flash-decoding) against SDPA, on views of
    a longer cache, with masked positions: whole 64-position chunks (left padding) and scattered ones."""
    vnni_or_skip()
    from smollm2.quant import kernels

    assert kernels.decode_attention_supported(H, Hkv, D, dtype, torch.device("cpu"))
    cache_len = L + 30
    q = torch.randn(B, H, 1, D).to(dtype)
    k_cache, v_cache = (torch.randn(B, Hkv, cache_len, D).to(dtype) for _ in range(2))
    k_cache[:, :, L:] = float("nan")  # past the attended length: must never be read
    valid = torch.rand(B, L) > 0.3
    valid[:, -1] = True  # the new token itself
    valid[0, : min(L - 1, 130)] = False  # row 0 left-padded over two whole chunks
    v_cache[0, :, :5] = float("nan")  # a masked position's cache row may hold anything
    y = torch.ops.smollm2.decode_attention(q, k_cache[:, :, :L], v_cache[:, :, :L], valid)
    assert y.shape == q.shape and y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    k, v = (c[:, :, :L].nan_to_num() for c in (k_cache, v_cache))  # SDPA would spread the NaN (0 x NaN)
    torch.testing.assert_close(y.float(), sdpa_reference(q, k, v, valid), atol=tolerance, rtol=tolerance)


def test_decode_attention_kernel_supported_shapes() -> None:
    vnni_or_skip()
    from smollm2.quant import kernels

    cpu = torch.device("cpu")
    assert kernels.decode_attention_supported(9, 3, 64, torch.float32, cpu)
    assert not kernels.decode_attention_supported(4, 2, 16, torch.float32, cpu)  # head_dim 16: SDPA instead
    assert not kernels.decode_attention_supported(10, 2, 64, torch.float32, cpu)  # 5 query heads per KV head
    assert not kernels.decode_attention_supported(9, 3, 64, torch.float16, cpu)
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        torch.ops.smollm2.decode_attention(torch.randn(1, 4, 1, 32), *(torch.randn(1, 2, 8, 32),) * 2,
                                           torch.ones(1, 8, dtype=torch.bool))
