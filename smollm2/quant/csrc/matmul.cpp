// Matrix products: q4_mm / q8_mm (quantised weights, int8 activations, AVX-512 VNNI), bf16_mm (AVX-512 BF16)
// and f32_mv (float32 weights, one row). The formats and the maths are described in smollm2/quant/kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

namespace smollm2 {
namespace {

// Activations quantised per group of 32: xq int8, and per (row, group) the scale, the sum of xq and the exact
// sum of x. Rows are M rows of K inputs (G = K / 32 groups each).
struct Acts {
  std::vector<int8_t> xq;
  std::vector<float> scale, sum_x;
  std::vector<int32_t> sum_q;
};

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

// y = W x for W (N, K) float32 as nn.Linear stores it (row-major) and one row x (K): 16 rows at a time, each
// with its own accumulator over the K/16 vectors of its row, summed across lanes by sum16.
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

}  // namespace
}  // namespace smollm2

TORCH_LIBRARY_IMPL(smollm2, CPU, m) {
  m.impl("q4_mm", &smollm2::q4_mm);
  m.impl("q8_mm", &smollm2::q8_mm);
  m.impl("bf16_mm", &smollm2::bf16_mm);
  m.impl("f32_mv", &smollm2::f32_mv);
}
