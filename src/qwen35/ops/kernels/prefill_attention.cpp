// Causal prefill attention on AVX-512 BF16, flash style: T queries that are the last T of S keys (a prompt from
// empty, or a chunk after a cached history), grouped K/V heads, bf16 in and out. PyTorch's CPU flash attention
// runs head_dim 256 at ~150 GFLOP/s on two Zen 4 cores, a oneDNN GEMM call per tile; here a task (a K/V head, a
// run of query tokens, its group's query heads as rows) walks its keys in blocks repacked in pairs, and every
// product is a register-blocked bf16 dot (vdpbf16ps) or, where the CPU has AMX, a tile product: scores in fp32,
// an online softmax in fp32, the weights rounded to bf16 for the values as PyTorch's flash attention rounds
// them, the output summed in fp32.
#include "common.h"

namespace qwen35 {

#ifdef QWEN35_AVX512
namespace {

constexpr int64_t kKeys = 256;   // keys a block: the running softmax rescales a row's output once a block
constexpr int64_t kTokens = 32;  // query tokens a task: with 4 heads, 128 rows whose output (128 KB) stays in L2

// A block of n <= kKeys key rows as pairs along D: out[(d / 2) * kKeys + key] = (k[key][d], k[key][d + 1]) for
// keys up to n rounded up to 64, those past n zero. In 16 x 16 tiles of pairs, each transposed in registers (a
// scalar loop took 12% of the kernel's time).
void pack_keys(const uint16_t* k, int64_t stride, int64_t n, int64_t D, uint32_t* out) {
  for (int64_t key0 = 0; key0 < (n + 63) / 64 * 64; key0 += 16)
    for (int64_t c0 = 0; c0 < D / 2; c0 += 16) {
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = key0 + i < n ? _mm512_loadu_si512(k + (key0 + i) * stride + 2 * c0) : _mm512_setzero_si512();
      for (int i = 0; i < 8; ++i) {  // lane L of t[2i], t[2i + 1]: rows 2i, 2i + 1 interleaved, columns 4L..4L+3
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {  // lane L of r[4i + j]: rows 4i..4i+3 of column 4L + j
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      for (int j = 0; j < 4; ++j) {  // column 4L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j]
        const __m512i u = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), w = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
        const __m512i v = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        const __m512i x = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
        uint32_t* col = out + (c0 + j) * kKeys + key0;
        _mm512_storeu_si512(col, _mm512_shuffle_i32x4(u, v, 0x88));
        _mm512_storeu_si512(col + 4 * kKeys, _mm512_shuffle_i32x4(u, v, 0xDD));
        _mm512_storeu_si512(col + 8 * kKeys, _mm512_shuffle_i32x4(w, x, 0x88));
        _mm512_storeu_si512(col + 12 * kKeys, _mm512_shuffle_i32x4(w, x, 0xDD));
      }
    }
}

// The same block's value rows as pairs of keys: out[(key / 2) * D + d] = (v[key][d], v[key + 1][d]).
void pack_values(const uint16_t* v, int64_t stride, int64_t n, int64_t D, uint32_t* out) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lo = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t key = 0; key < (n + 63) / 64 * 64; key += 2) {
    const uint16_t *a = v + key * stride, *b = a + stride;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i x = key < n ? _mm512_loadu_si512(a + d) : zero, y = key + 1 < n ? _mm512_loadu_si512(b + d) : zero;
      // unpack interleaves within 128-bit lanes: (d 0-3, 8-11, 16-19, 24-27) and (4-7, 12-15, ...); the
      // permutes put d 0-15 in the first vector and 16-31 in the second
      const __m512i l = _mm512_unpacklo_epi16(x, y), h = _mm512_unpackhi_epi16(x, y);
      _mm512_storeu_si512(out + (key / 2) * D + d, _mm512_permutex2var_epi64(l, lo, h));
      _mm512_storeu_si512(out + (key / 2) * D + d + 16, _mm512_permutex2var_epi64(l, hi, h));
    }
  }
}

// n rows of 8-bit keys or values (int8, an fp32 scale per row at sc[row * sst]) to bf16 rows of D at out, as
// `QuantKV.dequantize(bf16)` rounds them: the product in fp32, then to nearest even.
void dequantize_rows(const int8_t* x, int64_t stride, const float* sc, int64_t sst, int64_t n, int64_t D,
                     uint16_t* out) {
  for (int64_t row = 0; row < n; ++row) {
    const __m512 unit = _mm512_set1_ps(sc[row * sst]);
    for (int64_t d = 0; d < D; d += 32) {
      const int8_t* src = x + row * stride + d;
      const auto* at = reinterpret_cast<const __m128i*>(src);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(at)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(at + 1)));
      _mm512_storeu_si512(out + row * D + d,
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, unit), _mm512_mul_ps(lo, unit)));
    }
  }
}

// s[r][0..64) = q_r . (64 packed keys, rows kKeys apart) for N <= 4 query rows (bf16, pointers to their first
// value); s's rows are kKeys apart.
template <int N>
void score_rows(const uint16_t* const* q, const uint32_t* kp, int64_t D, float* s) {
  __m512 acc[N][4];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < D / 2; ++d2) {
    const uint32_t* row = kp + d2 * kKeys;
    const __m512bh k[4] = {as_bh(_mm512_loadu_si512(row)), as_bh(_mm512_loadu_si512(row + 16)),
                           as_bh(_mm512_loadu_si512(row + 32)), as_bh(_mm512_loadu_si512(row + 48))};
    for (int r = 0; r < N; ++r) {
      const __m512bh pair = as_bh(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q[r] + 2 * d2)));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pair, k[c]);
    }
  }
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * kKeys + 16 * c, acc[r][c]);
}

// o[r][d0..d0+64) += (weights of row r, `pairs` pairs of keys in bf16) . (the packed block's values), N <= 4 rows.
template <int N>
void value_rows(const uint32_t* p, const uint32_t* vp, int64_t pairs, int64_t D, int64_t d0, float* o) {
  __m512 acc[N][4];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + d0 + 16 * c);
  for (int64_t k2 = 0; k2 < pairs; ++k2) {
    const uint32_t* row = vp + k2 * D + d0;
    const __m512bh v[4] = {as_bh(_mm512_loadu_si512(row)), as_bh(_mm512_loadu_si512(row + 16)),
                           as_bh(_mm512_loadu_si512(row + 32)), as_bh(_mm512_loadu_si512(row + 48))};
    for (int r = 0; r < N; ++r) {
      const __m512bh pair = as_bh(_mm512_set1_epi32(static_cast<int32_t>(p[r * kKeys / 2 + k2])));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pair, v[c]);
    }
  }
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * D + d0 + 16 * c, acc[r][c]);
}

template <typename F>
void by_four(int64_t rows, F&& f) {  // f(row, count) on groups of 4 rows, the last one shorter
  for (int64_t r = 0; r < rows; r += 4) f(r, std::min<int64_t>(4, rows - r));
}

#ifdef QWEN35_AMX
// The same products on AMX tiles (Sapphire Rapids and later): a tile product is 16 rows x 16 columns x 32 bf16,
// 16 times the work of a vdpbf16ps, and the packed blocks above are already the B-tile layout (pairs along the
// summed axis). Tiles 0-3 hold a 2 x 2 block of fp32 outputs, 4-5 two row tiles of A, 6-7 two column tiles of B.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// s[r][0..keys) = q_r . (the block's keys) for rows [r0, r0 + 32) of qb (bf16 rows of D); keys a multiple of 32.
void tile_scores(const uint16_t* qb, int64_t r0, const uint32_t* kp, int64_t keys, int64_t D, float* s) {
  for (int64_t c0 = 0; c0 < keys; c0 += 32) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      _tile_loadd(4, qb + r0 * D + d0, D * 2);
      _tile_loadd(5, qb + (r0 + 16) * D + d0, D * 2);
      _tile_loadd(6, kp + d0 / 2 * kKeys + c0, kKeys * 4);
      _tile_loadd(7, kp + d0 / 2 * kKeys + c0 + 16, kKeys * 4);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    float* out = s + r0 * kKeys + c0;
    _tile_stored(0, out, kKeys * 4); _tile_stored(1, out + 16, kKeys * 4);
    _tile_stored(2, out + 16 * kKeys, kKeys * 4); _tile_stored(3, out + 16 * kKeys + 16, kKeys * 4);
  }
}

// o[r] += (row r's weights, `pairs` bf16 pairs of keys, a multiple of 16) . (the block's values) for rows
// [r0, r0 + 32).
void tile_values(const uint32_t* p, int64_t r0, const uint32_t* vp, int64_t pairs, int64_t D, float* o) {
  constexpr int64_t P = kKeys / 2;  // pairs a row
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    float* out = o + r0 * D + d0;
    _tile_loadd(0, out, D * 4); _tile_loadd(1, out + 16, D * 4);
    _tile_loadd(2, out + 16 * D, D * 4); _tile_loadd(3, out + 16 * D + 16, D * 4);
    for (int64_t k2 = 0; k2 < pairs; k2 += 16) {
      _tile_loadd(4, p + r0 * P + k2, P * 4);
      _tile_loadd(5, p + (r0 + 16) * P + k2, P * 4);
      _tile_loadd(6, vp + k2 * D + d0, D * 4);
      _tile_loadd(7, vp + k2 * D + d0 + 16, D * 4);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, D * 4); _tile_stored(1, out + 16, D * 4);
    _tile_stored(2, out + 16 * D, D * 4); _tile_stored(3, out + 16 * D + 16, D * 4);
  }
}
#endif

// A thread's buffers for its tasks (R rows at most, head_dim D; tiles take rows in pairs of 16).
struct Scratch {
  std::vector<uint16_t> rows8, qb;  // an 8-bit block's rows in bf16; the query rows gathered for tiles
  std::vector<uint32_t> kp, vp, p;  // the packed keys, values, and each row's weights in bf16 pairs
  std::vector<float> s, o, top, sum;
  std::vector<const uint16_t*> rows;
  Scratch(int64_t R, int64_t D, bool tiles)
      : rows8(kKeys * D), qb(tiles ? R * D : 0), kp(kKeys * D / 2), vp(kKeys * D / 2), p(R * kKeys / 2),
        s(R * kKeys), o(R * D), top(R), sum(R), rows(R) {}
};

// One task: query tokens [t0, t0 + nt) of K/V head h of sequence b, its G query heads; row r is token
// t0 + r / G, head h * G + r % G. The scratch buffers are the thread's.
struct Task {
  const torch::Tensor &q, &k, &v;
  float scale;
  const float *ksc, *vsc;  // 8-bit K/V: the scales (B, Hkv, S, 1) of one layout; null for bf16
  const int64_t* sst;
  torch::Tensor& out;
  bool tiles;  // the products on AMX tiles (`amx()`), rows padded to pairs of 16

  void operator()(int64_t b, int64_t h, int64_t t0, int64_t nt, Scratch& buf) const {
    std::vector<float> &s = buf.s, &o = buf.o, &top = buf.top, &sum = buf.sum;
    std::vector<uint32_t> &kp = buf.kp, &vp = buf.vp, &p = buf.p;
    std::vector<const uint16_t*>& rows = buf.rows;
    const int64_t T = q.size(2), D = q.size(3), S = k.size(2), G = q.size(1) / k.size(1), R = nt * G;
    const int64_t past = S - T, last = past + t0 + nt;  // keys [0, last) are seen by some row
    const int64_t Rt = tiles ? (R + 31) / 32 * 32 : R;  // rows computed (the pad rows' queries are zeros)
    const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < R; ++r)
      rows[r] = qp + b * q.stride(0) + (h * G + r % G) * q.stride(1) + (t0 + r / G) * q.stride(2);
    if (tiles) {
      for (int64_t r = 0; r < R; ++r) std::copy(rows[r], rows[r] + D, buf.qb.begin() + r * D);
      std::fill(buf.qb.begin() + R * D, buf.qb.begin() + Rt * D, 0);
    }
    const auto head = [&](const torch::Tensor& x) {  // this head's first row, bytes
      return static_cast<const char*>(x.data_ptr()) + (b * x.stride(0) + h * x.stride(1)) * x.element_size();
    };
    const char *kh = head(k), *vh = head(v);
    const int64_t first = b * sst[0] + h * sst[1];  // this head's first scale (8-bit)
    // a block's rows as bf16: the cache's own (16-bit), or dequantized into rows8 (8-bit)
    const auto block = [&](const char* x, const torch::Tensor& t, const float* sc, int64_t k0, int64_t n) {
      if (!sc) return std::make_pair(reinterpret_cast<const uint16_t*>(x) + k0 * t.stride(2), t.stride(2));
      dequantize_rows(reinterpret_cast<const int8_t*>(x) + k0 * t.stride(2), t.stride(2), sc + first + k0 * sst[2],
                      sst[2], n, D, buf.rows8.data());
      return std::make_pair(static_cast<const uint16_t*>(buf.rows8.data()), D);
    };
    std::fill(o.begin(), o.begin() + Rt * D, 0.0f);
    std::fill(top.begin(), top.begin() + Rt, -INFINITY), std::fill(sum.begin(), sum.begin() + Rt, 0.0f);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t k0 = 0; k0 < last; k0 += kKeys) {
      const int64_t n = std::min(kKeys, last - k0), width = (n + 63) / 64 * 64;  // keys, and keys computed
      const auto [kr, kst] = block(kh, k, ksc, k0, n);
      pack_keys(kr, kst, n, D, kp.data());
      const auto [vr, vst] = block(vh, v, vsc, k0, n);
      pack_values(vr, vst, n, D, vp.data());
#ifdef QWEN35_AMX
      if (tiles)
        for (int64_t r0 = 0; r0 < Rt; r0 += 32) tile_scores(buf.qb.data(), r0, kp.data(), width, D, s.data());
      else
#endif
      for (int64_t c0 = 0; c0 < width; c0 += 64)
        by_four(R, [&](int64_t r, int64_t m) {
          const auto* qr = rows.data() + r;
          const uint32_t* kc = kp.data() + c0;
          float* sr = s.data() + r * kKeys + c0;
          m == 4 ? score_rows<4>(qr, kc, D, sr) : m == 3 ? score_rows<3>(qr, kc, D, sr)
                 : m == 2 ? score_rows<2>(qr, kc, D, sr) : score_rows<1>(qr, kc, D, sr);
        });
      for (int64_t r = 0; r < Rt; ++r) {  // scale, mask the keys after the row's token, the running softmax
        float* sr = s.data() + r * kKeys;
        const __m512i seen = _mm512_set1_epi32(static_cast<int32_t>(std::min(n, past + t0 + r / G + 1 - k0)));
        __m512 best = _mm512_set1_ps(top[r]);
        for (int64_t c = 0; c < width; c += 16) {
          const __mmask16 ok = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(c)), seen);
          const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), ok, _mm512_loadu_ps(sr + c),
                                              _mm512_set1_ps(scale));
          _mm512_storeu_ps(sr + c, x);
          best = _mm512_max_ps(best, x);
        }
        const float m = _mm512_reduce_max_ps(best);  // finite: key 0 is seen by every row, in its first block
        const float fade = std::exp(top[r] - m);
        __m512 total = _mm512_setzero_ps();
        for (int64_t c = 0; c < width; c += 32) {  // weights in bf16 pairs of keys: (c, c + 1), ...
          const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + c), _mm512_set1_ps(m)));
          const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + c + 16), _mm512_set1_ps(m)));
          total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
          _mm512_storeu_si512(p.data() + r * kKeys / 2 + c / 2, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        sum[r] = sum[r] * fade + _mm512_reduce_add_ps(total), top[r] = m;
        if (fade != 1.0f)
          for (int64_t d = 0; d < D; ++d) o[r * D + d] *= fade;
      }
#ifdef QWEN35_AMX
      if (tiles)
        for (int64_t r0 = 0; r0 < Rt; r0 += 32) tile_values(p.data(), r0, vp.data(), width / 2, D, o.data());
      else
#endif
      for (int64_t d0 = 0; d0 < D; d0 += 64)
        by_four(R, [&](int64_t r, int64_t m) {
          const uint32_t* pr = p.data() + r * kKeys / 2;
          float* orow = o.data() + r * D;
          const int64_t w = width / 2;
          m == 4 ? value_rows<4>(pr, vp.data(), w, D, d0, orow) : m == 3 ? value_rows<3>(pr, vp.data(), w, D, d0, orow)
                 : m == 2 ? value_rows<2>(pr, vp.data(), w, D, d0, orow) : value_rows<1>(pr, vp.data(), w, D, d0, orow);
        });
    }
    bf16* op = out.data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < R; ++r) {
      bf16* dst = op + ((b * q.size(1) + h * G + r % G) * T + t0 + r / G) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = bf16(o[r * D + d] / sum[r]);
    }
  }
};

}  // namespace
#endif

bool amx() {
#ifdef QWEN35_AMX
  // Linux hands a process the tiles' 8 KB of state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); asked once, the answer holds for the process
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

// q (B, Hq, T, D) against k and v (B, Hkv, S, D), S >= T, with unit stride along D (views of the cache's
// buffers), causal with the queries the last T keys: query t sees keys 0 .. S - T + t. q, and k and v bf16, or
// int8 with k_scale and v_scale (B, Hkv, S, 1) fp32 (an 8-bit cache, dequantized 64 keys at a time as
// `QuantKV.dequantize(bf16)` does). Returns (B, Hq, T, D) bf16. D a multiple of 64; AVX-512 BF16 builds only
// (`isa()` "avx512"). tiles: the products on AMX tiles where `amx()` (a pass about twice as fast on Sapphire Rapids
// cores); else vdpbf16ps.
torch::Tensor attention_prefill(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                double scale, const std::optional<torch::Tensor>& k_scale,
                                const std::optional<torch::Tensor>& v_scale, bool tiles) {
  const bool quantized = k.scalar_type() == at::kChar;
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && (k.scalar_type() == at::kBFloat16 || quantized) &&
              v.scalar_type() == k.scalar_type() && q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
              "q must be bf16 (B, H, T, D), k and v bf16 or int8 (B, Hkv, S, D)");
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hq % Hkv == 0 && S >= T && D % 64 == 0,
              "attention_prefill: q ", q.sizes(), " does not fit k ", k.sizes(), " (S >= T, D a multiple of 64)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k and v need unit stride along D");
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()), "int8 k and v need k_scale and v_scale");
  const int64_t none[3] = {0, 0, 0};
  const float *ksc = nullptr, *vsc = nullptr;
  const int64_t* sst = none;
  if (quantized) {
    for (const auto* t : {&*k_scale, &*v_scale})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv &&
                  t->size(2) == S && t->size(3) == 1 && t->strides() == k_scale->strides(),
                  "k_scale and v_scale must be (B, Hkv, S, 1) fp32 views of one layout");
    ksc = k_scale->data_ptr<float>(), vsc = v_scale->data_ptr<float>(), sst = k_scale->strides().data();
  }
  auto out = torch::empty({B, Hq, T, D}, q.options());
#ifdef QWEN35_AVX512
  const int64_t G = Hq / Hkv, runs = (T + kTokens - 1) / kTokens;
  tiles = tiles && amx();
  const Task task{q, k, v, static_cast<float>(scale), ksc, vsc, sst, out, tiles};
  // later runs of tokens see more keys: in the order last, first, second last, second, ... each thread's
  // contiguous share of the tasks holds as many keys as another's
  at::parallel_for(0, B * Hkv * runs, 1, [&](int64_t i0, int64_t i1) {
    Scratch scratch((kTokens * G + 31) / 32 * 32, D, tiles);
#ifdef QWEN35_AMX
    const TileConfig config;
    if (tiles) _tile_loadconfig(&config);  // a thread's tile shapes, held until _tile_release
#endif
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = i % runs, run = j % 2 == 0 ? runs - 1 - j / 2 : j / 2, bh = i / runs, t0 = run * kTokens;
      task(bh / Hkv, bh % Hkv, t0, std::min(kTokens, T - t0), scratch);
    }
#ifdef QWEN35_AMX
    if (tiles) _tile_release();
#endif
  });
#else
  TORCH_CHECK(false, "attention_prefill needs a build with AVX-512 BF16");
#endif
  return out;
}

}  // namespace qwen35
