// The torch-facing layer of the MADE ops: the one-pass inverse (made_inverse), and the fused forward with its
// backward (made_forward, made_backward): schemas, checks, the degree-sorted weights and CPU dispatch. Python
// (python/fusedlayers/flows/made_plan.py) describes the network (see made_kernel.h).
#include "flows/made_kernel.h"

#include "common/derived_cache.h"
#include "common/reusable_tensor.h"
#include "common/transpose_dispatch.h"
#include "common/gemm.h"
#include "common/parallel.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <tuple>
#include <vector>

namespace fl {

namespace {

using at::Tensor;
using OptTensorList = c10::List<std::optional<Tensor>>;

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t, int64_t row = 0) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() + row * t->size(-1) : nullptr;
}

std::tuple<Tensor, Tensor> made_inverse_cpu(const Tensor& targets, at::TensorList weights,
                                            const OptTensorList& biases, const OptTensorList& in_affine,
                                            const OptTensorList& out_affine, const OptTensorList& contexts,
                                            const Tensor& stage_info, const Tensor& offsets, int64_t activation,
                                            double epsilon) {
  constexpr const char* op = "made_inverse";
  TORCH_CHECK(targets.device().is_cpu() && targets.dim() == 2, op, ": targets must be a 2-D CPU tensor, got ",
              targets.sizes());
  const auto dtype = targets.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": targets must be float32 or float64, got ",
                   dtype);
  const int64_t S = static_cast<int64_t>(weights.size()), D = targets.size(1), N = targets.size(0);
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(biases.size()) == S && static_cast<int64_t>(in_affine.size()) == S &&
                  static_cast<int64_t>(out_affine.size()) == S && static_cast<int64_t>(contexts.size()) == S,
              op, ": one weight, bias, affine and context entry per stage");
  TORCH_CHECK(stage_info.scalar_type() == at::kLong && stage_info.sizes() == at::IntArrayRef({S, 5}), op,
              ": stage_info must be int64 [stages, 5]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.sizes() == at::IntArrayRef({S, 2, D + 2}), op,
              ": offsets must be int64 [stages, 2, features + 2]");
  TORCH_CHECK(activation >= 0 && activation <= 3, op, ": unknown activation ", activation);
  const Tensor info = stage_info.contiguous(), offs = offsets.contiguous();
  const int64_t* si = info.data_ptr<int64_t>();
  std::vector<int64_t> buffer_units{D};
  for (int64_t s = 0; s < S; ++s) {
    const Tensor& w = weights[s];
    TORCH_CHECK(w.scalar_type() == dtype && w.dim() == 2 && w.is_contiguous(), op, ": weight ", s,
                " must be a contiguous 2-D tensor of the targets' dtype");
    const int64_t src = si[s * 5], dst = si[s * 5 + 1], residual = si[s * 5 + 2];
    TORCH_CHECK(src >= 0 && src < static_cast<int64_t>(buffer_units.size()) && buffer_units[src] == w.size(1), op,
                ": stage ", s, " reads a buffer that does not exist yet or has the wrong size");
    TORCH_CHECK(residual < static_cast<int64_t>(buffer_units.size()) &&
                    (residual < 0 || buffer_units[residual] == w.size(0)),
                op, ": stage ", s, " has a bad residual buffer");
    if (s + 1 < S) {
      TORCH_CHECK(dst == static_cast<int64_t>(buffer_units.size()), op, ": stage ", s,
                  " must write the next new buffer");
      buffer_units.push_back(w.size(0));
    } else {
      TORCH_CHECK(w.size(0) == 2 * D, op, ": the output stage must have 2 rows per feature");
    }
    for (const auto* list : {&biases, &contexts}) {
      const std::optional<Tensor> t = (*list)[s];
      if (t.has_value() && t->defined())
        TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->size(0) == w.size(0) &&
                        t->numel() == w.size(0) * (list == &contexts ? N : 1),
                    op, ": stage ", s, " has a bias or context of the wrong shape");
    }
    for (const auto& [t, units] : {std::pair{std::optional<Tensor>(in_affine[s]), w.size(1)},
                                   {std::optional<Tensor>(out_affine[s]), w.size(0)}})
      if (t.has_value() && t->defined())
        TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->sizes() == at::IntArrayRef({2, units}),
                    op, ": stage ", s, " has a batch-norm affine of the wrong shape");
  }
  // The kernel indexes with these offsets unchecked: each stage's must be non-decreasing within its units, and
  // the output stage must give every feature its two rows (unconstrained scale, shift) in order.
  const int64_t* od = offs.data_ptr<int64_t>();
  for (int64_t st = 0; st < S; ++st)
    for (int64_t side = 0; side < 2; ++side) {
      const int64_t* o = od + (st * 2 + side) * (D + 2);
      const int64_t units = side == 0 ? weights[st].size(1) : weights[st].size(0);
      TORCH_CHECK(o[0] >= 0 && std::is_sorted(o, o + D + 2) && o[D + 1] <= units, op, ": stage ", st,
                  " offsets must be non-decreasing within [0, ", units, "]");
    }
  const int64_t* out_offsets = od + ((S - 1) * 2 + 1) * (D + 2);
  for (int64_t k = 1; k <= D; ++k)
    TORCH_CHECK(out_offsets[k] == 2 * (k - 1) && out_offsets[k + 1] == 2 * k, op,
                ": the output stage must have rows 2(k-1), 2k-1 for feature k");
  const Tensor y = targets.contiguous();
  Tensor x = at::empty_like(y);
  Tensor logabsdet = at::empty({N}, y.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    std::vector<MadeStage<scalar_t>> stages(S);
    for (int64_t s = 0; s < S; ++s) {
      MadeStage<scalar_t>& st = stages[s];
      st.src = si[s * 5];
      st.dst = si[s * 5 + 1];
      st.residual = si[s * 5 + 2];
      st.act_in = si[s * 5 + 3] != 0;
      st.act_out = si[s * 5 + 4] != 0;
      st.in_units = weights[s].size(1);
      st.out_units = weights[s].size(0);
      st.weight = weights[s].data_ptr<scalar_t>();
      st.bias = data_or_null<scalar_t>(biases[s]);
      st.in_scale = data_or_null<scalar_t>(in_affine[s]);
      st.in_shift = data_or_null<scalar_t>(in_affine[s], 1);
      st.out_scale = data_or_null<scalar_t>(out_affine[s]);
      st.out_shift = data_or_null<scalar_t>(out_affine[s], 1);
      st.context = data_or_null<scalar_t>(contexts[s]);
      st.in_offsets = offs.data_ptr<int64_t>() + s * 2 * (D + 2);
      st.out_offsets = st.in_offsets + (D + 2);
    }
    MadeInverseArgs<scalar_t> a;
    a.batch = N;
    a.features = D;
    a.num_stages = S;
    a.num_buffers = static_cast<int64_t>(buffer_units.size());
    a.activation = static_cast<int>(activation);
    a.epsilon = static_cast<scalar_t>(epsilon);
    a.stages = stages.data();
    a.buffer_units = buffer_units.data();
    a.targets = y.data_ptr<scalar_t>();
    a.outputs = x.data_ptr<scalar_t>();
    a.logabsdet = logabsdet.data_ptr<scalar_t>();
    FL_DISPATCH_ISA(made_inverse, a);
  });
  return {x, logabsdet};
}

// ---- the forward pass (density direction) and its backward
//
// The op takes the module's own tensors (weights [out, in], masks, biases, context terms, all in the module's
// unit order) and the permutations that sort each layer's units by degree; it derives the sorted, masked
// weights (cached while a weight is unchanged) and returns gradients in the module's order again, so autograd
// needs no permuting ops of its own.

// Biases and contexts are Tensor[] (autograd returns one gradient list per list argument only when every entry
// is a tensor); an empty tensor stands for an absent one.
bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

struct MadeNet {
  std::vector<int64_t> src, residual, act_in, act_out, in_units, out_units;
  std::vector<Tensor> weight, weight_t, extent;  // sorted: [out, in], [in, out], inputs read per output unit
  std::vector<Tensor> output_strips, input_strips;  // float on strip-kernel builds (made_kernel.h), else undefined
};


// A number naming the current state of t: renewed by the derived cache whenever t changes or is replaced.
std::string token_of(const Tensor& t) {
  static std::atomic<int64_t> next{0};
  const Tensor token = cached_derived(t, "made_token", [] { return at::full({1}, ++next, at::kLong); });
  return std::to_string(token.data_ptr<int64_t>()[0]);
}

// token_of, looked up once per tensor within one call: consecutive layers share their permutations, and each
// cache lookup samples the tensor's bytes.
class Tokens {
 public:
  std::string of(const Tensor& t) {
    for (const auto& [impl, token] : seen_)
      if (impl == t.unsafeGetTensorImpl()) return token;
    seen_.emplace_back(t.unsafeGetTensorImpl(), token_of(t));
    return seen_.back().second;
  }

 private:
  std::vector<std::pair<const void*, std::string>> seen_;
};

template <typename T>
Tensor sort_weight(const Tensor& weight, const Tensor& mask, const int64_t* out_perm, const int64_t* in_perm) {
  const int64_t out = weight.size(0), in = weight.size(1);
  Tensor sorted = at::empty({out, in}, weight.options());
  const T* w = weight.data_ptr<T>();
  const T* m = mask.data_ptr<T>();
  T* s = sorted.data_ptr<T>();
  // Redone after every optimizer step: shared among threads (a training step re-sorts every layer).
  parallel_for(out, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* w_row = w + out_perm[o] * in;
      const T* m_row = m + out_perm[o] * in;
      for (int64_t i = 0; i < in; ++i) s[o * in + i] = w_row[in_perm[i]] * m_row[in_perm[i]];
    }
  });
  return sorted;
}

// A permutation of [0, n) as int64: checked with plain loops (a few aten calls per layer would cost more).
void check_permutation(const Tensor& perm, int64_t n, const char* op) {
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.is_contiguous() && perm.numel() == n, op,
              ": permutations must be int64 with one entry per unit (", n, "), got ", perm.sizes());
  const int64_t* p = perm.data_ptr<int64_t>();
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < n && !seen[p[i]], op, ": permutation out of range or repeating an index");
    seen[p[i]] = 1;
  }
}

// The sorted weight depends on the mask and the permutations too: key it on tokens that the derived cache
// renews whenever one of them changes (version counter, sampled bytes, or a new tensor).
std::string sorted_weight_key(const Tensor& mask, const Tensor& out_perm, const Tensor& in_perm, Tokens& tokens) {
  return "made:" + tokens.of(mask) + ":" + tokens.of(out_perm) + ":" + tokens.of(in_perm);
}

// (weight * mask) with rows permuted by out_perm and columns by in_perm, cached while all four are unchanged.
// Checked by the callers (describe_net, made_sorted_weight_cpu).
Tensor cached_sorted_weight(const Tensor& w, const Tensor& mask, const Tensor& out_perm, const Tensor& in_perm,
                            const std::string& key) {
  return cached_derived(w, key, [&] {
    return AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "made_sort_weight", [&] {
      return sort_weight<scalar_t>(w, mask, out_perm.data_ptr<int64_t>(), in_perm.data_ptr<int64_t>());
    });
  });
}

// A layer's sorted weight packed as strips for the kernels (over its output units for the forward, its input
// units for the backward), cached like the sorted weight; undefined where this build packs none.
Tensor cached_strips(const Tensor& w, const Tensor& mask, const Tensor& out_perm, const Tensor& in_perm,
                     const std::string& key, const Tensor& extent, bool over_inputs) {
  const int64_t out = w.size(0), in = w.size(1);
  int64_t floats = 0;
  if (w.scalar_type() == at::kFloat)
    FL_DISPATCH_ISA(made_strip_floats, in, out, extent.data_ptr<int64_t>(), over_inputs, floats);
  if (floats == 0) return Tensor();
  return cached_derived(w, key + (over_inputs ? ":input strips" : ":output strips"), [&] {
    const Tensor sorted = cached_sorted_weight(w, mask, out_perm, in_perm, key);
    Tensor strips = at::empty({floats}, w.options());
    FL_DISPATCH_ISA(made_pack_strips, sorted.data_ptr<float>(), in, out, extent.data_ptr<int64_t>(), over_inputs,
                    strips.data_ptr<float>());
    return strips;
  });
}

// The inverse's weights: sorted, masked and cached (sampling again with unchanged weights re-sorts nothing).
Tensor made_sorted_weight_cpu(const Tensor& weight, const Tensor& mask, const Tensor& out_perm,
                              const Tensor& in_perm) {
  constexpr const char* op = "made_sorted_weight";
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous(), op,
              ": weight must be a contiguous 2-D CPU tensor");
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble, op,
                   ": weight must be float32 or float64");
  TORCH_CHECK(mask.sizes() == weight.sizes() && mask.scalar_type() == weight.scalar_type() && mask.is_contiguous(),
              op, ": mask must be contiguous, with the weight's shape and dtype");
  check_permutation(out_perm, weight.size(0), op);
  check_permutation(in_perm, weight.size(1), op);
  Tokens tokens;
  return cached_sorted_weight(weight, mask, out_perm, in_perm, sorted_weight_key(mask, out_perm, in_perm, tokens));
}

// [out, in] -> [in, out] in tiles: ATen's strided copy is several times slower.
Tensor transposed(const Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  Tensor t = at::empty({in, out}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "made_transpose", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = t.data_ptr<scalar_t>();
    parallel_for((out + 31) / 32, std::max<int64_t>(1, 512 / std::max<int64_t>(in, 1)), [&](int64_t b0, int64_t b1) {
      const int64_t r0 = b0 * 32, r1 = std::min(out, b1 * 32);  // a band of rows of w
      FL_DISPATCH_ISA(transposed_copy, r1 - r0, in, src + r0 * in, in, dst + r0, out);
    });
  });
  return t;
}

// A dense layer (no masks: made_coupling_forward's conditioner): every unit reads every input and the weight is
// its own sorted weight, so only the forward's strips (or transpose) are derived, cached on the weight alone.
void add_dense_layer(MadeNet& net, const Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  const Tensor extent = cached_derived(w, "dense:extent", [&] { return at::full({out}, in, at::kLong); });
  int64_t floats = 0;
  if (w.scalar_type() == at::kFloat)
    FL_DISPATCH_ISA(made_strip_floats, in, out, extent.data_ptr<int64_t>(), false, floats);
  net.output_strips.push_back(floats == 0 ? Tensor() : cached_derived(w, "dense:output strips", [&] {
    Tensor strips = at::empty({floats}, w.options());
    FL_DISPATCH_ISA(made_pack_strips, w.data_ptr<float>(), in, out, extent.data_ptr<int64_t>(), false,
                    strips.data_ptr<float>());
    return strips;
  }));
  net.input_strips.emplace_back();
  net.weight.emplace_back();
  net.weight_t.push_back(floats ? Tensor() : cached_derived(w, "dense:t", [&] { return transposed(w); }));
  net.extent.push_back(extent);
}

// A masked layer's derived tensors: its units' input counts (extent), its forward strips or transposed sorted
// weight, and where the backward needs them its sorted weight and input strips; cached while unchanged.
void add_masked_layer(MadeNet& net, const Tensor& w, const Tensor& mask, const Tensor& in_perm,
                      const Tensor& out_perm, bool need_sorted, Tokens& tokens, int64_t l) {
  constexpr const char* op = "made_forward";
  const int64_t out = w.size(0), in = w.size(1);
  const auto dtype = w.scalar_type();
  const int64_t* po = out_perm.data_ptr<int64_t>();
  const int64_t* pi = in_perm.data_ptr<int64_t>();
  const std::string key = sorted_weight_key(mask, out_perm, in_perm, tokens);
  // Sorted by degree, each mask row is a prefix of the sorted inputs: its count is all that unit reads.
  Tensor extent = cached_derived(mask, "made_extent:" + tokens.of(out_perm), [&] {
    Tensor counts = at::empty({out}, out_perm.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "made_extent", [&] {
      const scalar_t* m = mask.data_ptr<scalar_t>();
      for (int64_t o = 0; o < out; ++o)
        counts.data_ptr<int64_t>()[o] = std::count_if(m + po[o] * in, m + (po[o] + 1) * in,
                                                      [](scalar_t v) { return v != scalar_t(0); });
    });
    return counts;
  });
  const int64_t* e = extent.data_ptr<int64_t>();
  TORCH_CHECK(std::is_sorted(e, e + out), op, ": layer ", l,
              " is not sorted by degree (its units' input counts must not decrease)");
  // The forward reads the strips (or else the transposed weight); the backward the sorted weight and strips.
  net.output_strips.push_back(cached_strips(w, mask, out_perm, in_perm, key, extent, false));
  net.input_strips.push_back(need_sorted ? cached_strips(w, mask, out_perm, in_perm, key, extent, true)
                                         : Tensor());
  net.weight.push_back(need_sorted ? cached_sorted_weight(w, mask, out_perm, in_perm, key) : Tensor());
  net.weight_t.push_back(net.output_strips.back().defined() ? Tensor() : cached_derived(w, key + ":t", [&] {
    return transposed(cached_sorted_weight(w, mask, out_perm, in_perm, key));
  }));
  net.extent.push_back(extent);
}

// Masks and permutations may be empty lists: a dense network (made_coupling_forward), which has no backward.
MadeNet describe_net(const Tensor& inputs, at::TensorList weights, at::TensorList masks, at::TensorList in_perms,
                     at::TensorList out_perms, at::TensorList biases, at::TensorList contexts,
                     at::IntArrayRef layer_info, bool need_sorted, int64_t input_units = -1,
                     int64_t output_units = -1) {
  constexpr const char* op = "made_forward";
  Tokens tokens;
  TORCH_CHECK(inputs.device().is_cpu() && inputs.dim() == 2 && inputs.is_contiguous(), op,
              ": inputs must be a contiguous 2-D CPU tensor, got ", inputs.sizes());
  const auto dtype = inputs.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op, ": inputs must be float32 or float64, got ",
                   dtype);
  const int64_t L = static_cast<int64_t>(weights.size()), N = inputs.size(0);
  const int64_t D = input_units < 0 ? inputs.size(1) : input_units;
  const bool dense = masks.empty() && in_perms.empty() && out_perms.empty();
  TORCH_CHECK(!(dense && need_sorted), op, ": a dense network has no backward");
  for (const auto* list : {&masks, &in_perms, &out_perms, &biases, &contexts})
    TORCH_CHECK(static_cast<int64_t>(list->size()) == L || (dense && list->empty()), op,
                ": one mask, permutation, bias and context per layer");
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(layer_info.size()) == 4 * L, op,
              ": layer_info must hold 4 ints per layer");
  MadeNet net;
  std::vector<int64_t> units{D};
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    const int64_t out = w.size(0), in = w.dim() == 2 ? w.size(1) : -1;
    TORCH_CHECK(w.scalar_type() == dtype && w.dim() == 2 && w.is_contiguous() &&
                    (dense || (masks[l].is_contiguous() && masks[l].scalar_type() == dtype &&
                               masks[l].sizes() == w.sizes())),
                op, ": layer ", l, " needs a contiguous weight and mask of one shape and the inputs' dtype");
    if (!dense) {
      check_permutation(in_perms[l], in, op);
      check_permutation(out_perms[l], out, op);
    }
    const int64_t src = layer_info[l * 4], residual = layer_info[l * 4 + 1];
    TORCH_CHECK(src >= 0 && src <= l && units[src] == in, op, ": layer ", l,
                " reads a buffer that does not exist yet or has the wrong size");
    TORCH_CHECK(residual <= l && (residual < 0 || units[residual] == out), op, ": layer ", l,
                " has a bad residual buffer");
    if (present(biases[l]))
      TORCH_CHECK(biases[l].scalar_type() == dtype && biases[l].is_contiguous() && biases[l].numel() == out, op,
                  ": layer ", l, " bias must have ", out, " elements");
    if (present(contexts[l]))
      TORCH_CHECK(contexts[l].scalar_type() == dtype && contexts[l].is_contiguous() &&
                      contexts[l].sizes() == at::IntArrayRef({N, out}),
                  op, ": layer ", l, " context must be [batch, ", out, "]");
    if (dense) {
      add_dense_layer(net, w);
    } else {
      add_masked_layer(net, w, masks[l], in_perms[l], out_perms[l], need_sorted, tokens, l);
    }
    units.push_back(out);
    net.src.push_back(src);
    net.residual.push_back(residual);
    net.act_in.push_back(layer_info[l * 4 + 2]);
    net.act_out.push_back(layer_info[l * 4 + 3]);
    net.in_units.push_back(in);
    net.out_units.push_back(out);
  }
  if (output_units < 0) output_units = 2 * D;  // a MAF: (unconstrained scale, shift) per feature
  TORCH_CHECK(units.back() == output_units, op, ": the output layer must have ", output_units, " units, got ",
              units.back());
  return net;
}

template <typename T>
std::vector<MadeLayer<T>> kernel_layers(const MadeNet& net, const std::vector<Tensor>& biases,
                                        const std::vector<Tensor>& contexts, at::TensorList saved) {
  std::vector<MadeLayer<T>> layers(net.weight.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    MadeLayer<T>& y = layers[l];
    y.src = net.src[l];
    y.residual = net.residual[l];
    y.act_in = net.act_in[l] != 0;
    y.act_out = net.act_out[l] != 0;
    y.in_units = net.in_units[l];
    y.out_units = net.out_units[l];
    y.weight_t = net.weight_t[l].defined() ? net.weight_t[l].data_ptr<T>() : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      y.output_strips = net.output_strips[l].defined() ? net.output_strips[l].data_ptr<float>() : nullptr;
      y.input_strips = net.input_strips[l].defined() ? net.input_strips[l].data_ptr<float>() : nullptr;
    }
    y.weight = net.weight[l].defined() ? net.weight[l].data_ptr<T>() : nullptr;
    y.bias = present(biases[l]) ? biases[l].data_ptr<T>() : nullptr;
    y.context = present(contexts[l]) ? contexts[l].data_ptr<T>() : nullptr;
    y.extent = net.extent[l].data_ptr<int64_t>();
    y.dst = saved[2 * l].numel() ? saved[2 * l].data_ptr<T>() : nullptr;
    y.pre = saved[2 * l + 1].numel() ? saved[2 * l + 1].data_ptr<T>() : nullptr;
  }
  return layers;
}

// bias[perm]: a plain loop (an index_select per layer costs a dispatch and several checks).
Tensor gather_bias(const Tensor& bias, const Tensor& perm) {
  Tensor out = at::empty_like(bias);
  const int64_t* p = perm.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "made_gather_bias", [&] {
    const scalar_t* src = bias.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t o = 0; o < bias.numel(); ++o) dst[o] = src[p[o]];
  });
  return out;
}

// Biases and context terms in sorted unit order (absent ones stay empty).
std::pair<std::vector<Tensor>, std::vector<Tensor>> sorted_terms(at::TensorList biases, at::TensorList contexts,
                                                                 at::TensorList out_perms) {
  std::vector<Tensor> b, c;
  for (size_t l = 0; l < biases.size(); ++l) {
    const bool sorted = out_perms.empty();  // a dense network's units stay in their order
    b.push_back(present(biases[l]) && !sorted ? gather_bias(biases[l], out_perms[l]) : biases[l]);
    c.push_back(present(contexts[l]) && !sorted ? contexts[l].index_select(1, out_perms[l]) : contexts[l]);
  }
  return {b, c};
}

// The arguments both forward ops share: the network and where its inputs, outputs and log-dets live.
template <typename T>
MadeForwardArgs<T> forward_args(const std::vector<MadeLayer<T>>& layers, int64_t batch, int64_t features,
                                int64_t activation, double epsilon, const Tensor& inputs, Tensor& outputs,
                                Tensor& logabsdet) {
  MadeForwardArgs<T> a;
  a.batch = batch;
  a.features = features;
  a.num_layers = static_cast<int64_t>(layers.size());
  a.activation = static_cast<int>(activation);
  a.epsilon = static_cast<T>(epsilon);
  a.layers = layers.data();
  a.inputs = inputs.data_ptr<T>();
  a.outputs = outputs.data_ptr<T>();
  a.logabsdet = logabsdet.data_ptr<T>();
  return a;
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> made_forward_cpu(
    const Tensor& inputs, at::TensorList weights, at::TensorList masks, at::TensorList in_perms,
    at::TensorList out_perms, at::TensorList biases, at::TensorList contexts, at::IntArrayRef layer_info,
    int64_t activation, double epsilon, bool save) {
  TORCH_CHECK(activation >= 0 && activation <= 3, "made_forward: unknown activation ", activation);
  const MadeNet net = describe_net(inputs, weights, masks, in_perms, out_perms, biases, contexts, layer_info,
                                   /*need_sorted=*/false);
  const auto [b, c] = sorted_terms(biases, contexts, out_perms);
  const int64_t N = inputs.size(0), rows = save ? N : 0;
  std::vector<Tensor> saved;
  for (size_t l = 0; l < net.weight.size(); ++l) {
    saved.push_back(reusable_empty("made_forward:dst", {rows, net.out_units[l]}, inputs.options()));
    // A relu layer without residual saves no pre-activation: relu' is read from its output.
    const bool pre = net.act_out[l] && !(activation == 0 && net.residual[l] < 0);
    saved.push_back(reusable_empty("made_forward:pre", {pre ? rows : 0, net.out_units[l]}, inputs.options()));
  }
  Tensor outputs = at::empty_like(inputs), logabsdet = at::empty({N}, inputs.options());
  std::atomic<bool> nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "made_forward", [&] {
    const auto layers = kernel_layers<scalar_t>(net, b, c, saved);
    auto a = forward_args<scalar_t>(layers, N, inputs.size(1), activation, epsilon, inputs, outputs, logabsdet);
    a.save = save;
    a.nonfinite_inputs = &nonfinite;
    FL_DISPATCH_ISA(made_forward, a);
  });
  // Checked here, in the pass that reads them anyway (a separate check cost a tenth of a small layer's call).
  TORCH_CHECK_VALUE(!nonfinite.load(), "inputs contains NaN or infinite values");
  return {outputs, logabsdet, saved};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> made_backward_cpu(
    const Tensor& grad_outputs, const Tensor& grad_logabsdet, const Tensor& inputs, at::TensorList weights,
    at::TensorList masks, at::TensorList in_perms, at::TensorList out_perms, at::TensorList biases,
    at::TensorList contexts, at::IntArrayRef layer_info, at::TensorList saved, int64_t activation, double epsilon,
    bool input_grad) {
  const MadeNet net = describe_net(inputs, weights, masks, in_perms, out_perms, biases, contexts, layer_info,
                                   /*need_sorted=*/true);
  const int64_t N = inputs.size(0), L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 2 * L && saved[0].size(0) == N,
              "made_backward: saved must come from made_forward with save=True");
  const auto [b, c] = sorted_terms(biases, contexts, out_perms);
  const Tensor go = grad_outputs.to(inputs.scalar_type()).contiguous();
  const Tensor gl = grad_logabsdet.to(inputs.scalar_type()).contiguous();
  TORCH_CHECK(go.sizes() == inputs.sizes() && gl.numel() == N, "made_backward: gradients of the wrong shape");
  Tensor grad_inputs = input_grad ? at::empty_like(inputs) : inputs.new_empty({0, inputs.size(1)});
  std::vector<Tensor> grad_w, grad_b, grad_ctx;
  for (int64_t l = 0; l < L; ++l) {
    // Pooled: a training loop frees last step's gradients (or adds them into .grad and frees them), and fresh
    // megabytes would fault in a page per 4 KiB on first write (about as long as writing them).
    grad_w.push_back(reusable_empty("made_grad_weight", {net.out_units[l], net.in_units[l]}, inputs.options()));
    grad_b.push_back(at::empty({present(biases[l]) ? net.out_units[l] : 0}, inputs.options()));
    grad_ctx.push_back(at::empty({present(contexts[l]) ? N : 0, net.out_units[l]}, inputs.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "made_backward", [&] {
    const auto layers = kernel_layers<scalar_t>(net, b, c, saved);
    std::vector<scalar_t*> dw(L), db(L), dctx(L);
    std::vector<const int64_t*> po(L), pi(L);
    std::vector<const scalar_t*> mask(L);
    for (int64_t l = 0; l < L; ++l) {
      dw[l] = grad_w[l].data_ptr<scalar_t>();
      po[l] = out_perms[l].data_ptr<int64_t>();
      pi[l] = in_perms[l].data_ptr<int64_t>();
      mask[l] = masks[l].data_ptr<scalar_t>();
      db[l] = grad_b[l].numel() ? grad_b[l].data_ptr<scalar_t>() : nullptr;
      dctx[l] = grad_ctx[l].numel() ? grad_ctx[l].data_ptr<scalar_t>() : nullptr;
    }
    MadeBackwardArgs<scalar_t> a;
    a.batch = N;
    a.features = inputs.size(1);
    a.num_layers = L;
    a.activation = static_cast<int>(activation);
    a.epsilon = static_cast<scalar_t>(epsilon);
    a.layers = layers.data();
    a.inputs = inputs.data_ptr<scalar_t>();
    a.grad_outputs = go.data_ptr<scalar_t>();
    a.grad_logabsdet = gl.data_ptr<scalar_t>();
    a.grad_inputs = input_grad ? grad_inputs.data_ptr<scalar_t>() : nullptr;
    a.grad_weight = dw.data();
    a.out_perm = po.data();
    a.in_perm = pi.data();
    a.mask = mask.data();
    a.grad_bias = db.data();
    a.grad_context = dctx.data();
    FL_DISPATCH_ISA(made_backward, a);
  });
  // Bias and context gradients back to the module's unit order (the kernel wrote the weights' there already).
  std::vector<Tensor> grad_bias, grad_context;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t out = net.out_units[l];
    const int64_t* po = out_perms[l].data_ptr<int64_t>();
    Tensor gb = grad_b[l].numel() ? at::empty_like(grad_b[l]) : grad_b[l];
    Tensor gc = at::empty_like(contexts[l]);
    AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), "made_unsort", [&] {
      if (gb.numel())
        for (int64_t o = 0; o < out; ++o) gb.data_ptr<scalar_t>()[po[o]] = grad_b[l].data_ptr<scalar_t>()[o];
      if (present(contexts[l])) {
        const scalar_t* src = grad_ctx[l].data_ptr<scalar_t>();
        scalar_t* dst = gc.data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n)
          for (int64_t o = 0; o < out; ++o) dst[n * out + po[o]] = src[n * out + o];
      }
    });
    grad_bias.push_back(gb);
    grad_context.push_back(gc);  // an absent context's gradient keeps its empty shape
  }
  return {grad_inputs, grad_w, grad_bias, grad_context};
}

// An affine coupling with its conditioner in one slab kernel: the conditioner is a dense MADE (no masks; the
// Python side describes a chain of linear layers, activations and residual additions that way), the MAF's map
// replaced by the coupling's. No autograd: called when nothing needs gradients.
void check_columns(const Tensor& index, int64_t columns, const char* name) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 &&
                  index.is_contiguous(), "made_coupling_forward: ", name, " must be a contiguous 1-D int64 CPU tensor");
  const int64_t* p = index.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(p, p + index.numel(), [&](int64_t i) { return i >= 0 && i < columns; }),
              "made_coupling_forward: ", name, " has a column outside [0, ", columns, ")");
}

std::tuple<Tensor, Tensor> made_coupling_forward_cpu(const Tensor& inputs, const Tensor& identity_index,
                                                     const Tensor& moving_index, at::TensorList weights,
                                                     at::TensorList biases, at::IntArrayRef layer_info,
                                                     int64_t activation, double epsilon, bool inverse) {
  constexpr const char* op = "made_coupling_forward";
  TORCH_CHECK(activation >= 0 && activation <= 3, op, ": unknown activation ", activation);
  TORCH_CHECK(inputs.dim() == 2, op, ": inputs must be 2-D, got ", inputs.sizes());
  const int64_t C = inputs.size(1);
  check_columns(identity_index, C, "identity_index");
  check_columns(moving_index, C, "moving_index");
  std::vector<char> seen(C, 0);
  for (const Tensor* index : {&identity_index, &moving_index})
    for (int64_t k = 0; k < index->numel(); ++k) seen[index->data_ptr<int64_t>()[k]] += 1;
  TORCH_CHECK(std::all_of(seen.begin(), seen.end(), [](char n) { return n == 1; }), op,
              ": the identity and moving columns must cover each of the inputs' ", C, " columns once");
  const std::vector<Tensor> contexts(weights.size(), inputs.new_empty(0));
  const MadeNet net = describe_net(inputs, weights, {}, {}, {}, biases, contexts, layer_info, /*need_sorted=*/false,
                                   identity_index.numel(), 2 * moving_index.numel());
  const auto [b, c] = sorted_terms(biases, contexts, {});
  std::vector<Tensor> saved(2 * net.weight.size(), inputs.new_empty(0));
  Tensor outputs = at::empty_like(inputs), logabsdet = at::empty({inputs.size(0)}, inputs.options());
  AT_DISPATCH_FLOATING_TYPES(inputs.scalar_type(), op, [&] {
    const auto layers = kernel_layers<scalar_t>(net, b, c, saved);
    auto a = forward_args<scalar_t>(layers, inputs.size(0), identity_index.numel(), activation, epsilon, inputs,
                                    outputs, logabsdet);
    a.save = false;
    a.map = inverse ? MadeForwardArgs<scalar_t>::Map::coupling_inverse
                    : MadeForwardArgs<scalar_t>::Map::coupling_forward;
    a.coupled_features = C;
    a.moving_features = moving_index.numel();
    a.identity_index = identity_index.data_ptr<int64_t>();
    a.moving_index = moving_index.data_ptr<int64_t>();
    FL_DISPATCH_ISA(made_forward, a);
  });
  return {outputs, logabsdet};
}

}  // namespace

}  // namespace fl

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Solves y = scale(x_<i) * x + shift(x_<i) for x (nflows' MAF inverse), one unit of each layer at a time in
  // degree order. stage_info rows: (src buffer, dst buffer, residual buffer or -1, act_in, act_out); offsets
  // [stage, (in, out), features + 2]; affines [2, units] (scale; shift); contexts [units, batch].
  m.def(
      "made_inverse(Tensor targets, Tensor[] weights, Tensor?[] biases, Tensor?[] in_affine, Tensor?[] out_affine, "
      "Tensor?[] contexts, Tensor stage_info, Tensor offsets, int activation, float epsilon) -> (Tensor, Tensor)");
  // (weight * mask)[out_perm][:, in_perm], cached while unchanged: the inverse's weights (no autograd).
  m.def("made_sorted_weight(Tensor weight, Tensor mask, Tensor out_perm, Tensor in_perm) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // The MAF forward with its log-determinant in one pass. Weights, masks, biases and context terms in the
  // module's unit order, with permutations sorting each layer's inputs and outputs by degree; an empty bias or
  // context is an absent one. layer_info, 4 per layer: (src buffer, residual buffer or -1, act_in, act_out);
  // buffer 0 is the inputs, buffer l + 1 layer l's output. Returns (outputs, logabsdet, saved activations:
  // empty unless `save`, which the backward needs).
  m.def(
      "made_forward(Tensor inputs, Tensor[] weights, Tensor[] masks, Tensor[] in_perms, Tensor[] out_perms, "
      "Tensor[] biases, Tensor[] contexts, int[] layer_info, int activation, float epsilon, bool save) "
      "-> (Tensor, Tensor, Tensor[])");
  m.def(
      "made_backward(Tensor grad_outputs, Tensor grad_logabsdet, Tensor inputs, Tensor[] weights, Tensor[] masks, "
      "Tensor[] in_perms, Tensor[] out_perms, Tensor[] biases, Tensor[] contexts, int[] layer_info, "
      "Tensor[] saved, int activation, float epsilon, bool input_grad=True) -> (Tensor, Tensor[], Tensor[], "
      "Tensor[])");
  // An affine coupling (forward or inverse) with its conditioner network fused: the network, a dense MADE
  // (made_forward's weights, biases and layer_info, no masks), reads the inputs' identity columns and returns
  // [shift; unconstrained scale] for the moving ones. Returns (outputs, logabsdet), the outputs in the inputs'
  // column order. No autograd.
  m.def(
      "made_coupling_forward(Tensor inputs, Tensor identity_index, Tensor moving_index, Tensor[] weights, "
      "Tensor[] biases, int[] layer_info, int activation, float epsilon, bool inverse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlayers, CPU, m) {
  m.impl("made_inverse", &fl::made_inverse_cpu);
  m.impl("made_sorted_weight", &fl::made_sorted_weight_cpu);
  m.impl("made_forward", &fl::made_forward_cpu);
  m.impl("made_backward", &fl::made_backward_cpu);
  m.impl("made_coupling_forward", &fl::made_coupling_forward_cpu);
}
