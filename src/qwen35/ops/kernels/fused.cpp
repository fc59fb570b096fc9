// Fused steps of one decode token: at one token per step the cost of many tiny PyTorch ops rivals the
// arithmetic, so each of these is one call. Each is tested against the unfused PyTorch path.
#include "common.h"

#include <type_traits>

namespace qwen35 {

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
inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
}  // namespace

// One decode token of a Gated DeltaNet layer for B sequences, between the input projections and out_proj:
// short conv (state updated in place) + SiLU, L2-normalised q/k, beta and decay, the delta-rule update of the
// fp32 state (in place, or into `state_out` when given: `state` is then kept, as a speculative verify pass
// needs, at no extra memory traffic), and the gated RMSNorm with z. Rounds to bf16 where the
// unfused PyTorch path does.
torch::Tensor deltanet_decode(const torch::Tensor& qkv, const torch::Tensor& z, const torch::Tensor& b,
                              const torch::Tensor& a, torch::Tensor conv_state, const torch::Tensor& conv_w,
                              const torch::Tensor& A_log, const torch::Tensor& dt_bias, torch::Tensor state,
                              const std::optional<torch::Tensor>& state_out, const torch::Tensor& norm_w,
                              double eps) {
  check(qkv, at::kBFloat16, 2, "qkv");
  check(z, at::kBFloat16, 2, "z");
  check(b, at::kBFloat16, 2, "b");
  check(a, at::kBFloat16, 2, "a");
  check(conv_state, at::kBFloat16, 3, "conv_state");
  check(conv_w, at::kBFloat16, 2, "conv_w");
  check(state, at::kFloat, 4, "state");
  if (state_out) {
    check(*state_out, at::kFloat, 4, "state_out");
    TORCH_CHECK(state_out->sizes() == state.sizes() && !state_out->is_same(state),
                "state_out must be a separate buffer of the state's shape");
  }
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
  const bf16 *zp = z.data_ptr<at::BFloat16>(), *bp = b.data_ptr<at::BFloat16>(), *ap = a.data_ptr<at::BFloat16>();
  const bf16* nw = norm_w.data_ptr<at::BFloat16>();
  const float* sp = state.data_ptr<float>();
  float* so = state_out ? state_out->data_ptr<float>() : state.data_ptr<float>();
  auto out = torch::empty({B, Hv * dv}, qkv.options());
  bf16* op = out.data_ptr<at::BFloat16>();
  const int64_t group = Hv / Hk;

  auto conv = [&](int64_t bi, int64_t c0, int64_t n) {  // channels c0.. of sequence bi: conv + SiLU into mixed
    for (int64_t c = c0; c < c0 + n; ++c) {
      bf16* hist = cs + (bi * C + c) * (W - 1);
      const bf16* wc = wp + c * W;
      const float u = static_cast<float>(xp[bi * C + c]);
      float acc = static_cast<float>(wc[W - 1]) * u;
      for (int64_t j = 0; j < W - 1; ++j) acc += static_cast<float>(wc[j]) * static_cast<float>(hist[j]);
      for (int64_t j = 0; j + 1 < W - 1; ++j) hist[j] = hist[j + 1];
      hist[W - 2] = xp[bi * C + c];
      mp[bi * C + c] = bf16_round(silu(bf16_round(acc)));
    }
  };
  auto l2norm = [&](float* v, float scale) {
    float ss = 0.f;
    for (int64_t i = 0; i < dk; ++i) ss += v[i] * v[i];
    const float inv = 1.0f / std::sqrt(ss + 1e-6f) * scale;
    for (int64_t i = 0; i < dk; ++i) v[i] *= inv;
  };
  // One task per sequence and key head: its q/k channels, then the value heads reading them. A single parallel
  // region with no serial part: the conv over all channels had run on one thread while the other waited.
  at::parallel_for(0, B * Hk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> pred(dv), o(dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / Hk, hk = t % Hk;
      float* q = mp + bi * C + hk * dk;
      float* k = mp + bi * C + (Hk + hk) * dk;
      conv(bi, hk * dk, dk);
      conv(bi, (Hk + hk) * dk, dk);
      conv(bi, 2 * Hk * dk + hk * group * dv, group * dv);
      l2norm(q, 1.0f / std::sqrt(static_cast<float>(dk)));  // q also by dk^-1/2
      l2norm(k, 1.0f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t i = bi * Hv + h;
        const float* v = mp + bi * C + 2 * Hk * dk + h * dv;
        const float beta = bf16_round(1.0f / (1.0f + std::exp(-static_cast<float>(bp[i]))));
        const float x = static_cast<float>(ap[i]) + dtp[h];
        const float softplus = x > 20.0f ? x : std::log1p(std::exp(x));
        const float decay = std::exp(-std::exp(Ap[h]) * softplus);
        const float* S = sp + i * dk * dv;
        float* S_out = so + i * dk * dv;
        std::fill(pred.begin(), pred.end(), 0.f);
        for (int64_t r = 0; r < dk; ++r)
          for (int64_t c = 0; c < dv; ++c) pred[c] += k[r] * (S[r * dv + c] * decay);
        for (int64_t c = 0; c < dv; ++c) pred[c] = beta * (v[c] - pred[c]);  // the delta to write
        std::fill(o.begin(), o.end(), 0.f);
        for (int64_t r = 0; r < dk; ++r)
          for (int64_t c = 0; c < dv; ++c) {
            const float s = S[r * dv + c] * decay + k[r] * pred[c];
            S_out[r * dv + c] = s;
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
          op[i * dv + c] = bf16(normed * silu(static_cast<float>(zp[i * dv + c])));
        }
      }
    }
  });
  return out;
}

}  // namespace qwen35

namespace qwen35 {
namespace {

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

// dots[j] = q[j] . k (j < n <= 4) for a bf16 or int8 key row k; q: fp32 rows of length D one after another
// (`qh` the same rows in bf16, for AVX-512's bf16 dot). Products exact, sums in fp32.
template <typename T>
void dots4(const float* q, const bf16* qh, const T* k, int64_t D, int n, float* dots) {
#ifdef QWEN35_AVX512
  if constexpr (std::is_same_v<T, bf16>) {
    if (D % 32 == 0 && n == 4) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      const uint16_t *qs = reinterpret_cast<const uint16_t*>(qh), *kr = reinterpret_cast<const uint16_t*>(k);
      for (int64_t d = 0; d < D; d += 32) {
        const __m512bh kv = as_bh(_mm512_loadu_si512(kr + d));
        for (int j = 0; j < 4; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], as_bh(_mm512_loadu_si512(qs + j * D + d)), kv);
      }
      lane_sums<4>(acc, dots);
      return;
    }
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

// o[g] += w[g] * v for the G query heads of a K/V head (o: G rows of D fp32).
template <typename T>
void add_value(const T* v, const float* w, int64_t G, int64_t D, float* o) {
#ifdef QWEN35_SIMD256
  if (D % 8 == 0) {  // per head, the row from L1 after the first: no branch in the inner loop
    for (int64_t g = 0; g < G; ++g) {
      if (w[g] == 0.0f) continue;  // a masked key: its slot may hold anything
      const __m256 wg = _mm256_set1_ps(w[g]);
      float* og = o + g * D;
      for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(og + d, _mm256_fmadd_ps(wg, load8(v + d), _mm256_loadu_ps(og + d)));
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g)
    if (w[g] != 0.0f)
      for (int64_t d = 0; d < D; ++d) o[g * D + d] += w[g] * static_cast<float>(v[d]);
}

#ifdef QWEN35_SIMD256
// o (4 rows of D) += sum over keys s of w[g * S + s] * v_s, for 4 query heads (every official size's group):
// D in blocks of 16 columns whose 8 accumulators stay in registers over a run of keys (their rows, ~32 KB, stay
// in L1 from one block to the next). A key none of the 4 heads weighs (a masked slot) is not read.
template <typename T>
void add_values4(const T* v, int64_t stride, const float* w, int64_t S, int64_t D, float* o) {
  constexpr int64_t kRun = 64;
  for (int64_t s0 = 0; s0 < S; s0 += kRun) {
    const int64_t s1 = std::min(S, s0 + kRun);
    for (int64_t d = 0; d < D; d += 16) {
      __m256 acc[4][2];
      for (int g = 0; g < 4; ++g)
        for (int h = 0; h < 2; ++h) acc[g][h] = _mm256_loadu_ps(o + g * D + d + 8 * h);
      for (int64_t s = s0; s < s1; ++s) {
        if (w[s] == 0.0f && w[S + s] == 0.0f && w[2 * S + s] == 0.0f && w[3 * S + s] == 0.0f) continue;
        const __m256 row[2] = {load8(v + s * stride + d), load8(v + s * stride + d + 8)};
        for (int g = 0; g < 4; ++g) {
          const __m256 wg = _mm256_set1_ps(w[g * S + s]);
          for (int h = 0; h < 2; ++h) acc[g][h] = _mm256_fmadd_ps(wg, row[h], acc[g][h]);
        }
      }
      for (int g = 0; g < 4; ++g)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(o + g * D + d + 8 * h, acc[g][h]);
    }
  }
}
#endif

// attention_decode over keys and values of type T: bf16, or int8 with an fp32 scale per token and head
// (ksc/vsc, null for bf16). One task per sequence and K/V head: its G query heads' scores against every key,
// the softmax, then the values.
template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const float* ksc,
            const float* vsc, const int64_t* sst, const bool* ok, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const bf16* qp = q.data_ptr<at::BFloat16>();
  const T *kp = static_cast<const T*>(k.data_ptr()), *vp = static_cast<const T*>(v.data_ptr());
  bf16* op = out.data_ptr<at::BFloat16>();
  constexpr bool quantized = std::is_same_v<T, int8_t>;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(G * S), o(G * D), qf(G * D), w(G);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, first = b * sst[0] + h * sst[1];  // this head's first scale
      const T* ks = kp + b * k.stride(0) + h * k.stride(1);
      const T* vs = vp + b * v.stride(0) + h * v.stride(1);
      const bf16* qh = qp + (b * Hq + h * G) * D;
      for (int64_t j = 0; j < G * D; ++j) qf[j] = static_cast<float>(qh[j]);
      for (int64_t s = 0; s < S; ++s) {  // scores of the G queries against key s
        float dots[4];
        const bool keep = !ok || ok[b * S + s];
        const float unit = quantized ? ksc[first + s * sst[2]] : 1.0f;
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
          const int n = static_cast<int>(std::min<int64_t>(4, G - g0));
          if (keep) dots4(qf.data() + g0 * D, qh + g0 * D, ks + s * k.stride(2), D, n, dots);
          for (int j = 0; j < n; ++j)
            p[(g0 + j) * S + s] = keep ? dots[j] * unit * static_cast<float>(scale) : -INFINITY;  // unit 1: bf16
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax in place
        float top = -INFINITY;
        for (int64_t s = 0; s < S; ++s) top = std::max(top, p[g * S + s]);
        if (top == -INFINITY) top = 0.0f;  // no valid key: an all-zero output rather than NaN
        float total = 0.0f;
        for (int64_t s = 0; s < S; ++s) total += (p[g * S + s] = std::exp(p[g * S + s] - top));
        for (int64_t s = 0; s < S; ++s) p[g * S + s] = total > 0.0f ? p[g * S + s] / total : 0.0f;
      }
      if constexpr (quantized)  // each value row's weight times its scale
        for (int64_t g = 0; g < G; ++g)
          for (int64_t s = 0; s < S; ++s) p[g * S + s] *= vsc[first + s * sst[2]];
      std::fill(o.begin(), o.end(), 0.0f);
#ifdef QWEN35_SIMD256
      if (G == 4 && D % 16 == 0) {
        add_values4(vs, v.stride(2), p.data(), S, D, o.data());
      } else
#endif
      {
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t g = 0; g < G; ++g) w[g] = p[g * S + s];
          add_value(vs + s * v.stride(2), w.data(), G, D, o.data());
        }
      }
      for (int64_t j = 0; j < G * D; ++j) op[(b * Hq + h * G) * D + j] = bf16(o[j]);
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
