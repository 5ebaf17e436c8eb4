// One-token decode steps through llama blocks, in C++ over ATen: the ops of
// layerchain.model.span.LeanDecode (and the int4 paths of layerchain.model.quant), in the
// same order with the same arguments, so the outputs are the same bits; what goes away is
// the Python around each op (argument parsing, tensor wrapping, the functions between them).
// Registered as torch.ops.layerchain.span_decode; see layerchain/native/__init__.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kFloatLayout = 0;  // nn.Linear weights [N, K] float32, no bias
constexpr int64_t kInt4Layout = 1;   // fused int4 q/k/v and gate/up, int4 o and down
constexpr int64_t kFloatFields = 9;  // per block: norm, q, k, v, o, norm, gate, up, down
constexpr int64_t kInt4Fields = 10;  // norm, qkv (codes, scales), o (2), norm, gate/up (2), down (2)

// span._rms_norm for a float32 input
Tensor rms_norm(const Tensor& hidden, const Tensor& weight, double eps) {
  Tensor variance = hidden.pow(2).mean(-1, /*keepdim=*/true);
  Tensor scaled = hidden * variance.add_(eps).rsqrt_();
  return scaled.mul_(weight);
}

// quant.Int4Linear.forward / FusedLinears.joint without a bias: x [B, T, K] -> [B, T, N]
Tensor int4_linear(const Tensor& x, const Tensor& packed, const Tensor& scales, int64_t group) {
  const int64_t k = packed.size(1) * 2;
  const int64_t n = packed.size(0);
  Tensor flat = x.reshape({-1, k}).to(at::kBFloat16);
  Tensor out = at::_weight_int4pack_mm_for_cpu(flat, packed, group, scales);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  return out.to(x.scalar_type()).reshape(shape);
}

// llama_block.rotate_half
Tensor rotate_half(const Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  Tensor x1 = x.slice(-1, 0, half);
  Tensor x2 = x.slice(-1, half);
  return at::cat({-x2, x1}, -1);
}

// llama_block.rotate_heads / one half of apply_rotary_pos_emb (cos, sin already unsqueezed)
Tensor rotate(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return (x * cos) + (rotate_half(x) * sin);
}

// span.KVCache.update for storage with room: keys/values [B, kv, capacity, D]
std::pair<Tensor, Tensor> cache_update(const Tensor& keys, const Tensor& values,
                                       const Tensor& key, const Tensor& value, int64_t length) {
  const int64_t need = length + key.size(2);
  keys.slice(2, length, need).copy_(key);
  values.slice(2, length, need).copy_(value);
  return {keys.slice(2, 0, need), values.slice(2, 0, need)};
}

// llama_block.sdpa_attention for one query token without a mask -> [B, 1, heads, D]
Tensor attend(const Tensor& query, const Tensor& key, const Tensor& value, double scaling,
              bool gqa) {
  Tensor out = at::scaled_dot_product_attention(query, key, value, std::nullopt, 0.0,
                                                /*is_causal=*/false, scaling, gqa);
  out = out.reshape({out.size(0), -1, query.size(2), value.size(-1)});
  return out.transpose(1, 2).contiguous();
}

// [..., T, H] -> [..., T, -1, head_dim]: a projection's output viewed as heads
std::vector<int64_t> heads_shape(const Tensor& x, int64_t head_dim) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(-1);
  shape.push_back(head_dim);
  return shape;
}

// A block after attention (the lean path's and the Python batch's, the same ops):
// ``hidden = residual + o(attn_out)``, then ``hidden + down(silu(gate(x)) * up(x))`` with
// x the post-attention norm of hidden. attn_out: [B, T, heads, D], contiguous.
Tensor after_attention(const Tensor* f, int64_t layout, const Tensor& residual,
                       const Tensor& attn_out, double eps, int64_t group) {
  std::vector<int64_t> flat(residual.sizes().begin(), residual.sizes().end() - 1);
  flat.push_back(-1);
  Tensor merged = attn_out.reshape(flat).contiguous();  // [B, T, heads * D]
  Tensor o = layout == kInt4Layout ? int4_linear(merged, f[3], f[4], group)
                                   : at::linear(merged, f[4]);
  Tensor hidden = residual + o;
  Tensor x = rms_norm(hidden, f[5], eps);
  Tensor mlp;
  if (layout == kInt4Layout) {
    Tensor gate_up = int4_linear(x, f[6], f[7], group);  // FusedLinears: split views
    const int64_t width = gate_up.size(-1) / 2;
    auto parts = at::split_with_sizes(gate_up, {width, gate_up.size(-1) - width}, -1);
    mlp = int4_linear(at::silu(parts[0]).mul_(parts[1]), f[8], f[9], group);
  } else {
    Tensor gate = at::linear(x, f[6]);
    Tensor up = at::linear(x, f[7]);
    mlp = at::linear(at::silu(gate).mul_(up), f[8]);
  }
  return hidden + mlp;
}

}  // namespace

// hidden [B, 1, H] float32 through the blocks whose tensors ``fields`` lists (``layout``'s
// fields per block, in order), writing each block's key/value at ``length`` into ``keys[i]``
// / ``values[i]`` ([B, kv_heads, capacity, D], capacity > length). cos/sin: [B, 1, D] (the
// step's rotary table). dims: head_dim, query heads, key/value heads, int4 group.
Tensor span_decode(Tensor hidden, Tensor cos, Tensor sin, at::TensorList fields,
                   at::TensorList keys, at::TensorList values, int64_t length, int64_t layout,
                   at::IntArrayRef dims, double eps, double scaling) {
  const int64_t head_dim = dims[0], heads = dims[1], kv_heads = dims[2], group = dims[3];
  const int64_t per = layout == kInt4Layout ? kInt4Fields : kFloatFields;
  TORCH_CHECK(layout == kFloatLayout || layout == kInt4Layout, "unknown layout ", layout);
  TORCH_CHECK(static_cast<int64_t>(fields.size()) == per * static_cast<int64_t>(keys.size()) &&
                  keys.size() == values.size(),
              "fields and caches do not match the blocks");
  const bool gqa = heads != kv_heads;  // SDPA's enable_gqa, as transformers passes it
  const Tensor cos1 = cos.unsqueeze(1), sin1 = sin.unsqueeze(1);  // [B, 1, 1, D]
  const int64_t q_size = heads * head_dim, k_size = kv_heads * head_dim;
  for (size_t block = 0; block < keys.size(); ++block) {
    const Tensor* f = fields.data() + block * per;
    Tensor x = rms_norm(hidden, f[0], eps);
    const std::vector<int64_t> shape = heads_shape(x, head_dim);  // [B, T, heads, D]
    Tensor query, key, value;
    if (layout == kInt4Layout) {
      Tensor out = int4_linear(x, f[1], f[2], group);  // [B, T, q + k + v]
      // span.rotated_qkv: query and key heads rotated as one tensor (the same bits)
      Tensor both = rotate(out.slice(-1, 0, q_size + k_size).view(shape).transpose(1, 2),
                           cos1, sin1);
      query = both.slice(1, 0, heads);
      key = both.slice(1, heads);
      value = out.slice(-1, q_size + k_size).view(shape).transpose(1, 2);
    } else {
      query = rotate(at::linear(x, f[1]).view(shape).transpose(1, 2), cos1, sin1);
      key = rotate(at::linear(x, f[2]).view(shape).transpose(1, 2), cos1, sin1);
      value = at::linear(x, f[3]).view(shape).transpose(1, 2);
    }
    auto [all_keys, all_values] = cache_update(keys[block], values[block], key, value, length);
    Tensor attn_out = attend(query, all_keys, all_values, scaling, gqa);
    hidden = after_attention(f, layout, hidden, attn_out, eps, group);
  }
  return hidden;
}

// model.batched.decode_batch's blocks (``_block``) over the rows of B sessions: hidden
// [B, 1, H], row i at position lengths[i]; cos/sin [B, 1, D] (each row's own); keys/values
// session-major (session i's block j at i * blocks + j). The products run over all rows,
// the cache writes and attention per session (``project_qkv`` then the two rotations, as
// the Python batch does: its bits, which may differ from a solo step's in the last place).
Tensor span_decode_batch(Tensor hidden, Tensor cos, Tensor sin, at::TensorList fields,
                         at::TensorList keys, at::TensorList values, at::IntArrayRef lengths,
                         int64_t layout, at::IntArrayRef dims, double eps, double scaling) {
  const int64_t head_dim = dims[0], heads = dims[1], kv_heads = dims[2], group = dims[3];
  const int64_t per = layout == kInt4Layout ? kInt4Fields : kFloatFields;
  TORCH_CHECK(layout == kFloatLayout || layout == kInt4Layout, "unknown layout ", layout);
  const int64_t rows = hidden.size(0);
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == rows, "a length per row");
  const int64_t blocks = static_cast<int64_t>(fields.size()) / per;
  TORCH_CHECK(blocks * per == static_cast<int64_t>(fields.size()) &&
                  static_cast<int64_t>(keys.size()) == rows * blocks &&
                  keys.size() == values.size(),
              "fields and caches do not match the blocks and rows");
  const bool gqa = heads != kv_heads;
  const Tensor cos1 = cos.unsqueeze(1), sin1 = sin.unsqueeze(1);  // [B, 1, 1, D]
  const int64_t q_size = heads * head_dim, k_size = kv_heads * head_dim;
  for (int64_t block = 0; block < blocks; ++block) {
    const Tensor* f = fields.data() + block * per;
    Tensor x = rms_norm(hidden, f[0], eps);
    const std::vector<int64_t> shape = heads_shape(x, head_dim);  // [B, T, heads, D]
    Tensor query, key, value;
    if (layout == kInt4Layout) {
      Tensor out = int4_linear(x, f[1], f[2], group);  // FusedLinears.forward: split views
      auto parts =
          at::split_with_sizes(out, {q_size, k_size, out.size(-1) - q_size - k_size}, -1);
      query = parts[0].view(shape).transpose(1, 2);
      key = parts[1].view(shape).transpose(1, 2);
      value = parts[2].view(shape).transpose(1, 2);
    } else {
      query = at::linear(x, f[1]).view(shape).transpose(1, 2);
      key = at::linear(x, f[2]).view(shape).transpose(1, 2);
      value = at::linear(x, f[3]).view(shape).transpose(1, 2);
    }
    query = rotate(query, cos1, sin1);  // apply_rotary_pos_emb: query, then key
    key = rotate(key, cos1, sin1);
    std::vector<Tensor> outs;
    outs.reserve(rows);
    for (int64_t i = 0; i < rows; ++i) {  // each session's own cache: no padding
      const int64_t slot = i * blocks + block;
      auto [all_keys, all_values] = cache_update(keys[slot], values[slot], key.slice(0, i, i + 1),
                                                 value.slice(0, i, i + 1), lengths[i]);
      outs.push_back(attend(query.slice(0, i, i + 1), all_keys, all_values, scaling, gqa));
    }
    hidden = after_attention(f, layout, hidden, at::cat(outs), eps, group);
  }
  return hidden;
}

TORCH_LIBRARY(layerchain, m) {
  m.def("span_decode(Tensor hidden, Tensor cos, Tensor sin, Tensor[] fields, Tensor[] keys, "
        "Tensor[] values, int length, int layout, int[] dims, float eps, float scaling) -> Tensor",
        &span_decode);
  m.def("span_decode_batch(Tensor hidden, Tensor cos, Tensor sin, Tensor[] fields, "
        "Tensor[] keys, Tensor[] values, int[] lengths, int layout, int[] dims, float eps, "
        "float scaling) -> Tensor",
        &span_decode_batch);
}
