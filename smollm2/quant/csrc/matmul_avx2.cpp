// AVX2 versions of matmul.cpp's q4_mm, q8_mm and f32_mv, for x86-64 CPUs without AVX-512 (AMD Zen 2/3, Intel
// before Ice Lake and the client chips since Alder Lake). The same packed weights and the same maths: the
// activations quantised per group of 32 exactly as matmul.cpp does (the same int8 values, scales and sums),
// the same integer dot products, the same fp32 combination per group; only float sums (sum x, f32_mv) are
// added in another order. The formats are described in smollm2/quant/kernels.py.
//
// Without vpdpbusd, a dot product of 4 unsigned by 4 signed bytes per 32-bit lane is vpmaddubsw (u8 x s8,
// adjacent pairs summed into int16, saturating) then vpmaddwd by ones (pairs of int16 into int32). The int16
// pairs must never saturate, which the operands' ranges ensure:
//   q4  codes 0..15 times activations -127..127 (quantised to +-127, never -128): a pair is at most
//       2 * 15 * 127 = 3810, so even the 8 pairs of a group's 4 chunks x 2 nibbles summed in int16 stay
//       within 30480 < 32767; one vpmaddwd per group and row then widens them.
//   q8  the bytes hold code + 128 (0..255), whose pairs with +-127 could reach 64770. So the signed codes
//       (byte ^ 0x80, -128..127) are used instead: |code| (vpabsb, 0..128 read as unsigned) times the
//       activation with the code's sign (vpsignb; |xq| <= 127, so the negation never overflows), at most
//       2 * 128 * 127 = 32512 per pair, every code -128..127 exact; widened to int32 after each chunk. This
//       gives sum code * xq directly, the integer matmul.cpp computes as sum (code + 128) xq - 128 sum xq.
// Built with -mavxvnni (the "avxvnni" build, for CPUs with AVX-VNNI but no AVX-512 VNNI: Intel's client chips
// since Alder Lake), each vpmaddubsw + vpmaddwd pair is one vpdpbusd instead (VEX-encoded, 256-bit), which sums
// the same four products straight into int32: the same integers, so the same bits, in fewer instructions.
// A 64-byte chunk of the packing holds 16 rows: here its two 32-byte halves (rows 0-7, 8-15) are two ymm
// registers, each lane (4 bytes) still one row's 4 consecutive inputs, so no horizontal sums are needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd_avx2.h"

namespace smollm2 {
namespace avx2 {
namespace {

// Activations quantised per group of 32, as in matmul.cpp: xq int8, and per (row, group) the scale, 8 x the
// sum of xq and the sum of x.
struct Acts {
  std::vector<int8_t> xq;
  std::vector<float> scale, sum_x;
  std::vector<int32_t> sum_q8;  // 8 x the sum of xq (q4's centring)
};

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, Acts& a) {
  const int64_t G = K / 32;
  a.xq.resize(M * K); a.scale.resize(M * G); a.sum_x.resize(M * G); a.sum_q8.resize(M * G);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' per-lane interleave
  at::parallel_for(0, M * G, 2048, [&](int64_t i0, int64_t i1) {  // i = row * G + group
    for (int64_t i = i0; i < i1; ++i) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j) v[j] = load8f(x + i * 32 + 8 * j);
      const float amax = hmax(_mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                            _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask))));
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i q[4];  // round to nearest even (the default rounding mode), as matmul.cpp's cvtps does
      for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
      // int32 -> int8 (|q| <= 127: the packs never saturate); they interleave per 128-bit lane, hence `order`
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&a.xq[i * 32]), _mm256_permutevar8x32_epi32(bytes, order));
      a.scale[i] = amax / 127.f;
      a.sum_x[i] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
      a.sum_q8[i] = 8 * hsum(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    }
  });
}

inline __m256i bcast4(const int8_t* p) {  // 4 int8 activations to every 32-bit lane
  int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v);
}

// One row block's weights made ready for vpmaddubsw, once for all the activation rows of a call (see run_blocks):
// q4, 16 vectors a group: chunk p, half hh -> [low nibbles, high nibbles]; q8, 32 a group: chunk j, half hh ->
// [signed code, |code|].
constexpr int Q4_VECS = 16, Q8_VECS = 32;

inline void unpack_q4(const uint8_t* c, int64_t G, __m256i* u) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < G * 8; ++i, c += 32, u += 2) {  // 8 half-chunks of 32 bytes per group, in order
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
    _mm256_storeu_si256(u, _mm256_and_si256(v, low));
    _mm256_storeu_si256(u + 1, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  }
}

inline void unpack_q8(const uint8_t* c, int64_t G, __m256i* u) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < G * 16; ++i, c += 32, u += 2) {
    const __m256i code = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), flip);
    _mm256_storeu_si256(u, code);
    _mm256_storeu_si256(u + 1, _mm256_abs_epi8(code));
  }
}

// q4: codes [N/16][G][4][64] bytes, d and z [N/16][G][16] fp16; w = d * (q - 8) + z. All 16 rows of one row
// block (two halves of 8 rows) against MR activation rows m0..; acc[m][hh] holds 8 outputs. With PRE the codes
// come unpacked from u (unpack_q4), else straight from c. Each unpacked vector feeds MR rows and each
// broadcast activation both halves.
template <int MR, bool PRE>
inline void q4_tile(const uint8_t* c, const __m256i* u, const at::Half* d, const at::Half* z, const Acts& a,
                    int64_t m0, int64_t K, int64_t G, __m256 (*acc)[2]) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // (the AVX-VNNI build widens without it)
  const int8_t* xq = a.xq.data() + m0 * K;
  for (int m = 0; m < MR; ++m)
    for (int hh = 0; hh < 2; ++hh) acc[m][hh] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, c += 256, u += Q4_VECS) {
    // int16 pair sums (at most 8 x 3810 over the group: see the top of the file), or with AVX-VNNI int32 sums
    __m256i isum[MR][2];
    for (int m = 0; m < MR; ++m)
      for (int hh = 0; hh < 2; ++hh) isum[m][hh] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      __m256i lo[2], hi[2];
      for (int hh = 0; hh < 2; ++hh) {
        if constexpr (PRE) {
          lo[hh] = _mm256_loadu_si256(u + (2 * p + hh) * 2);
          hi[hh] = _mm256_loadu_si256(u + (2 * p + hh) * 2 + 1);
        } else {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + p * 64 + hh * 32));
          lo[hh] = _mm256_and_si256(v, low);
          hi[hh] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        }
      }
      for (int m = 0; m < MR; ++m) {
        const int8_t* x = xq + m * K + g * 32 + 8 * p;
        const __m256i x0 = bcast4(x), x1 = bcast4(x + 4);
        for (int hh = 0; hh < 2; ++hh)
#ifdef __AVXVNNI__
          isum[m][hh] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(isum[m][hh], lo[hh], x0), hi[hh], x1);
#else
          isum[m][hh] = _mm256_add_epi16(isum[m][hh], _mm256_add_epi16(_mm256_maddubs_epi16(lo[hh], x0),
                                                                       _mm256_maddubs_epi16(hi[hh], x1)));
#endif
      }
    }
    for (int hh = 0; hh < 2; ++hh) {
      const __m256 dg = load8h(d + g * 16 + hh * 8), zg = load8h(z + g * 16 + hh * 8);
      for (int m = 0; m < MR; ++m) {
        const int64_t i = (m0 + m) * G + g;
        // sum (q - 8) xq = sum q xq - 8 sum xq, exactly, as in matmul.cpp
#ifdef __AVXVNNI__
        const __m256i sum_q_xq = isum[m][hh];
#else
        const __m256i sum_q_xq = _mm256_madd_epi16(isum[m][hh], ones);
#endif
        const __m256i centred = _mm256_sub_epi32(sum_q_xq, _mm256_set1_epi32(a.sum_q8[i]));
        acc[m][hh] = _mm256_fmadd_ps(_mm256_mul_ps(dg, _mm256_set1_ps(a.scale[i])), _mm256_cvtepi32_ps(centred),
                                     acc[m][hh]);
        acc[m][hh] = _mm256_fmadd_ps(zg, _mm256_set1_ps(a.sum_x[i]), acc[m][hh]);
      }
    }
  }
}

// q8: codes [N/16][G][8][64] bytes (code + 128), d [N/16][G][16] fp16 (llama.cpp's Q8_0: w = d * code).
template <int MR, bool PRE>
inline void q8_tile(const uint8_t* c, const __m256i* u, const at::Half* d, const Acts& a, int64_t m0, int64_t K,
                    int64_t G, __m256 (*acc)[2]) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // (the AVX-VNNI build widens without it)
  const int8_t* xq = a.xq.data() + m0 * K;
  for (int m = 0; m < MR; ++m)
    for (int hh = 0; hh < 2; ++hh) acc[m][hh] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g, c += 512, u += Q8_VECS) {
    __m256i s32[MR][2];
    for (int m = 0; m < MR; ++m)
      for (int hh = 0; hh < 2; ++hh) s32[m][hh] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256i code[2], mag[2];  // the signed code, -128..127, and |code|, 0..128 read as unsigned by maddubs
      for (int hh = 0; hh < 2; ++hh) {
        if constexpr (PRE) {
          code[hh] = _mm256_loadu_si256(u + (2 * j + hh) * 2);
          mag[hh] = _mm256_loadu_si256(u + (2 * j + hh) * 2 + 1);
        } else {
          code[hh] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j * 64 + hh * 32)),
                                      flip);
          mag[hh] = _mm256_abs_epi8(code[hh]);
        }
      }
      for (int m = 0; m < MR; ++m) {
        const __m256i x = bcast4(xq + m * K + g * 32 + 4 * j);
        for (int hh = 0; hh < 2; ++hh) {
          const __m256i signed_x = _mm256_sign_epi8(x, code[hh]);  // 0 where code is
#ifdef __AVXVNNI__
          s32[m][hh] = _mm256_dpbusd_avx_epi32(s32[m][hh], mag[hh], signed_x);  // the same sums, unsaturated
#else
          s32[m][hh] = _mm256_add_epi32(s32[m][hh], _mm256_madd_epi16(_mm256_maddubs_epi16(mag[hh], signed_x), ones));
#endif
        }
      }
    }
    for (int hh = 0; hh < 2; ++hh) {
      const __m256 dg = load8h(d + g * 16 + hh * 8);
      for (int m = 0; m < MR; ++m) {
        const int64_t i = (m0 + m) * G + g;
        acc[m][hh] = _mm256_fmadd_ps(_mm256_mul_ps(dg, _mm256_set1_ps(a.scale[i])), _mm256_cvtepi32_ps(s32[m][hh]),
                                     acc[m][hh]);
      }
    }
  }
}

constexpr int MR = 4;  // activation rows per tile: 8 int16/int32 accumulators, 4 weight vectors, 2 broadcasts

// One tile of R rows (1..MR) at m, its outputs stored: R is a template argument, so each case is unrolled.
template <bool IS_Q4, bool PRE, int R, typename Out>
inline void tile(const uint8_t* c, const __m256i* u, const at::Half* d, const at::Half* z, const Acts& a,
                 int64_t m, int64_t N, int64_t K, int64_t G, int64_t rb, Out* y) {
  __m256 acc[R][2];
  if constexpr (IS_Q4) q4_tile<R, PRE>(c, u, d, z, a, m, K, G, acc); else q8_tile<R, PRE>(c, u, d, a, m, K, G, acc);
  for (int r = 0; r < R; ++r)
    for (int hh = 0; hh < 2; ++hh) store8(y + (m + r) * N + rb * 16 + hh * 8, acc[r][hh]);
}

template <bool IS_Q4, bool PRE, typename Out>
inline void rows(int64_t R, const uint8_t* c, const __m256i* u, const at::Half* d, const at::Half* z,
                 const Acts& a, int64_t m, int64_t N, int64_t K, int64_t G, int64_t rb, Out* y) {
  switch (R) {
    case 1: tile<IS_Q4, PRE, 1>(c, u, d, z, a, m, N, K, G, rb, y); break;
    case 2: tile<IS_Q4, PRE, 2>(c, u, d, z, a, m, N, K, G, rb, y); break;
    case 3: tile<IS_Q4, PRE, 3>(c, u, d, z, a, m, N, K, G, rb, y); break;
    default: tile<IS_Q4, PRE, MR>(c, u, d, z, a, m, N, K, G, rb, y); break;
  }
}

// y = x @ W.T, parallel over row blocks as in matmul.cpp: each thread owns a range of 16-row blocks and runs
// every activation row through a block before the next, so a call reads each weight from memory once, for
// all its rows (a decode step of a batch, a prefill): the block (4.5 KiB of q4 codes at K = 576, 12 KiB at
// 1536) stays in L1 while the row tiles go over it. With more than 2 tiles of rows the block's codes are first
// unpacked once into a per-thread buffer (twice their bytes: 9 / 24 KiB) that every tile then reads; with
// fewer (a decode step of up to 8 rows) each tile unpacks as it goes. Every row's result comes from the
// same integer sums and the same float operations in the same order (per group, groups in order) whichever
// tile it falls in and whether or not its block was unpacked first, so a row's output does not depend on M.
template <bool IS_Q4, typename Out>
void run_blocks(const Acts& a, const uint8_t* codes, const at::Half* d, const at::Half* z, int64_t M, int64_t N,
                int64_t K, int64_t block_bytes, Out* y) {
  const int64_t G = K / 32, blocks = N / 16;
  const int64_t grain = std::max<int64_t>(1, 65536 / (G * block_bytes) / std::max<int64_t>(1, M));
  const bool pre = M > 2 * MR;  // 3 tiles or more: unpacking first pays (measured: at 5-8 rows it does not)
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    static thread_local std::vector<__m256i> buffer;  // this thread's unpacked block (reused between calls)
    if (pre) buffer.resize(G * (IS_Q4 ? Q4_VECS : Q8_VECS));
    __m256i* u = buffer.data();
    for (int64_t rb = b0; rb < b1; ++rb) {
      const uint8_t* c = codes + rb * G * block_bytes;
      const at::Half* dd = d + rb * G * 16;
      const at::Half* zz = z ? z + rb * G * 16 : nullptr;
      if (!pre) {
        for (int64_t m = 0; m < M; m += MR)
          rows<IS_Q4, false>(std::min<int64_t>(MR, M - m), c, nullptr, dd, zz, a, m, N, K, G, rb, y);
        continue;
      }
      if constexpr (IS_Q4) unpack_q4(c, G, u); else unpack_q8(c, G, u);
      for (int64_t m = 0; m < M; m += MR)
        rows<IS_Q4, true>(std::min<int64_t>(MR, M - m), c, u, dd, zz, a, m, N, K, G, rb, y);
    }
  });
}

template <bool IS_Q4>
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& d, const at::Tensor* z,
                  int64_t N, int64_t block_bytes) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0 && N % 16 == 0, "smollm2 avx2 kernel: bad shapes");
  TORCH_CHECK(codes.is_contiguous() && d.is_contiguous() && (!z || z->is_contiguous()), "contiguous weights");
  TORCH_CHECK(codes.numel() == N * x_in.size(1) / 32 * (block_bytes / 16), "codes do not match the shapes");
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = bf16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  static thread_local Acts storage;  // reused between calls; captured by reference (see matmul.cpp)
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

// No bf16 dot product in AVX2: quantize.py keeps plain bf16 linears here (kernels.bf16_supported() is False).
at::Tensor bf16_mm(const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "smollm2 bf16_mm needs AVX-512 BF16; the AVX2 kernels loaded here have none");
}

// y = W x for W (N, K) float32 row-major and one row x (K): 8 rows at a time, one accumulator each over the
// row's K/8 vectors, summed across lanes by sum8.
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
  const int64_t grain = std::max<int64_t>(1, 65536 / (8 * K * 4));
  at::parallel_for(0, N / 8, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* rows = wp + b * 8 * K;
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(xp + k);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + r * K + k), xv, acc[r]);
      }
      _mm256_storeu_ps(yp + b * 8, sum8(acc));
    }
  });
  return y;
}

}  // namespace
}  // namespace avx2
}  // namespace smollm2

TORCH_LIBRARY_IMPL(smollm2, CPU, m) {
  m.impl("q4_mm", &smollm2::avx2::q4_mm);
  m.impl("q8_mm", &smollm2::avx2::q8_mm);
  m.impl("bf16_mm", &smollm2::avx2::bf16_mm);
  m.impl("f32_mv", &smollm2::avx2::f32_mv);
}
