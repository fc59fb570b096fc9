// Quantized weight rows back to bf16, from the int8/int4 kernel layouts (tiles of 16 rows, see gemv.cpp): tiles
// of a prefill product (256 rows at a time into a GEMM) and embedding lookups. Each rounds exactly as the plain
// PyTorch reference does (tests/test_cpu_kernels.py).
#include "common.h"

#include <cstring>

namespace qwen35 {
namespace {

// Row r's 4-byte pieces of a tile (one per 64-byte block) side by side in `row` (a 16-lane gather of them was
// several times slower than these 4-byte copies).
inline void row_pieces(const uint8_t* tile, int r, int64_t pieces, uint8_t* row) {
  for (int64_t i = 0; i < pieces; ++i) std::memcpy(row + 4 * i, tile + 64 * i + 4 * r, 4);
}

#ifdef QWEN35_AVX512

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
      const __m512i x01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
      const __m512i x23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
      const __m512i y01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
      const __m512i y23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
      const __m512i row[4] = {_mm512_shuffle_i32x4(x01, x23, 0x88), _mm512_shuffle_i32x4(x01, x23, 0xDD),
                              _mm512_shuffle_i32x4(y01, y23, 0x88), _mm512_shuffle_i32x4(y01, y23, 0xDD)};
      for (int L = 0; L < 4; ++L)
        _mm512_mask_storeu_epi32(rows + (4 * L + c) * 4 * pieces + 4 * p0, (__mmask16)((1u << n) - 1), row[L]);
    }
  }
}

// Row r of a tile in the int4 kernel layout (see int4_tile), its pieces side by side in `row`, to bf16, rounded as
// the reference computes it: w = (q - 8) * scale + zero, a product then a sum (no fused multiply-add), then to
// nearest-even bf16.
void int4_row_to_bf16(const uint8_t* row, const bf16* s, const bf16* z, int r, int64_t K, int64_t G, bf16* w) {
  const __m512 eight = _mm512_set1_ps(8.0f);
  const __m512i nibble = _mm512_set1_epi8(15);
  // per 32-bit piece i (8 columns): low nibbles = its first 4 columns, high = the next 4; qwords put back in order
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
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

#elif defined(QWEN35_KERNELS)  // AVX2: plain loops, for embedding lookups (prefill products take the kernels)

// As the AVX-512 versions: a product then a sum, each rounded (no contraction into a fused multiply-add).
__attribute__((optimize("fp-contract=off")))
void int4_row_to_bf16(const uint8_t* row, const bf16* s, const bf16* z, int r, int64_t K, int64_t G, bf16* w) {
  for (int64_t c = 0; c < K; ++c) {  // piece c / 8: byte j holds column j (low nibble) and 4 + j (high)
    const uint8_t byte = row[c / 8 * 4 + c % 4];
    const float q = static_cast<float>(c % 8 < 4 ? byte & 15 : byte >> 4);
    const int64_t g = c / G;
    const float scaled = (q - 8.0f) * static_cast<float>(s[g * 16 + r]);
    w[c] = bf16(scaled + static_cast<float>(z[g * 16 + r]));
  }
}

void int8_row_to_bf16(const uint8_t* row, float scale, int64_t K, bf16* w) {
  for (int64_t k = 0; k < K; ++k) w[k] = bf16(static_cast<float>(static_cast<int>(row[k]) - 128) * scale);
}

#endif  // QWEN35_AVX512

#ifdef QWEN35_KERNELS
// Calls convert(piece_row, r, i) for each requested row i (row r of its tile, its pieces in piece_row): with
// AVX-512, whole tiles requested in order (prefill) go through tile_pieces; other rows (lookups) one by one.
template <typename Convert>
void for_rows(const uint8_t* packed, int64_t tile_bytes, int64_t pieces, const int64_t* rp, int64_t n,
              Convert&& convert) {
  at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> buf(16 * 4 * pieces);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t i0 = 16 * g, i1 = std::min(n, i0 + 16);
#ifdef QWEN35_AVX512
      bool whole = i1 - i0 == 16 && rp[i0] % 16 == 0;
      for (int64_t i = i0 + 1; whole && i < i1; ++i) whole = rp[i] == rp[i - 1] + 1;
      if (whole) tile_pieces(packed + rp[i0] / 16 * tile_bytes, pieces, buf.data());
#else
      const bool whole = false;
#endif
      for (int64_t i = i0; i < i1; ++i) {
        const int r = static_cast<int>(rp[i] % 16);
        if (!whole) row_pieces(packed + rp[i] / 16 * tile_bytes, r, pieces, buf.data());
        convert(buf.data() + (whole ? r : 0) * 4 * pieces, r, i);
      }
    }
  });
}
#endif

}  // namespace

// Requested rows: int64, each one of the N rows.
static void check_rows(const torch::Tensor& rows, int64_t N) {
  check(rows, at::kLong, 1, "rows");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "row ", rp[i], " is not in [0, ", N, ")");
}

// Rows `rows` (int64) of W in bf16 from the int4 kernel layout: tiles of it feed a GEMM when many activation rows
// (prefill) come; single rows are embedding lookups.
torch::Tensor int4_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                              int64_t G, const torch::Tensor& rows) {
  const int64_t K = packed.size(1) / 8, groups = K / G, N = 16 * packed.size(0);
  check_int4(packed, scales, zeros, K, G);
  check_rows(rows, N);
  auto w = torch::empty({rows.size(0), K}, scales.options());
#ifdef QWEN35_KERNELS
  const int64_t* rp = rows.data_ptr<int64_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  bf16* wp = w.data_ptr<at::BFloat16>();
  for_rows(pp, 8 * K, K / 8, rp, rows.size(0), [&](const uint8_t* row, int r, int64_t i) {
    const int64_t t = rp[i] / 16;
    int4_row_to_bf16(row, sp + t * groups * 16, zp + t * groups * 16, r, K, G, wp + i * K);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 or AVX2");
#endif
  return w;
}

// Rows `rows` (int64) of W in bf16 from the int8 kernel layout, as `int4_dequantize`.
torch::Tensor int8_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& rows) {
  const int64_t K = packed.size(1) / 16, N = 16 * packed.size(0);
  check_int8(packed, scales, K);
  check_rows(rows, N);
  auto w = torch::empty({rows.size(0), K}, scales.options());
#ifdef QWEN35_KERNELS
  const int64_t* rp = rows.data_ptr<int64_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16* sp = scales.data_ptr<at::BFloat16>();
  bf16* wp = w.data_ptr<at::BFloat16>();
  for_rows(pp, 16 * K, K / 4, rp, rows.size(0), [&](const uint8_t* row, int, int64_t i) {
    int8_row_to_bf16(row, static_cast<float>(sp[rp[i]]), K, wp + i * K);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 or AVX2");
#endif
  return w;
}

}  // namespace qwen35
