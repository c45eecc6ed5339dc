"""Hand-written AVX-512 and AVX2 kernels (quantised, bf16 and fp32 matmuls, decode attention), C++ built at run time.

    python -m smollm2.kernels        build them once (the setup step does); prints where they live

torch's own weight-only kernels (quantize.py) dequantise every weight to float before multiplying. These do
what llama.cpp does instead: quantise the activations too, to int8 per group of 32 channels, and multiply
integer by integer with VNNI's `vpdpbusd` (64 byte multiply-adds per instruction; the AVX2 build, below,
with vpmaddubsw + vpmaddwd). Two weight formats:
  q4   4-bit codes q (0..15) per group of 32 input channels with an fp16 scale d and zero z per group:
       w = d * (q - 8) + z, llama.cpp's Q4_1 (w = d * q + min, the bundled GGUF's own format) re-centred
  q8   int8 codes per group of 32 input channels with an fp16 scale d per group: w = d * code, llama.cpp's
       Q8_0 (the GGUF's format for the embedding / output projection); stored offset by 128 as unsigned bytes
For the group of 32 inputs g and an output row r, with activations x ~ sx[g] * xq (xq int8):
  q4:  sum_k w[r,k] x[k] ~ sum_g d[r,g] sx[g] (sum_k (q - 8) xq) + z[r,g] (sum_k x)   (sum_k x exact, fp32)
  q8:  sum_k w[r,k] x[k] ~ sum_g d[r,g] sx[g] ((sum_k (code + 128) xq) - 128 sum_k xq)
The weights are repacked so that one 64-byte load holds 4 consecutive inputs for 16 output rows: each
`vpdpbusd` then advances 16 rows at once against one broadcast group of 4 activations, with no horizontal
sums. Work is split over row blocks with at::parallel_for (torch's own OpenMP threads); a block's codes are
read once and reused from cache for every row of a prefill, 4 rows at a time (each 64-byte load, and its
nibble unpacking, then feeds 4 rows, and 4 independent accumulators hide vpdpbusd's latency). On one core
with the weights in cache the one-row case runs 3-4x faster than torch's int4/int8 kernels (960 x 576: 10 us
against 34-37 us); a 512-row prefill's matmuls run at ~2x the fp32 GEMM's rate on 2 cores (~550 against ~270
GOP/s, 6144 x 576).

`bf16_mm` multiplies bf16 activations by bf16 weights packed 16 rows x 2 inputs per 64-byte load with
AVX-512 BF16's `vdpbf16ps` (pairs of products summed in fp32), for the bf16 mode on CPUs that have it: at one
row ~4x faster than torch's bf16 linear on a CPU without AMX; at 512 rows as fast as oneDNN's bf16 GEMM (both
~half the fp32 GEMM's rate here: vdpbf16ps does 32 multiply-adds per instruction, two fp32 FMAs do 32 too).

`f32_mv` is the float32 matrix-vector product of a one-row decode step, on nn.Linear's own row-major weights:
16 rows at a time, one accumulator each, summed across lanes at the end. It streams no faster than MKL's
GEMV, but as an op of our own it takes the compiled step's (1, K) activations as they come (inductor hands
`mm` a view with a zero stride that ATen copies first, 61 times a step) and skips ATen's GEMM dispatch: ~6%
of an fp32 decode step.

The last kernel is the attention of one new token over the KV cache (`decode_attention`, used by compiled_step.py's
decode step): fp32 or bf16, grouped-query heads, a boolean mask. The cache is split into chunks of 64
positions, each chunk's softmax computed apart (its maximum, its sum, its weighted values) and the chunks
merged, as flash-decoding does, so both cores share even one row's 3 KV heads; the V rows are prefetched
while the scores compute. At 576 cached positions it takes ~21-30 us against SDPA's 40-70 us.

AVX2 (CPUs without AVX-512: AMD Zen 2/3, Intel before Ice Lake, Intel's client chips since Alder Lake) gets a
build of its own, the same ops on the same packed weights with the same maths: the same int8 activations and
integer sums, only float sums in another order (tests/quant/test_kernels.py checks both builds against one
torch reference, bit for bit on inputs that make every float operation exact). Its integer dot product is
vpmaddubsw + vpmaddwd on the two 32-byte halves of each 64-byte chunk (rows 0-7, 8-15); matmul_avx2.cpp
says why the int16 pairs never saturate. Its matmuls run all of a call's rows (a batched decode step's B
rows, one token each, or a prefill) through each 16-row block while the block is in L1, in tiles of up to 4
rows over both halves at once (one broadcast activation feeds both), the block's codes unpacked once into a
per-thread buffer when 3 tiles or more read them: each weight is read from memory once per call, whatever
the number of rows, and a row's result is the same bits in any batch. From ~4 rows on a call is bound by
the integer multiply-adds, not by memory (benchmarks/batched_matmul.py). bf16_mm has no AVX2 version (no
bf16 dot product): bf16 mode keeps plain bf16 layers there. Measured on a 2-core AMD EPYC (AVX2, no
AVX-512), one thread: q4 at one row 3-6x faster than torch's int4 kernel (960 x 576: 29 against 126 us; the
49152 x 576 head in q8 at the memory bandwidth), at 512 rows 1.7-3.2x torch's and 0.8-1.7x the fp32 GEMM
(BENCHMARKS.md, taken under load).

The C++ lives in smollm2/quant/csrc/ (package data): ops.cpp declares the ops (`torch.ops.smollm2.*`); the
AVX-512 build compiles it with matmul.cpp (q4_mm, q8_mm, bf16_mm, f32_mv) and decode_attention.cpp, which
share simd.h; the AVX2 build with matmul_avx2.cpp and decode_attention_avx2.cpp (simd_avx2.h), compiled with
-mavx2 -mfma -mf16c only, and the AVX-VNNI build with the same files and -mavxvnni too, which turns each
vpmaddubsw + vpmaddwd into one vpdpbusd with the same integer result (`ISAS`).
`torch.utils.cpp_extension.load` compiles a build (ninja; -O3 -fopenmp) into NAME.so under
~/.cache/torch_extensions/py311_cpu/NAME (or $TORCH_EXTENSIONS_DIR/NAME). NAME is "smollm2_kernels_"
(AVX-512), "smollm2_kernels_avxvnni_" or "smollm2_kernels_avx2_" and 12 hex digits of a sha256 of that build's
own sources, its compiler flags and torch's version (`build_name`): a changed source or flag, or another torch
(whose headers the build depends on), gets a build of its own, and an unchanged one finds the cached build;
nothing is bumped by hand, and older builds stay until deleted.

Which build a process uses is decided once (`isa()`): SMOLLM2_ISA=avx512|avxvnni|avx2 if set (a ValueError
naming the value if it is unknown or this CPU lacks its flags), else the fastest one the CPU reports the flags
for in /proc/cpuinfo (AVX-512 VNNI, else AVX2 + FMA + F16C with AVX-VNNI, else without). One process loads one
build: all register the same ops. `python -m smollm2.kernels` builds that one, then every other one this CPU
runs (in a process of its own), so that an AVX-512 machine tests the AVX2 builds too.

At run time `available()` loads the cached NAME.so as it is, if there is one (no ninja run: a newer mtime
alone could start a rebuild), and builds only when asked to (`python -m smollm2.kernels`, which the setup
step runs, or SMOLLM2_BUILD_KERNELS=1): using smollm2 never starts a minute-long compile. Everything falls
back cleanly: `available()` is False where nothing is built, without a C++ compiler, on a CPU with neither
AVX-512 VNNI nor AVX2, where the build fails, or with SMOLLM2_KERNELS=0, and quantize.py and compiled_step.py
then use torch's kernels and SDPA; bf16_mm also needs AVX-512 BF16 (`bf16_supported()`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROWS = 16  # output rows per packed block: one 512-bit register of int32 accumulators (two 256-bit ones)
GROUP = 32  # input channels per activation (and q4 weight) scale

_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mf16c", "-mfma",
           # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread while torch's other
           # OpenMP thread spins idle (10x slower here). At run time the libgomp.so.1 torch loaded is reused.
           "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


@dataclass(frozen=True)
class Isa:
    """One build of the kernels: the csrc/ files it compiles (.cpp) and includes (.h), its compiler flags,
    the /proc/cpuinfo flags the CPU must report to run it, and the prefix of its build name."""

    files: tuple[str, ...]
    cflags: tuple[str, ...]
    cpu_flags: frozenset[str]
    prefix: str


_AVX2_FILES = ("ops.cpp", "matmul_avx2.cpp", "decode_attention_avx2.cpp", "simd_avx2.h")

# The builds, fastest first: `isa()` takes the first this CPU runs. Each compiles only its own files (ops.cpp,
# the ops' schemas, is shared), so a change to one leaves the other's build, and its name, as it was. Never
# -march=native: a build must run on every CPU with these flags, not only on the one that compiled it.
ISAS = {
    "avx512": Isa(("ops.cpp", "matmul.cpp", "decode_attention.cpp", "simd.h"), tuple(_CFLAGS),
                  frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"}), "smollm2_kernels_"),
    # the AVX2 sources again with vpdpbusd for the integer dot products (matmul_avx2.cpp's __AVXVNNI__ lines)
    "avxvnni": Isa(_AVX2_FILES, ("-O3", "-mavx2", "-mfma", "-mf16c", "-mavxvnni", "-fopenmp"),
                   frozenset({"avx2", "fma", "f16c", "avx_vnni"}), "smollm2_kernels_avxvnni_"),
    "avx2": Isa(_AVX2_FILES, ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"), frozenset({"avx2", "fma", "f16c"}),
                "smollm2_kernels_avx2_"),
}


def source_dir() -> Path:
    """smollm2/quant/csrc/ of the installed package: the kernels' C++ (.cpp compiled, .h included by them)."""
    return Path(str(resources.files("smollm2.quant") / "csrc"))


def sources(isa: str | None = None) -> dict[str, str]:
    """Each C++ file of csrc/ by name, with its text (empty where the package was installed without them);
    with isa, only the files of that build (ISAS)."""
    csrc = resources.files("smollm2.quant") / "csrc"
    if not csrc.is_dir():
        return {}
    wanted = ISAS[isa].files if isa else None
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(csrc.iterdir(), key=lambda f: f.name)
            if f.name.endswith((".cpp", ".h")) and (wanted is None or f.name in wanted)}


def build_name(texts: Mapping[str, str], flags: Sequence[str], torch_version: str = torch.__version__,
               prefix: str = "smollm2_kernels_") -> str:
    """The extension's name, which keys its build directory: a hash of all that the build depends on. torch's
    version is in it because ninja does not track torch's headers (-isystem), so a stale build would remain."""
    key = json.dumps([sorted(texts.items()), list(flags), torch_version])
    return prefix + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def _isa_name(isa: str) -> str:
    return build_name(sources(isa), [*ISAS[isa].cflags, *_LDFLAGS], prefix=ISAS[isa].prefix)


NAMES = {isa: _isa_name(isa) for isa in ISAS}  # each build's name (the AVX-512 one as before the AVX2 build)


@cache
def _cpu_flags() -> set[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split()[2:])  # after "flags" and ":"


def cpu_runs(isa: str) -> bool:
    """Whether this CPU reports every flag that ISA's build needs (/proc/cpuinfo). Where there is no
    /proc/cpuinfo, torch's own detection decides for AVX2 (its "AVX2" level means AVX2 and FMA; every such
    CPU has F16C too); the AVX-512 build also needs VNNI, which that level does not say."""
    flags = _cpu_flags()
    if not flags and isa == "avx2":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return ISAS[isa].cpu_flags <= flags


@cache
def isa() -> str | None:
    """The build this process uses: SMOLLM2_ISA (avx512, avxvnni or avx2) if set, else the fastest this CPU
    runs (AVX-512 VNNI; then AVX2 with FMA and F16C, with AVX-VNNI where the CPU has it, as Intel's since Alder
    Lake), None if none. Raises ValueError for an unknown value or one this CPU cannot run."""
    forced = os.environ.get("SMOLLM2_ISA", "").strip().lower()
    if not forced:
        return next((name for name in ISAS if cpu_runs(name)), None)
    if forced not in ISAS:
        raise ValueError(f"SMOLLM2_ISA={forced!r} is not one of {', '.join(ISAS)}")
    if not cpu_runs(forced):
        missing = sorted(ISAS[forced].cpu_flags - _cpu_flags())
        raise ValueError(f"SMOLLM2_ISA={forced}: this CPU cannot run it (/proc/cpuinfo lacks {', '.join(missing)})")
    return forced


def cpu_supported() -> bool:
    """Whether any of our builds runs on this CPU (AVX-512 VNNI, or AVX2 + FMA + F16C)."""
    return isa() is not None


def bf16_supported() -> bool:
    """Whether bf16_mm runs here: the AVX-512 kernels are loaded and the CPU has AVX-512 BF16 (vdpbf16ps)."""
    return available() and isa() == "avx512" and "avx512_bf16" in _cpu_flags()


def build_dir(isa_name: str | None = None) -> Path:
    """Where cpp_extension keeps a build (~/.cache/torch_extensions/py311_cpu/NAME by default; this process's
    build, `isa()`, unless named); creates it."""
    from torch.utils import cpp_extension

    name = NAMES[isa_name or isa() or "avx2"]
    return Path(cpp_extension._get_build_directory(name, verbose=False))  # private, but it is load's own


def built(isa_name: str) -> bool:
    """Whether the build for isa_name is in the cache (NAME.so), what available() loads without a compiler."""
    return (build_dir(isa_name) / f"{NAMES[isa_name]}.so").is_file()


@cache
def available() -> bool:
    """Whether the kernels are loaded (`torch.ops.smollm2.q4_mm` / `q8_mm` / `f32_mv` / `decode_attention`
    exist): the build `isa()` picks, made earlier by `python -m smollm2.kernels`; builds only if
    SMOLLM2_BUILD_KERNELS=1 (a build takes ~1 minute). SMOLLM2_KERNELS=0 turns them off (to compare with
    torch's kernels). One build per process: both register the same ops."""
    if os.environ.get("SMOLLM2_KERNELS") == "0":
        return False
    chosen = isa()
    if chosen is None:
        return False
    if os.environ.get("SMOLLM2_BUILD_KERNELS") == "1":
        return _load(chosen, build=True)
    if not built(chosen):
        log.info("smollm2 %s kernels not built (python -m smollm2.kernels builds them); using torch's", chosen)
        return False
    return _load(chosen, build=False)


def _load(isa_name: str, build: bool) -> bool:
    """Load a build; with build, through cpp_extension.load, which (re)builds it first where needed.
    Without, the cached library is loaded as it is: its name is the hash of these very sources, so it is up to
    date, and ninja (which would rebuild on a newer mtime or another checkout's paths) is not needed."""
    from torch.utils import cpp_extension

    name = NAMES[isa_name]
    files = [str(source_dir() / f) for f in sources(isa_name) if f.endswith(".cpp")]
    if build and not files:
        log.warning("smollm2 kernels unavailable (no C++ sources in %s); using torch's", source_dir())
        return False
    try:
        if build:
            cpp_extension.load(name, sources=files, extra_cflags=list(ISAS[isa_name].cflags),
                               extra_ldflags=_LDFLAGS, is_python_module=False, verbose=False)
        else:
            torch.ops.load_library(str(build_dir(isa_name) / f"{name}.so"))  # as cpp_extension.load ends
        _register_fakes()
    except Exception as e:  # no compiler, a failed build, an incompatible cached build: fall back
        log.warning("smollm2 kernels unavailable (%s: %s); using torch's", type(e).__name__, str(e)[:300])
        return False
    return True


def _register_fakes() -> None:
    """Output shapes for torch.compile, which traces without running the kernels."""

    @torch.library.register_fake("smollm2::q4_mm")
    def _(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, z: torch.Tensor, N: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], N)

    @torch.library.register_fake("smollm2::q8_mm")
    def _(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, N: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], N)

    @torch.library.register_fake("smollm2::bf16_mm")
    def _(x: torch.Tensor, w: torch.Tensor, N: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], N)

    @torch.library.register_fake("smollm2::f32_mv")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(1, w.shape[0])

    @torch.library.register_fake("smollm2::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return q.new_empty(q.shape)


# ---- packing: (N, K) codes -> the kernels' layout ---------------------------------------------------------


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) in 0..15 -> bytes [N/16][K/32][4][64]: in each 64-byte chunk p of a group, lane r
    (4 bytes) holds inputs 8p..8p+3 of row r in its low nibbles and 8p+4..8p+7 in its high nibbles."""
    N, K = codes.shape
    c = codes.to(torch.uint8).reshape(N // ROWS, ROWS, K // GROUP, 4, 2, 4)  # (blocks, r, g, p, half, j)
    c = c.permute(0, 2, 3, 1, 4, 5)  # (blocks, g, p, r, half, j)
    packed = c[..., 0, :] | (c[..., 1, :] << 4)  # (blocks, g, p, r, j)
    return packed.contiguous().reshape(-1)


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A weight (N, K) -> bf16 [N/16][K/2][16][2]: in chunk kk, lane r holds inputs 2kk, 2kk+1 of row r."""
    N, K = weight.shape
    w = weight.to(torch.bfloat16).reshape(N // ROWS, ROWS, K // 2, 2)
    return w.permute(0, 2, 1, 3).contiguous().reshape(-1)


def pack_groups(values: torch.Tensor) -> torch.Tensor:
    """Per-group values (N, K/32) -> fp16 [N/16][K/32][16], 16 rows of one group side by side."""
    N, G = values.shape
    return values.to(torch.float16).reshape(N // ROWS, ROWS, G).transpose(1, 2).contiguous().reshape(-1)


def pack_q8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) -> unsigned bytes (code + 128) [N/16][K/32][8][64]: in chunk j of a group, lane r
    holds inputs 4j..4j+3 of row r."""
    N, K = codes.shape
    c = (codes.to(torch.int16) + 128).to(torch.uint8).reshape(N // ROWS, ROWS, K // GROUP, 8, 4)
    return c.permute(0, 2, 3, 1, 4).contiguous().reshape(-1)  # (blocks, g, j, r, 4)


def shapes_supported(out_features: int, in_features: int) -> bool:
    return out_features % ROWS == 0 and in_features % GROUP == 0


def bf16_shapes_supported(out_features: int, in_features: int) -> bool:
    return out_features % ROWS == 0 and in_features % 8 == 0


def f32_mv_fits(weight: torch.Tensor) -> bool:
    """Whether `torch.ops.smollm2.f32_mv` takes this nn.Linear weight (float32, contiguous, 16 | N and K)."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0)


def decode_attention_supported(n_head: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                               device: torch.device) -> bool:
    """Whether `torch.ops.smollm2.decode_attention` runs this attention (the cases it was compiled for)."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim in (64, 128)
            and n_head % n_kv_head == 0 and 1 <= n_head // n_kv_head <= 4 and available())


def main() -> None:
    """`python -m smollm2.kernels` (or smollm2.quant.kernels): build the kernels this CPU runs now and say where
    they are: the one `isa()` picks, then (unless SMOLLM2_ISA names one) every other build this CPU runs, each
    in a process of its own (one process loads one build), so that SMOLLM2_ISA=avx2 can be tested on an
    AVX-512 machine too."""
    logging.basicConfig(level=logging.INFO)
    try:
        chosen = isa()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if chosen is None:
        print("this CPU has neither AVX-512 VNNI nor AVX2 with FMA and F16C: the kernels are not built; "
              "torch's kernels are used instead")
        return
    if not _load(chosen, build=True):
        raise SystemExit(f"building the smollm2 {chosen} kernels failed (see the warning above); torch's kernels "
                         "are used")
    print(f"built {NAMES[chosen]} ({chosen}) in {build_dir(chosen)}")
    if os.environ.get("SMOLLM2_ISA"):
        return
    for other in ISAS:
        if other != chosen and cpu_runs(other):
            done = subprocess.run([sys.executable, "-m", "smollm2.quant.kernels"],
                                  env={**os.environ, "SMOLLM2_ISA": other})
            if done.returncode:  # (this process's own build is in place: only SMOLLM2_ISA=other lacks one)
                print(f"note: the {other} build failed; SMOLLM2_ISA={other} falls back to torch's kernels")


if __name__ == "__main__":
    main()
