// AVX2 version of decode_attention.cpp: the attention of one new token per row over the KV cache, fp32 or
// bf16, grouped-query heads, a boolean mask, the cache split into chunks of 64 positions whose softmaxes are
// merged (flash-decoding). The same maths and the same chunks; 8 lanes instead of 16, masks as vectors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd_avx2.h"

namespace smollm2 {
namespace avx2 {
namespace {

// e^x for x <= 0 to ~1e-7 relative, as decode_attention.cpp's: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// Taylor polynomial to r^6, times 2^n built in the exponent field. x is clamped to -87 (not -88), so that
// n >= -126 and 2^n is a normal float; e^-87 ~ 2e-38 is nothing next to the row's maximum's e^0 = 1.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 in two parts: hi exact in fp32...
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);      // ...and the rest
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

constexpr int64_t CHUNK = 64;  // cache positions per task, as in decode_attention.cpp

// One chunk of n <= CHUNK unmasked positions of one KV head, at cache columns cols[0..n), against its R query
// heads q (R x DV*8, fp32, pre-scaled): the chunk's max m, sum l of e^(score - m) and e^(score - m)-weighted
// V rows o.
template <int R, int DV, typename T>
void attend_chunk(const float* q, const T* k, const T* v, int64_t k_stride, int64_t v_stride, const int64_t* cols,
                  int64_t n, float* m, float* l, float* o) {
  constexpr int64_t D = DV * 8;
  alignas(32) float weights[R][CHUNK];
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  __m256 mx[R];
  for (int r = 0; r < R; ++r) mx[r] = minus_inf;
  for (int64_t j = 0; j < n; j += 8) {  // scores, 8 positions at a time
    const int64_t cnt = std::min<int64_t>(8, n - j);
    alignas(32) int32_t keep_bits[8];
    for (int64_t p = 0; p < 8; ++p) keep_bits[p] = p < cnt ? -1 : 0;
    const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(keep_bits)));
    __m256 partial[R][8];  // per query head and position: 8 lanes of products, summed by sum8 below
    for (int64_t p = 0; p < 8; ++p) {
      if (p >= cnt) {
        for (int r = 0; r < R; ++r) partial[r][p] = _mm256_setzero_ps();
        continue;
      }
      const T* kr = k + cols[j + p] * k_stride;
      const T* vr = v + cols[j + p] * v_stride;
      const char* ahead = j + p + 8 < n ? reinterpret_cast<const char*>(k + cols[j + p + 8] * k_stride)
                                        : nullptr;  // the key row 8 positions on
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(vr) + b, _MM_HINT_T0);  // needed after the scores
        if (ahead != nullptr) _mm_prefetch(ahead + b, _MM_HINT_T0);
      }
      __m256 kv[DV];  // the key row, loaded (and widened from bf16) once for all R query heads
      for (int d = 0; d < DV; ++d) kv[d] = load8f(kr + d * 8);
      for (int r = 0; r < R; ++r) {
        __m256 acc = _mm256_mul_ps(_mm256_load_ps(q + r * D), kv[0]);
        for (int d = 1; d < DV; ++d) acc = _mm256_fmadd_ps(_mm256_load_ps(q + r * D + d * 8), kv[d], acc);
        partial[r][p] = acc;
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 sc = _mm256_blendv_ps(minus_inf, sum8(partial[r]), keep);
      _mm256_store_ps(weights[r] + j, sc);
      mx[r] = _mm256_max_ps(mx[r], sc);
    }
  }
  for (int r = 0; r < R; ++r) {  // scores -> e^(score - m), exactly 0 in the lanes past n
    m[r] = hmax(mx[r]);
    const __m256 mr = _mm256_set1_ps(m[r] == -INFINITY ? 0.f : m[r]);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 sc = _mm256_load_ps(weights[r] + j);
      const __m256 finite = _mm256_cmp_ps(sc, minus_inf, _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(finite, exp_nonpositive(_mm256_sub_ps(sc, mr)));
      _mm256_store_ps(weights[r] + j, e);
      sum = _mm256_add_ps(sum, e);  // (lanes past n hold -inf, hence 0)
    }
    l[r] = hsum(sum);
  }
  // The weighted V rows, DB vectors of the head at a time (16 ymm registers: R x DB accumulators)
  constexpr int DB = R <= 2 ? 4 : 2;
  for (int d0 = 0; d0 < DV; d0 += DB) {
    __m256 out[R][DB];
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < DB; ++d) out[r][d] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vr = v + cols[j] * v_stride + d0 * 8;
      for (int d = 0; d < DB; ++d) {
        const __m256 vv = load8f(vr + d * 8);
        for (int r = 0; r < R; ++r) out[r][d] = _mm256_fmadd_ps(_mm256_set1_ps(weights[r][j]), vv, out[r][d]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < DB; ++d) _mm256_storeu_ps(o + r * D + (d0 + d) * 8, out[r][d]);
  }
}

// softmax(q k^T / sqrt(D) + mask) v for q (B, H, 1, D) against k, v (B, Hkv, L, D), valid (B, L) bool; see
// decode_attention.cpp, whose parallel split and merge this repeats.
template <int R, int DV, typename T>
at::Tensor decode_attention_impl(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& valid_in) {
  constexpr int64_t D = DV * 8;
  const int64_t B = q_in.size(0), H = q_in.size(1), Hkv = k.size(1), L = k.size(2);
  const int64_t chunks = (L + CHUNK - 1) / CHUNK, parts = B * H * chunks;
  const at::Tensor q = q_in.contiguous(), valid = valid_in.contiguous();
  static thread_local std::vector<float> storage;  // per chunk and query head: m, l, then o (D)
  std::vector<float>& part = storage;  // (captured by reference: see matmul in matmul.cpp)
  part.resize(parts * (D + 2));
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* mp = valid.data_ptr<bool>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  // Each row's chunks are runs of 64 of its unmasked positions, in order (cols: their columns), not of 64
  // columns: a row's result then depends only on its own tokens, bit for bit, not on where they sit in the
  // cache (the engine's rows start at different columns and may have unused columns between their prompt and
  // their new tokens) nor on the left padding of a batch. Masked positions are never read.
  std::vector<int64_t> cols(B * L), count(B, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L; ++s)
      if (mp[b * L + s]) cols[b * L + count[b]++] = s;
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) float qs[R * D];
    float m[R], l[R], o[R * D];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chunks, h = (t / chunks) % Hkv, b = t / chunks / Hkv;
      const int64_t head0 = b * H + h * R;  // this KV head's first query head, as a row of q
      const int64_t s0 = c * CHUNK;  // the chunk's first position among the row's unmasked ones
      if (s0 >= count[b]) {  // past the row's last one: an empty chunk, skipped by the merge
        for (int r = 0; r < R; ++r) part[((head0 + r) * chunks + c) * (D + 2)] = -INFINITY;
        continue;
      }
      for (int64_t i = 0; i < R * D; i += 8)
        _mm256_store_ps(qs + i, _mm256_mul_ps(load8f(qp + head0 * D + i), _mm256_set1_ps(scale)));
      attend_chunk<R, DV>(qs, kp + b * k.stride(0) + h * k.stride(1), vp + b * v.stride(0) + h * v.stride(1),
                          k.stride(2), v.stride(2), cols.data() + b * L + s0,
                          std::min(CHUNK, count[b] - s0), m, l, o);
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
    __m256 acc[DV];
    for (int d = 0; d < DV; ++d) acc[d] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = first + c * (D + 2);
      if (p[0] == -INFINITY) continue;  // every position of the chunk masked
      const float w = std::exp(p[0] - mx);
      total += w * p[1];
      for (int d = 0; d < DV; ++d) acc[d] = _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(p + 2 + d * 8), acc[d]);
    }
    const __m256 inv = _mm256_set1_ps(total > 0.f ? 1.f / total : 0.f);
    for (int d = 0; d < DV; ++d) store8(yp + bh * D + d * 8, _mm256_mul_ps(acc[d], inv));
  }
  return y;
}

template <typename T>
at::Tensor decode_attention_dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& valid) {
  const int64_t R = q.size(1) / k.size(1), D = q.size(3);
#define SMOLLM2_CASE(r, dv) if (R == r && D == dv * 8) return decode_attention_impl<r, dv, T>(q, k, v, valid);
  SMOLLM2_CASE(1, 8) SMOLLM2_CASE(2, 8) SMOLLM2_CASE(3, 8) SMOLLM2_CASE(4, 8)
  SMOLLM2_CASE(1, 16) SMOLLM2_CASE(2, 16) SMOLLM2_CASE(3, 16) SMOLLM2_CASE(4, 16)
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
}  // namespace avx2
}  // namespace smollm2

TORCH_LIBRARY_IMPL(smollm2, CPU, m) {
  m.impl("decode_attention", &smollm2::avx2::decode_attention);
}
