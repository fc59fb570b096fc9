// The decode plan (decode.cpp): every layer's weights, held once, so a decode token is one call from Python.
#pragma once
#include "common.h"

#include <map>
#include <string>
#include <tuple>

namespace qwen35 {

using TensorMap = std::map<std::string, torch::Tensor>;
// kind 0: bf16 (weight); 1: int8 (packed, scales); 2: int4 (packed, scales, zeros) with its group size.
using LinearMap = std::map<std::string, std::tuple<int64_t, int64_t, std::vector<torch::Tensor>>>;

// A linear layer on the decode kernels (gemv.cpp).
struct Lin {
  int64_t kind = 0, group = 0;
  std::vector<torch::Tensor> t;
  torch::Tensor operator()(const torch::Tensor& x) const;
};

class DecodePlan {
 public:
  explicit DecodePlan(double eps) : eps_(eps) {}
  // Layers are added in order, named as in the model (`input_layernorm`, `in_proj_qkv`, `q_proj`, ...).
  void add_deltanet(const TensorMap& w, const LinearMap& lin);
  void add_attention(const TensorMap& w, const LinearMap& lin, int64_t heads, int64_t kv_heads, int64_t head_dim);
  std::tuple<torch::Tensor, std::vector<torch::Tensor>> run(
      torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, const std::optional<torch::Tensor>& valid,
      const std::vector<torch::Tensor>& state, const std::vector<int64_t>& lengths,
      const std::vector<torch::Tensor>& scales) const;

 private:
  struct Layer {
    bool attention = false;
    int64_t heads = 0, kv_heads = 0, head_dim = 0;
    torch::Tensor in_norm, post_norm;
    torch::Tensor conv_w, A_log, dt_bias, mix_norm;  // DeltaNet
    torch::Tensor q_norm, k_norm;                   // attention
    std::vector<Lin> mix;  // DeltaNet: qkv, z, b, a; attention: q (with gate), k, v
    Lin out;
    std::vector<Lin> mlp;  // gate, up, down
  };
  double eps_;
  std::vector<Layer> layers_;
};

}  // namespace qwen35
