// One decode token through every layer in one native call. At one token per step each layer is ~20 tiny
// operations, and from Python each costs more in dispatch than in arithmetic (~6 ms a token at 0.8B, a quarter
// of the step); here they are the same ATen operations and kernels, called from C++, so the result is
// bit-identical to the layer-by-layer path in models/qwen3_5.py, which the tests compare against.
#include "decode.h"

namespace qwen35 {

namespace {

const torch::Tensor& take(const TensorMap& m, const std::string& name) {
  const auto it = m.find(name);
  TORCH_CHECK(it != m.end(), "decode plan: missing tensor '", name, "'");
  return it->second;
}

Lin take_linear(const LinearMap& m, const std::string& name) {
  const auto it = m.find(name);
  TORCH_CHECK(it != m.end(), "decode plan: missing linear '", name, "'");
  const auto& [kind, group, t] = it->second;
  const size_t need = kind == 0 ? 1 : kind == 1 ? 2 : 3;
  TORCH_CHECK(kind >= 0 && kind <= 2 && t.size() == need, "decode plan: linear '", name, "' of kind ", kind,
              " needs ", need, " tensors, got ", t.size());
  return Lin{kind, group, t};
}

// Rotate-half RoPE on the first cos.size(-1) channels of x (B, heads, 1, hd): `apply_rotary` in the model.
torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t rd = cos.size(-1), hd = x.size(-1);
  const auto rot = x.narrow(-1, 0, rd), rest = x.narrow(-1, rd, hd - rd);
  const auto x1 = rot.narrow(-1, 0, rd / 2), x2 = rot.narrow(-1, rd / 2, rd / 2);
  return at::cat({rot * cos + at::cat({-x2, x1}, -1) * sin, rest}, -1);
}

}  // namespace

torch::Tensor Lin::operator()(const torch::Tensor& x) const {
  const auto xc = x.contiguous();
  if (kind == 0) return linear_bf16(xc, t[0]);
  if (kind == 1) return linear_int8(xc, t[0], t[1]);
  return linear_int4(xc, t[0], t[1], t[2], group);
}

void DecodePlan::add_deltanet(const TensorMap& w, const LinearMap& lin) {
  Layer l;
  l.in_norm = take(w, "input_layernorm"), l.post_norm = take(w, "post_attention_layernorm");
  l.conv_w = take(w, "conv1d"), l.A_log = take(w, "A_log"), l.dt_bias = take(w, "dt_bias");
  l.mix_norm = take(w, "norm");
  l.mix = {take_linear(lin, "in_proj_qkv"), take_linear(lin, "in_proj_z"), take_linear(lin, "in_proj_b"),
           take_linear(lin, "in_proj_a")};
  l.out = take_linear(lin, "out_proj");
  l.mlp = {take_linear(lin, "gate_proj"), take_linear(lin, "up_proj"), take_linear(lin, "down_proj")};
  layers_.push_back(std::move(l));
}

void DecodePlan::add_attention(const TensorMap& w, const LinearMap& lin, int64_t heads, int64_t kv_heads,
                               int64_t head_dim) {
  Layer l;
  l.attention = true, l.heads = heads, l.kv_heads = kv_heads, l.head_dim = head_dim;
  l.in_norm = take(w, "input_layernorm"), l.post_norm = take(w, "post_attention_layernorm");
  l.q_norm = take(w, "q_norm"), l.k_norm = take(w, "k_norm");
  l.mix = {take_linear(lin, "q_proj"), take_linear(lin, "k_proj"), take_linear(lin, "v_proj")};
  l.out = take_linear(lin, "o_proj");
  l.mlp = {take_linear(lin, "gate_proj"), take_linear(lin, "up_proj"), take_linear(lin, "down_proj")};
  layers_.push_back(std::move(l));
}

// x (B, H) the embedded tokens; cos/sin (B, 1, rotary_dim); valid (B, S+1) the real slots after this token, or
// None; state: per layer two tensors, DeltaNet (conv history, recurrent state) updated in place, attention
// (K buffer, V buffer) with room at slot lengths[i], which this token's K/V fill. Returns the last hidden (B, H).
torch::Tensor DecodePlan::run(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                              const std::optional<torch::Tensor>& valid, const std::vector<torch::Tensor>& state,
                              const std::vector<int64_t>& lengths) const {
  const auto n = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(static_cast<int64_t>(state.size()) == 2 * n && static_cast<int64_t>(lengths.size()) == n,
              "decode plan has ", n, " layers: needs ", 2 * n, " state tensors and ", n, " lengths");
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= 16, "decode plan takes (B, H) with B <= 16, got ", x.sizes());
  const auto c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // (B, 1, 1, rd): broadcast over heads
  const int64_t B = x.size(0);
  for (int64_t i = 0; i < n; ++i) {
    const Layer& l = layers_[i];
    const auto u = rms_norm(x, l.in_norm, eps_, 1.0);
    torch::Tensor o;
    if (!l.attention) {
      auto conv = state[2 * i], rec = state[2 * i + 1];
      o = deltanet_decode(l.mix[0](u), l.mix[1](u), l.mix[2](u), l.mix[3](u), conv, l.conv_w, l.A_log,
                          l.dt_bias, rec, std::nullopt, l.mix_norm, eps_);
    } else {
      const int64_t hd = l.head_dim, len = lengths[i];
      const auto qg = l.mix[0](u).view({B, l.heads, 2 * hd});  // per head: [query | gate]
      const auto query = qg.narrow(-1, 0, hd).reshape({-1, hd}).contiguous();
      auto q = rms_norm(query, l.q_norm, eps_, 1.0).view({B, l.heads, 1, hd});
      auto k = rms_norm(l.mix[1](u).view({-1, hd}), l.k_norm, eps_, 1.0).view({B, l.kv_heads, 1, hd});
      const auto v = l.mix[2](u).view({B, l.kv_heads, 1, hd});
      q = rotate(q, c, s), k = rotate(k, c, s);
      const auto &kbuf = state[2 * i], &vbuf = state[2 * i + 1];
      TORCH_CHECK(kbuf.dim() == 4 && kbuf.size(2) > len, "layer ", i, ": K/V buffer has no room at slot ", len);
      kbuf.narrow(2, len, 1).copy_(k), vbuf.narrow(2, len, 1).copy_(v);
      const auto att = attention_decode(q.reshape({B, l.heads, hd}).contiguous(), kbuf.narrow(2, 0, len + 1),
                                        vbuf.narrow(2, 0, len + 1), valid, std::pow(static_cast<double>(hd), -0.5));
      o = att.reshape({B, -1}) * at::sigmoid(qg.narrow(-1, hd, hd).reshape({B, -1}));
    }
    x = x + l.out(o);
    const auto h = rms_norm(x, l.post_norm, eps_, 1.0);
    x = x + l.mlp[2](at::silu(l.mlp[0](h)) * l.mlp[1](h));
  }
  return x;
}

}  // namespace qwen35
