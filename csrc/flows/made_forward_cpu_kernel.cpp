// CPU kernels of the fused MAF forward pass and its backward (see made_kernel.h). Built once per ISA.
//
// A work item is a slab of samples that runs the whole network. Units are sorted by degree, so the masked
// weights are block-triangular and the zero blocks are skipped: on AVX2 and AVX-512 builds (float) each product
// runs on the layer's weight packed once as 16- or 32-unit strips (flows/made_strips.h); elsewhere every product is
// [rows x K] x [K x 32] on the GEMM engine, over one block of 32 output units with K the inputs that block can
// see. The affine map and the log-determinant are the output layer's epilogue. The backward walks the layers in
// reverse per slab; weight and bias gradients are summed per worker and then across workers.
#include "flows/made_kernel.h"

#include "common/gemm.h"
#include "common/transpose_kernel.h"
#include "common/vec_math.h"
#include "common/workspace.h"
#include "common/parallel.h"
#include "flows/coupling_rows.h"
#include "flows/flow_math.h"
#include "flows/made_strips.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace fl::FL_ISA {

namespace {

// Samples per slab: the GEMM engine's row tile (64) at least, so a slab costs no extra product calls, and at
// most about 16 KiB of a layer's activations, so the elementwise passes between products run in L1 (measured:
// 64 rows at hidden 64 is 5% faster than 512; 32 rows is 15% slower).
template <typename Layer>
int64_t slab_rows(const Layer* layers, int64_t num_layers, int64_t batch) {
  int64_t widest = 1;
  for (int64_t l = 0; l < num_layers; ++l) widest = std::max({widest, layers[l].in_units, layers[l].out_units});
  const int64_t per_thread = (batch + num_threads() - 1) / num_threads();
  const int64_t rows = std::clamp<int64_t>(4096 / widest, 64, 512);
  return std::max<int64_t>(16, std::min(rows, (per_thread + 15) / 16 * 16));
}
constexpr int64_t kColumnBlock = 32;

template <typename T>
void activate(MadeActivation kind, const T* in, T* out, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  if (kind == MadeActivation::relu || kind == MadeActivation::tanh)
    for (; c + W <= n; c += W) {
      const Vec x = Vec::loadu(in + c);
      (kind == MadeActivation::relu ? at::vec::clamp_min(x, Vec(0)) : x.tanh()).store(out + c);
    }
  for (; c < n; ++c) out[c] = made_activation(kind, in[c]);
}

// dst[e] = grad[e] where x[e] > 0 or x[e] is NaN (relu's gradient, NaN passing through as torch's does), else 0;
// `add` adds that to dst instead. In vector lanes: GCC left this loop scalar with a branch per element, mispredicted
// half the time at random signs, and it took a sixth of a MAF training step.
template <typename T>
void relu_backward(const T* x, const T* grad, T* dst, int64_t n, bool add) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t e = 0;
  for (; e + W <= n; e += W) {
    const Vec v = Vec::loadu(x + e);
    const Vec passed = Vec::loadu(grad + e) & ((v > Vec(0)) | (v != v));
    (add ? Vec::loadu(dst + e) + passed : passed).store(dst + e);
  }
  for (; e < n; ++e) {
    const T passed = (x[e] > T(0) || x[e] != x[e]) ? grad[e] : T(0);
    dst[e] = add ? dst[e] + passed : passed;
  }
}

// dst[e] += src[e], in vector lanes (GCC kept it scalar: the vectors may overlap).
template <typename T>
void add_into(T* dst, const T* src, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t e = 0;
  for (; e + W <= n; e += W) (Vec::loadu(dst + e) + Vec::loadu(src + e)).store(dst + e);
  for (; e < n; ++e) dst[e] += src[e];
}

// In place: unconstrained -> scale = softplus + epsilon; also, where asked, log(scale) and d scale / d unconstrained.
// Vectorised, on the fast float exp and log of vec_math.h: with SLEEF's 1-ulp exp, log1p and log this took an
// eighth of a MAF forward at hidden 256.
template <typename T>
void affine_scales(T* values, T* log_scale, T* slope, int64_t n, T epsilon) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < n; i += W) {  // the last vector partly filled: D is often below the vector width
    const int64_t w = std::min(W, n - i);
    const Vec raw = Vec::loadu(values + i, w);
    const Vec scale = softplus_(raw) + Vec(epsilon);
    scale.store(values + i, w);
    if (log_scale) log_(scale).store(log_scale + i, w);
    if (slope)
      Vec::blendv(Vec(T(1)) / (Vec(T(1)) + exp_(raw.neg())), Vec(T(1)), raw > Vec(T(20))).store(slope + i, w);
  }
}

// The rows of buffer `id` for samples [n0, ...): x, or a layer's saved output.
template <typename T, typename Layers>
const T* buffer_rows(Layers layers, const T* inputs, int64_t features, int64_t id, int64_t n0) {
  if (id == 0) return inputs + n0 * features;
  return layers[id - 1].dst + n0 * layers[id - 1].out_units;
}

// Where one slab's activations live: the saved [batch, units] tensors (when the backward needs them) or
// buffers of this worker's own, [slab rows, units], reused from slab to slab.
template <typename T>
struct SlabRows {
  std::vector<T*> dst, activated, pre;
  std::vector<std::vector<T>> own;
  std::vector<T> gathered;  // a coupling's identity columns
  std::vector<T> epilogue;  // the affine map's scales and their logs (a coupling's: a row of moving values)

  void point(const MadeForwardArgs<T>& a, int64_t n0, int64_t kRows) {
    const auto L = static_cast<size_t>(a.num_layers);
    dst.assign(L, nullptr);
    activated.assign(L, nullptr);
    pre.assign(L, nullptr);
    own.resize(3 * L);
    for (size_t l = 0; l < L; ++l) {
      const MadeLayer<T>& y = a.layers[l];
      own[3 * l + 1].resize(y.act_in ? kRows * y.in_units : 0);  // activated inputs are never saved
      activated[l] = own[3 * l + 1].data();
      if (a.save && (y.pre || !y.act_out)) {
        dst[l] = y.dst + n0 * y.out_units;
        pre[l] = y.act_out ? y.pre + n0 * y.out_units : nullptr;
        continue;
      }
      if (a.save) {  // a relu layer without residual: the backward finds relu' from the output, pre stays here
        own[3 * l + 2].resize(kRows * y.out_units);
        dst[l] = y.dst + n0 * y.out_units;
        pre[l] = own[3 * l + 2].data();
        continue;
      }
      own[3 * l].resize(kRows * y.out_units);
      own[3 * l + 2].resize(y.act_out ? kRows * y.out_units : 0);
      dst[l] = own[3 * l].data();
      pre[l] = own[3 * l + 2].data();
    }
  }
};

// The layouts of the layers' strips (when the op layer packed them: float on AVX2 and AVX-512 builds) and their
// biases padded for the tiles.
struct ForwardStrips {
  bool on = false;
  std::vector<MadeStripLayout> layouts;
  std::vector<std::vector<float>> biases;  // empty: no bias
};

template <typename T>
ForwardStrips forward_strips_of(const MadeForwardArgs<T>& a) {
  ForwardStrips st;
  if constexpr (std::is_same_v<T, float> && kStripPanels) {
    st.on = std::all_of(a.layers, a.layers + a.num_layers, [](const MadeLayer<T>& y) { return y.output_strips; });
    for (int64_t l = 0; l < a.num_layers && st.on; ++l) {
      const MadeLayer<T>& y = a.layers[l];
      st.layouts.push_back(made_output_strips(y.out_units, y.extent));
      st.biases.emplace_back(y.bias ? st.layouts.back().strips() * kStripColumns : 0);
      if (y.bias) pad_strip_bias(st.layouts.back(), y.bias, st.biases.back().data());
    }
  }
  return st;
}

// The backward's layouts: each layer's W over its input units (dA = dZ W), and where each worker sums its weight
// gradient (the forward's layout) in one buffer.
struct BackwardStrips {
  bool on = false;
  std::vector<MadeStripLayout> inputs, grads;
  std::vector<int64_t> grad_offset;
  int64_t grad_floats = 0;
};

template <typename T>
BackwardStrips backward_strips_of(const MadeBackwardArgs<T>& a) {
  BackwardStrips st;
  if constexpr (std::is_same_v<T, float> && kStripPanels) {
    st.on = std::all_of(a.layers, a.layers + a.num_layers, [](const MadeLayer<T>& y) { return y.input_strips; });
    for (int64_t l = 0; l < a.num_layers && st.on; ++l) {
      const MadeLayer<T>& y = a.layers[l];
      st.inputs.push_back(made_input_strips(y.in_units, y.out_units, y.extent));
      st.grads.push_back(made_output_strips(y.out_units, y.extent));
      st.grad_offset.push_back(st.grad_floats);
      st.grad_floats += st.grads.back().floats();
    }
  }
  return st;
}

template <typename T>
void forward_slab(const MadeForwardArgs<T>& a, int64_t n0, int64_t rows, int64_t slab_size, SlabRows<T>& slab,
                  const ForwardStrips& st) {
  const auto act = static_cast<MadeActivation>(a.activation);
  const int64_t D = a.features;
  slab.point(a, n0, slab_size);
  const bool coupling = a.map != MadeForwardArgs<T>::Map::maf;
  const T* net_inputs = a.inputs + n0 * D;
  if (coupling) {  // the network reads the identity columns, gathered for the slab
    const int64_t C = a.coupled_features;
    slab.gathered.resize(rows * D);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < D; ++i) slab.gathered[r * D + i] = a.inputs[(n0 + r) * C + a.identity_index[i]];
    net_inputs = slab.gathered.data();
  }
  const auto buffer = [&](int64_t id) -> const T* { return id == 0 ? net_inputs : slab.dst[id - 1]; };
  for (int64_t l = 0; l < a.num_layers; ++l) {
    const MadeLayer<T>& y = a.layers[l];
    const int64_t in = y.in_units, out = y.out_units;
    const T* input = buffer(y.src);
    if (y.act_in) {
      activate(act, input, slab.activated[l], rows * in);
      input = slab.activated[l];
    }
    const bool strips = st.on;  // the strips add the bias
    // relu straight from the tiles' registers when nothing else comes between the product and it
    const bool tile_relu = strips && y.act_out && act == MadeActivation::relu && !y.context && y.residual < 0;
    T* z = y.act_out && !tile_relu ? slab.pre[l] : slab.dst[l];
    if constexpr (std::is_same_v<T, float>)
      if (strips)
        made_strip_product(rows, input, in, st.layouts[l], y.output_strips,
                           st.biases[l].empty() ? nullptr : st.biases[l].data(), z, out, tile_relu);
    if (tile_relu) continue;
    for (int64_t c0 = 0; c0 < out && !strips; c0 += kColumnBlock) {
      const int64_t c1 = std::min(out, c0 + kColumnBlock), k = y.extent[c1 - 1];
      if (k > 0)
        gemm(rows, c1 - c0, k, input, in, y.weight_t + c0, out, z + c0, out, false);
      else
        for (int64_t r = 0; r < rows; ++r) std::fill(z + r * out + c0, z + r * out + c1, T(0));
    }
    T* dst = slab.dst[l];
    const T* residual = y.residual >= 0 ? buffer(y.residual) : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      T* zr = z + r * out;
      if (y.bias && !strips)
        for (int64_t c = 0; c < out; ++c) zr[c] += y.bias[c];
      if (y.context) {
        const T* ctx = y.context + (n0 + r) * out;
        for (int64_t c = 0; c < out; ++c) zr[c] += ctx[c];
      }
      if (y.act_out) activate(act, zr, dst + r * out, out);
      if (residual)
        for (int64_t c = 0; c < out; ++c) dst[r * out + c] += residual[r * out + c];
    }
  }
  const T* params = slab.dst[a.num_layers - 1];
  if (coupling) {  // params hold [shift; unconstrained scale] of the moving columns
    const int64_t M = a.moving_features, C = a.coupled_features;
    const bool inverse = a.map == MadeForwardArgs<T>::Map::coupling_inverse;
    slab.epilogue.resize(2 * M);  // a row's moving values, then its outputs
    T* moving = slab.epilogue.data();
    for (int64_t r = 0; r < rows; ++r) {
      const T* in = a.inputs + (n0 + r) * C;
      T* out = a.outputs + (n0 + r) * C;
      for (int64_t i = 0; i < M; ++i) moving[i] = in[a.moving_index[i]];
      a.logabsdet[n0 + r] = coupling_row(moving, params + r * 2 * M, params + r * 2 * M + M, moving + M, M, inverse,
                                         a.epsilon);
      for (int64_t i = 0; i < M; ++i) out[a.moving_index[i]] = moving[M + i];
      for (int64_t i = 0; i < D; ++i) out[a.identity_index[i]] = net_inputs[r * D + i];
    }
    return;
  }
  // The affine map: params hold (unconstrained scale, shift) per feature. The scales are taken in [feature,
  // sample] order, so that each sample's sum of logs is a vector add per feature across 16 samples: summed per
  // row in vector lanes, with a horizontal sum and partial loads per row, the map took a third of a D = 8 MADE.
  slab.epilogue.resize(2 * rows * D);
  T* scale = slab.epilogue.data();
  T* log_scale = scale + rows * D;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < D; ++i) scale[i * rows + r] = params[r * 2 * D + 2 * i];
  affine_scales(scale, log_scale, static_cast<T*>(nullptr), rows * D, a.epsilon);
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t r0 = 0; r0 < rows; r0 += W) {
    const int64_t w = std::min(W, rows - r0);
    Vec sum(0);
    for (int64_t i = 0; i < D; ++i) sum = sum + Vec::loadu(log_scale + i * rows + r0, w);
    sum.store(a.logabsdet + n0 + r0, w);
  }
  const T* x = a.inputs + n0 * D;  // the slab's samples are contiguous
  T* y = a.outputs + n0 * D;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = scale[i * rows + r] * x[r * D + i] + params[r * 2 * D + 2 * i + 1];
  Vec finite(0);  // x - x: 0 for finite x, NaN for NaN and inf, so the sum says whether any was
  int64_t e = 0;
  for (; e + W <= rows * D; e += W) {
    const Vec xv = Vec::loadu(x + e);
    finite = finite + (xv - xv);
  }
  T any = at::vec::vec_reduce_all<T>([](const Vec& u, const Vec& v) { return u + v; }, finite);
  for (; e < rows * D; ++e) any += x[e] - x[e];
  if (any != 0 || any != any) a.nonfinite_inputs->store(true, std::memory_order_relaxed);
}

template <typename T>
void forward(const MadeForwardArgs<T>& a) {
  const int64_t rows = slab_rows(a.layers, a.num_layers, a.batch);
  const int64_t slabs = (a.batch + rows - 1) / rows;
  const ForwardStrips st = forward_strips_of(a);
  // Slabs are taken from a shared counter rather than dealt out in equal shares: on a shared machine one core
  // can run slower for a while, and the other then takes more slabs instead of waiting (slabs are independent,
  // so the results do not depend on who computed them).
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(num_threads(), slabs);
  parallel_for(workers, 1, [&](int64_t, int64_t) {
    // Kept by the thread from call to call: as fresh vectors, the slab buffers (about a megabyte) were zeroed, and
    // their pages faulted in, on every call.
    thread_local SlabRows<T> slab;
    for (int64_t s = next.fetch_add(1); s < slabs; s = next.fetch_add(1))
      forward_slab(a, s * rows, std::min(rows, a.batch - s * rows), rows, slab, st);
  });
}

// One worker's gradient sums over its slabs.
template <typename T>
struct Accumulators {
  std::vector<std::vector<T>> weight_t, bias;
  // The weight gradients, when the products run on strips: the worker thread's workspace (megabytes, which as a
  // fresh allocation per call cost a page fault per 4 KiB), written by its first slab, then added to.
  float* strips = nullptr;
};

template <typename T>
void backward_slab(const MadeBackwardArgs<T>& a, int64_t n0, int64_t rows, bool first_slab, Accumulators<T>& acc,
                   std::vector<std::vector<T>>& grads, std::vector<T>& scratch, const BackwardStrips& st) {
  const auto act = static_cast<MadeActivation>(a.activation);
  const int64_t D = a.features, L = a.num_layers;
  // grads[0]: dx; grads[l + 1]: d(dst of layer l), each [rows, units]. Not zeroed: the first contribution to a
  // buffer is stored, later ones added (written[b]); zeroing them took a fortieth of a MAF training step.
  grads.resize(L + 1);
  grads[0].resize(rows * D);
  for (int64_t l = 0; l < L; ++l) grads[l + 1].resize(rows * a.layers[l].out_units);
  std::vector<char> written(L + 1, 0);
  // buffer b += src (or = src on its first contribution)
  const auto contribute = [&](int64_t b, const T* src) {
    T* dst = grads[b].data();
    if (written[b])
      add_into(dst, src, static_cast<int64_t>(grads[b].size()));
    else
      std::copy(src, src + grads[b].size(), dst);
    written[b] = true;
  };
  // The affine map's backward.
  const T* params = a.layers[L - 1].dst + n0 * 2 * D;
  T* dparams = grads[L].data();
  scratch.resize(2 * rows * D);
  T *scale = scratch.data(), *slope = scale + rows * D;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < D; ++i) scale[r * D + i] = params[r * 2 * D + 2 * i];
  affine_scales(scale, static_cast<T*>(nullptr), slope, rows * D, a.epsilon);
  // In vector lanes (the division above all), the scale's gradient in place of its slope; then interleaved with
  // the shift's gradient (dy) into dparams.
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  T* dx = grads[0].data();
  for (int64_t r = 0; r < rows; ++r) {
    const Vec dl(a.grad_logabsdet[n0 + r]);
    const T* dy = a.grad_outputs + (n0 + r) * D;
    const T* x = a.inputs + (n0 + r) * D;
    T* dscale = slope + r * D;  // overwrites the slope it is computed from
    for (int64_t i = 0; i < D; i += W) {
      const int64_t w = std::min<int64_t>(W, D - i), e = r * D + i;
      const Vec dyv = Vec::loadu(dy + i, w), sv = Vec::loadu(scale + e, w);
      ((dyv * Vec::loadu(x + i, w) + dl / sv) * Vec::loadu(dscale + i, w)).store(dscale + i, w);
      (dyv * sv).store(dx + e, w);
    }
    for (int64_t i = 0; i < D; ++i) {
      dparams[r * 2 * D + 2 * i] = dscale[i];
      dparams[r * 2 * D + 2 * i + 1] = dy[i];
    }
  }
  written[0] = written[L] = true;  // dx's first term and the parameters' gradient, above
  for (int64_t l = L - 1; l >= 0; --l) {
    const MadeLayer<T>& y = a.layers[l];
    const int64_t in = y.in_units, out = y.out_units;
    T* dz = grads[l + 1].data();
    if (!written[l + 1]) std::fill(dz, dz + rows * out, T(0));  // an output no later layer reads
    if (y.residual >= 0) contribute(y.residual, dz);
    if (y.act_out && !y.pre) {  // relu without residual (made_ops): relu'(pre) from relu(pre) itself
      relu_backward(y.dst + n0 * out, dz, dz, rows * out, false);
    } else if (y.act_out) {
      const T* pre = y.pre + n0 * out;
      if (act == MadeActivation::relu)
        relu_backward(pre, dz, dz, rows * out, false);
      else
        for (int64_t e = 0; e < rows * out; ++e) dz[e] *= made_activation_grad(act, pre[e]);
    }
    if (a.grad_context[l]) std::copy(dz, dz + rows * out, a.grad_context[l] + n0 * out);
    if (y.bias)  // through a plain pointer: indexing acc.bias[l] in the loop kept GCC from vectorising it
      for (int64_t r = 0; r < rows; ++r) add_into(acc.bias[l].data(), dz + r * out, out);
    const T* src = buffer_rows<T>(a.layers, a.inputs, D, y.src, n0);
    // dWt[0:k, block] += input^T[0:k, :] dz[:, block]; dA[:, 0:k] += dz[:, block] W[block, 0:k].
    scratch.resize(3 * in * rows + kStripColumns * rows);
    T* input_t = scratch.data();
    T* da = scratch.data() + in * rows;
    const T* input = src;
    if (y.act_in) {  // recomputed: cheaper than saving it
      T* activated = da + in * rows;
      activate(act, src, activated, rows * in);
      input = activated;
    }
    fast_transpose(rows, in, input, in, input_t, rows);
    // The inputs' gradient: not for a layer that reads x when x needs none (the products' last sixth or so).
    const bool input_grad = y.src != 0 || a.grad_inputs != nullptr;
    const bool strips = st.on;
    if constexpr (std::is_same_v<T, float>)
      if (strips) {
        made_strip_weight_grad(rows, input_t, dz, out, st.grads[l], acc.strips + st.grad_offset[l], !first_slab,
                               scratch.data() + 3 * in * rows);
        if (input_grad) made_strip_product(rows, dz, out, st.inputs[l], y.input_strips, nullptr, da, in);
      }
    if (!strips) std::fill(da, da + rows * in, T(0));
    for (int64_t c0 = 0; c0 < out && !strips; c0 += kColumnBlock) {
      const int64_t c1 = std::min(out, c0 + kColumnBlock), k = y.extent[c1 - 1];
      if (k == 0) continue;
      gemm(k, c1 - c0, rows, input_t, rows, dz + c0, out, acc.weight_t[l].data() + c0, out, true);
      if (input_grad) gemm(rows, k, c1 - c0, dz + c0, out, y.weight + c0 * in, in, da, in, true);
    }
    if (!input_grad) continue;
    T* dsrc = grads[y.src].data();
    const bool add = written[y.src];
    if (!y.act_in)
      contribute(y.src, da);
    else if (act == MadeActivation::relu)
      relu_backward(src, da, dsrc, rows * in, add);
    else
      for (int64_t e = 0; e < rows * in; ++e)
        dsrc[e] = (add ? dsrc[e] : T(0)) + da[e] * made_activation_grad(act, src[e]);
    written[y.src] = true;
  }
  if (a.grad_inputs) std::copy(grads[0].begin(), grads[0].end(), a.grad_inputs + n0 * D);
}

template <typename T>
void backward(const MadeBackwardArgs<T>& a) {
  const int64_t rows = slab_rows(a.layers, a.num_layers, a.batch);
  const int64_t slabs = (a.batch + rows - 1) / rows, L = a.num_layers;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads(), slabs));
  std::vector<Accumulators<T>> acc(workers);
  const BackwardStrips st = backward_strips_of(a);
  const bool strips = st.on;
  parallel_for(workers, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<std::vector<T>> grads;  // kept from call to call, as the forward's slab buffers
    thread_local std::vector<T> scratch;
    for (int64_t w = begin; w < end; ++w) {
      Accumulators<T>& mine = acc[w];
      mine.weight_t.resize(strips ? 0 : L);
      mine.bias.resize(L);
      for (int64_t l = 0; l < L; ++l) {
        if (!strips) mine.weight_t[l].assign(a.layers[l].in_units * a.layers[l].out_units, T(0));
        mine.bias[l].assign(a.layers[l].out_units, T(0));
      }
      if (strips)  // (one block per worker: a nested call runs every worker on this thread)
        mine.strips = workspace<float>(WorkspaceSlot::made_grad, (end - begin) * st.grad_floats) +
                      (w - begin) * st.grad_floats;
      int64_t s0, s1;
      split_range(slabs, workers, w, s0, s1);
      for (int64_t s = s0; s < s1; ++s)
        backward_slab(a, s * rows, std::min(rows, a.batch - s * rows), s == s0, mine, grads, scratch, st);
    }
  });
  // The weight gradients, summed over the workers, straight into the module's unit order, masked.
  if constexpr (std::is_same_v<T, float>)
    if (strips) {
      // Items are (layer, strip) pairs: each writes whole rows of one gradient, so any split gives the same sums.
      std::vector<std::pair<int64_t, int64_t>> items;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t s = 0; s < st.grads[l].strips(); ++s) items.emplace_back(l, s);
      parallel_for_dynamic(static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
        std::vector<const float*> sums;
        for (int64_t item = i0; item < i1; ++item) {
          const auto [l, s] = items[item];
          sums.clear();
          for (const auto& w : acc) sums.push_back(w.strips + st.grad_offset[l]);
          unpack_made_strip_grad(st.grads[l], s, sums.data(), static_cast<int64_t>(sums.size()),
                                 a.layers[l].in_units, a.out_perm[l], a.in_perm[l], a.mask[l], a.grad_weight[l]);
        }
      });
    }
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = a.layers[l].in_units, out = a.layers[l].out_units;
    if (!strips) {  // summed into the first worker's W^T, transposed, then scattered to the module's order
      T* sum = acc[0].weight_t[l].data();
      for (size_t w = 1; w < acc.size(); ++w)
        for (int64_t e = 0; e < in * out; ++e) sum[e] += acc[w].weight_t[l][e];
      std::vector<T> sorted(in * out);
      fast_transpose(in, out, sum, out, sorted.data(), in);
      const int64_t *po = a.out_perm[l], *pi = a.in_perm[l];
      for (int64_t o = 0; o < out; ++o) {
        T* row = a.grad_weight[l] + po[o] * in;
        const T* mask_row = a.mask[l] + po[o] * in;
        for (int64_t i = 0; i < in; ++i) row[pi[i]] = sorted[o * in + i] * mask_row[pi[i]];
      }
    }
    if (T* db = a.grad_bias[l]) {
      std::fill(db, db + a.layers[l].out_units, T(0));
      for (const auto& w : acc)
        for (int64_t c = 0; c < a.layers[l].out_units; ++c) db[c] += w.bias[l][c];
    }
  }
}

}  // namespace

void made_strip_floats(int64_t in_units, int64_t out_units, const int64_t* extent, bool over_inputs, int64_t& floats) {
  floats = 0;
  if constexpr (kStripPanels) {
    const MadeStripLayout layout = over_inputs ? made_input_strips(in_units, out_units, extent)
                                               : made_output_strips(out_units, extent);
    floats = layout.floats() + kStripColumns;  // never 0: a layer whose units read nothing still has strips
  }
}

void made_pack_strips(const float* sorted_weight, int64_t in_units, int64_t out_units, const int64_t* extent,
                      bool over_inputs, float* out) {
  if (over_inputs)  // B = W [out x in]
    pack_made_strips(made_input_strips(in_units, out_units, extent), sorted_weight, in_units, 1, out);
  else  // B = W^T [in x out]
    pack_made_strips(made_output_strips(out_units, extent), sorted_weight, 1, in_units, out);
}

void made_forward(const MadeForwardArgs<float>& args) { forward(args); }
void made_forward(const MadeForwardArgs<double>& args) { forward(args); }
void made_backward(const MadeBackwardArgs<float>& args) { backward(args); }
void made_backward(const MadeBackwardArgs<double>& args) { backward(args); }

}  // namespace fl::FL_ISA
