// Matrix-vector products for decode: a few activation rows against large weight matrices (bf16, int8, int4).
//
// The work is reading the weights once, so each weight row is streamed once for all activation rows (stock GEMM
// kernels reach about half the memory bandwidth on that shape). Each kernel is tested against a plain PyTorch
// reference (tests/test_cpu_kernels.py).
#include "common.h"

#include <cstring>

namespace qwen35 {
namespace {

#ifdef QWEN35_AVX512

// Prefetch into L2 ahead of the loads, for bf16 rows: 2 KB ahead. The int8/int4 tiles read one sequential stream
// per thread, which the hardware prefetcher follows: in 0.8B decode, alternating settings in one process, no
// software prefetch was 4-14% (int4) and 9% (int8) faster than 16 KB ahead, and 2 KB level with none.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

constexpr int64_t kAheadBf16 = 2048;  // bytes

// One weight row against MB activation rows: y[m] = sum_k x[m, k] w[k]. Weight rows are read strictly in order
// (one sequential stream per thread); U independent accumulators per activation row hide the dot latency.
template <int MB>
void bf16_row(const uint16_t* x, const uint16_t* w, int64_t K, bf16* y, int64_t ldy) {
  constexpr int U = MB == 1 ? 4 : 2;
  __m512 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    prefetch(w + k + kAheadBf16 / 2);
    if (U == 4) prefetch(w + k + kAheadBf16 / 2 + 64);
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
    __m512 total = acc[0][m];
    for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[u][m]);
    y[m * ldy] = bf16(_mm512_reduce_add_ps(total));
  }
}

// Activations for the integer kernels: each row cut into blocks of 32 and rounded to int8 with one scale per
// block (as llama.cpp's Q8_0), so weight x activation products run on VNNI's u8 x s8 dot (64 per instruction)
// instead of widening every weight to float. Rows are zero-padded to a multiple of 64 columns. `scale` holds,
// per 64-column chunk, the 16 fp32 lane scales of a dpbusd result (lanes 0-7: the chunk's first block).
struct Int8Rows {
  int64_t K64;  // padded row length
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<float> bsum;  // per row and block of 32: scale * sum(q), the block's sum as the kernels see it
  std::vector<float> qsum;  // per row: the sum of its bsum, for the int8 weights' +128 offset
};

Int8Rows quantize_rows(const bf16* x, int64_t M, int64_t K) {
  Int8Rows r{(K + 63) / 64 * 64};
  const int64_t chunks = r.K64 / 64;
  r.q.assign(M * r.K64, 0);
  r.scale.assign(M * chunks * 16, 0.0f);
  r.bsum.assign(M * (r.K64 / 32), 0.0f);
  r.qsum.assign(M, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b * 32 < K; ++b) {
      const int64_t k0 = b * 32, k1 = std::min(K, k0 + 32);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::abs(static_cast<float>(x[m * K + k])));
      const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int8_t v = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[m * K + k]) * inv));
        r.q[m * r.K64 + k] = v;
        sum += v;
      }
      std::fill_n(r.scale.data() + (m * chunks + b / 2) * 16 + (b % 2) * 8, 8, d);
      r.bsum[m * (r.K64 / 32) + b] = d * static_cast<float>(sum);
      r.qsum[m] += d * static_cast<float>(sum);
    }
  return r;
}

// int8 kernel layout: tiles of 16 weight rows. Per tile and 4 columns c..c+3, 64 bytes: byte 4r + j holds row r's
// column c + j as q + 128 (u8, for dpbusd), so one instruction multiplies 4 columns of 16 rows by 4 activations
// broadcast to every lane, and the 16 sums stay in int32 lanes over a 32-column activation block (as int4_tile).
// dpbusd gives sum (q + 128) x: the 128 * sum x part is taken off once per activation row (qsum).
template <int MB>
void int8_tile(const Int8Rows& x, int64_t m0, const uint8_t* w, const bf16* scale, int64_t K, bf16* y, int64_t ldy) {
  const int64_t chunks = x.K64 / 64;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {  // blocks of 32 columns: 8 x 64 bytes
    const uint8_t* p = w + b * 512;
    __m512i even[MB], odd[MB];  // two accumulators: half the dependency chain
    for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm512_setzero_si512();
    for (int i = 0; i < 8; i += 2) {
      const __m512i v0 = _mm512_loadu_si512(p + 64 * i), v1 = _mm512_loadu_si512(p + 64 * i + 64);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xq = x.q.data() + (m0 + m) * x.K64 + b * 32 + 4 * i;
        int32_t x0, x1;
        std::memcpy(&x0, xq, 4);
        std::memcpy(&x1, xq + 4, 4);
        even[m] = _mm512_dpbusd_epi32(even[m], v0, _mm512_set1_epi32(x0));
        odd[m] = _mm512_dpbusd_epi32(odd[m], v1, _mm512_set1_epi32(x1));
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float d = x.scale[((m0 + m) * chunks + b / 2) * 16 + (b % 2) * 8];  // the block's activation scale
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[m], odd[m])), _mm512_set1_ps(d), acc[m]);
    }
  }
  const __m512 s = load_bf16_ps(scale, 16);
  for (int m = 0; m < MB; ++m) {
    const __m512 out = _mm512_mul_ps(s, _mm512_sub_ps(acc[m], _mm512_set1_ps(128.0f * x.qsum[m0 + m])));
    const __m256bh v = _mm512_cvtneps_pbh(out);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy), reinterpret_cast<const __m256i&>(v));
  }
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
  const int64_t groups = K / G, chunks = x.K64 / 64;
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
        for (int m = 0; m < MB; ++m) {
          const int8_t* xq = x.q.data() + (m0 + m) * x.K64 + b * 32 + 8 * i;
          int32_t x0, x1;
          std::memcpy(&x0, xq, 4);
          std::memcpy(&x1, xq + 4, 4);
          lo[m] = _mm512_dpbusd_epi32(lo[m], wl, _mm512_set1_epi32(x0));
          hi[m] = _mm512_dpbusd_epi32(hi[m], wh, _mm512_set1_epi32(x1));
        }
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i dot = _mm512_add_epi32(lo[m], _mm512_srai_epi32(hi[m], 4));
        const float d = x.scale[((m0 + m) * chunks + b / 2) * 16 + (b % 2) * 8];  // the block's activation scale
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d), acc[m]);
      }
    }
    const __m512 sg = load_bf16_ps(s + g * 16, 16), zg = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sg,
                                                                          load_bf16_ps(z + g * 16, 16));
    for (int m = 0; m < MB; ++m)
      out[m] = _mm512_fmadd_ps(zg, _mm512_set1_ps(xsum[(m0 + m) * groups + g]), _mm512_fmadd_ps(acc[m], sg, out[m]));
  }
  for (int m = 0; m < MB; ++m) {
    const __m256bh v = _mm512_cvtneps_pbh(out[m]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy), reinterpret_cast<const __m256i&>(v));
  }
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

// Row r's 4-byte pieces of a tile (one per 64-byte block) side by side in `row` (a 16-lane gather of them was
// several times slower than these 4-byte copies).
inline void row_pieces(const uint8_t* tile, int r, int64_t pieces, uint8_t* row) {
  for (int64_t i = 0; i < pieces; ++i) std::memcpy(row + 4 * i, tile + 64 * i + 4 * r, 4);
}

// All 16 rows' pieces of a tile, row r's at rows + r * 4 * pieces, in one pass: 16 blocks at a time are a 16x16
// matrix of 32-bit pieces (block, row), transposed in registers. Prefill reads whole tiles; row by row, tiles
// wider than the L1 cache (K = 2560) dequantized 2-3x slower.
void tile_pieces(const uint8_t* tile, int64_t pieces, uint8_t* rows) {
  for (int64_t p0 = 0; p0 < pieces; p0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, pieces - p0));
    __m512i r[16], t[16];
    for (int a = 0; a < 16; ++a) r[a] = a < n ? _mm512_loadu_si512(tile + 64 * (p0 + a)) : _mm512_setzero_si512();
    for (int a = 0; a < 16; a += 2) {
      t[a] = _mm512_unpacklo_epi32(r[a], r[a + 1]);
      t[a + 1] = _mm512_unpackhi_epi32(r[a], r[a + 1]);
    }
    for (int j = 0; j < 16; j += 4) {  // r[j + c], 128-bit lane L: row 4L + c of blocks j..j+3
      r[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
      r[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
      r[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
      r[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // row 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
      const __m512i x01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), x23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
      const __m512i y01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE), y23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
      const __m512i row[4] = {_mm512_shuffle_i32x4(x01, x23, 0x88), _mm512_shuffle_i32x4(x01, x23, 0xDD),
                              _mm512_shuffle_i32x4(y01, y23, 0x88), _mm512_shuffle_i32x4(y01, y23, 0xDD)};
      for (int L = 0; L < 4; ++L)
        _mm512_mask_storeu_epi32(rows + (4 * L + c) * 4 * pieces + 4 * p0, (__mmask16)((1u << n) - 1), row[L]);
    }
  }
}

// Calls convert(piece_row, r, i) for each requested row i (row r of its tile, its pieces in piece_row): whole
// tiles requested in order (prefill) go through tile_pieces, other rows (lookups) one by one.
template <typename Convert>
void for_rows(const uint8_t* packed, int64_t tile_bytes, int64_t pieces, const int64_t* rp, int64_t n,
              Convert&& convert) {
  at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> buf(16 * 4 * pieces);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t i0 = 16 * g, i1 = std::min(n, i0 + 16);
      bool whole = i1 - i0 == 16 && rp[i0] % 16 == 0;
      for (int64_t i = i0 + 1; whole && i < i1; ++i) whole = rp[i] == rp[i - 1] + 1;
      if (whole) tile_pieces(packed + rp[i0] / 16 * tile_bytes, pieces, buf.data());
      for (int64_t i = i0; i < i1; ++i) {
        const int r = static_cast<int>(rp[i] % 16);
        if (!whole) row_pieces(packed + rp[i] / 16 * tile_bytes, r, pieces, buf.data());
        convert(buf.data() + (whole ? r : 0) * 4 * pieces, r, i);
      }
    }
  });
}

// Row r of a tile in the int4 kernel layout (see int4_tile), its pieces side by side in `row`, to bf16, rounded as
// the reference computes it: w = (q - 8) * scale + zero, a product then a sum (no fused multiply-add), then to
// nearest-even bf16.
void int4_row_to_bf16(const uint8_t* row, const bf16* s, const bf16* z, int r, int64_t K, int64_t G, bf16* w) {
  const __m512 eight = _mm512_set1_ps(8.0f);
  const __m512i nibble = _mm512_set1_epi8(15);
  // per 32-bit piece i (8 columns): low nibbles = its first 4 columns, high = the next 4; qwords put back in order
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  alignas(64) uint8_t q[128];
  for (int64_t block = 0; block < K / 128; ++block) {
    const __m512i bytes = _mm512_loadu_si512(row + block * 64);
    const __m512i lo = _mm512_and_si512(bytes, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
    const __m512i a = _mm512_unpacklo_epi32(lo, hi), b = _mm512_unpackhi_epi32(lo, hi);
    _mm512_store_si512(q, _mm512_permutex2var_epi64(a, first, b));
    _mm512_store_si512(q + 64, _mm512_permutex2var_epi64(a, second, b));
    for (int j = 0; j < 8; ++j) {  // 16 columns at a time, inside one group (G is a multiple of 16)
      const int64_t c = block * 128 + 16 * j, g = c / G;
      const __m128i q16 = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * j));
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q16));
      const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(v, eight), _mm512_set1_ps(static_cast<float>(s[g * 16 + r])));
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(scaled, _mm512_set1_ps(static_cast<float>(z[g * 16 + r]))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + c), reinterpret_cast<const __m256i&>(out));
    }
  }
}

// A row of the int8 kernel layout (see int8_tile), its pieces side by side in `row`, to bf16: q * scale rounded
// once, as PyTorch's bf16 product of the two.
void int8_row_to_bf16(const uint8_t* row, float scale, int64_t K, bf16* w) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 16) {  // K is a multiple of 32
    const __m128i q = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)), flip);
    const __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + k), reinterpret_cast<const __m256i&>(out));
  }
}

#endif  // QWEN35_AVX512

}  // namespace

bool available() {
#ifdef QWEN35_AVX512
  return true;
#else
  return false;
#endif
}

// y (M, N) = x (M, K) @ w (N, K)^T, all bf16.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w) {
  check(x, at::kBFloat16, 2, "x");
  check(w, at::kBFloat16, 2, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "x has ", x.size(1), " columns, w has ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_AVX512
  const uint16_t *xp = u16(x), *wp = u16(w);
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_blocks(M, N, [&](int64_t n, int r, int64_t m, int mb) {
    dispatch_rows(mb, [&](auto MB) {
      for (int i = 0; i < r; ++i) bf16_row<MB()>(xp + m * K, wp + (n + i) * K, K, yp + m * N + n + i, N);
    });
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16 and VNNI");
#endif
  return y;
}

// Checks int8 operands in the kernel layout (see int8_tile): packed (N/16, 16K), scales (N).
static void check_int8(const torch::Tensor& packed, const torch::Tensor& scales, int64_t K) {
  check(packed, at::kByte, 2, "packed");
  check(scales, at::kBFloat16, 1, "scales");
  TORCH_CHECK(K % 32 == 0 && packed.size(1) == 16 * K && scales.size(0) == 16 * packed.size(0),
              "int8 operands do not match K=", K, " (a multiple of 32), ", packed.size(0), " tiles and ",
              scales.size(0), " scales");
}

// y (M, N) = x (M, K) @ (q * scale)^T with q int8 in the kernel layout (see int8_tile), one scale per row.
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales) {
  check(x, at::kBFloat16, 2, "x");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = 16 * tiles;
  check_int8(packed, scales, K);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_AVX512
  const Int8Rows xq = quantize_rows(x.data_ptr<at::BFloat16>(), M, K);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const bf16* sp = scales.data_ptr<at::BFloat16>();
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_tiles(M, tiles, [&](int64_t t, int64_t m, auto MB) {
    int8_tile<MB()>(xq, m, wp + t * 16 * K, sp + 16 * t, K, yp + m * N + 16 * t, N);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16 and VNNI");
#endif
  return y;
}

// Checks int4 operands in the kernel layout (see int4_tile): packed (N/16, 8K), scales and zeros (N/16, K/G, 16).
static void check_int4(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                       int64_t K, int64_t G) {
  check(packed, at::kByte, 2, "packed");
  check(scales, at::kBFloat16, 3, "scales");
  check(zeros, at::kBFloat16, 3, "zeros");
  TORCH_CHECK(K % 128 == 0 && (G == 32 || G == 64 || G == 128 || G == 256) && K % G == 0,
              "int4 kernel needs K % 128 == 0 and a group of 32/64/128/256 dividing K; K=", K, " G=", G);
  TORCH_CHECK(packed.size(1) == 8 * K && scales.size(0) == packed.size(0) && scales.size(1) == K / G &&
              scales.size(2) == 16 && zeros.sizes() == scales.sizes(), "int4 operands do not match K=", K, " G=", G);
}

// y (M, N) = x (M, K) @ W^T with W int4 in the kernel layout (see int4_tile), x and y bf16.
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t G) {
  check(x, at::kBFloat16, 2, "x");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = 16 * tiles;
  check_int4(packed, scales, zeros, K, G);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_AVX512
  const int64_t groups = K / G;
  const Int8Rows xq = quantize_rows(x.data_ptr<at::BFloat16>(), M, K);
  std::vector<float> xsum(M * groups, 0.0f);  // per activation row and group: sum of x, for the zero points
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / 32; ++b) xsum[m * groups + b * 32 / G] += xq.bsum[m * (xq.K64 / 32) + b];
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
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16 and VNNI");
#endif
  return y;
}

// Rows `rows` (int64) of W in bf16 from the int4 kernel layout: tiles of it feed a GEMM when many activation rows
// (prefill) come; single rows are embedding lookups.
torch::Tensor int4_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                              int64_t G, const torch::Tensor& rows) {
  const int64_t K = packed.size(1) / 8, groups = K / G, N = 16 * packed.size(0);
  check_int4(packed, scales, zeros, K, G);
  check(rows, at::kLong, 1, "rows");
  auto w = torch::empty({rows.size(0), K}, scales.options());
#ifdef QWEN35_AVX512
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "row ", rp[i], " is not in [0, ", N, ")");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  bf16* wp = w.data_ptr<at::BFloat16>();
  for_rows(pp, 8 * K, K / 8, rp, rows.size(0), [&](const uint8_t* row, int r, int64_t i) {
    const int64_t t = rp[i] / 16;
    int4_row_to_bf16(row, sp + t * groups * 16, zp + t * groups * 16, r, K, G, wp + i * K);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16 and VNNI");
#endif
  return w;
}

// Rows `rows` (int64) of W in bf16 from the int8 kernel layout, as `int4_dequantize`.
torch::Tensor int8_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& rows) {
  const int64_t K = packed.size(1) / 16, N = 16 * packed.size(0);
  check_int8(packed, scales, K);
  check(rows, at::kLong, 1, "rows");
  auto w = torch::empty({rows.size(0), K}, scales.options());
#ifdef QWEN35_AVX512
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "row ", rp[i], " is not in [0, ", N, ")");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16* sp = scales.data_ptr<at::BFloat16>();
  bf16* wp = w.data_ptr<at::BFloat16>();
  for_rows(pp, 16 * K, K / 4, rp, rows.size(0), [&](const uint8_t* row, int, int64_t i) {
    int8_row_to_bf16(row, static_cast<float>(sp[rp[i]]), K, wp + i * K);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16 and VNNI");
#endif
  return w;
}

}  // namespace qwen35
