"""smollm2's own C++ kernels (smollm2/quant/kernels.py, C++ in smollm2/quant/csrc/): where the sources are found,
how each build (AVX-512, AVX2) is named (a hash, so that a changed source builds afresh), which one a CPU or
SMOLLM2_ISA picks, and that nothing builds unasked; then each op (q4_mm, q8_mm, bf16_mm, f32_mv,
decode_attention) of the build loaded here against a pure-torch reference of the same maths (bit for bit where
the inputs make every float operation exact), float maths, torch or SDPA. On a CPU that runs both builds the
ops' tests run once more on the other one, in a process of its own."""

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


def kernels_or_skip() -> None:
    if not kernels.available():
        pytest.skip("smollm2's kernels are not built here (python -m smollm2.kernels) or the CPU runs none of them")


# ---- the sources, the name, the build ---------------------------------------------------------------------


def test_the_sources_are_found_through_the_package() -> None:
    csrc = resources.files("smollm2.quant") / "csrc"
    found = kernels.sources()
    assert {"ops.cpp", "matmul.cpp", "decode_attention.cpp", "simd.h"} <= set(found)
    assert set(found) == {name for isa in kernels.ISAS.values() for name in isa.files}  # every file in a build
    for name, isa in kernels.ISAS.items():
        assert set(kernels.sources(name)) == set(isa.files) and "ops.cpp" in isa.files
        assert not any("-march" in flag for flag in isa.cflags)  # a build must run on other CPUs than its own
    assert not any("avx512" in flag for flag in kernels.ISAS["avx2"].cflags)
    avx2, vnni = kernels.ISAS["avx2"], kernels.ISAS["avxvnni"]  # the same sources, with vpdpbusd switched on
    assert vnni.files == avx2.files and set(vnni.cflags) == set(avx2.cflags) | {"-mavxvnni"}
    assert "__AVXVNNI__" in found["matmul_avx2.cpp"] and vnni.cpu_flags == avx2.cpu_flags | {"avx_vnni"}
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


def test_each_name_is_that_of_its_own_sources() -> None:
    """The AVX-512 build keeps the name it had before the AVX2 build existed (a hash of its own files), so
    adding or changing the AVX2 sources never sends an AVX-512 machine into a rebuild, and the reverse."""
    avx512 = kernels.build_name(kernels.sources("avx512"), kernels._CFLAGS + kernels._LDFLAGS)
    assert kernels.NAMES["avx512"] == avx512 and re.fullmatch(r"smollm2_kernels_[0-9a-f]{12}", avx512)
    avx2 = kernels.NAMES["avx2"]
    assert re.fullmatch(r"smollm2_kernels_avx2_[0-9a-f]{12}", avx2)
    assert avx2 == kernels.build_name(kernels.sources("avx2"), [*kernels.ISAS["avx2"].cflags, *kernels._LDFLAGS],
                                      prefix="smollm2_kernels_avx2_")
    for name in kernels.ISAS:
        assert kernels.build_dir(name).name == kernels.NAMES[name]


def test_a_build_is_found_under_its_name() -> None:
    kernels_or_skip()
    isa = kernels.isa()
    assert (kernels.build_dir() / f"{kernels.NAMES[isa]}.so").is_file()  # what available() looks for
    assert all(hasattr(torch.ops.smollm2, op) for op in OPS)
    assert kernels.NAMES[isa] in Path("/proc/self/maps").read_text()  # the build isa() picked is the one loaded


def python_here(code: str, **env: str) -> str:
    """What `python -c code` prints (see run_python)."""
    return run_python(code, **env).stdout


def run_python(code: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process with no SMOLLM2_* switches set and env on top."""
    switches = ("SMOLLM2_BUILD_KERNELS", "SMOLLM2_KERNELS", "SMOLLM2_ISA")
    base = {k: v for k, v in os.environ.items() if k not in switches}
    done = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stderr
    return done


def test_available_never_builds_unasked(tmp_path: Path) -> None:
    """Without a cached build, available() is False rather than the start of a minute-long compile."""
    code = "from smollm2.quant import kernels; print(kernels.available(), kernels.build_dir())"
    available, where = python_here(code, TORCH_EXTENSIONS_DIR=str(tmp_path)).split()  # an empty build cache
    assert available == "False" and Path(where).parent == tmp_path and Path(where).name in kernels.NAMES.values()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written, nothing compiled


def test_a_cached_build_loads_without_ninja_or_a_compiler(tmp_path: Path) -> None:
    """available() loads NAME.so as it is: no ninja run (which a source's newer mtime alone would send into a
    rebuild), so neither ninja nor c++ is needed once built."""
    kernels_or_skip()
    code = "from smollm2.quant import kernels; print(kernels.available(), kernels.bf16_supported())"
    same_build = {"SMOLLM2_ISA": kernels.isa()}  # (bf16 support differs between the AVX-512 and AVX2 builds)
    assert python_here(code, PATH=str(tmp_path), **same_build).split() == ["True", str(kernels.bf16_supported())]


# ---- which build: the CPU's flags, or SMOLLM2_ISA --------------------------------------------------------


def test_the_fastest_build_the_cpu_runs_is_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMOLLM2_ISA", raising=False)
    cases = [({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "avx2", "fma"}, "avx512"),
             ({"avx2", "fma", "f16c", "avx_vnni"}, "avxvnni"),  # Alder Lake and later: AVX-VNNI, no AVX-512
             ({"avx2", "fma", "f16c"}, "avx2"),  # Zen 2/3, Skylake
             ({"avx512f", "avx512bw", "avx512vl", "f16c", "avx2", "fma"}, "avx2"),  # Skylake-X: no VNNI
             ({"avx", "f16c"}, None), ({"avx2", "f16c"}, None)]  # no AVX2; AVX2 without FMA
    for flags, expected in cases:
        monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: flags)
        kernels.isa.cache_clear()
        try:
            assert kernels.isa() == expected, flags
            assert kernels.cpu_supported() == (expected is not None)
        finally:
            kernels.isa.cache_clear()


def test_smollm2_isa_forces_a_build_or_names_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    for value, message in [("avx9", r"SMOLLM2_ISA='avx9' is not one of avx512, avxvnni, avx2"),
                           ("avxvnni", r"SMOLLM2_ISA=avxvnni: this CPU cannot run it \(/proc/cpuinfo lacks avx_vnni\)"),
                           ("avx512", r"SMOLLM2_ISA=avx512: this CPU cannot run it \(/proc/cpuinfo lacks avx512_vnni, "
                                      r"avx512bw, avx512f, avx512vl\)")]:
        monkeypatch.setenv("SMOLLM2_ISA", value)
        kernels.isa.cache_clear()
        try:
            with pytest.raises(ValueError, match=message):
                kernels.isa()
        finally:
            kernels.isa.cache_clear()
    monkeypatch.setenv("SMOLLM2_ISA", " AVX2 ")
    kernels.isa.cache_clear()
    try:
        assert kernels.isa() == "avx2"
    finally:
        kernels.isa.cache_clear()


def test_smollm2_isa_chooses_the_build_a_fresh_process_loads() -> None:
    """Forced to each build this CPU runs, a process loads that build; a value this CPU cannot run stops
    quantize_model (and `python -m smollm2.kernels`) with the value named, not a crash deep in torch."""
    code = ("from pathlib import Path; from smollm2.quant import kernels; ok = kernels.available(); "
            "print(kernels.isa(), ok, [n for n in kernels.NAMES.values() if n in Path('/proc/self/maps').read_text()])")
    for name in kernels.ISAS:
        if kernels.cpu_runs(name) and kernels.built(name):
            loaded = python_here(code, SMOLLM2_ISA=name).strip().split(maxsplit=2)
            assert loaded == [name, "True", f"['{kernels.NAMES[name]}']"]
    bad = "avx512" if not kernels.cpu_runs("avx512") else "sse2"
    code = ("import torch; from smollm2.quant.quantize import quantize_model; "
            "quantize_model(torch.nn.Linear(32, 16), 'int8')")
    done = run_python(code, check=False, SMOLLM2_ISA=bad)
    assert done.returncode == 1 and f"ValueError: SMOLLM2_ISA={bad}" in done.stderr.replace("'", "")
    done = subprocess.run([sys.executable, "-m", "smollm2.kernels"], env={**os.environ, "SMOLLM2_ISA": bad},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"SMOLLM2_ISA={bad}" in done.stderr.replace("'", "")
    assert "Traceback" not in done.stderr


# ---- the ops ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("shape", [(64, 64), (960, 576), (576, 1536)])
def test_quantised_kernels_match_float_maths(rows: int, shape: tuple[int, int]) -> None:
    """Our kernels quantise the activations to int8 per group of 32 (as llama.cpp does): ~0.5% error."""
    kernels_or_skip()
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


def test_quantised_kernels_give_a_row_the_same_result_in_any_batch() -> None:
    """The kernels take rows in tiles of up to 4 (a decode step of one row: a tile of 1): the same numbers
    whichever tile a row falls in."""
    kernels_or_skip()
    w, x = torch.randn(96, 128), torch.randn(7, 128)  # 7 rows: a tile of 4, then one of 3
    for layer in (Q4Linear.from_float(w), Q8Linear.from_float(w)):
        whole = layer(x)
        assert all(torch.equal(whole[i], layer(x[i : i + 1])[0]) for i in range(7))
        assert torch.equal(whole[4:], layer(x[4:]))


@pytest.mark.parametrize("rows", [1, 6])
def test_bf16_kernel_matches_float_maths(rows: int) -> None:
    """vdpbf16ps sums bf16 products in fp32; the output is rounded to bf16 once."""
    kernels_or_skip()
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
    kernels_or_skip()
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
    kernels_or_skip()
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
def test_decode_attention_does_not_depend_on_where_a_row_sits(dtype, length) -> None:
    """A row's tokens anywhere in a wider cache attend bit for bit as the same tokens at [0, length) alone:
    from another column (the engine's rows start at different columns), with unused columns between them
    (the engine's timeline jumps past a row when a longer prompt joins), or scattered. Each row's chunks are
    runs of 64 of its own unmasked positions, so only they and their order count."""
    kernels_or_skip()
    H, Hkv, D = 9, 3, 64
    q = torch.randn(1, H, 1, D).to(dtype)
    k, v = (torch.randn(1, Hkv, length, D).to(dtype) for _ in range(2))
    alone = torch.ops.smollm2.decode_attention(q, k, v, torch.ones(1, length, dtype=torch.bool))
    width = length + 180
    layouts = [torch.arange(3, 3 + length), torch.arange(37, 37 + length), torch.arange(64, 64 + length),
               torch.cat([torch.arange(min(length, 5)) + 10, torch.arange(length - min(length, 5)) + 100]),  # a gap
               torch.randperm(width)[:length].sort().values]  # scattered
    K, V = (torch.full((len(layouts), Hkv, width, D), float("nan")).to(dtype) for _ in range(2))
    valid = torch.zeros(len(layouts), width, dtype=torch.bool)
    for row, columns in enumerate(layouts):
        K[row][:, columns], V[row][:, columns] = k[0], v[0]
        valid[row, columns] = True
    batched = torch.ops.smollm2.decode_attention(q.expand(len(layouts), -1, -1, -1), K, V, valid)
    for row in range(len(layouts)):
        assert torch.equal(batched[row], alone[0]), f"layout {row}"


def test_decode_attention_kernel_supported_shapes() -> None:
    kernels_or_skip()
    from smollm2.quant import kernels

    cpu = torch.device("cpu")
    assert kernels.decode_attention_supported(9, 3, 64, torch.float32, cpu)
    assert not kernels.decode_attention_supported(4, 2, 16, torch.float32, cpu)  # head_dim 16: SDPA instead
    assert not kernels.decode_attention_supported(10, 2, 64, torch.float32, cpu)  # 5 query heads per KV head
    assert not kernels.decode_attention_supported(9, 3, 64, torch.float16, cpu)
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        torch.ops.smollm2.decode_attention(torch.randn(1, 4, 1, 32), *(torch.randn(1, 2, 8, 32),) * 2,
                                           torch.ones(1, 8, dtype=torch.bool))


# ---- the quantised ops against the same maths in torch (whichever build is loaded) -----------------------


def reference_mm(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """The kernels' maths in float64 torch: x quantised to int8 per group of 32 exactly as the C++ does
    (scale amax / 127, round half to even of x * (127 / amax) in fp32), exact integer dot products with the
    codes (q4: q - 8 in 0..15 - 8, z given; q8: int8 codes), then per group d * scale * sum + z * sum x."""
    M, K = x.shape
    N, G = codes.shape[0], K // 32
    xg = x.float().reshape(M, G, 32)
    amax = xg.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros(()))  # fp32, as 127.f / amax
    xq = torch.round(xg * inv[..., None]).double()  # (M, G, 32)
    c = codes.double().reshape(N, G, 32) - (8 if z is not None else 0)
    sums = torch.einsum("mgk,ngk->mng", xq, c)  # exact: integers far below 2^53
    y = ((d.double()[None] * (amax.double() / 127)[:, None]) * sums).sum(-1)  # (M, N)
    if z is not None:
        y += (z.double()[None] * xg.double().sum(-1)[:, None]).sum(-1)
    return y


def exact_activations(M: int, K: int) -> torch.Tensor:
    """Multiples of 1/8 within +-127/8, each group's largest exactly 127/8 (so its scale is exactly 1/8 and
    every xq exactly 8 x): every float operation of the kernels on such inputs is exact. The extremes the
    saturation argument of matmul_avx2.cpp rests on: rows of all +127 and all -127, and a group of zeros."""
    xq = torch.randint(-127, 128, (M, K // 32, 32))
    xq[..., 0] = torch.where(torch.rand(M, K // 32) < 0.5, 127, -127)
    xq[0] = 127
    if M > 1:
        xq[1] = -127
    if M > 2:
        xq[2, 0] = 0  # amax 0: scale 0, all xq 0
    return xq.reshape(M, K).float() / 8


@pytest.mark.parametrize("M", [1, 3, 4, 5, 9])
def test_q4_kernel_is_the_reference_maths_bit_for_bit(M: int) -> None:
    """With exact inputs the kernel's q4 result equals the reference to the bit: codes 0..15 (rows of all 15
    against all +-127: the largest int16 pair sums), fp16 scales 2^-4, 2^-5 and zeros k/32, all tile paths."""
    kernels_or_skip()
    layer, (codes, d, z) = exact_q4_layer()
    x = exact_activations(M, layer.in_features)
    expected = reference_mm(x, codes, d, z)
    assert torch.equal(layer(x), expected.float())
    assert torch.equal(layer(x.to(torch.bfloat16)), expected.to(torch.bfloat16))  # (these x are exact in bf16)


@pytest.mark.parametrize("M", [1, 4, 7])
def test_q8_kernel_is_the_reference_maths_bit_for_bit(M: int) -> None:
    """Every int8 code -128..127, rows of all -128 and all 127 against all +-127 (the largest maddubs pairs
    of the AVX2 path: 2 x 128 x 127), fp16 scales 2^-6, 2^-7: equal to the reference to the bit."""
    kernels_or_skip()
    layer, (codes, d) = exact_q8_layer()
    x = exact_activations(M, layer.in_features)
    assert torch.equal(layer(x), reference_mm(x, codes, d, None).float())


def exact_q4_layer(N: int = 48, K: int = 576) -> tuple[Q4Linear, tuple[torch.Tensor, ...]]:
    """A q4 layer whose float maths is exact on exact_activations, and its codes, scales and zeros: codes
    0..15 with rows of all 15 (the largest int16 pair sums) and a group of 0s, fp16 scales 2^-4 and 2^-5,
    zeros k/32."""
    codes = torch.randint(0, 16, (N, K))
    codes[:16] = 15
    codes[16, :32] = 0
    d = torch.where(torch.rand(N, K // 32) < 0.5, 2.0**-4, 2.0**-5)
    z = torch.randint(-16, 17, (N, K // 32)) / 32
    return Q4Linear(kernels.pack_q4(codes), kernels.pack_groups(d), kernels.pack_groups(z), N, K), (codes, d, z)


def exact_q8_layer(N: int = 64, K: int = 256) -> tuple[Q8Linear, tuple[torch.Tensor, ...]]:
    """A q8 layer exact on exact_activations: every code -128..127, rows of all -128 and all 127, fp16
    scales 2^-6 and 2^-7."""
    codes = torch.randint(-128, 128, (N, K))
    codes[:16], codes[16:32] = -128, 127
    d = torch.where(torch.rand(N, K // 32) < 0.5, 2.0**-6, 2.0**-7)
    return Q8Linear(kernels.pack_q8(codes), kernels.pack_groups(d), N, K), (codes, d)


@pytest.mark.parametrize("M", [2, 5, 16, 33, 64])
def test_a_batch_of_rows_is_the_reference_maths_and_each_row_alone(M: int) -> None:
    """A batched decode step (2-64 rows, one token each): every 16-row weight block is read once for all the
    rows, in tiles of up to 4 (from 9 rows on, the block unpacked once first). The result is still the
    reference maths, to the bit on exact inputs, and on random ones every row equals that row run alone."""
    kernels_or_skip()
    q4, (codes, d, z) = exact_q4_layer()
    x = exact_activations(M, q4.in_features)
    assert torch.equal(q4(x), reference_mm(x, codes, d, z).float())
    q8, (codes8, d8) = exact_q8_layer()
    x8 = exact_activations(M, q8.in_features)
    assert torch.equal(q8(x8), reference_mm(x8, codes8, d8, None).float())
    N, K = 960, 576  # the fused q/k/v projection: 60 blocks, shared by the threads
    w = torch.randn(N, K) * 0.05 + torch.linspace(-0.02, 0.02, K)
    codes, scales, zeros = quantize_int4(w, 32)
    codes8, scales8 = quantize_int8(w, 32)
    for layer, expected_of in ((Q4Linear.from_float(w), lambda x: reference_mm(x, codes, scales.half().float(),
                                                                                zeros.half().float())),
                               (Q8Linear.from_float(w), lambda x: reference_mm(x, codes8, scales8.half().float(),
                                                                                None))):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(M, K) * 3).to(dtype)
            y = layer(x)
            assert y.dtype == dtype
            assert all(torch.equal(y[i], layer(x[i : i + 1])[0]) for i in range(M))  # each row alone
            expected = expected_of(x)
            if dtype == torch.float32:
                torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
            else:  # the same, rounded to bf16 once
                torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize(("M", "N", "K"), [(1, 16, 32), (2, 960, 576), (6, 576, 1536), (13, 80, 96)])
def test_quantised_kernels_follow_the_reference_maths(M: int, N: int, K: int) -> None:
    """Random weights and activations: only the float rounding order may differ from the reference."""
    kernels_or_skip()
    w, x = torch.randn(N, K) * 0.05 + torch.linspace(-0.02, 0.02, K), torch.randn(M, K) * 3
    codes, scales, zeros = quantize_int4(w, 32)
    q4 = Q4Linear.from_float(w)
    y4 = reference_mm(x, codes, scales.half().float(), zeros.half().float())
    torch.testing.assert_close(q4(x).double(), y4, rtol=1e-5, atol=1e-5 * float(y4.abs().max()))
    codes8, scales8 = quantize_int8(w, 32)
    y8 = reference_mm(x, codes8, scales8.half().float(), None)
    torch.testing.assert_close(Q8Linear.from_float(w)(x).double(), y8, rtol=1e-5, atol=1e-5 * float(y8.abs().max()))


def test_kernels_give_the_same_numbers_on_any_number_of_threads() -> None:
    """The work is split over blocks of 16 output rows (and attention over chunks of 64 positions), each
    computed whole by one thread: one thread or several give the same bits."""
    kernels_or_skip()
    w, x = torch.randn(960, 576), torch.randn(5, 576)
    layers = (Q4Linear.from_float(w), Q8Linear.from_float(w))
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 300, 64), torch.randn(1, 3, 300, 64)
    valid = torch.rand(1, 300) > 0.2

    def outputs() -> list[torch.Tensor]:
        return ([layer(x) for layer in layers] + [layer(x[:1]) for layer in layers]
                + [torch.ops.smollm2.f32_mv(x[:1], w), torch.ops.smollm2.decode_attention(q, k, v, valid)])

    threads = torch.get_num_threads()
    many = outputs()
    try:
        torch.set_num_threads(1)
        one = outputs()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))


def test_quantised_kernels_reject_bad_shapes() -> None:
    kernels_or_skip()
    w = torch.randn(96, 128)
    q4, q8 = Q4Linear.from_float(w), Q8Linear.from_float(w)
    with pytest.raises(RuntimeError, match=r"smollm2 (avx2|vnni) kernel: bad shapes"):
        torch.ops.smollm2.q4_mm(torch.randn(2, 100), q4.weight, q4.scales, q4.zeros, 96)  # K not a multiple of 32
    with pytest.raises(RuntimeError, match="codes do not match the shapes"):
        torch.ops.smollm2.q8_mm(torch.randn(2, 128), q8.weight, q8.scales, 80)


def test_the_avx2_build_has_no_bf16_kernel() -> None:
    """bf16_mm is AVX-512 BF16 only: the AVX2 build says so, and quantize.py keeps plain bf16 layers."""
    kernels_or_skip()
    if kernels.isa() == "avx512":
        pytest.skip("the AVX-512 build is loaded here")
    assert not kernels.bf16_supported()
    with pytest.raises(RuntimeError, match="bf16_mm needs AVX-512 BF16"):
        torch.ops.smollm2.bf16_mm(torch.randn(2, 64), torch.zeros(96 * 64, dtype=torch.bfloat16), 96)


def test_the_other_builds_this_cpu_runs_pass_the_ops_tests() -> None:
    """A CPU with AVX-512 VNNI also runs the AVX2 builds (python -m smollm2.kernels builds all it runs): the
    ops' tests run again on each, in a process of its own (one process loads one build)."""
    kernels_or_skip()
    others = [name for name in kernels.ISAS if name != kernels.isa() and kernels.cpu_runs(name)
              and kernels.built(name)]
    if not others:
        pytest.skip(f"this CPU runs only the {kernels.isa()} build")
    for name in others:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                               "kernel and not other_builds and not sources and not name"],
                              env={**os.environ, "SMOLLM2_ISA": name}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and " passed" in done.stdout, (name, done.stdout[-3000:])


# ---- the real weights: our kernels' int4 against torch's -----------------------------------------------

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Gravity is the force that")
# logits: torch's int4 path gives bf16 logits, in steps of 0.125 at their scale (16-32), so a gap of one or
# two steps is a tie; the activations' rounding (bf16 there, int8 per group here) moves logits by about as much
TIE = 0.5


@pytest.mark.slow
def test_int4_greedy_tokens_on_our_kernels_are_torch_int4s(real_int4, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled weights in int4 on the build loaded here (the AVX2 one on a CPU without AVX-512) against
    torch's int4 kernel on the same codes: the two quantise activations differently (int8 per group of 32
    against bf16), so a near-tie may go either way; every token ours picks must be torch's choice or within
    TIE of it (judged by torch's model on our tokens), and most continuations must be the same."""
    import smollm2
    from smollm2.inference.config import GenerationConfig

    kernels_or_skip()
    ours, tokenizer = real_int4
    assert ours.quantization.backend == "vnni"
    monkeypatch.setattr(kernels, "available", lambda: False)  # torch's kernels for the second model
    theirs, _ = smollm2.load(quantize="int4")
    assert theirs.quantization.backend == "torch"
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    same = 0
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        new = list(smollm2.generate(ours, prompt, config=config))
        same += new == list(smollm2.generate(theirs, prompt, config=config))
        with torch.no_grad():  # torch's int4 logits at each of our choices
            logits = theirs(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1].float()
        gap = logits.max(dim=-1).values - logits.gather(1, torch.tensor(new)[:, None])[:, 0]
        assert len(new) == 16 and float(gap.max()) < TIE, (text, tokenizer.decode(new), gap.tolist())
    assert same >= len(PROMPTS) - 1
