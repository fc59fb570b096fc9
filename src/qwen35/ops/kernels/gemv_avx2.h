// gemv.cpp's kernels on 256-bit AVX2 + FMA (included by gemv.cpp inside its anonymous namespace): the same
// weight layouts, activation rounding and order of the float sums, so on integer weights a row's result equals
// the AVX-512 kernel's. Without VNNI the u8 x s8 dot is vpmaddubsw (pairs summed to int16, saturating) and
// vpmaddwd (to int32): the bounds that keep each sum exact are stated where they are used.
#pragma once

// Software prefetch this far ahead of the weight stream: on a 2-core Zen 3 (AVX2) the hardware prefetcher alone
// streamed int4 tiles at 22.4 GB/s and bf16 rows at 21-22 GB/s, 2 KB ahead 26 and 23-24 GB/s (a standalone loop over
// 256 MB, best of 15, three rounds alternating). AVX-512's Zen 4 measured the opposite (gemv.cpp).
constexpr int64_t kAhead = 2048;  // bytes

inline void prefetch_lines(const uint8_t* p, int lines) {
  for (int c = 0; c < lines; ++c) _mm_prefetch(reinterpret_cast<const char*>(p + kAhead + 64 * c), _MM_HINT_T0);
}

// One block of 32 activations rounded to int8 at q, as the AVX-512 `quantize_block`: its scale and the sum of its q.
inline std::pair<float, int32_t> quantize_block(const bf16* x, int8_t* q) {
  __m256 v[4], top = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8_bf16_ps(x + 8 * i);
    top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[i]));
  }
  const __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  const __m128 h2 = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h2, _mm_movehdup_ps(h2)));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  __m256i r[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {  // x * inv rounded to nearest even
    r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
    sum = _mm256_add_epi32(sum, r[i]);
  }
  // int32 -> int8 (saturating, as vpmovsdb); packs work within 128-bit lanes, the permute restores the order
  const __m256i w8 = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(w8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
  return {amax / 127.0f, _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)))};
}

// 4 activation bytes broadcast to every 32-bit lane.
inline __m256i broadcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm256_set1_epi32(v);
}

// A tile's 16 outputs (rows 0-7 in v[0], 8-15 in v[1]) to bf16 at y.
inline void store_tile(bf16* y, const __m256 (&v)[2]) {
  store8_bf16(y, v[0]);
  store8_bf16(y + 8, v[1]);
}

// int8 tiles (layout: gemv.cpp's int8_tile; the two 32-byte halves of a 64-byte step are rows 0-7 and 8-15). The
// weights are made signed (q + 128 -> q, |q| <= 127 as quantized) and the dot is |q| x sign(x, q): each pair sum
// is at most 2 * 127 * 127 < 2^15, so vpmaddubsw never saturates; no 128 * sum(x) correction is needed.
template <int MB>
void int8_tile(const Int8Rows& x, int64_t m0, const uint8_t* w, const bf16* scale, int64_t K, bf16* y, int64_t ldy) {
  const int64_t blocks = K / 32;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {  // blocks of 32 columns: 8 x 64 bytes
    const uint8_t* p = w + b * 512;
    prefetch_lines(p, 8);
    __m256i dot[MB][2];
    for (int m = 0; m < MB; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
    for (int i = 0; i < 8; ++i) {
      __m256i v[2], a[2];
      for (int h = 0; h < 2; ++h) {
        v[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i + 32 * h)), flip);
        a[h] = _mm256_abs_epi8(v[h]);
      }
      for (int m = 0; m < MB; ++m) {
        const __m256i xb = broadcast4(x.q.data() + (m0 + m) * K + b * 32 + 4 * i);
        for (int h = 0; h < 2; ++h)
          dot[m][h] = _mm256_add_epi32(dot[m][h],
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(a[h], _mm256_sign_epi8(xb, v[h])), ones));
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 d = _mm256_set1_ps(x.scale[(m0 + m) * blocks + b]);  // the block's activation scale
      for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][h]), d, acc[m][h]);
    }
  }
  const __m256 s[2] = {load8_bf16_ps(scale), load8_bf16_ps(scale + 8)};
  for (int m = 0; m < MB; ++m) {
    const __m256 out[2] = {_mm256_mul_ps(s[0], acc[m][0]), _mm256_mul_ps(s[1], acc[m][1])};
    store_tile(y + m * ldy, out);
  }
}

// int4 tiles (layout: gemv.cpp's int4_tile). Both nibbles are masked to [0, 15], so a pair sum of vpmaddubsw is at
// most 2 * 15 * 127 = 3,810 and the 8 of a 32-column block (4 steps x low and high) at most 30,480 < 2^15: the
// block's dot products add up exactly in int16 before one vpmaddwd widens them. Float work as the AVX-512 kernel.
template <int MB, int G>
void int4_tile(const Int8Rows& x, int64_t m0, const float* xsum, const uint8_t* w, const bf16* s, const bf16* z,
               int64_t K, bf16* y, int64_t ldy) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t groups = K / G, blocks = K / 32;
  __m256 out[MB][2];
  for (int m = 0; m < MB; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = g * G / 32; b < (g + 1) * G / 32; ++b) {  // blocks of 32 columns: 4 x 64 bytes
      const uint8_t* p = w + b * 256;
      prefetch_lines(p, 4);
      __m256i dot[MB][2];
      for (int m = 0; m < MB; ++m) dot[m][0] = dot[m][1] = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        __m256i lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i + 32 * h));
          lo[h] = _mm256_and_si256(v, low4);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        for (int m = 0; m < MB; ++m) {
          const int8_t* q = x.q.data() + (m0 + m) * K + b * 32 + 8 * i;
          const __m256i xl = broadcast4(q), xh = broadcast4(q + 4);
          for (int h = 0; h < 2; ++h)
            dot[m][h] = _mm256_add_epi16(dot[m][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl),
                                                                     _mm256_maddubs_epi16(hi[h], xh)));
        }
      }
      for (int m = 0; m < MB; ++m) {
        const __m256 d = _mm256_set1_ps(x.scale[(m0 + m) * blocks + b]);  // the block's activation scale
        for (int h = 0; h < 2; ++h)
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(dot[m][h], ones)), d, acc[m][h]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sg = load8_bf16_ps(s + g * 16 + 8 * h);
      const __m256 zg = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), sg, load8_bf16_ps(z + g * 16 + 8 * h));
      for (int m = 0; m < MB; ++m)
        out[m][h] = _mm256_fmadd_ps(zg, _mm256_set1_ps(xsum[(m0 + m) * groups + g]),
                                    _mm256_fmadd_ps(acc[m][h], sg, out[m][h]));
    }
  }
  for (int m = 0; m < MB; ++m) store_tile(y + m * ldy, out[m]);
}

// One bf16 weight row against MB activation rows given in fp32 (converted once per call): y[m] = sum_k x[m, k]
// w[k], products exact in fp32 as dpbf16. U accumulators per row, the same for every MB (batch invariance).
template <int MB>
void bf16_row(const float* x, const uint16_t* w, int64_t K, bf16* y, int64_t ldy) {
  constexpr int U = 2;
  __m256 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm256_setzero_ps();
  const bf16* wb = reinterpret_cast<const bf16*>(w);
  const auto step = [&](int64_t k, int u) {  // 8 columns into accumulator u
    const __m256 wv = load8_bf16_ps(wb + k);
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[u][m]);
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // a 64-byte line per round, prefetched once
    prefetch_lines(reinterpret_cast<const uint8_t*>(w + k), 1);
    for (int j = 0; j < 4; ++j) step(k + 8 * j, j % U);
  }
  for (; k + 8 * U <= K; k += 8 * U)
    for (int u = 0; u < U; ++u) step(k + 8 * u, u);
  for (int m = 0; m < MB; ++m) {
    __m256 total = acc[0][m];
    for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][m]);
    float t = lane_sum(total);
    for (int64_t j = k; j < K; ++j) t += x[m * K + j] * static_cast<float>(wb[j]);
    y[m * ldy] = bf16(t);
  }
}
