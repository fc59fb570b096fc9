// Fast CPU kernels for decode-shaped work, compiled on the user's machine at first use (-march=native).
//
// Decode multiplies a few activation rows by large weight matrices: the work is reading the weights once, so
// these kernels stream each weight row once for all activation rows (stock GEMM kernels reach about half the
// memory bandwidth on that shape). Also: RMSNorm and the whole Gated DeltaNet decode step fused into one call
// each, because at one token per step the cost of many tiny PyTorch ops rivals the arithmetic.
// Each kernel has a plain PyTorch reference in qwen35/ops and is tested against it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define QWEN35_AVX512 1
#endif

namespace {

using bf16 = c10::BFloat16;

void check(const torch::Tensor& t, at::ScalarType type, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == type, name, " has dtype ", t.scalar_type(), ", expected ", type);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const uint16_t* u16(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

#ifdef QWEN35_AVX512

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline __m512i load_bf16(const uint16_t* p, int64_t n) {  // n < 32: masked tail
  return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

// Prefetch into L2 a little ahead of the loads (measured: T1 at 2 KB streams ~10% faster than the hardware
// prefetcher alone, T0 at 1 KB ~30% slower).
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

constexpr int64_t kAhead = 2048;  // bytes

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
    prefetch(w + k + kAhead / 2);
    if (U == 4) prefetch(w + k + kAhead / 2 + 64);
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

// int8 weights with one scale per row: widened to fp32 and multiplied with fp32 activations (exact products).
template <int MB>
void int8_row(const float* x, const int8_t* w, float scale, int64_t K, bf16* y, int64_t ldy) {
  constexpr int U = MB == 1 ? 4 : 2;
  __m512 acc[U][MB];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    prefetch(w + k + kAhead);
    for (int u = 0; u < U; ++u) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(w + k + 16 * u))));
      for (int m = 0; m < MB; ++m) acc[u][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16 * u), wv, acc[u][m]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + k)));
    for (int m = 0; m < MB; ++m) acc[0][m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k), wv, acc[0][m]);
  }
  for (int m = 0; m < MB; ++m) {
    __m512 total = acc[0][m];
    for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[u][m]);
    y[m * ldy] = bf16(_mm512_reduce_add_ps(total) * scale);
  }
}

// int4 weights in the kernel layout: per 128 columns, 64 bytes. Byte L*16 + j (lane L, j < 8) holds column
// L*8 + j in its low nibble and 64 + L*8 + j in its high one; byte L*16 + 8 + j holds 32 + L*8 + j and
// 96 + L*8 + j. In-lane byte unpacks then give four vectors of 32 consecutive columns each, with no cross-lane
// shuffle. A nibble q becomes the exact bf16 value 128 + q by OR-ing the exponent bits 0x4300, so
// w = (q - 8) s + z = (v - 136) s + z and  sum_k x_k w_k = s * sum x v + (z - 136 s) * sum x  per group.
// QPG: 32-column quarters per group (G / 32), a power of two known at compile time.
template <int MB, int QPG>
void int4_row(const uint16_t* x, const float* xsum, const uint8_t* w, const bf16* s, const bf16* z, int64_t K,
              bf16* y, int64_t ldy) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i exponent = _mm512_set1_epi16(0x4300);
  __m512 out[2][MB], acc[2][MB];  // two dependency chains each
  for (int m = 0; m < MB; ++m) out[0][m] = out[1][m] = acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < K / 128; ++sb) {
    prefetch(w + sb * 64 + kAhead);
    const __m512i v = _mm512_loadu_si512(w + sb * 64);
    const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    const __m512i quarter[4] = {
        _mm512_or_si512(_mm512_unpacklo_epi8(lo, zero), exponent), _mm512_or_si512(_mm512_unpackhi_epi8(lo, zero), exponent),
        _mm512_or_si512(_mm512_unpacklo_epi8(hi, zero), exponent), _mm512_or_si512(_mm512_unpackhi_epi8(hi, zero), exponent)};
    for (int q = 0; q < 4; ++q) {
      const int c = q & 1;
      const int64_t index = sb * 4 + q;  // quarter index along K
      for (int m = 0; m < MB; ++m)
        acc[c][m] = _mm512_dpbf16_ps(acc[c][m], as_bh(_mm512_loadu_si512(x + m * K + index * 32)), as_bh(quarter[q]));
      if ((index + 1) % QPG == 0) {  // a group ends: scale it into the output
        const __m512 sv = _mm512_set1_ps(static_cast<float>(s[index / QPG]));
        for (int m = 0; m < MB; ++m) {
          if (QPG == 1) {
            out[c][m] = _mm512_fmadd_ps(acc[c][m], sv, out[c][m]);
          } else {
            out[c][m] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][m], acc[1][m]), sv, out[c][m]);
            acc[1 - c][m] = _mm512_setzero_ps();
          }
          acc[c][m] = _mm512_setzero_ps();
        }
      }
    }
  }
  const int64_t groups = K / (32 * QPG);
  for (int m = 0; m < MB; ++m) {
    float t = _mm512_reduce_add_ps(_mm512_add_ps(out[0][m], out[1][m]));
    for (int64_t g = 0; g < groups; ++g)
      t += (static_cast<float>(z[g]) - 136.0f * static_cast<float>(s[g])) * xsum[m * groups + g];
    y[m * ldy] = bf16(t);
  }
}

// Calls row(n, m, mb) for every weight row n (split across threads, each a contiguous range) and chunk of up
// to MBMAX activation rows starting at m.
template <int MBMAX, typename Row>
void for_rows(int64_t M, int64_t N, Row&& row) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; m += MBMAX) row(n, m, static_cast<int>(std::min<int64_t>(MBMAX, M - m)));
  });
}

template <template <int> class F, typename... A>
void dispatch_mb(int mb, A... args) {
  switch (mb) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    default: F<4>::run(args...); break;
  }
}

template <int MB> struct Bf16 { template <typename... A> static void run(A... a) { bf16_row<MB>(a...); } };
template <int MB> struct Int8 { template <typename... A> static void run(A... a) { int8_row<MB>(a...); } };

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
  for_rows<4>(M, N, [&](int64_t n, int64_t m, int mb) {
    dispatch_mb<Bf16>(mb, xp + m * K, wp + n * K, K, yp + m * N + n, N);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16");
#endif
  return y;
}

// y (M, N) = x (M, K) @ (q (N, K) int8 * scale (N))^T, x and y bf16.
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  check(x, at::kBFloat16, 2, "x");
  check(q, at::kChar, 2, "qweight");
  check(scale, at::kBFloat16, 1, "scales");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "shapes do not match");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_AVX512
  std::vector<float> xf(M * K);  // activations widened once (a plain loop: cheaper than an ATen op per call)
  const bf16* xb = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xb[i]);
  const float* xp = xf.data();
  const int8_t* qp = q.data_ptr<int8_t>();
  const bf16* sp = scale.data_ptr<at::BFloat16>();
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_rows<4>(M, N, [&](int64_t n, int64_t m, int mb) {
    dispatch_mb<Int8>(mb, xp + m * K, qp + n * K, static_cast<float>(sp[n]), K, yp + m * N + n, N);
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16");
#endif
  return y;
}

// y (M, N) = x (M, K) @ W^T with W int4 in the kernel layout (see int4_block), scales and zeros (N, K/G) bf16.
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t G) {
  check(x, at::kBFloat16, 2, "x");
  check(packed, at::kByte, 2, "packed");
  check(scales, at::kBFloat16, 2, "scales");
  check(zeros, at::kBFloat16, 2, "zeros");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(K % 128 == 0 && (G == 32 || G == 64 || G == 128 || G == 256) && K % G == 0,
              "int4 kernel needs K % 128 == 0 and a group of 32/64/128/256 dividing K; K=", K, " G=", G);
  TORCH_CHECK(packed.size(1) * 2 == K && scales.size(0) == N && scales.size(1) == K / G &&
              zeros.sizes() == scales.sizes(), "shapes do not match");
  auto y = torch::empty({M, N}, x.options());
#ifdef QWEN35_AVX512
  const int64_t groups = K / G;
  std::vector<float> xsum(M * groups, 0.0f);  // per activation row and group: sum of x, for the zero points
  const bf16* xb = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xsum[i / G] += static_cast<float>(xb[i]);
  const uint16_t* xp = u16(x);
  const float* xs = xsum.data();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const bf16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  bf16* yp = y.data_ptr<at::BFloat16>();
  for_rows<2>(M, N, [&](int64_t n, int64_t m, int mb) {
    const auto args = std::make_tuple(xp + m * K, xs + m * groups, wp + n * (K / 2), sp + n * groups,
                                      zp + n * groups, K, yp + m * N + n, N);
    switch (G * 2 + (mb == 1 ? 0 : 1)) {
      case 64: std::apply(int4_row<1, 1>, args); break;
      case 65: std::apply(int4_row<2, 1>, args); break;
      case 128: std::apply(int4_row<1, 2>, args); break;
      case 129: std::apply(int4_row<2, 2>, args); break;
      case 256: std::apply(int4_row<1, 4>, args); break;
      case 257: std::apply(int4_row<2, 4>, args); break;
      case 512: std::apply(int4_row<1, 8>, args); break;
      default: std::apply(int4_row<2, 8>, args); break;
    }
  });
#else
  TORCH_CHECK(false, "qwen35 CPU kernels were built without AVX-512 BF16");
#endif
  return y;
}

// W (N, K) in bf16 from the int4 kernel layout: tiles of it feed a GEMM when many activation rows (prefill) come.
torch::Tensor int4_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                              int64_t G) {
  check(packed, at::kByte, 2, "packed");
  check(scales, at::kBFloat16, 2, "scales");
  check(zeros, at::kBFloat16, 2, "zeros");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, groups = K / G;
  TORCH_CHECK(K % 128 == 0 && K % G == 0 && scales.size(0) == N && scales.size(1) == groups &&
              zeros.sizes() == scales.sizes(), "shapes do not match");
  auto w = torch::empty({N, K}, scales.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const bf16 *sp = scales.data_ptr<at::BFloat16>(), *zp = zeros.data_ptr<at::BFloat16>();
  bf16* wp = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t p = 0; p < K / 2; ++p) {  // byte p of the row: lane L, position j (see int4_row)
        const int64_t block = p / 64, lane = (p % 64) / 16, j = p % 16;
        const int64_t col = block * 128 + (j < 8 ? lane * 8 + j : 32 + lane * 8 + (j - 8));
        const uint8_t byte = pp[n * (K / 2) + p];
        for (int half = 0; half < 2; ++half) {
          const int64_t c = col + 64 * half, g = n * groups + c / G;
          const float q = static_cast<float>(half ? byte >> 4 : byte & 15);
          wp[n * K + c] = bf16((q - 8.0f) * static_cast<float>(sp[g]) + static_cast<float>(zp[g]));
        }
      }
  });
  return w;
}

// y = bf16(x * rsqrt(mean(x^2) + eps) * (offset + w)) per row, in fp32: offset 1 is the zero-centred norm.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, double offset) {
  check(x, at::kBFloat16, 2, "x");
  check(w, at::kBFloat16, 1, "weight");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(w.size(0) == H, "weight has ", w.size(0), " entries, rows have ", H);
  auto y = torch::empty_like(x);
  const bf16 *xp = x.data_ptr<at::BFloat16>(), *wp = w.data_ptr<at::BFloat16>();
  bf16* yp = y.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < M; ++m) {
    const bf16* row = xp + m * H;
    float ss = 0.f;
    for (int64_t i = 0; i < H; ++i) ss += static_cast<float>(row[i]) * static_cast<float>(row[i]);
    const float inv = 1.0f / std::sqrt(ss / H + static_cast<float>(eps));
    for (int64_t i = 0; i < H; ++i)
      yp[m * H + i] = bf16(static_cast<float>(row[i]) * inv * (static_cast<float>(offset) + static_cast<float>(wp[i])));
  }
  return y;
}

namespace {
inline float bf16_round(float v) { return static_cast<float>(bf16(v)); }
inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
}  // namespace

// One decode token of a Gated DeltaNet layer for B sequences, between the input projections and out_proj:
// short conv (state updated in place) + SiLU, L2-normalised q/k, beta and decay, the delta-rule update of the
// fp32 state (in place), and the gated RMSNorm with z. Rounds to bf16 where the unfused PyTorch path does.
torch::Tensor deltanet_decode(const torch::Tensor& qkv, const torch::Tensor& z, const torch::Tensor& b,
                              const torch::Tensor& a, torch::Tensor conv_state, const torch::Tensor& conv_w,
                              const torch::Tensor& A_log, const torch::Tensor& dt_bias, torch::Tensor state,
                              const torch::Tensor& norm_w, double eps) {
  check(qkv, at::kBFloat16, 2, "qkv");
  check(z, at::kBFloat16, 2, "z");
  check(b, at::kBFloat16, 2, "b");
  check(a, at::kBFloat16, 2, "a");
  check(conv_state, at::kBFloat16, 3, "conv_state");
  check(conv_w, at::kBFloat16, 2, "conv_w");
  check(state, at::kFloat, 4, "state");
  check(norm_w, at::kBFloat16, 1, "norm_w");
  const int64_t B = qkv.size(0), C = qkv.size(1), W = conv_w.size(1);
  const int64_t Hv = state.size(1), dk = state.size(2), dv = state.size(3), Hk = (C - Hv * dv) / (2 * dk);
  TORCH_CHECK(2 * Hk * dk + Hv * dv == C && Hv % Hk == 0, "qkv width ", C, " does not fit the state shape");
  TORCH_CHECK(conv_state.size(0) == B && conv_state.size(1) == C && conv_state.size(2) == W - 1, "conv_state shape");
  TORCH_CHECK(z.size(1) == Hv * dv && b.size(1) == Hv && a.size(1) == Hv && state.size(0) == B, "shapes do not match");
  const auto A = A_log.to(at::kFloat).contiguous(), dt = dt_bias.to(at::kFloat).contiguous();
  const float *Ap = A.data_ptr<float>(), *dtp = dt.data_ptr<float>();
  auto mixed = torch::empty({B, C}, qkv.options().dtype(at::kFloat));  // conv output, then q/k normalised
  float* mp = mixed.data_ptr<float>();
  const bf16 *xp = qkv.data_ptr<at::BFloat16>(), *wp = conv_w.data_ptr<at::BFloat16>();
  bf16* cs = conv_state.data_ptr<at::BFloat16>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      for (int64_t c = 0; c < C; ++c) {
        bf16* hist = cs + (bi * C + c) * (W - 1);
        const bf16* wc = wp + c * W;
        const float u = static_cast<float>(xp[bi * C + c]);
        float acc = static_cast<float>(wc[W - 1]) * u;
        for (int64_t j = 0; j < W - 1; ++j) acc += static_cast<float>(wc[j]) * static_cast<float>(hist[j]);
        for (int64_t j = 0; j + 1 < W - 1; ++j) hist[j] = hist[j + 1];
        hist[W - 2] = xp[bi * C + c];
        mp[bi * C + c] = bf16_round(silu(bf16_round(acc)));
      }
      for (int64_t h = 0; h < 2 * Hk; ++h) {  // q heads then k heads: L2-normalise in fp32; q also by dk^-1/2
        float* v = mp + bi * C + h * dk;
        float ss = 0.f;
        for (int64_t i = 0; i < dk; ++i) ss += v[i] * v[i];
        const float scale = 1.0f / std::sqrt(ss + 1e-6f) * (h < Hk ? 1.0f / std::sqrt(static_cast<float>(dk)) : 1.0f);
        for (int64_t i = 0; i < dk; ++i) v[i] *= scale;
      }
    }
  });
  auto out = torch::empty({B, Hv * dv}, qkv.options());
  bf16* op = out.data_ptr<at::BFloat16>();
  const bf16 *zp = z.data_ptr<at::BFloat16>(), *bp = b.data_ptr<at::BFloat16>(), *ap = a.data_ptr<at::BFloat16>();
  const bf16* nw = norm_w.data_ptr<at::BFloat16>();
  float* sp = state.data_ptr<float>();
  at::parallel_for(0, B * Hv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> pred(dv), o(dv);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bi = i / Hv, h = i % Hv, hk = h / (Hv / Hk);
      const float* q = mp + bi * C + hk * dk;
      const float* k = mp + bi * C + (Hk + hk) * dk;
      const float* v = mp + bi * C + 2 * Hk * dk + h * dv;
      const float beta = bf16_round(1.0f / (1.0f + std::exp(-static_cast<float>(bp[bi * Hv + h]))));
      const float x = static_cast<float>(ap[bi * Hv + h]) + dtp[h];
      const float softplus = x > 20.0f ? x : std::log1p(std::exp(x));
      const float decay = std::exp(-std::exp(Ap[h]) * softplus);
      float* S = sp + i * dk * dv;
      std::fill(pred.begin(), pred.end(), 0.f);
      for (int64_t r = 0; r < dk; ++r)
        for (int64_t c = 0; c < dv; ++c) pred[c] += k[r] * (S[r * dv + c] * decay);
      for (int64_t c = 0; c < dv; ++c) pred[c] = beta * (v[c] - pred[c]);  // the delta to write
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t r = 0; r < dk; ++r)
        for (int64_t c = 0; c < dv; ++c) {
          const float s = S[r * dv + c] * decay + k[r] * pred[c];
          S[r * dv + c] = s;
          o[c] += q[r] * s;
        }
      float ss = 0.f;
      for (int64_t c = 0; c < dv; ++c) {
        o[c] = bf16_round(o[c]);
        ss += o[c] * o[c];
      }
      const float inv = 1.0f / std::sqrt(ss / dv + static_cast<float>(eps));
      for (int64_t c = 0; c < dv; ++c) {
        const float normed = bf16_round(static_cast<float>(nw[c]) * bf16_round(o[c] * inv));
        op[bi * Hv * dv + h * dv + c] = bf16(normed * silu(static_cast<float>(zp[bi * Hv * dv + h * dv + c])));
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "True when built with AVX-512 BF16 (the GEMV kernels work)");
  m.def("linear_bf16", &linear_bf16);
  m.def("linear_int8", &linear_int8);
  m.def("linear_int4", &linear_int4);
  m.def("int4_dequantize", &int4_dequantize);
  m.def("rms_norm", &rms_norm);
  m.def("deltanet_decode", &deltanet_decode);
}
