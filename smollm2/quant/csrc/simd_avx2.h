// AVX2 helpers shared by smollm2's AVX2 kernels (matmul_avx2.cpp, decode_attention_avx2.cpp): 8 floats at a
// time to and from fp32, bf16 or fp16 memory, horizontal reductions, and 8 horizontal sums at once. Compiled
// with -mavx2 -mfma -mf16c only (no AVX-512), for the CPUs the AVX-512 kernels (simd.h) do not run on.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace smollm2 {
namespace avx2 {

inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8f(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline __m256 load8h(const at::Half* p) {  // 8 fp16 values to fp32 (F16C)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

inline void store8(at::BFloat16* dst, __m256 v) {  // round to nearest even, as torch (and simd.h) do
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // 8 x 32-bit -> 8 x 16-bit: packus per 128-bit lane (values fit: 0..0xFFFF), then the two lanes' low halves
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// Lane j of the result = the sum of v[j]'s 8 lanes.
inline __m256 sum8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // per 128-bit half
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

}  // namespace avx2
}  // namespace smollm2
