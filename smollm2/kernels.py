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

The last kernel is the attention of one new token over the KV cache (`decode_attention`, used by fast.py's
decode step): fp32 or bf16, grouped-query heads, a boolean mask. The cache is split into chunks of 64
positions, each chunk's softmax computed apart (its maximum, its sum, its weighted values) and the chunks
merged, as flash-decoding does, so both cores share even one row's 3 KV heads; the V rows are prefetched
while the scores compute. At 576 cached positions it takes ~21-30 us against SDPA's 40-70 us.

Everything else falls back cleanly: `available()` is False without a C++ compiler, on a CPU without AVX-512
VNNI, or where the build fails, and quantize.py then uses torch's kernels. The build is cached under
~/.cache/torch_extensions (load_inline's directory), keyed by NAME.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "smollm2_vnni_v21"  # bump when the source changes: the build cache is keyed by name
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

// Activations quantised per group of 32: xq int8, and per (row, group) the scale, the sum of xq and the exact
// sum of x. Rows are M rows of K inputs (G = K / 32 groups each).
struct Acts {
  std::vector<int8_t> xq;
  std::vector<float> scale, sum_x;
  std::vector<int32_t> sum_q;
};

inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16f(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, Acts& a) {
  const int64_t G = K / 32;
  a.xq.resize(M * K); a.scale.resize(M * G); a.sum_x.resize(M * G); a.sum_q.resize(M * G);
  at::parallel_for(0, M * G, 2048, [&](int64_t i0, int64_t i1) {  // i = row * G + group
    for (int64_t i = i0; i < i1; ++i) {
      const __m512 lo = load16f(x + i * 32), hi = load16f(x + i * 32 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      // round to nearest even (the default rounding mode), as std::nearbyint would
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&a.xq[i * 32]), _mm512_cvtepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&a.xq[i * 32 + 16]), _mm512_cvtepi32_epi8(qhi));
      a.scale[i] = amax / 127.f;
      a.sum_x[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
      a.sum_q[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
  });
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

inline __m512 load16h(const at::Half* p) {  // 16 fp16 values to fp32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// q4: codes [N/16][G][4][64] bytes, d and z [N/16][G][16] fp16; w = d * (q - 8) + z. One row block (16 output
// rows) against MR activation rows m0.. (a prefill's rows go MR at a time: each 64-byte load of codes, and its
// unpacking into nibbles, then serves MR rows, and the MR accumulator chains hide vpdpbusd's latency).
template <int MR>
inline void q4_tile(const uint8_t* c, const at::Half* d, const at::Half* z, const Acts& a, int64_t m0, int64_t K,
                    int64_t G, __m512* acc) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int8_t* xq = a.xq.data() + m0 * K;
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g, c += 256) {
    __m512i isum[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) isum[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_loadu_si512(c + p * 64);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const int8_t* x = xq + m * K + g * 32 + 8 * p;
        isum[m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum[m], lo, bcast4(x)), hi, bcast4(x + 4));
      }
    }
    const __m512 dg = load16h(d + g * 16), zg = load16h(z + g * 16);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const int64_t i = (m0 + m) * G + g;
      // sum (q - 8) xq = sum q xq - 8 sum xq, exactly: centred codes halve the activation rounding error
      const __m512i centred = _mm512_sub_epi32(isum[m], _mm512_set1_epi32(8 * a.sum_q[i]));
      acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(dg, _mm512_set1_ps(a.scale[i])), _mm512_cvtepi32_ps(centred), acc[m]);
      acc[m] = _mm512_fmadd_ps(zg, _mm512_set1_ps(a.sum_x[i]), acc[m]);
    }
  }
}

// q8: codes [N/16][G][8][64] bytes (code + 128), d [N/16][G][16] fp16 (llama.cpp's Q8_0: w = d * code).
template <int MR>
inline void q8_tile(const uint8_t* c, const at::Half* d, const Acts& a, int64_t m0, int64_t K, int64_t G,
                    __m512* acc) {
  const int8_t* xq = a.xq.data() + m0 * K;
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g, c += 512) {
    __m512i isum[MR];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) isum[m] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i v = _mm512_loadu_si512(c + j * 64);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) isum[m] = _mm512_dpbusd_epi32(isum[m], v, bcast4(xq + m * K + g * 32 + 4 * j));
    }
    const __m512 dg = load16h(d + g * 16);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const int64_t i = (m0 + m) * G + g;
      const __m512i centred = _mm512_sub_epi32(isum[m], _mm512_set1_epi32(128 * a.sum_q[i]));  // codes + 128
      acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(dg, _mm512_set1_ps(a.scale[i])), _mm512_cvtepi32_ps(centred), acc[m]);
    }
  }
}

// MR rows at a time, then the remaining 0..MR-1 one by one. Every row's result is computed by the same
// operations in the same order whichever tile it falls in, so a row's output does not depend on M.
constexpr int MR = 4;

// y = x @ W.T for x (M, K) float or bf16 (other dtypes go through float), W in one of the layouts above with
// `block_bytes` bytes of codes per row block and group. Parallel over row blocks; each block's codes are read
// from memory once and reused from cache for all M rows.
template <bool IS_Q4, typename Out>
void run_blocks(const Acts& a, const uint8_t* codes, const at::Half* d, const at::Half* z, int64_t M, int64_t N,
                int64_t K, int64_t block_bytes, Out* y) {
  const int64_t G = K / 32, blocks = N / 16;
  // at least ~64 KB of weights per task, so that small layers do not pay for a second thread
  const int64_t grain = std::max<int64_t>(1, 65536 / (G * block_bytes) / std::max<int64_t>(1, M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    __m512 acc[MR];
    for (int64_t rb = b0; rb < b1; ++rb) {
      const uint8_t* c = codes + rb * G * block_bytes;
      const at::Half* dd = d + rb * G * 16;
      const at::Half* zz = z ? z + rb * G * 16 : nullptr;
      int64_t m = 0;
      for (; m + MR <= M; m += MR) {
        if constexpr (IS_Q4) q4_tile<MR>(c, dd, zz, a, m, K, G, acc); else q8_tile<MR>(c, dd, a, m, K, G, acc);
        for (int r = 0; r < MR; ++r) store16(y + (m + r) * N + rb * 16, acc[r]);
      }
      for (; m < M; ++m) {
        if constexpr (IS_Q4) q4_tile<1>(c, dd, zz, a, m, K, G, acc); else q8_tile<1>(c, dd, a, m, K, G, acc);
        store16(y + m * N + rb * 16, acc[0]);
      }
    }
  });
}

template <bool IS_Q4>
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& d, const at::Tensor* z,
                  int64_t N, int64_t block_bytes) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0 && N % 16 == 0, "smollm2 vnni kernel: bad shapes");
  TORCH_CHECK(codes.is_contiguous() && d.is_contiguous() && (!z || z->is_contiguous()), "contiguous weights");
  TORCH_CHECK(codes.numel() == N * x_in.size(1) / 32 * (block_bytes / 16), "codes do not match the shapes");
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = bf16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  // Reused between calls (no allocation per call). The lambdas capture the reference `a`: naming the
  // thread_local itself in them would give each worker thread its own, empty, copy.
  static thread_local Acts storage;
  Acts& a = storage;
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* zp = z ? z->data_ptr<at::Half>() : nullptr;
  if (bf16) {
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, a);
    run_blocks<IS_Q4>(a, c, dp, zp, M, N, K, block_bytes, y.data_ptr<at::BFloat16>());
  } else {
    quantize_rows(x.data_ptr<float>(), M, K, a);
    run_blocks<IS_Q4>(a, c, dp, zp, M, N, K, block_bytes, y.data_ptr<float>());
  }
  return (bf16 || x_in.scalar_type() == at::kFloat) ? y : y.to(x_in.scalar_type());
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& z,
                 int64_t N) {
  return matmul<true>(x, codes, d, &z, N, 256);
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d, int64_t N) {
  return matmul<false>(x, codes, d, nullptr, N, 512);
}

// ---- bf16 weights (avx512_bf16) ----------------------------------------------------------------------------

// bf16 weights packed [N/16][K/2][16][2]: chunk kk of a block holds inputs 2kk and 2kk+1 of its 16 rows, and
// vdpbf16ps multiplies such pairs by one broadcast pair of activations, accumulating in fp32. MR activation
// rows share each load of weights; KCH independent accumulators per row (summed at the end) hide the
// instruction's latency when there is only one row.
template <int MR, int KCH>
inline void bf16_tile(const uint16_t* w, const uint16_t* x, int64_t K, __m512* out) {
  __m512 acc[MR][KCH];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < KCH; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K / 2; kk += KCH) {
    for (int c = 0; c < KCH; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (kk + c) * 32);
      for (int m = 0; m < MR; ++m) {
        int32_t pair; std::memcpy(&pair, x + m * K + 2 * (kk + c), 4);
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], wv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    out[m] = acc[m][0];
    for (int c = 1; c < KCH; ++c) out[m] = _mm512_add_ps(out[m], acc[m][c]);
  }
}

at::Tensor bf16_mm(const at::Tensor& x_in, const at::Tensor& w_packed, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 8 == 0 && N % 16 == 0, "smollm2 bf16_mm: bad shapes");
  TORCH_CHECK(w_packed.is_contiguous() && w_packed.numel() == N * x_in.size(1), "bf16_mm: weights do not match");
  const at::Tensor x = x_in.to(at::kBFloat16).contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = N / 16;
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w_packed.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t grain = std::max<int64_t>(1, 65536 / (16 * K * 2) / std::max<int64_t>(1, M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    __m512 acc[4];
    for (int64_t rb = b0; rb < b1; ++rb) {
      const uint16_t* w = wp + rb * 16 * K;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        bf16_tile<4, 1>(w, xp + m * K, K, acc);
        for (int r = 0; r < 4; ++r) store16(yp + (m + r) * N + rb * 16, acc[r]);
      }
      for (; m < M; ++m) {
        bf16_tile<1, 4>(w, xp + m * K, K, acc);
        store16(yp + m * N + rb * 16, acc[0]);
      }
    }
  });
  return x_in.scalar_type() == at::kBFloat16 ? y : y.to(x_in.scalar_type());
}

// ---- attention for one new token per row (decode) -------------------------------------------------------

// e^x for x <= 0 (a score minus its row's maximum) to ~1e-7 relative: x = n ln2 + r with |r| <= ln2 / 2,
// e^r by its Taylor polynomial to r^6, times 2^n.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2 in two parts: hi exact in fp32...
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);      // ...and the rest
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Lane j of the result = the sum of v[j]'s 16 lanes: 16 horizontal sums in 45 instructions instead of ~130.
inline __m512 sum16(const __m512 v[16]) {
  __m512 u[4];
  for (int i = 0; i < 4; ++i) {
    __m512d t[2];
    for (int h = 0; h < 2; ++h) {  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a, b = v[4i+2h], v[4i+2h+1]
      const __m512 a = v[4 * i + 2 * h], b = v[4 * i + 2 * h + 1];
      t[h] = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)));
    }
    // per 128-bit lane: the partial sums of v[4i .. 4i+3]
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(t[0], t[1])),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(t[0], t[1])));
  }
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

constexpr int64_t CHUNK = 64;  // cache positions per task

// One chunk of positions [s0, s1) of one KV head against its R query heads q (R x DV*16, fp32, pre-scaled):
// the chunk's softmax statistics (max m, sum l of e^(score - m); m = -inf if all masked) and its
// e^(score - m)-weighted sum of V rows o (R x DV*16).
template <int R, int DV, typename T>
void attend_chunk(const float* q, const T* k, const T* v, int64_t k_stride, int64_t v_stride, const bool* valid,
                  int64_t s0, int64_t s1, float* m, float* l, float* o) {
  alignas(64) float weights[R][CHUNK];
  const int64_t n = s1 - s0;
  __m512 qv[R][DV], mx[R];
  for (int r = 0; r < R; ++r) {
    for (int d = 0; d < DV; ++d) qv[r][d] = _mm512_loadu_ps(q + (r * DV + d) * 16);
    mx[r] = _mm512_set1_ps(-INFINITY);
  }
  for (int64_t j = 0; j < n; j += 16) {  // scores, 16 positions at a time
    const int64_t cnt = std::min<int64_t>(16, n - j);
    const __mmask16 live = _cvtu32_mask16(cnt == 16 ? 0xFFFF : (1u << cnt) - 1);
    const __mmask16 keep =
        _mm_mask_cmpneq_epi8_mask(live, _mm_maskz_loadu_epi8(live, valid + s0 + j), _mm_setzero_si128());
    __m512 partial[R][16];  // per query head and position: 16 lanes of products, summed by sum16 below
    for (int64_t p = 0; p < 16; ++p) {
      if (p >= cnt) {
        for (int r = 0; r < R; ++r) partial[r][p] = _mm512_setzero_ps();
        continue;
      }
      const T* kr = k + (s0 + j + p) * k_stride;
      const T* vr = v + (s0 + j + p) * v_stride;
      const char* ahead = reinterpret_cast<const char*>(kr + 16 * k_stride);  // the key row 16 positions on
      for (int64_t b = 0; b < DV * 16 * static_cast<int64_t>(sizeof(T)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(vr) + b, _MM_HINT_T0);  // needed after the scores
        if (j + p + 16 < n) _mm_prefetch(ahead + b, _MM_HINT_T0);
      }
      __m512 kv[DV];  // the key row, loaded (and widened from bf16) once for all R query heads
      for (int d = 0; d < DV; ++d) kv[d] = load16f(kr + d * 16);
      for (int r = 0; r < R; ++r) {
        __m512 acc = _mm512_mul_ps(qv[r][0], kv[0]);
        for (int d = 1; d < DV; ++d) acc = _mm512_fmadd_ps(qv[r][d], kv[d], acc);
        partial[r][p] = acc;
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sc = _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), sum16(partial[r]));
      _mm512_store_ps(weights[r] + j, sc);
      mx[r] = _mm512_max_ps(mx[r], sc);
    }
  }
  for (int r = 0; r < R; ++r) {  // scores -> e^(score - m), exactly 0 where masked
    m[r] = _mm512_reduce_max_ps(mx[r]);
    const __m512 mr = _mm512_set1_ps(m[r] == -INFINITY ? 0.f : m[r]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __m512 sc = _mm512_load_ps(weights[r] + j);
      const __mmask16 finite = _mm512_cmp_ps_mask(sc, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(finite, exp_nonpositive(_mm512_sub_ps(sc, mr)));
      _mm512_store_ps(weights[r] + j, e);
      sum = _mm512_add_ps(sum, e);  // (lanes past n hold -inf, hence 0)
    }
    l[r] = _mm512_reduce_add_ps(sum);
  }
  __m512 out[R][DV];
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < DV; ++d) out[r][d] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (!valid[s0 + j]) continue;  // (a masked position's cache row may hold anything)
    const T* vr = v + (s0 + j) * v_stride;
    for (int d = 0; d < DV; ++d) {
      const __m512 vv = load16f(vr + d * 16);
      for (int r = 0; r < R; ++r) out[r][d] = _mm512_fmadd_ps(_mm512_set1_ps(weights[r][j]), vv, out[r][d]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < DV; ++d) _mm512_storeu_ps(o + (r * DV + d) * 16, out[r][d]);
}

// y = W x for W (N, K) float32 as nn.Linear stores it (row-major) and one row x (K): 16 rows at a time, each
// with its own accumulator over the K/16 vectors of its row, summed across lanes by sum16. The next block's
// rows are prefetched while this one computes.
at::Tensor f32_mv(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == 1 && w.dim() == 2 && x_in.size(1) == w.size(1),
              "f32_mv: x (1, K) and w (N, K)");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "f32_mv: float32");
  TORCH_CHECK(w.size(0) % 16 == 0 && w.size(1) % 16 == 0 && w.stride(1) == 1 && w.stride(0) == w.size(1),
              "f32_mv: N and K multiples of 16, w contiguous");
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor x = x_in.contiguous();  // (a (1, K) view is contiguous whatever its first stride)
  at::Tensor y = at::empty({1, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / (16 * K * 4));
  at::parallel_for(0, N / 16, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* rows = wp + b * 16 * K;
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 xv = _mm512_loadu_ps(xp + k);
        for (int r = 0; r < 16; ++r) {
          acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows + r * K + k), xv, acc[r]);
        }
      }
      _mm512_storeu_ps(yp + b * 16, sum16(acc));
    }
  });
  return y;
}

// softmax(q k^T / sqrt(D) + mask) v for q (B, H, 1, D) against k, v (B, Hkv, L, D) (views of a KV cache: any
// strides with contiguous rows), valid (B, L) bool. Query head h reads KV head h / R (R = H / Hkv), as SDPA's
// enable_gqa does. Parallel over (row, KV head, chunk of 64 positions); the chunks' partial softmaxes are then
// merged (flash-decoding), so that both cores read the cache even for one row and 3 KV heads.
template <int R, int DV, typename T>
at::Tensor decode_attention_impl(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& valid_in) {
  constexpr int64_t D = DV * 16;
  const int64_t B = q_in.size(0), H = q_in.size(1), Hkv = k.size(1), L = k.size(2);
  const int64_t chunks = (L + CHUNK - 1) / CHUNK, parts = B * H * chunks;
  const at::Tensor q = q_in.contiguous(), valid = valid_in.contiguous();
  static thread_local std::vector<float> storage;  // per chunk and query head: m, l, then o (D)
  std::vector<float>& part = storage;  // (captured by reference: see matmul)
  part.resize(parts * (D + 2));
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* mp = valid.data_ptr<bool>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float qs[R * D];
    float m[R], l[R], o[R * D];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chunks, h = (t / chunks) % Hkv, b = t / chunks / Hkv;
      const int64_t head0 = b * H + h * R;  // this KV head's first query head, as a row of q
      for (int64_t i = 0; i < R * D; i += 16)
        _mm512_store_ps(qs + i, _mm512_mul_ps(load16f(qp + head0 * D + i), _mm512_set1_ps(scale)));
      attend_chunk<R, DV>(qs, kp + b * k.stride(0) + h * k.stride(1), vp + b * v.stride(0) + h * v.stride(1),
                          k.stride(2), v.stride(2), mp + b * L, c * CHUNK, std::min(L, (c + 1) * CHUNK), m, l, o);
      for (int r = 0; r < R; ++r) {
        float* dst = part.data() + ((head0 + r) * chunks + c) * (D + 2);
        dst[0] = m[r]; dst[1] = l[r];
        std::memcpy(dst + 2, o + r * D, D * sizeof(float));
      }
    }
  });
  at::Tensor y = at::empty({B, H, 1, D}, q_in.options());
  T* yp = y.data_ptr<T>();
  for (int64_t bh = 0; bh < B * H; ++bh) {  // merge the chunks, each rescaled to the overall max
    const float* first = part.data() + bh * chunks * (D + 2);
    float mx = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, first[c * (D + 2)]);
    float total = 0.f;
    __m512 acc[DV];
    for (int d = 0; d < DV; ++d) acc[d] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = first + c * (D + 2);
      if (p[0] == -INFINITY) continue;  // every position of the chunk masked
      const float w = std::exp(p[0] - mx);
      total += w * p[1];
      for (int d = 0; d < DV; ++d) acc[d] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(p + 2 + d * 16), acc[d]);
    }
    const __m512 inv = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);
    for (int d = 0; d < DV; ++d) store16(yp + bh * D + d * 16, _mm512_mul_ps(acc[d], inv));
  }
  return y;
}

template <typename T>
at::Tensor decode_attention_dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& valid) {
  const int64_t R = q.size(1) / k.size(1), D = q.size(3);
#define SMOLLM2_CASE(r, dv) if (R == r && D == dv * 16) return decode_attention_impl<r, dv, T>(q, k, v, valid);
  SMOLLM2_CASE(1, 4) SMOLLM2_CASE(2, 4) SMOLLM2_CASE(3, 4) SMOLLM2_CASE(4, 4)
  SMOLLM2_CASE(1, 8) SMOLLM2_CASE(2, 8) SMOLLM2_CASE(3, 8) SMOLLM2_CASE(4, 8)
#undef SMOLLM2_CASE
  TORCH_CHECK(false, "decode_attention: head_dim 64 or 128 and 1 to 4 query heads per KV head only");
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "decode_attention: q (B, H, 1, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
              "decode_attention: k, v (B, Hkv, L, D) with H a multiple of Hkv");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: contiguous cache rows");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == q.size(0) &&
              valid.size(1) == k.size(2), "decode_attention: valid (B, L) bool");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "decode_attention: one dtype");
  if (q.scalar_type() == at::kBFloat16) return decode_attention_dispatch<at::BFloat16>(q, k, v, valid);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "decode_attention: float32 or bfloat16");
  return decode_attention_dispatch<float>(q, k, v, valid);
}

}  // namespace

TORCH_LIBRARY(smollm2, m) {
  m.def("q4_mm(Tensor x, Tensor codes, Tensor d, Tensor z, int N) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor codes, Tensor d, int N) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor w, int N) -> Tensor");
  m.def("f32_mv(Tensor x, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor valid) -> Tensor");
}

TORCH_LIBRARY_IMPL(smollm2, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
  m.impl("bf16_mm", &bf16_mm);
  m.impl("f32_mv", &f32_mv);
  m.impl("decode_attention", &decode_attention);
}
"""

_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mf16c", "-mfma",
          # at::parallel_for is inline OpenMP: without -fopenmp it runs on one thread while torch's other
          # OpenMP thread spins idle (10x slower here). At run time the libgomp.so.1 torch loaded is reused.
          "-fopenmp"]


def cpu_supported() -> bool:
    """AVX-512 with VNNI (x86-64 Ice Lake / Zen 4 and later), read from /proc/cpuinfo."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"} <= _cpu_flags()


@cache
def _cpu_flags() -> set[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split()[2:])  # after "flags" and ":"


def bf16_supported() -> bool:
    """Whether bf16_mm runs here: the kernels are loaded and the CPU has AVX-512 BF16 (vdpbf16ps)."""
    return available() and "avx512_bf16" in _cpu_flags()


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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if not cpu_supported():
        print("this CPU has no AVX-512 VNNI: the kernels are not built; torch's kernels are used instead")
    elif _load():
        print(f"built {NAME} in {build_dir()}")
    else:
        raise SystemExit("building the smollm2 kernels failed (see the warning above); torch's kernels are used")
