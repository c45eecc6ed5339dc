// AVX-512 helpers shared by smollm2's kernels (matmul.cpp, decode_attention.cpp): 16 floats at a time to and
// from fp32 or bf16 memory, and 16 horizontal sums at once.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace smollm2 {

inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16f(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(at::BFloat16* dst, __m512 v) {  // round to nearest even, as torch does
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
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

}  // namespace smollm2
