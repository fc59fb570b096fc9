// Matrix-vector products for decode: a few activation rows against large weight matrices (bf16, int8, int4).
//
// The work is reading the weights once, so each weight row is streamed once for all activation rows (stock GEMM
// kernels reach about half the memory bandwidth on that shape). Each kernel is tested against a plain PyTorch
// reference (tests/test_cpu_kernels.py).
#include "common.h"

#include <cstring>
#include <utility>

namespace qwen35 {
namespace {

#ifdef QWEN35_KERNELS
// Activations for the integer kernels: each row (K a multiple of 32, as the tile kernels require) cut into blocks
// of 32 and rounded to int8 with one scale per block (as llama.cpp's Q8_0), so weight x activation products run on
// integer dot instructions (VNNI: 64 per instruction) instead of widening every weight to float.
struct Int8Rows {
  std::vector<int8_t> q;     // (M, K)
  std::vector<float> scale;  // per row and block of 32
  std::vector<float> bsum;   // per row and block: scale * sum(q), the block's sum as the kernels see it
  std::vector<float> qsum;   // per row: the sum of its bsum, for the int8 weights' +128 offset
};

#endif

#ifdef QWEN35_AVX512

// Prefetch into L2 ahead of the loads, for bf16 rows: 2 KB ahead. The int8/int4 tiles read one sequential stream
// per thread, which the hardware prefetcher follows: in 0.8B decode, alternating settings in one process, no
// software prefetch was 4-14% (int4) and 9% (int8) faster than 16 KB ahead, and 2 KB level with none.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

constexpr int64_t kAheadBf16 = 2048;  // bytes

// One weight row against MB activation rows: total[m], whose 16 lanes sum to y[m] = sum_k x[m, k] w[k]. Weight
// rows are read strictly in order (one sequential stream per thread); U independent accumulators per activation
// row hide the dot latency. U is the same for every MB: it sets the order of the sums, so a row's result must not
// depend on how many rows share the call (batch invariance; with 2 for MB > 1, rows decoded in a batch differed
// from alone).
template <int MB>
inline void bf16_sums(const uint16_t* x, const uint16_t* w, int64_t K, __m512* total) {
  constexpr int U = 4;
  __m512 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    prefetch(w + k + kAheadBf16 / 2);
    prefetch(w + k + kAheadBf16 / 2 + 64);
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = as_bh(_mm512_loadu_si512(w + k + 32 * u));
      for (int m = 0; m < MB; ++m)
        acc[u][m] = _mm512_dpbf16_ps(acc[u][m], as_bh(_mm512_loadu_si512(x + m * K + k + 32 * u)), wv);
    }
  }
  for (; k < K; k += 32) {
    const __m512bh wv = as_bh(load_bf16(w + k, K - k));
    for (int m = 0; m < MB; ++m) acc[0][m] = _mm512_dpbf16_ps(acc[0][m], as_bh(load_bf16(x + m * K + k, K - k)), wv);
  }
  for (int m = 0; m < MB; ++m) {
    total[m] = acc[0][m];
    for (int u = 1; u < U; ++u) total[m] = _mm512_add_ps(total[m], acc[u][m]);
  }
}

template <int MB>
void bf16_row(const uint16_t* x, const uint16_t* w, int64_t K, bf16* y, int64_t ldy) {
  __m512 total[MB];
  bf16_sums<MB>(x, w, K, total);
  for (int m = 0; m < MB; ++m) y[m * ldy] = bf16(_mm512_reduce_add_ps(total[m]));
}

// Four weight rows (outputs y[m * ldy + 0..3]): bf16_row's sums, their 16-lane sums taken together by one shuffle
// tree for four vectors. At K = 256 (the nano) a lone reduction was most of a row's work, and each activation row
// added ~85% of the first one's time; the tree pairs lanes exactly as _mm512_reduce_add_ps (j with j+8, then j+4,
// j^2, j^1), so each output is bit-identical to bf16_row's.
template <int MB>
void bf16_rows4(const uint16_t* x, const uint16_t* w, int64_t K, bf16* y, int64_t ldy) {
  __m512 t[4][MB];
  for (int i = 0; i < 4; ++i) bf16_sums<MB>(x, w + i * K, K, t[i]);
  const __m512i lanes = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  for (int m = 0; m < MB; ++m) {
    // [a.q0+a.q2, a.q1+a.q3, b.q0+b.q2, b.q1+b.q3] (q: 128-bit quarters), then the halves of each 8-lane sum
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(t[0][m], t[1][m], 0x44),
                                    _mm512_shuffle_f32x4(t[0][m], t[1][m], 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(t[2][m], t[3][m], 0x44),
                                    _mm512_shuffle_f32x4(t[2][m], t[3][m], 0xEE));
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
    alignas(16) float out[4];
    _mm_store_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, s)));
    for (int i = 0; i < 4; ++i) y[m * ldy + i] = bf16(out[i]);
  }
}

// One block of 32 activations rounded to int8 at q (x * 127 / amax, to nearest even): its scale and the sum of
// its q. Vectorised: the scalar loop cost ~20 us a row at K = 9216.
inline std::pair<float, int32_t> quantize_block(const bf16* x, int8_t* q) {
  const __m512 lo = load_bf16_ps(x, 16), hi = load_bf16_ps(x + 16, 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m512 scale = _mm512_set1_ps(inv);  // x * inv rounded to nearest even, as std::nearbyint
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, scale));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, scale));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qhi));
  return {amax / 127.0f, _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi))};
}

// Two dpbusd steps of the tile kernels: weights w0 against activations q[0..3], w1 against q[4..7], each 4 bytes
// broadcast to every lane.
inline void dot_pair(__m512i& a0, __m512i& a1, __m512i w0, __m512i w1, const int8_t* q) {
  int32_t x0, x1;
  std::memcpy(&x0, q, 4);
  std::memcpy(&x1, q + 4, 4);
  a0 = _mm512_dpbusd_epi32(a0, w0, _mm512_set1_epi32(x0));
  a1 = _mm512_dpbusd_epi32(a1, w1, _mm512_set1_epi32(x1));
}

// A tile's 16 outputs (fp32 lanes) to bf16 at y.
inline void store_tile(bf16* y, __m512 v) {
  const __m256bh out = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), reinterpret_cast<const __m256i&>(out));
}

// int8 kernel layout: tiles of 16 weight rows. Per tile and 4 columns c..c+3, 64 bytes: byte 4r + j holds row r's
// column c + j as q + 128 (u8, for dpbusd), so one instruction multiplies 4 columns of 16 rows by 4 activations
// broadcast to every lane, and the 16 sums stay in int32 lanes over a 32-column activation block (as int4_tile).
// dpbusd gives sum (q + 128) x: the 128 * sum x part is taken off once per activation row (qsum).
template <int MB>
void int8_tile(const Int8Rows& x, int64_t m0, const uint8_t* w, const bf16* scale, int64_t K, bf16* y, int64_t ldy) {
  const int64_t blocks = K / 32;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {  // blocks of 32 columns: 8 x 64 bytes
    const uint8_t* p = w + b * 512;
    __m512i even[MB], odd[MB];  // two accumulators: half the dependency chain
    for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm512_setzero_si512();
    for (int i = 0; i < 8; i += 2) {
      const __m512i v0 = _mm512_loadu_si512(p + 64 * i), v1 = _mm512_loadu_si512(p + 64 * i + 64);
      for (int m = 0; m < MB; ++m) dot_pair(even[m], odd[m], v0, v1, x.q.data() + (m0 + m) * K + b * 32 + 4 * i);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 d = _mm512_set1_ps(x.scale[(m0 + m) * blocks + b]);  // the block's activation scale
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[m], odd[m])), d, acc[m]);
    }
  }
  const __m512 s = load_bf16_ps(scale, 16);
  for (int m = 0; m < MB; ++m)
    store_tile(y + m * ldy, _mm512_mul_ps(s, _mm512_sub_ps(acc[m], _mm512_set1_ps(128.0f * x.qsum[m0 + m]))));
}

// int4 kernel layout: tiles of 16 weight rows. Per tile and 8 columns c..c+7, 64 bytes: byte 4r + j holds
// row r's column c + j in its low nibble and column c + 4 + j in its high one. Two ANDs then give, for 16 rows at
// once, u8 vectors of 4 consecutive columns per 32-bit lane, which dpbusd multiplies by 4 activations broadcast
// to every lane: the dot products of all 16 rows accumulate in int32 lanes over a 32-column activation block,
// with one conversion and one scale per block (not per 64 weights of each row: the ALU-bound part of a
// row-at-a-time loop). The high nibbles are read as 16 q (no shift), and their sum is divided by 16 exactly.
// Scales and zeros are laid out (tiles, groups, 16). With w = (q - 8) s + z per group of G,
// sum_k x_k w_k = sum_g s_g sum x q + (z_g - 8 s_g) xsum_g  (xsum: sums of the rounded x per group).
template <int MB, int G>
void int4_tile(const Int8Rows& x, int64_t m0, const float* xsum, const uint8_t* w, const bf16* s, const bf16* z,
               int64_t K, bf16* y, int64_t ldy) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int64_t groups = K / G, blocks = K / 32;
  __m512 out[MB];
  for (int m = 0; m < MB; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = g * G / 32; b < (g + 1) * G / 32; ++b) {  // blocks of 32 columns: 4 x 64 bytes
      const uint8_t* p = w + b * 256;
      __m512i lo[MB], hi[MB];
      for (int m = 0; m < MB; ++m) lo[m] = hi[m] = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const __m512i v = _mm512_loadu_si512(p + 64 * i);
        const __m512i wl = _mm512_and_si512(v, low4), wh = _mm512_and_si512(v, high4);
        for (int m = 0; m < MB; ++m) dot_pair(lo[m], hi[m], wl, wh, x.q.data() + (m0 + m) * K + b * 32 + 8 * i);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i dot = _mm512_add_epi32(lo[m], _mm512_srai_epi32(hi[m], 4));
        const __m512 d = _mm512_set1_ps(x.scale[(m0 + m) * blocks + b]);  // the block's activation scale
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[m]);
      }
    }
    const __m512 sg = load_bf16_ps(s + g * 16, 16), zg = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sg,
                                                                          load_bf16_ps(z + g * 16, 16));
    for (int m = 0; m < MB; ++m)
      out[m] = _mm512_fmadd_ps(zg, _mm512_set1_ps(xsum[(m0 + m) * groups + g]), _mm512_fmadd_ps(acc[m], sg, out[m]));
  }
  for (int m = 0; m < MB; ++m) store_tile(y + m * ldy, out[m]);
}

#elif defined(QWEN35_AVX2)
#include "gemv_avx2.h"
#endif

#ifdef QWEN35_KERNELS
// Activation rows (M, K) rounded to int8 per block of 32 by the ISA's `quantize_block`.
Int8Rows quantize_rows(const bf16* x, int64_t M, int64_t K) {
  Int8Rows r;
  const int64_t blocks = K / 32;
  r.q.resize(M * K);
  r.scale.resize(M * blocks);
  r.bsum.resize(M * blocks);
  r.qsum.assign(M, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const auto [d, sum] = quantize_block(x + m * K + b * 32, r.q.data() + m * K + b * 32);
      r.scale[m * blocks + b] = d;
      r.bsum[m * blocks + b] = d * static_cast<float>(sum);
      r.qsum[m] += d * static_cast<float>(sum);
    }
  return r;
}

// Calls block(n, r, m, mb) for weight rows n..n+r (r = 4, or 1 at a range's end; split across threads, each a
// contiguous range) and activation rows m..m+mb (mb <= 4).
template <typename Block>
void for_blocks(int64_t M, int64_t N, Block&& block) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1;) {
      const int r = n + 4 <= n1 ? 4 : 1;
      for (int64_t m = 0; m < M; m += 4) block(n, r, m, static_cast<int>(std::min<int64_t>(4, M - m)));
      n += r;
    }
  });
}

// Calls f(MB) with runtime mb (1-4) as a compile-time constant.
template <typename F>
void dispatch_rows(int mb, F&& f) {
  switch (mb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Calls tile(t, m, MB) for every tile of 16 weight rows (split across threads, each a contiguous range) and
// activation rows m..m+MB (MB <= 4, a compile-time constant).
template <typename Tile>
void for_tiles(int64_t M, int64_t tiles, Tile&& tile) {
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = 0; m < M; m += 4)
        dispatch_rows(static_cast<int>(std::min<int64_t>(4, M - m)), [&](auto MB) { tile(t, m, MB); });
  });
}

#endif  // QWEN35_KERNELS

}  // namespace

bool available() {
#ifdef QWEN35_KERNELS
  return true;
#else
  return false;
#endif
}

std::string isa() {
#if defined(QWEN35_AVX512)
  return "avx512";
#elif defined(QWEN35_AVX2)
  return "avx2";
#else
  return "";
#endif
}

// y (M, N) = x (M, K) @ w (N, K)^T, all bf16.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w) {
  check(x, at::kBFloat16, 2, "x");
  check(w, at::kBFloat16, 2, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "x has ", x.size(1), " columns, w has ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_KERNELS
#ifdef QWEN35_AVX512
  const uint16_t* xp = u16(x);
#else
  const auto xf = x.to(at::kFloat);  // once per call: the weight rows then read it in fp32
  const float* xp = xf.data_ptr<float>();
#endif
  const uint16_t* wp = u16(w);
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_blocks(M, N, [&](int64_t n, int r, int64_t m, int mb) {
    dispatch_rows(mb, [&](auto MB) {
#ifdef QWEN35_AVX512
      if (r == 4) return bf16_rows4<MB()>(xp + m * K, wp + n * K, K, yp + m * N + n, N);
#endif
      for (int i = 0; i < r; ++i) bf16_row<MB()>(xp + m * K, wp + (n + i) * K, K, yp + m * N + n + i, N);
    });
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 or AVX2");
#endif
  return y;
}

// y (M, N) = x (M, K) @ (q * scale)^T with q int8 in the kernel layout (see int8_tile), one scale per row.
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales) {
  check(x, at::kBFloat16, 2, "x");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = 16 * tiles;
  check_int8(packed, scales, K);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_KERNELS
  const Int8Rows xq = quantize_rows(x.data_ptr<at::BFloat16>(), M, K);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const bf16* sp = scales.data_ptr<at::BFloat16>();
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_tiles(M, tiles, [&](int64_t t, int64_t m, auto MB) {
    int8_tile<MB()>(xq, m, wp + t * 16 * K, sp + 16 * t, K, yp + m * N + 16 * t, N);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 or AVX2");
#endif
  return y;
}

// y (M, N) = x (M, K) @ W^T with W int4 in the kernel layout (see int4_tile), x and y bf16.
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t G) {
  check(x, at::kBFloat16, 2, "x");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = 16 * tiles;
  check_int4(packed, scales, zeros, K, G);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_KERNELS
  const int64_t groups = K / G;
  const Int8Rows xq = quantize_rows(x.data_ptr<at::BFloat16>(), M, K);
  std::vector<float> xsum(M * groups, 0.0f);  // per activation row and group: sum of x, for the zero points
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / 32; ++b) xsum[m * groups + b * 32 / G] += xq.bsum[m * (K / 32) + b];
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const bf16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_tiles(M, tiles, [&](int64_t t, int64_t m, auto MB) {
    const auto args = std::make_tuple(std::cref(xq), m, xsum.data(), wp + t * 8 * K, sp + t * groups * 16,
                                      zp + t * groups * 16, K, yp + m * N + 16 * t, N);
    switch (G) {
      case 32: std::apply(int4_tile<MB(), 32>, args); break;
      case 64: std::apply(int4_tile<MB(), 64>, args); break;
      case 128: std::apply(int4_tile<MB(), 128>, args); break;
      default: std::apply(int4_tile<MB(), 256>, args); break;
    }
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 or AVX2");
#endif
  return y;
}

}  // namespace qwen35
