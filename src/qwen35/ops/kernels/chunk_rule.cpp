// The chunked gated delta rule of a prefill (ops/gated_delta.py: `chunk_gated_delta_rule` is the PyTorch form and
// the reference): one call per layer, every head's chunks in cache-sized scratch. In PyTorch the rule is ~25 ops
// on (B, H, N, 64, 128) tensors a layer, bound by memory traffic and dispatch (a 0.8B layer of 512 tokens ~29 ms on
// 2 AVX2 cores); here each head's chunk stays in L1/L2 and its products run on a 4 x 16 FMA tile.
#include "common.h"

#include <optional>
#include <tuple>

namespace qwen35 {
namespace {

#if defined(QWEN35_SIMD256)
// C (+)= alpha * A B for row-major A (M x K, rows readable up to a multiple of 4), B (K x N, N a multiple of 16),
// C (M x N). `lower`: A is lower triangular (row i is zero past column i), so row block i0 stops at column i0 + 3.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, float alpha, bool accumulate, bool lower) {
  for (int64_t i0 = 0; i0 < M; i0 += 4) {
    const int64_t kend = lower ? std::min(K, i0 + 4) : K;
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      __m256 c[4][2];
      for (auto& row : c) row[0] = row[1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < kend; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + n0), b1 = _mm256_loadu_ps(B + k * ldb + n0 + 8);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_broadcast_ss(A + (i0 + r) * lda + k);
          c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
          c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
        }
      }
      const __m256 s = _mm256_set1_ps(alpha);
      for (int r = 0; r < 4 && i0 + r < M; ++r) {
        float* dst = C + (i0 + r) * ldc + n0;
        for (int h = 0; h < 2; ++h) {
          const __m256 v = accumulate ? _mm256_fmadd_ps(s, c[r][h], _mm256_loadu_ps(dst + 8 * h))
                                      : _mm256_mul_ps(s, c[r][h]);
          _mm256_storeu_ps(dst + 8 * h, v);
        }
      }
    }
  }
}

// e^x on 8 lanes for x <= 0 (Cody-Waite reduction, Cephes' degree-6 polynomial: within 2 ulp of expf; x is
// clamped at -87, e^-87 ~ 1.6e-38, where expf would go on to denormals).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[i][j] = in[i][j] * e^(cum_i - cum_j) for j <= i (diagonal: `diag`), 0 elsewhere; `scale[i]` multiplies row i.
void decay_mask(int64_t C, int64_t Cp, const float* cum, const float* scale, float* m, bool diag) {
  for (int64_t i = 0; i < C; ++i) {
    float* row = m + i * Cp;
    const int64_t end = diag ? i + 1 : i;
    const __m256 ci = _mm256_set1_ps(cum[i]), si = _mm256_set1_ps(scale ? scale[i] : 1.0f);
    int64_t j = 0;
    for (; j + 8 <= end; j += 8) {
      const __m256 d = exp_nonpositive(_mm256_sub_ps(ci, _mm256_loadu_ps(cum + j)));
      _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), d), si));
    }
    for (; j < end; ++j) row[j] *= std::exp(cum[i] - cum[j]) * (scale ? scale[i] : 1.0f);
    std::fill(row + end, row + Cp, 0.0f);
  }
}

// One head's rule over T steps: chunks of `chunk`, the last one shorter. q_row(t, dst) etc. write the t-th row of
// an input as fp32; g and beta are this head's T values.
struct Head {
  int64_t T, dk, dv, chunk;
  float* S;  // (dk, dv) state, updated
  template <class QRow, class KRow, class VRow>
  void run(QRow q_row, KRow k_row, VRow v_row, const float* g, const float* beta, bf16* out, int64_t out_stride) {
    const int64_t Cp = (chunk + 15) / 16 * 16, W = dv + dk;
    std::vector<float> Q(Cp * dk, 0.f), K(Cp * dk, 0.f), Kt(dk * Cp, 0.f), X(Cp * W, 0.f), UW(Cp * W, 0.f),
        T_(Cp * Cp, 0.f), P(Cp * Cp, 0.f), Vs(Cp * dv, 0.f), O(Cp * dv, 0.f), cum(Cp), bt(Cp), e(Cp);
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      const int64_t C = std::min(chunk, T - c0);
      float acc = 0.f;
      for (int64_t i = 0; i < C; ++i) {
        const int64_t t = c0 + i;
        q_row(t, Q.data() + i * dk);
        k_row(t, K.data() + i * dk);
        v_row(t, X.data() + i * W);  // X = [beta V | beta K e^G]
        acc += g[t];
        cum[i] = acc;
        bt[i] = beta[t];
      }
      for (int64_t i = C; i < Cp; ++i) {  // rows past the chunk read as zeros by the 4-row tiles
        std::fill(Q.data() + i * dk, Q.data() + (i + 1) * dk, 0.f);
        std::fill(K.data() + i * dk, K.data() + (i + 1) * dk, 0.f);
      }
      for (int64_t i = 0; i < C; ++i) {
        e[i] = std::exp(cum[i]);
        float* x = X.data() + i * W;
        for (int64_t d = 0; d < dv; ++d) x[d] *= bt[i];
        for (int64_t d = 0; d < dk; ++d) x[dv + d] = K[i * dk + d] * bt[i] * e[i];
        for (int64_t d = 0; d < dk; ++d) Kt[d * Cp + i] = K[i * dk + d];
      }
      for (int64_t d = 0; d < dk; ++d) std::fill(Kt.data() + d * Cp + C, Kt.data() + (d + 1) * Cp, 0.f);
      // A = strict_lower(beta K K^T * D); T = (I + A)^-1 by forward substitution: T_i = e_i - sum_m A_im T_m
      gemm(C, Cp, dk, K.data(), dk, Kt.data(), Cp, P.data(), Cp, 1.f, false, false);
      decay_mask(C, Cp, cum.data(), bt.data(), P.data(), false);
      std::fill(T_.begin(), T_.end(), 0.f);
      for (int64_t i = 0; i < C; ++i) {
        float* ti = T_.data() + i * Cp;
        ti[i] = 1.f;
        for (int64_t m = 0; m < i; ++m) {
          const float a = -P[i * Cp + m];
          const float* tm = T_.data() + m * Cp;
          for (int64_t j = 0; j <= m; ++j) ti[j] += a * tm[j];
        }
      }
      // [U | W] = T X;  V' = U - W S, in U's place
      gemm(C, W, C, T_.data(), Cp, X.data(), W, UW.data(), W, 1.f, false, true);
      gemm(C, dv, dk, UW.data() + dv, W, S, dv, UW.data(), W, -1.f, true, false);
      const float* Vn = UW.data();  // rows of stride W
      // O = (Q e^G) S + ((Q K^T) * D) V'
      gemm(C, Cp, dk, Q.data(), dk, Kt.data(), Cp, P.data(), Cp, 1.f, false, false);
      decay_mask(C, Cp, cum.data(), nullptr, P.data(), true);
      for (int64_t i = 0; i < C; ++i)
        for (int64_t d = 0; d < dk; ++d) Q[i * dk + d] *= e[i];
      gemm(C, dv, dk, Q.data(), dk, S, dv, O.data(), dv, 1.f, false, false);
      gemm(C, dv, C, P.data(), Cp, Vn, W, O.data(), dv, 1.f, true, true);
      for (int64_t i = 0; i < C; ++i)
        for (int64_t d = 0; d < dv; d += 8)
          store8_bf16(out + (c0 + i) * out_stride + d, _mm256_loadu_ps(O.data() + i * dv + d));
      // S <- e^G_last S + K^T (e^(G_last - G) V')
      const float last = cum[C - 1], total = std::exp(last);
      for (int64_t i = 0; i < dk * dv; ++i) S[i] *= total;
      for (int64_t i = 0; i < C; ++i) {
        const float f = std::exp(last - cum[i]);
        for (int64_t d = 0; d < dv; ++d) Vs[i * dv + d] = Vn[i * W + d] * f;
      }
      gemm(dk, dv, C, Kt.data(), Cp, Vs.data(), dv, S, dv, 1.f, true, false);
    }
  }
};
#endif

}  // namespace

// q, k (B, T, Hk, dk) fp32, L2-normalised, q scaled; v (B, T, Hv, dv) bf16; g (B, T, Hv) fp32 log decay; beta
// (B, T, Hv) bf16; state (B, Hv, dk, dv) fp32 or none (zeros). Returns (o (B, T, Hv, dv) bf16, the new state).
std::tuple<torch::Tensor, torch::Tensor> chunk_delta_rule(const torch::Tensor& q, const torch::Tensor& k,
                                                          const torch::Tensor& v, const torch::Tensor& g,
                                                          const torch::Tensor& beta,
                                                          const std::optional<torch::Tensor>& state, int64_t chunk) {
  check(q, at::kFloat, 4, "q");
  check(k, at::kFloat, 4, "k");
  check(v, at::kBFloat16, 4, "v");
  check(g, at::kFloat, 3, "g");
  check(beta, at::kBFloat16, 3, "beta");
  const int64_t B = v.size(0), T = v.size(1), Hv = v.size(2), dv = v.size(3), Hk = k.size(2), dk = k.size(3);
  TORCH_CHECK(q.sizes() == k.sizes() && k.size(0) == B && k.size(1) == T && Hv % Hk == 0, "q/k/v shapes differ");
  TORCH_CHECK(g.size(0) == B && g.size(1) == T && g.size(2) == Hv && beta.sizes() == g.sizes(), "g/beta shapes");
  TORCH_CHECK(dv % 16 == 0 && dk % 16 == 0 && chunk > 0, "head dims must be multiples of 16");
  auto S = state ? state->to(at::kFloat).clone(at::MemoryFormat::Contiguous)
                 : torch::zeros({B, Hv, dk, dv}, q.options());
  TORCH_CHECK(S.size(0) == B && S.size(1) == Hv && S.size(2) == dk && S.size(3) == dv, "state shape");
  auto out = torch::empty({B, T, Hv, dv}, v.options());
#if defined(QWEN35_SIMD256)
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *gp = g.data_ptr<float>();
  const bf16 *vp = v.data_ptr<at::BFloat16>(), *bp = beta.data_ptr<at::BFloat16>();
  const int64_t group = Hv / Hk;
  float* sp = S.data_ptr<float>();
  bf16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * Hv, 1, [&](int64_t h0, int64_t h1) {
    const FlushDenormals flush;
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / Hv, h = bh % Hv, kh = h / group;
      std::vector<float> bt(T), gt(T);
      for (int64_t t = 0; t < T; ++t) {
        gt[t] = gp[(b * T + t) * Hv + h];
        bt[t] = static_cast<float>(bp[(b * T + t) * Hv + h]);
      }
      auto key_row = [&](const float* base) {
        return [=](int64_t t, float* dst) { std::copy_n(base + ((b * T + t) * Hk + kh) * dk, dk, dst); };
      };
      auto v_row = [&](int64_t t, float* dst) {
        const bf16* src = vp + ((b * T + t) * Hv + h) * dv;
        for (int64_t d = 0; d < dv; d += 8) _mm256_storeu_ps(dst + d, load8_bf16_ps(src + d));
      };
      Head head{T, dk, dv, chunk, sp + bh * dk * dv};
      head.run(key_row(qp), key_row(kp), v_row, gt.data(), bt.data(), op + (b * T * Hv + h) * dv, Hv * dv);
    }
  });
#else
  TORCH_CHECK(false, "chunk_delta_rule needs AVX2 and FMA");
#endif
  return {out, S};
}

}  // namespace qwen35
