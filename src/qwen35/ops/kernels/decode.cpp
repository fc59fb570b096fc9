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

// x (B*T, H) the embedded tokens, T per sequence (row b*T + j: sequence b's token j); cos/sin (B, T, rotary_dim);
// valid (B, T, S+T) each token's real slots (its row of the causal mask), or None; state: per layer two tensors,
// DeltaNet (conv history, recurrent state) updated in place, attention (K buffer, V buffer) with room at slots
// lengths[i].. lengths[i]+T-1, which these tokens' K/V fill; scales: per layer two tensors, for an 8-bit K/V
// layer (int8 buffers) its K and V scale buffers (B, Hkv, capacity, 1) fp32, else empty: the new K/V are
// rounded per token and head as the cache's quantize_kv does. T > 1 is a speculative verify pass: the linears
// take all B*T rows at once (one read of the weights), the mixers and attention go token by token, exactly as T
// decode steps, and each DeltaNet layer's state before tokens 1..T-1 is kept for the rollback. Returns the last
// hidden (B*T, H) and, per DeltaNet layer in order, T-1 pairs (conv history copy, recurrent state) before tokens
// 1..T-1 followed by the final recurrent state (a new buffer: the one before it is kept); empty for T = 1.
std::tuple<torch::Tensor, std::vector<torch::Tensor>> DecodePlan::run(
    torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, const std::optional<torch::Tensor>& valid,
    const std::vector<torch::Tensor>& state, const std::vector<int64_t>& lengths,
    const std::vector<torch::Tensor>& scales) const {
  const auto n = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(static_cast<int64_t>(state.size()) == 2 * n && static_cast<int64_t>(lengths.size()) == n &&
              static_cast<int64_t>(scales.size()) == 2 * n, "decode plan has ", n, " layers: needs ", 2 * n,
              " state tensors, ", n, " lengths and ", 2 * n, " scale tensors");
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes(), "cos/sin must be (B, T, rotary_dim), got ", cos.sizes());
  const int64_t B = cos.size(0), T = cos.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B * T && B * T <= 16, "decode plan takes (B*T, H) with B*T <= 16, got ",
              x.sizes(), " for B=", B, " T=", T);
  TORCH_CHECK(!valid || (valid->dim() == 3 && valid->size(0) == B && valid->size(1) == T),
              "valid must be (B, T, S+T)");
  const auto c = cos.unsqueeze(2), s = sin.unsqueeze(2);  // (B, T, 1, rd): broadcast over heads
  std::vector<torch::Tensor> kept;
  for (int64_t i = 0; i < n; ++i) {
    const Layer& l = layers_[i];
    const auto u = rms_norm(x, l.in_norm, eps_, 1.0);
    std::vector<torch::Tensor> out(T);
    torch::Tensor gate;
    if (!l.attention) {
      const auto conv = state[2 * i];
      auto rec = state[2 * i + 1];
      std::vector<torch::Tensor> p;
      for (const auto& proj : l.mix) p.push_back(proj(u).view({B, T, -1}));
      for (int64_t j = 0; j < T; ++j) {
        std::optional<torch::Tensor> next;
        if (j > 0) {  // keep the state before this token: the new one goes to a new buffer
          kept.push_back(conv.clone()), kept.push_back(rec);
          next = torch::empty_like(rec);
        }
        const auto at = [&](int64_t k) { return p[k].select(1, j).contiguous(); };
        out[j] = deltanet_decode(at(0), at(1), at(2), at(3), conv, l.conv_w, l.A_log, l.dt_bias, rec, next,
                                 l.mix_norm, eps_);
        if (next) rec = *next;
      }
      if (T > 1) kept.push_back(rec);
    } else {
      const int64_t hd = l.head_dim, len = lengths[i];
      const auto qg = l.mix[0](u).view({B * T, l.heads, 2 * hd});  // per head: [query | gate]
      const auto query = qg.narrow(-1, 0, hd).reshape({-1, hd}).contiguous();
      auto q = rms_norm(query, l.q_norm, eps_, 1.0).view({B, T, l.heads, hd});
      auto k = rms_norm(l.mix[1](u).view({-1, hd}), l.k_norm, eps_, 1.0).view({B, T, l.kv_heads, hd});
      const auto v = l.mix[2](u).view({B, T, l.kv_heads, hd});
      q = rotate(q, c, s), k = rotate(k, c, s);
      const auto &kbuf = state[2 * i], &vbuf = state[2 * i + 1];
      TORCH_CHECK(kbuf.dim() == 4 && kbuf.size(2) >= len + T, "layer ", i, ": K/V buffer has no room at slot ", len);
      const bool int8 = kbuf.scalar_type() == at::kChar;
      const auto store = [&](const torch::Tensor& buf, const torch::Tensor& scale, const torch::Tensor& x) {
        if (!int8) return void(buf.narrow(2, len, T).copy_(x.transpose(1, 2)));
        const auto xf = x.to(at::kFloat);  // as quantize_kv: amax / 127 per token and head, round half to even
        const auto unit = (xf.abs().amax(-1, true) / 127).clamp_min(1e-12);
        buf.narrow(2, len, T).copy_(at::round(xf / unit).to(at::kChar).transpose(1, 2));
        scale.narrow(2, len, T).copy_(unit.transpose(1, 2));
      };
      store(kbuf, scales[2 * i], k), store(vbuf, scales[2 * i + 1], v);
      const auto upto = [&](const torch::Tensor& t, int64_t j) {
        return int8 ? std::optional<torch::Tensor>(t.narrow(2, 0, len + j + 1)) : std::nullopt;
      };
      for (int64_t j = 0; j < T; ++j) {
        std::optional<torch::Tensor> mask;
        if (valid) mask = valid->select(1, j).narrow(1, 0, len + j + 1).contiguous();
        out[j] = attention_decode(q.select(1, j).contiguous(), kbuf.narrow(2, 0, len + j + 1),
                                  vbuf.narrow(2, 0, len + j + 1), mask, std::pow(static_cast<double>(hd), -0.5),
                                  upto(scales[2 * i], j), upto(scales[2 * i + 1], j))
                     .reshape({B, -1});
      }
      gate = at::sigmoid(qg.narrow(-1, hd, hd).reshape({B * T, -1}));
    }
    auto o = T == 1 ? out[0] : at::stack(out, 1).reshape({B * T, -1});
    if (gate.defined()) o = o * gate;
    x = x + l.out(o);
    const auto h = rms_norm(x, l.post_norm, eps_, 1.0);
    x = x + l.mlp[2](at::silu(l.mlp[0](h)) * l.mlp[1](h));
  }
  return {x, kept};
}

}  // namespace qwen35
