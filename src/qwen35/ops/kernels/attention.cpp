// Decode attention, one new query per sequence and head against its cached keys and values, split as
// flash-decoding splits it: a task takes a span of the history in blocks of keys small enough that a block's
// scores stay in L1 and its K/V rows in L2 between the scores and the values; a running maximum and sum join the
// blocks of a span, and the spans' partial results are merged at the end. So K and V are each read once, the
// softmax never walks a whole-history row of scores, and a long history splits across every thread even when
// there are fewer K/V heads than threads.
#include "common.h"

#include <cstring>
#include <type_traits>

namespace qwen35 {
namespace {

constexpr int64_t kBlock = 256;  // keys a block: 4 heads' scores 4 KB, its K and V rows 256 KB at D 256 bf16

#ifdef QWEN35_SIMD256
// 8 values of a K/V row in fp32 (exact: bf16 by a shift, int8 by a conversion).
inline __m256 load8(const bf16* p) { return load8_bf16_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int N, typename T>
void dots_n(const float* q, const T* k, int64_t D, float* dots) {
  __m256 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 kv = load8(k + d);
    for (int j = 0; j < N; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + d), kv, acc[j]);
  }
  for (int j = 0; j < N; ++j) dots[j] = lane_sum(acc[j]);
}
#endif

#ifdef QWEN35_AVX512
// 32 values of a K row as bf16 (exact: int8 values are integers below 2^8).
inline __m512i load32(const bf16* p) { return _mm512_loadu_si512(p); }
inline __m512i load32(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// 16 values of a V row in fp32.
inline __m512 load16(const bf16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// dots[j] = q[j] . k (j < n <= 4) for a bf16 or int8 key row k; q: fp32 rows of length D one after another
// (`qh` the same rows in bf16, for AVX-512's bf16 dot, int8 keys converted to bf16 exactly). Products exact,
// sums in fp32.
template <typename T>
void dots4(const float* q, const bf16* qh, const T* k, int64_t D, int n, float* dots) {
#ifdef QWEN35_AVX512
  if (D % 32 == 0 && n == 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const uint16_t* qs = reinterpret_cast<const uint16_t*>(qh);
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh kv = as_bh(load32(k + d));
      for (int j = 0; j < 4; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], as_bh(_mm512_loadu_si512(qs + j * D + d)), kv);
    }
    lane_sums<4>(acc, dots);
    return;
  }
#endif
#ifdef QWEN35_SIMD256
  if (D % 8 == 0) {
    switch (n) {  // the count a compile-time constant: the accumulators stay in registers
      case 4: return dots_n<4>(q, k, D, dots);
      case 3: return dots_n<3>(q, k, D, dots);
      case 2: return dots_n<2>(q, k, D, dots);
      default: return dots_n<1>(q, k, D, dots);
    }
  }
#endif
  for (int j = 0; j < n; ++j) {
    float t = 0.0f;
    for (int64_t d = 0; d < D; ++d) t += q[j * D + d] * static_cast<float>(k[d]);
    dots[j] = t;
  }
}

// p[0..n) = e^(p - top), returning their sum; n rounded up to 8 holds -inf past the keys.
float exp_sum(float* p, int64_t n, float top) {
#ifdef QWEN35_SIMD256
  __m256 total = _mm256_setzero_ps();
  const __m256 t = _mm256_set1_ps(top);
  for (int64_t s = 0; s < n; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), t));
    _mm256_storeu_ps(p + s, e);
    total = _mm256_add_ps(total, e);
  }
  return lane_sum(total);
#else
  float total = 0.0f;
  for (int64_t s = 0; s < n; ++s) total += (p[s] = std::exp(p[s] - top));
  return total;
#endif
}

// One head's block of the running softmax: its scores pg[0..n) (row of `stride`, -inf past n) become
// e^(score - top) under the new maximum, and what came before (sum, o: D values) is rescaled to it; false, with
// the row zeroed, while every key so far is masked (nothing to weigh).
bool softmax_block(float* pg, int64_t n, int64_t stride, float& top, float& sum, float* o, int64_t D) {
  const float best = std::max(top, *std::max_element(pg, pg + n));
  if (best == -INFINITY) {
    std::fill(pg, pg + stride, 0.0f);
    return false;
  }
  const float fade = std::exp(top - best);
  sum = sum * fade + exp_sum(pg, stride, best), top = best;
  if (fade != 1.0f)
    for (int64_t d = 0; d < D; ++d) o[d] *= fade;
  return true;
}

// o[g] += w[g] * v for the G query heads of a K/V head (o: G rows of D fp32); a key no head weighs (a masked
// slot, which may hold anything) is not read.
template <typename T>
void add_value(const T* v, const float* w, int64_t G, int64_t D, float* o) {
  for (int64_t g = 0; g < G; ++g)
    if (w[g] != 0.0f)
      for (int64_t d = 0; d < D; ++d) o[g * D + d] += w[g] * static_cast<float>(v[d]);
}

#ifdef QWEN35_SIMD256
// The vectors add_values4 works in: 16 fp32 lanes and 4 a row (16 accumulators of 32 registers) on AVX-512,
// 8 lanes and 2 a row (8 of 16) on AVX2.
#ifdef QWEN35_AVX512
struct Lanes {
  using V = __m512;
  static constexpr int kWidth = 16, kPerRow = 4;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  template <typename T>
  static V row(const T* p) { return load16(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#else
struct Lanes {
  using V = __m256;
  static constexpr int kWidth = 8, kPerRow = 2;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  template <typename T>
  static V row(const T* p) { return load8(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#endif
constexpr int64_t kValueColumns = Lanes::kWidth * Lanes::kPerRow;  // add_values4's block of columns

// o (4 rows of D) += sum over keys s < n of w[g * stride + s] * v_s, for 4 query heads (every official size's
// group): D in blocks of kValueColumns whose accumulators stay in registers over the block's keys (rows in L2).
// `masked`: skip keys none of the 4 heads weighs (their slots may hold anything); else every key is read.
// `next` (nn rows of stride nst): the next block's keys, sent to L2 a column block's share at a time, so memory
// streams while this arithmetic runs rather than only while scores are made (a 0.8B layer at 128K keys, 16-bit:
// 10.2-10.7 -> 9.2-9.6 ms).
template <bool masked, typename T>
void add_values4(const T* v, int64_t vstride, const float* w, int64_t stride, int64_t n, int64_t D, float* o,
                 const T* next, int64_t nst, int64_t nn) {
  using L = Lanes;
  for (int64_t d = 0; d < D; d += kValueColumns) {
    typename L::V acc[4][L::kPerRow];
    for (int g = 0; g < 4; ++g)
      for (int c = 0; c < L::kPerRow; ++c) acc[g][c] = L::load(o + g * D + d + L::kWidth * c);
    for (int64_t s = 0; s < n; ++s) {
      if (s < nn)
        for (int64_t c = 0; c < kValueColumns * static_cast<int64_t>(sizeof(T)); c += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next + s * nst + d) + c, _MM_HINT_T1);
      if (masked && w[s] == 0.0f && w[stride + s] == 0.0f && w[2 * stride + s] == 0.0f && w[3 * stride + s] == 0.0f)
        continue;
      typename L::V r[L::kPerRow];
      for (int c = 0; c < L::kPerRow; ++c) r[c] = L::row(v + s * vstride + d + L::kWidth * c);
      for (int g = 0; g < 4; ++g) {
        const auto wg = L::set1(w[g * stride + s]);
        for (int c = 0; c < L::kPerRow; ++c) acc[g][c] = L::fmadd(wg, r[c], acc[g][c]);
      }
    }
    for (int g = 0; g < 4; ++g)
      for (int c = 0; c < L::kPerRow; ++c) L::store(o + g * D + d + L::kWidth * c, acc[g][c]);
  }
}
#endif

#ifdef QWEN35_AVX512
// The lane sums of 16 int32 vectors, in their order (a transposing reduction: 45 instructions, not 16 x 9).
inline __m512i lane_sums16(const __m512i (&v)[16]) {
  __m512i x[8], y[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: that lane's sums of v[4i .. 4i+3]
    y[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2 * i], x[2 * i + 1]),
                            _mm512_unpackhi_epi64(x[2 * i], x[2 * i + 1]));
  __m512i z[2];
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2 * i], y[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(z[0], z[1], 0x88), _mm512_shuffle_i32x4(z[0], z[1], 0xDD));
}

inline __mmask16 first16(int64_t left) {  // the lanes of a 16-wide step with `left` values to go
  return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
}

// attend_span for int8 K/V under 4 query heads (every official size's group), on VNNI's 16-bit dot (vpdpwssd):
// the queries in 16-bit fixed point (a scale per head), each block's weights too (a scale per head and block),
// key and value rows sign-extended to 16 bits, sums exact in int32 (a 256-key block of 127 x 32767 pairs stays
// below 2^31). Why: converting every int8 row to bf16 or fp32 cost more than reading it; this takes ~2/3 of the
// time a key where K/V sit in cache, and with the next keys fetched while values are weighed a 0.8B layer takes
// 1.48 ms at 32K keys (was 1.82) and 6.3-7.0 at 128K (7.6-8.1). The 16-bit roundings weigh ~1e-5 of a head's
// largest query value and of a block's largest weight, far below the 8-bit keys' and values' own error.
void attend_span_vnni(const float* qf, const int8_t* ks, const int8_t* vs, int64_t kst, int64_t vst,
                      const float* ksc, const float* vsc, int64_t sst, const bool* ok, float scale, int64_t s0,
                      int64_t s1, int64_t D, float* top, float* sum, float* o, std::vector<float>& p) {
  constexpr int G = 4;
  std::fill(top, top + G, -INFINITY), std::fill(sum, sum + G, 0.0f), std::fill(o, o + G * D, 0.0f);
  std::vector<int16_t> q16(G * D), w16(G * (kBlock + 2));  // weights padded to whole pairs
  float qs[G];
  for (int g = 0; g < G; ++g) {  // each head as int16 times qs[g]
    float m = 0.0f;
    for (int64_t d = 0; d < D; ++d) m = std::max(m, std::abs(qf[g * D + d]));
    qs[g] = m / 32767.0f;
    const float f = m > 0.0f ? 32767.0f / m : 0.0f;
    for (int64_t d = 0; d < D; ++d) q16[g * D + d] = static_cast<int16_t>(std::lrint(qf[g * D + d] * f));
  }
  for (int64_t b0 = s0; b0 < s1; b0 += kBlock) {
    const int64_t n = std::min(kBlock, s1 - b0), stride = (n + 7) / 8 * 8;
    std::fill(p.begin(), p.end(), -INFINITY);
    for (int64_t s = 0; s < n; s += 4) {  // scores of 4 keys (the last repeated past the block's end)
      const int8_t* rows[4];
      for (int j = 0; j < 4; ++j) {
        rows[j] = ks + (b0 + std::min<int64_t>(s + j, n - 1)) * kst;
        const char* row = reinterpret_cast<const char*>(vs + (b0 + std::min<int64_t>(s + j, n - 1)) * vst);
        for (int64_t c = 0; c < D; c += 64) _mm_prefetch(row + c, _MM_HINT_T1);  // as attend_span
      }
      __m512i acc[16];  // head g, key j at 4g + j
      for (auto& a : acc) a = _mm512_setzero_si512();
      for (int64_t d = 0; d < D; d += 32) {
        __m512i kk[4];
        for (int j = 0; j < 4; ++j)
          kk[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + d)));
        for (int g = 0; g < G; ++g) {
          const __m512i qv = _mm512_loadu_si512(q16.data() + g * D + d);
          for (int j = 0; j < 4; ++j) acc[4 * g + j] = _mm512_dpwssd_epi32(acc[4 * g + j], kk[j], qv);
        }
      }
      alignas(64) float dots[16];
      _mm512_store_ps(dots, _mm512_cvtepi32_ps(lane_sums16(acc)));
      for (int64_t j = 0; j < std::min<int64_t>(4, n - s); ++j) {
        const int64_t key = b0 + s + j;
        if (ok && !ok[key]) continue;  // a masked slot (may hold anything): its score stays -inf
        const float unit = ksc[key * sst] * scale;
        for (int g = 0; g < G; ++g) p[g * stride + s + j] = dots[4 * g + j] * qs[g] * unit;
      }
    }
    float ws[G];  // block weights = w16 * ws
    for (int g = 0; g < G; ++g) {
      float* pg = p.data() + g * stride;
      int16_t* wg = w16.data() + g * (kBlock + 2);
      float m = 0.0f;
      if (softmax_block(pg, n, stride, top[g], sum[g], o + g * D, D)) {
        __m512 most = _mm512_setzero_ps();
        for (int64_t s = 0; s < n; s += 16) {  // each value row's weight times its scale (none for a masked slot)
          const __mmask16 in = first16(n - s);
          const __m512 w = _mm512_maskz_loadu_ps(in, pg + s);
          __m512 sc;
          if (sst == 1) {
            sc = _mm512_maskz_loadu_ps(in, vsc + b0 + s);
          } else {
            alignas(64) float t[16] = {};
            for (int64_t j = 0; j < std::min<int64_t>(16, n - s); ++j) t[j] = vsc[(b0 + s + j) * sst];
            sc = _mm512_load_ps(t);
          }
          const __m512 ws16 = _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(w, _mm512_setzero_ps(), _CMP_NEQ_UQ), w, sc);
          _mm512_mask_storeu_ps(pg + s, in, ws16);
          most = _mm512_max_ps(most, ws16);
        }
        m = _mm512_reduce_max_ps(most);
      }
      ws[g] = m / 32767.0f;
      const __m512 f = _mm512_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
      for (int64_t s = 0; s < n; s += 16) {  // to int16, rounded to nearest
        const __mmask16 in = first16(n - s);
        const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, pg + s), f));
        _mm256_mask_storeu_epi16(wg + s, in, _mm512_cvtepi32_epi16(r));
      }
      wg[n] = wg[n + 1] = 0;
    }
    // values: two keys' rows interleaved byte by byte, widened to 16 bits, against their two weights; 64 columns
    // at a time, the 16 accumulators in registers (each holds its columns in unpack order, put right below)
    const int8_t* vb = vs + b0 * vst;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      __m512i acc[G][4];
      for (auto& row : acc)
        for (auto& a : row) a = _mm512_setzero_si512();
      for (int64_t s = 0; s < n; s += 2) {
        const int8_t* ra = vb + s * vst + d0;
        if (b0 + kBlock + s + 1 < s1) {  // line d0 / 64 of the next block's keys to L2 meanwhile, as add_values4
          const char* k0 = reinterpret_cast<const char*>(ks + (b0 + kBlock + s) * kst + d0);  // (to L1: slower)
          _mm_prefetch(k0, _MM_HINT_T1), _mm_prefetch(k0 + kst, _MM_HINT_T1);
        }
        const __m512i a = _mm512_loadu_si512(ra), b = s + 1 < n ? _mm512_loadu_si512(ra + vst) : a;
        const __m512i lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
        const __m512i w[4] = {_mm512_cvtepi8_epi16(_mm512_castsi512_si256(lo)),   // columns 0-7, 16-23
                              _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(lo, 1)),  // 32-39, 48-55
                              _mm512_cvtepi8_epi16(_mm512_castsi512_si256(hi)),   // 8-15, 24-31
                              _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(hi, 1))};  // 40-47, 56-63
        for (int g = 0; g < G; ++g) {
          int32_t pair;  // the two keys' weights, as the 16-bit pairs vpdpwssd multiplies
          std::memcpy(&pair, w16.data() + g * (kBlock + 2) + s, sizeof(pair));
          const __m512i pv = _mm512_set1_epi32(pair);
          for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_dpwssd_epi32(acc[g][c], w[c], pv);
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m512i cols[4] = {_mm512_shuffle_i32x4(acc[g][0], acc[g][2], 0x44),   // 0-15
                                 _mm512_shuffle_i32x4(acc[g][0], acc[g][2], 0xEE),   // 16-31
                                 _mm512_shuffle_i32x4(acc[g][1], acc[g][3], 0x44),   // 32-47
                                 _mm512_shuffle_i32x4(acc[g][1], acc[g][3], 0xEE)};  // 48-63
        const __m512 f = _mm512_set1_ps(ws[g]);
        float* og = o + g * D + d0;
        for (int c = 0; c < 4; ++c)
          _mm512_storeu_ps(og + 16 * c, _mm512_fmadd_ps(_mm512_cvtepi32_ps(cols[c]), f, _mm512_loadu_ps(og + 16 * c)));
      }
    }
  }
}
#endif

// One task's keys [s0, s1) of one K/V head: its G query heads' running maximum `top`, sum of e^(score - top) and
// values weighted by those (o, G rows of D), block by block. ks/vs: the head's first key and value rows;
// ksc/vsc its first scales (int8) with stride sst; ok its sequence's valid slots or null.
template <typename T>
void attend_span(const float* qf, const bf16* qh, const T* ks, const T* vs, int64_t kst, int64_t vst,
                 const float* ksc, const float* vsc, int64_t sst, const bool* ok, float scale, int64_t s0,
                 int64_t s1, int64_t G, int64_t D, float* top, float* sum, float* o, std::vector<float>& p) {
  constexpr bool quantized = std::is_same_v<T, int8_t>;
#ifdef QWEN35_AVX512
  if constexpr (quantized)
    if (G == 4 && D % 64 == 0 && D <= 512)  // a score sums D products of 127 x 32767: below 2^31
      return attend_span_vnni(qf, ks, vs, kst, vst, ksc, vsc, sst, ok, scale, s0, s1, D, top, sum, o, p);
#endif
  std::fill(top, top + G, -INFINITY), std::fill(sum, sum + G, 0.0f), std::fill(o, o + G * D, 0.0f);
  std::vector<float> w(G);  // one key's weights (other groups than 4)
  for (int64_t b0 = s0; b0 < s1; b0 += kBlock) {
    const int64_t n = std::min(kBlock, s1 - b0), stride = (n + 7) / 8 * 8;
    std::fill(p.begin(), p.end(), -INFINITY);
    bool any_masked = false;
    for (int64_t s = 0; s < n; ++s) {  // scores of the G queries against key b0 + s
      // its value row on its way to L2 meanwhile: the values below then wait on no memory (32K keys, D 256 bf16:
      // 2.9 -> 2.1 ms), while the keys stream in order, which the hardware prefetches by itself
      const char* row = reinterpret_cast<const char*>(vs + (b0 + s) * vst);
      for (int64_t c = 0; c < D * static_cast<int64_t>(sizeof(T)); c += 64) _mm_prefetch(row + c, _MM_HINT_T1);
      if (ok && !ok[b0 + s]) {
        any_masked = true;
        continue;
      }
      float dots[4];
      const float unit = (quantized ? ksc[(b0 + s) * sst] : 1.0f) * scale;
      for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int m = static_cast<int>(std::min<int64_t>(4, G - g0));
        dots4(qf + g0 * D, qh + g0 * D, ks + (b0 + s) * kst, D, m, dots);
        for (int j = 0; j < m; ++j) p[(g0 + j) * stride + s] = dots[j] * unit;
      }
    }
    for (int64_t g = 0; g < G; ++g) {  // the running softmax
      float* pg = p.data() + g * stride;
      if (!softmax_block(pg, n, stride, top[g], sum[g], o + g * D, D)) continue;
      if constexpr (quantized)  // each value row's weight times its scale
        for (int64_t s = 0; s < n; ++s) pg[s] *= vsc[(b0 + s) * sst];
    }
    const T* vb = vs + b0 * vst;
#ifdef QWEN35_SIMD256
    if (G == 4 && D % kValueColumns == 0) {
      const int64_t nn = std::max<int64_t>(0, std::min(kBlock, s1 - b0 - kBlock));
      const T* next = ks + (b0 + kBlock) * kst;
      if (any_masked) add_values4<true>(vb, vst, p.data(), stride, n, D, o, next, kst, nn);
      else add_values4<false>(vb, vst, p.data(), stride, n, D, o, next, kst, nn);
      continue;
    }
#endif
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t g = 0; g < G; ++g) w[g] = p[g * stride + s];
      add_value(vb + s * vst, w.data(), G, D, o);
    }
  }
}

// attention_decode over keys and values of type T: bf16, or int8 with an fp32 scale per token and head
// (ksc/vsc, null for bf16). Tasks: (sequence, K/V head, span of the history); then one merge per query head.
template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const float* ksc,
            const float* vsc, const int64_t* sst, const bool* ok, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const int64_t blocks = std::max<int64_t>(1, (S + kBlock - 1) / kBlock);
  // two spans a thread where there are enough blocks: a thread that finishes early takes another
  const int64_t spans = std::min(blocks, std::max<int64_t>(1, (2 * at::get_num_threads() + B * Hkv - 1) / (B * Hkv)));
  const int64_t per = (blocks + spans - 1) / spans * kBlock, tasks = B * Hkv * spans;
  std::vector<float> top(tasks * G), sum(tasks * G), part(tasks * G * D);
  const bf16* qp = q.data_ptr<at::BFloat16>();
  const T *kp = static_cast<const T*>(k.data_ptr()), *vp = static_cast<const T*>(v.data_ptr());
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(G * (kBlock + 8)), qf(G * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / spans, b = i / Hkv, h = i % Hkv, s0 = (t % spans) * per;
      const bf16* qh = qp + (b * Hq + h * G) * D;
      for (int64_t j = 0; j < G * D; ++j) qf[j] = static_cast<float>(qh[j]);
      const int64_t first = b * sst[0] + h * sst[1];  // this head's first scale (int8)
      attend_span<T>(qf.data(), qh, kp + b * k.stride(0) + h * k.stride(1), vp + b * v.stride(0) + h * v.stride(1),
                     k.stride(2), v.stride(2), ksc ? ksc + first : nullptr, vsc ? vsc + first : nullptr, sst[2],
                     ok ? ok + b * S : nullptr, static_cast<float>(scale), s0, std::min(S, s0 + per), G, D,
                     top.data() + t * G, sum.data() + t * G, part.data() + t * G * D, p);
    }
  });
  bf16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * Hq, 1, [&](int64_t r0, int64_t r1) {  // row r: sequence r / Hq, query head r % Hq
    std::vector<float> o(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / G, g = r % G;  // (sequence, K/V head) pair i, the head's g-th query
      float best = -INFINITY, total = 0.0f;
      for (int64_t j = 0; j < spans; ++j) best = std::max(best, top[(i * spans + j) * G + g]);
      std::fill(o.begin(), o.end(), 0.0f);
      if (best != -INFINITY)  // else no valid key: an all-zero output rather than NaN
        for (int64_t j = 0; j < spans; ++j) {
          const int64_t t = i * spans + j;
          const float f = std::exp(top[t * G + g] - best);
          if (f == 0.0f) continue;
          total += f * sum[t * G + g];
          for (int64_t d = 0; d < D; ++d) o[d] += f * part[(t * G + g) * D + d];
        }
      for (int64_t d = 0; d < D; ++d) op[r * D + d] = bf16(total > 0.0f ? o[d] / total : 0.0f);
    }
  });
}

}  // namespace

// Softmax attention of one new query per sequence against its cached keys and values, GQA: q (B, Hq, D),
// k and v (B, Hkv, S, D) with unit stride along D (views of the cache's buffers), bf16, or int8 with k_scale and
// v_scale (B, Hkv, S, 1) fp32 (an 8-bit cache: read as it is stored, never dequantized whole); valid (B, S) bool
// or None (all valid). fp32 scores and sums, one bf16 rounding of the output; stock SDPA costs ~0.3 ms per call
// for this shape, most of it outside the arithmetic.
torch::Tensor attention_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& valid, double scale,
                               const std::optional<torch::Tensor>& k_scale,
                               const std::optional<torch::Tensor>& v_scale) {
  check(q, at::kBFloat16, 3, "q");
  const bool quantized = k.scalar_type() == at::kChar;
  TORCH_CHECK((k.scalar_type() == at::kBFloat16 || quantized) && v.scalar_type() == k.scalar_type() &&
              k.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "k and v must be (B, Hkv, S, D), bf16 or int8");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hq % Hkv == 0, "q (B, Hq, D) does not match k (B, Hkv, S, D)");
  TORCH_CHECK(!valid || (valid->scalar_type() == at::kBool && valid->dim() == 2 && valid->size(0) == B &&
              valid->size(1) == S && valid->is_contiguous()), "valid must be (B, S) bool");
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "int8 k and v need k_scale and v_scale");
  const bool* ok = valid ? valid->data_ptr<bool>() : nullptr;
  auto out = torch::empty_like(q);
  if (!quantized) {
    const int64_t none[3] = {0, 0, 0};
    attend<bf16>(q, k, v, nullptr, nullptr, none, ok, scale, out);
    return out;
  }
  for (const auto* t : {&*k_scale, &*v_scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv &&
                t->size(2) == S && t->size(3) == 1 && t->strides() == k_scale->strides(),
                "k_scale and v_scale must be (B, Hkv, S, 1) fp32 views of one layout");
  attend<int8_t>(q, k, v, k_scale->data_ptr<float>(), v_scale->data_ptr<float>(), k_scale->strides().data(), ok,
                 scale, out);
  return out;
}

}  // namespace qwen35
