// Fused steps of one decode token: at one token per step the cost of many tiny PyTorch ops rivals the
// arithmetic, so each of these is one call. Each is tested against the unfused PyTorch path.
#include "common.h"

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
    const FlushDenormals flush;
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
