// CUDA pointwise part of the LSTM step, on the same per-element math as the CPU kernels (lstm_math.h).
// Not yet wired into an op (the CUDA build is a later issue); CI compiles it with nvcc so that the shared
// headers stay valid CUDA.
#include "lstm/lstm_math.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace fl::cuda {

// pre: [B x 4H] gate pre-activations in torch's order (i, f, g, o blocks of H); c_prev, c, h: [B x H].
template <typename T>
__global__ void lstm_pointwise_forward_kernel(const T* __restrict__ pre, const T* __restrict__ c_prev,
                                              T* __restrict__ c, T* __restrict__ h, int64_t batch, int64_t hidden) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= batch * hidden) return;
  const int64_t b = idx / hidden, j = idx % hidden;
  const T* row = pre + b * 4 * hidden;
  T i, f, g, o, c_new, h_new;
  lstm_cell_forward_math(row[j], row[hidden + j], row[2 * hidden + j], row[3 * hidden + j], c_prev[idx], i, f, g,
                         o, c_new, h_new);
  c[idx] = c_new;
  h[idx] = h_new;
}

template <typename T>
cudaError_t lstm_pointwise_forward(const T* pre, const T* c_prev, T* c, T* h, int64_t batch, int64_t hidden,
                                   cudaStream_t stream) {
  const int64_t n = batch * hidden;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  lstm_pointwise_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(pre, c_prev, c, h, batch, hidden);
  return cudaGetLastError();
}

template cudaError_t lstm_pointwise_forward<float>(const float*, const float*, float*, float*, int64_t, int64_t,
                                                   cudaStream_t);
template cudaError_t lstm_pointwise_forward<double>(const double*, const double*, double*, double*, int64_t,
                                                    int64_t, cudaStream_t);

}  // namespace fl::cuda
