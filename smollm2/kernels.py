"""Hand-written AVX-512 VNNI matmul kernels for quantised weights, built with `torch.utils.cpp_extension`.

    python -m smollm2.kernels        build them once (the setup step does); prints where they live

torch's own weight-only kernels (quantize.py) dequantise every weight to float before multiplying. These do
what llama.cpp does instead: quantise the activations too, to int8 per group of 32 channels, and multiply
integer by integer with VNNI's `vpdpbusd` (64 byte multiply-adds per instruction). Two weight formats:
  q4   4-bit codes q (0..15) per group of 32 input channels with an fp16 scale d and zero z per group:
       w = d * (q - 8) + z, llama.cpp's Q4_1 (w = d * q + min, the bundled GGUF's own format) re-centred
  q8   int8 codes per group of 32 input channels with an fp16 scale d per group: w = d * code, llama.cpp's
       Q8_0 (the GGUF's format for the embedding / output projection); stored offset by 128 as unsigned bytes
For the group of 32 inputs g and an output row r, with activations x ~ sx[g] * xq (xq int8):
  q4:  sum_k w[r,k] x[k] ~ sum_g d[r,g] sx[g] (sum_k (q - 8) xq) + z[r,g] (sum_k x)   (sum_k x exact, fp32)
  q8:  sum_k w[r,k] x[k] ~ sum_g d[r,g] sx[g] ((sum_k (code + 128) xq) - 128 sum_k xq)
The weights are repacked so that one 64-byte load holds 4 consecutive inputs for 16 output rows: each
`vpdpbusd` then advances 16 rows at once against one broadcast group of 4 activations, with no horizontal
sums. A kernel call costs ~1 us, against ~5 us for torch's.

Everything else falls back cleanly: `available()` is False without a C++ compiler, on a CPU without AVX-512
VNNI, or where the build fails, and quantize.py then uses torch's kernels.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "smollm2_vnni_v7"  # bump when the source changes: the build cache is keyed by name
ROWS = 16  # output rows per packed block: one 512-bit register of int32 accumulators
GROUP = 32  # input channels per activation (and q4 weight) scale

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Activations of one row, quantised per group of 32: xq int8, the group's scale, sum of xq and exact sum of x.
struct QuantRow {
  std::vector<int8_t> xq;
  std::vector<float> scale, sum_x;
  std::vector<int32_t> sum_q;
};

template <typename T>
void quantize_row(const T* x, int64_t K, QuantRow& out) {
  const int64_t G = K / 32;
  out.xq.resize(K); out.scale.resize(G); out.sum_x.resize(G); out.sum_q.resize(G);
  float xg[32];
  for (int64_t g = 0; g < G; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int k = 0; k < 32; ++k) {
      xg[k] = static_cast<float>(x[g * 32 + k]);
      amax = std::max(amax, std::fabs(xg[k]));
      sum += xg[k];
    }
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t qs = 0;
    for (int k = 0; k < 32; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(xg[k] * inv));
      out.xq[g * 32 + k] = static_cast<int8_t>(q);
      qs += q;
    }
    out.scale[g] = s; out.sum_x[g] = sum; out.sum_q[g] = qs;
  }
}

inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(at::BFloat16* dst, __m512 v) {  // round to nearest even, as torch does
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

inline __m512i bcast4(const int8_t* p) {  // 4 int8 activations to every 32-bit lane
  int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v);
}

// q4: codes [N/16][G][4][64] bytes, d and z [N/16][G][16] fp16; w = d * (q - 8) + z.
template <typename Out>
void q4_rows(const QuantRow& a, const uint8_t* codes, const at::Half* d, const at::Half* z,
             int64_t G, int64_t rb0, int64_t rb1, Out* y) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    __m512 acc = _mm512_setzero_ps();
    const uint8_t* c = codes + rb * G * 256;
    const uint16_t* dd = reinterpret_cast<const uint16_t*>(d) + rb * G * 16;
    const uint16_t* zz = reinterpret_cast<const uint16_t*>(z) + rb * G * 16;
    for (int64_t g = 0; g < G; ++g, c += 256) {
      const int8_t* xq = a.xq.data() + g * 32;
      __m512i isum = _mm512_setzero_si512();
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(c + p * 64);
        isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(v, low), bcast4(xq + 8 * p));
        isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), bcast4(xq + 8 * p + 4));
      }
      // sum (q - 8) xq = sum q xq - 8 sum xq, exactly: centred codes halve the activation rounding error
      isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * a.sum_q[g]));
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dd + g * 16)));
      const __m512 zv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zz + g * 16)));
      acc = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(a.scale[g])), _mm512_cvtepi32_ps(isum), acc);
      acc = _mm512_fmadd_ps(zv, _mm512_set1_ps(a.sum_x[g]), acc);
    }
    store16(y + rb * 16, acc);
  }
}

// q8: codes [N/16][G][8][64] bytes (w + 128), d [N/16][G][16] fp16 (llama.cpp's Q8_0: w = d * code).
template <typename Out>
void q8_rows(const QuantRow& a, const uint8_t* codes, const at::Half* d, int64_t G, int64_t rb0, int64_t rb1,
             Out* y) {
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    __m512 acc = _mm512_setzero_ps();
    const uint8_t* c = codes + rb * G * 512;
    const uint16_t* dd = reinterpret_cast<const uint16_t*>(d) + rb * G * 16;
    for (int64_t g = 0; g < G; ++g, c += 512) {
      const int8_t* xq = a.xq.data() + g * 32;
      __m512i isum = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j)
        isum = _mm512_dpbusd_epi32(isum, _mm512_loadu_si512(c + j * 64), bcast4(xq + 4 * j));
      isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * a.sum_q[g]));  // the +128 of the stored codes
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dd + g * 16)));
      acc = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(a.scale[g])), _mm512_cvtepi32_ps(isum), acc);
    }
    store16(y + rb * 16, acc);
  }
}

// y = x @ W.T for x (M, K) float or bf16 (other dtypes go through float); rows(a, G, b0, b1, out) computes
// output row blocks b0..b1-1 of one activation row into out (float* or BFloat16*).
template <typename RowFn>
at::Tensor run(const at::Tensor& x_in, int64_t N, RowFn rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0 && N % 16 == 0, "smollm2 vnni kernel: bad shapes");
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = bf16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = K / 32, blocks = N / 16;
  at::Tensor y = at::empty({M, N}, x.options());
  // Reused between calls (no allocation per call). The lambdas below must capture the reference `a`: naming
  // the thread_local itself in them would give each worker thread its own, empty, copy.
  static thread_local QuantRow storage;
  QuantRow& a = storage;
  // grain: at least ~64 KB of weights per task, so that small layers do not pay for a second thread
  const int64_t grain = std::max<int64_t>(1, 65536 / (G * 256));
  for (int64_t i = 0; i < M; ++i) {
    if (bf16) {
      quantize_row(x.data_ptr<at::BFloat16>() + i * K, K, a);
      at::BFloat16* yi = y.data_ptr<at::BFloat16>() + i * N;
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { rows(a, G, b0, b1, yi); });
    } else {
      quantize_row(x.data_ptr<float>() + i * K, K, a);
      float* yi = y.data_ptr<float>() + i * N;
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) { rows(a, G, b0, b1, yi); });
    }
  }
  return (bf16 || x_in.scalar_type() == at::kFloat) ? y : y.to(x_in.scalar_type());
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& z,
                 int64_t N) {
  TORCH_CHECK(codes.is_contiguous() && d.is_contiguous() && z.is_contiguous(), "q4_mm: contiguous weights");
  TORCH_CHECK(codes.numel() * 2 == N * x.size(1), "q4_mm: codes do not match the shapes");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* zp = z.data_ptr<at::Half>();
  return run(x, N, [&](const QuantRow& a, int64_t G, int64_t b0, int64_t b1, auto* y) {
    q4_rows(a, c, dp, zp, G, b0, b1, y);
  });
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d, int64_t N) {
  TORCH_CHECK(codes.is_contiguous() && d.is_contiguous(), "q8_mm: contiguous weights");
  TORCH_CHECK(codes.numel() == N * x.size(1), "q8_mm: codes do not match the shapes");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return run(x, N, [&](const QuantRow& a, int64_t G, int64_t b0, int64_t b1, auto* y) {
    q8_rows(a, c, dp, G, b0, b1, y);
  });
}

}  // namespace

TORCH_LIBRARY(smollm2, m) {
  m.def("q4_mm(Tensor x, Tensor codes, Tensor d, Tensor z, int N) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor codes, Tensor d, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(smollm2, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
}
"""

_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma",
          # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread while torch's other
          # OpenMP thread spins idle (10x slower here). At run time the libgomp.so.1 torch loaded is reused.
          "-fopenmp"]


def cpu_supported() -> bool:
    """AVX-512 with VNNI (x86-64 Ice Lake / Zen 4 and later), read from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"))


def build_dir() -> Path:
    """Where load_inline keeps the build (~/.cache/torch_extensions/py311_cpu/NAME by default)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(NAME, verbose=False))  # private, but it is load_inline's own


@cache
def available() -> bool:
    """Whether the kernels are loaded (`torch.ops.smollm2.q4_mm` / `q8_mm` exist). Uses a build made earlier
    by `python -m smollm2.kernels`; builds only if SMOLLM2_BUILD_KERNELS=1 (a build takes ~1 minute).
    SMOLLM2_KERNELS=0 turns them off (to compare with torch's kernels)."""
    if os.environ.get("SMOLLM2_KERNELS") == "0" or not cpu_supported():
        return False
    if os.environ.get("SMOLLM2_BUILD_KERNELS") != "1" and not (build_dir() / f"{NAME}.so").is_file():
        log.info("smollm2 kernels not built (python -m smollm2.kernels builds them); using torch's")
        return False
    return _load()


def _load() -> bool:
    from torch.utils import cpp_extension

    try:
        cpp_extension.load_inline(NAME, cpp_sources=[_SOURCE], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                                  is_python_module=False, verbose=False)
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


# ---- packing: (N, K) codes -> the kernels' layout ---------------------------------------------------------


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) in 0..15 -> bytes [N/16][K/32][4][64]: in each 64-byte chunk p of a group, lane r
    (4 bytes) holds inputs 8p..8p+3 of row r in its low nibbles and 8p+4..8p+7 in its high nibbles."""
    N, K = codes.shape
    c = codes.to(torch.uint8).reshape(N // ROWS, ROWS, K // GROUP, 4, 2, 4)  # (blocks, r, g, p, half, j)
    c = c.permute(0, 2, 3, 1, 4, 5)  # (blocks, g, p, r, half, j)
    packed = c[..., 0, :] | (c[..., 1, :] << 4)  # (blocks, g, p, r, j)
    return packed.contiguous().reshape(-1)


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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if not cpu_supported():
        print("this CPU has no AVX-512 VNNI: the kernels are not built; torch's kernels are used instead")
    elif _load():
        print(f"built {NAME} in {build_dir()}")
    else:
        raise SystemExit("building the smollm2 kernels failed (see the warning above); torch's kernels are used")
