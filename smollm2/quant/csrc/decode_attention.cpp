// Attention of one new token per row over the KV cache (decode_attention): fp32 or bf16, grouped-query heads,
// a boolean mask, the cache split into chunks of 64 positions whose softmaxes are merged (flash-decoding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

namespace smollm2 {
namespace {

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

constexpr int64_t CHUNK = 64;  // cache positions per task

// One chunk of n <= CHUNK unmasked positions of one KV head, at cache columns cols[0..n), against its R query
// heads q (R x DV*16, fp32, pre-scaled): the chunk's softmax statistics (max m, sum l of e^(score - m)) and
// its e^(score - m)-weighted sum of V rows o (R x DV*16).
template <int R, int DV, typename T>
void attend_chunk(const float* q, const T* k, const T* v, int64_t k_stride, int64_t v_stride, const int64_t* cols,
                  int64_t n, float* m, float* l, float* o) {
  alignas(64) float weights[R][CHUNK];
  __m512 qv[R][DV], mx[R];
  for (int r = 0; r < R; ++r) {
    for (int d = 0; d < DV; ++d) qv[r][d] = _mm512_loadu_ps(q + (r * DV + d) * 16);
    mx[r] = _mm512_set1_ps(-INFINITY);
  }
  for (int64_t j = 0; j < n; j += 16) {  // scores, 16 positions at a time
    const int64_t cnt = std::min<int64_t>(16, n - j);
    const __mmask16 live = _cvtu32_mask16(cnt == 16 ? 0xFFFF : (1u << cnt) - 1);
    const __mmask16 keep = live;
    __m512 partial[R][16];  // per query head and position: 16 lanes of products, summed by sum16 below
    for (int64_t p = 0; p < 16; ++p) {
      if (p >= cnt) {
        for (int r = 0; r < R; ++r) partial[r][p] = _mm512_setzero_ps();
        continue;
      }
      const T* kr = k + cols[j + p] * k_stride;
      const T* vr = v + cols[j + p] * v_stride;
      const char* ahead = j + p + 16 < n ? reinterpret_cast<const char*>(k + cols[j + p + 16] * k_stride)
                                         : nullptr;  // the key row 16 positions on
      for (int64_t b = 0; b < DV * 16 * static_cast<int64_t>(sizeof(T)); b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(vr) + b, _MM_HINT_T0);  // needed after the scores
        if (ahead != nullptr) _mm_prefetch(ahead + b, _MM_HINT_T0);
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
  for (int r = 0; r < R; ++r) {  // scores -> e^(score - m), exactly 0 in the lanes past n
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
    const T* vr = v + cols[j] * v_stride;
    for (int d = 0; d < DV; ++d) {
      const __m512 vv = load16f(vr + d * 16);
      for (int r = 0; r < R; ++r) out[r][d] = _mm512_fmadd_ps(_mm512_set1_ps(weights[r][j]), vv, out[r][d]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < DV; ++d) _mm512_storeu_ps(o + (r * DV + d) * 16, out[r][d]);
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
    alignas(64) float qs[R * D];
    float m[R], l[R], o[R * D];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t % chunks, h = (t / chunks) % Hkv, b = t / chunks / Hkv;
      const int64_t head0 = b * H + h * R;  // this KV head's first query head, as a row of q
      const int64_t s0 = c * CHUNK;  // the chunk's first position among the row's unmasked ones
      if (s0 >= count[b]) {  // past the row's last one: an empty chunk, skipped by the merge
        for (int r = 0; r < R; ++r) part[((head0 + r) * chunks + c) * (D + 2)] = -INFINITY;
        continue;
      }
      for (int64_t i = 0; i < R * D; i += 16)
        _mm512_store_ps(qs + i, _mm512_mul_ps(load16f(qp + head0 * D + i), _mm512_set1_ps(scale)));
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
}  // namespace smollm2

TORCH_LIBRARY_IMPL(smollm2, CPU, m) {
  m.impl("decode_attention", &smollm2::decode_attention);
}
