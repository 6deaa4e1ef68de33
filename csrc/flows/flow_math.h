// Per-element math of the masked autoregressive flows, shared by the CPU and CUDA kernels: the MADE's
// activations and nflows' affine map (scale = softplus(unconstrained) + epsilon).
#pragma once

#include "common/scalar_math.h"

#include <cmath>

namespace fl {

// The activations a MADE may use; the values are the op's `activation` argument.
enum class MadeActivation : int { relu = 0, tanh = 1, elu = 2, gelu = 3 };

template <typename T>
FL_HOST_DEVICE T made_activation(MadeActivation kind, T x) {
  switch (kind) {
    case MadeActivation::relu: return (x > T(0) || x != x) ? x : T(0);  // NaN passes, as in torch.relu
    case MadeActivation::tanh: return std::tanh(x);
    case MadeActivation::elu: return x > T(0) ? x : std::expm1(x);
    default: return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
  }
}

// torch's softplus (beta 1, threshold 20) plus epsilon: the positive scale of the affine map.
template <typename T>
FL_HOST_DEVICE T affine_scale(T unconstrained, T epsilon) {
  return (unconstrained > T(20) ? unconstrained : std::log1p(std::exp(unconstrained))) + epsilon;
}

// The inverse affine map x = (y - shift) / scale.
template <typename T>
FL_HOST_DEVICE T affine_inverse(T y, T shift, T scale) {
  return (y - shift) / scale;
}

}  // namespace fl

namespace fl {

// d act(x) / dx from the pre-activation x.
template <typename T>
FL_HOST_DEVICE T made_activation_grad(MadeActivation kind, T x) {
  switch (kind) {
    case MadeActivation::relu: return (x > T(0) || x != x) ? T(1) : T(0);  // torch passes the gradient at NaN
    case MadeActivation::tanh: {
      const T t = std::tanh(x);
      return T(1) - t * t;
    }
    case MadeActivation::elu: return x > T(0) ? T(1) : std::exp(x);
    default: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
      return cdf + x * T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
    }
  }
}

// d affine_scale / d unconstrained: torch's softplus gradient (1 above the threshold).
template <typename T>
FL_HOST_DEVICE T affine_scale_grad(T unconstrained) {
  return unconstrained > T(20) ? T(1) : T(1) / (T(1) + std::exp(-unconstrained));
}

}  // namespace fl

namespace fl {

// nflows' affine coupling scale: sigmoid(unconstrained + 2) + epsilon (epsilon 1e-3).
template <typename T>
FL_HOST_DEVICE T coupling_sigmoid(T unconstrained) {
  return T(1) / (T(1) + std::exp(-(unconstrained + T(2))));
}

}  // namespace fl
