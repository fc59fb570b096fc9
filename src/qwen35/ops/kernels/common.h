// Shared by qwen35's CPU kernels (gemv.cpp, dequant.cpp, fused.cpp, attention.cpp, ...): compiled on the user's
// machine at first use with -march=native. The AVX-512 code paths need BF16 and VNNI (Zen 4, Sapphire Rapids and
// later); CPUs with AVX2 and FMA (Haswell, Zen 1 and later) get 256-bit versions of the same kernels.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define QWEN35_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define QWEN35_AVX2 1  // the same kernels on 256-bit vectors (gemv_avx2.h): most laptops' CPUs
#endif
#if defined(QWEN35_AVX512) || defined(QWEN35_AVX2)
#define QWEN35_KERNELS 1
#endif
#if defined(QWEN35_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define QWEN35_AMX 1  // Sapphire Rapids and later: the prefill attention's products on tiles
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qwen35 {

using bf16 = c10::BFloat16;

inline void check(const torch::Tensor& t, at::ScalarType type, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == type, name, " has dtype ", t.scalar_type(), ", expected ", type);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline const uint16_t* u16(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline float bf16_round(float v) { return static_cast<float>(bf16(v)); }

// Denormal floats flushed to zero (FTZ) and read as zero (DAZ) on this thread while it lives. The gated delta
// rule's decays reach them, and on Intel cores every denormal operand costs a microcode assist: a 0.8B layer's
// 512-token chunk rule took 282 ms against 14 on a Xeon, with the same output bits; Zen cores take them at speed.
struct FlushDenormals {
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

// Checks int8 operands in the kernel layout (see int8_tile): packed (N/16, 16K), scales (N).
inline void check_int8(const torch::Tensor& packed, const torch::Tensor& scales, int64_t K) {
  check(packed, at::kByte, 2, "packed");
  check(scales, at::kBFloat16, 1, "scales");
  TORCH_CHECK(K % 32 == 0 && packed.size(1) == 16 * K && scales.size(0) == 16 * packed.size(0),
              "int8 operands do not match K=", K, " (a multiple of 32), ", packed.size(0), " tiles and ",
              scales.size(0), " scales");
}

// Checks int4 operands in the kernel layout (see int4_tile): packed (N/16, 8K), scales and zeros (N/16, K/G, 16).
inline void check_int4(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                       int64_t K, int64_t G) {
  check(packed, at::kByte, 2, "packed");
  check(scales, at::kBFloat16, 3, "scales");
  check(zeros, at::kBFloat16, 3, "zeros");
  TORCH_CHECK(K % 128 == 0 && (G == 32 || G == 64 || G == 128 || G == 256) && K % G == 0,
              "int4 kernel needs K % 128 == 0 and a group of 32/64/128/256 dividing K; K=", K, " G=", G);
  TORCH_CHECK(packed.size(1) == 8 * K && scales.size(0) == packed.size(0) && scales.size(1) == K / G &&
              scales.size(2) == 16 && zeros.sizes() == scales.sizes(), "int4 operands do not match K=", K, " G=", G);
}

#ifdef QWEN35_AVX512
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline __m512i load_bf16(const uint16_t* p, int64_t n) {  // n < 32: masked tail
  return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

// bf16 values to fp32 lanes (n <= 16; the rest 0).
inline __m512 load_bf16_ps(const bf16* p, int64_t n) {
  const __m256i v = _mm256_maskz_loadu_epi16((__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// e^x on 16 lanes: exp8's reduction and polynomial on 512-bit vectors (two exp8 calls on the halves made the prefill
// attention 3-10 % slower on AMX tiles; a lane may differ from exp8's in the last bit where the compiler fuses
// products differently).
inline __m512 exp16(__m512 x) {
  const __mmask16 masked = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(~masked, y, _mm512_castsi512_ps(two_n));
}

// Sums of R vectors' lanes, to y[0..R-1] (R = 4: one transposing reduction instead of four).
template <int R>
void lane_sums(const __m512 (&v)[R], float* y) {
  if constexpr (R == 4) {
    __m256 h[4];
    for (int r = 0; r < 4; ++r) h[r] = _mm256_add_ps(_mm512_castps512_ps256(v[r]), _mm512_extractf32x8_ps(v[r], 1));
    const __m256 all = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1)));
  } else {
    for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(v[r]);
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)  // in the AVX-512 build too: the 8-bit K/V dot uses 256-bit vectors
#define QWEN35_SIMD256 1
// 8 bf16 values to fp32 lanes.
inline __m256 load8_bf16_ps(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// 8 fp32 lanes to bf16 at p, rounded to nearest even as c10::BFloat16 (NaN to its quiet NaN).
inline void store8_bf16(bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // lanes 0 and 2: values 0-7
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

inline float lane_sum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// e^x on 8 lanes of x <= 0 (scores less their maximum), -inf (a masked key) to 0: Cephes' expf (a degree-5
// polynomial after the reduction by ln 2, within 2 ulp); below -87 the result is held at e^-87, which against the
// maximum's e^0 weighs nothing.
inline __m256 exp8(__m256 x) {
  const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact to fp32
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(masked, _mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
}
#endif

// The kernels (one line each on what they compute; the .cpp files say how).
bool available();
std::string isa();
bool amx();
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales);
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                          const torch::Tensor& zeros, int64_t G);
torch::Tensor int8_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& rows);
torch::Tensor int4_dequantize(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& zeros,
                              int64_t G, const torch::Tensor& rows);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, double offset);
torch::Tensor deltanet_decode(const torch::Tensor& qkv, const torch::Tensor& z, const torch::Tensor& b,
                              const torch::Tensor& a, torch::Tensor conv_state, const torch::Tensor& conv_w,
                              const torch::Tensor& A_log, const torch::Tensor& dt_bias, torch::Tensor state,
                              const std::optional<torch::Tensor>& state_out, const torch::Tensor& norm_w,
                              double eps);
torch::Tensor attention_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& valid, double scale,
                               const std::optional<torch::Tensor>& k_scale,
                               const std::optional<torch::Tensor>& v_scale);
torch::Tensor attention_prefill(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                double scale, const std::optional<torch::Tensor>& k_scale,
                                const std::optional<torch::Tensor>& v_scale, bool tiles);
std::tuple<torch::Tensor, torch::Tensor> chunk_delta_rule(const torch::Tensor& q, const torch::Tensor& k,
                                                          const torch::Tensor& v, const torch::Tensor& g,
                                                          const torch::Tensor& beta,
                                                          const std::optional<torch::Tensor>& state, int64_t chunk);
torch::Tensor huge_page_empty(int64_t nbytes);

}  // namespace qwen35
