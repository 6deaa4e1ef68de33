// Scratch memory that outlives one call. A fresh multi-megabyte allocation costs a page fault per 4 KiB on first
// touch (about 7 GB/s here), which for a short sequence costs more than the arithmetic; these buffers are
// allocated once per calling thread and slot, grow when needed, and are reused by later calls.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>

namespace fl {

enum class WorkspaceSlot : int { w_ih, w_hh, w_hr, gates, raw, state_h, state_c, left, product, hidden_prev, grad,
                               gemm_b,       // the GEMM engine's contiguous copies of B panels
                               gemm_b_whole,  // ... and of a whole B shared by the tiles of a parallel product
                               made_grad,     // a MADE backward worker's weight-gradient sums
                               count };

// An uninitialised buffer of `count` elements, 64-byte aligned, valid until the next call with the same slot
// on the same thread.
template <typename T>
T* workspace(WorkspaceSlot slot, std::size_t count) {
  struct Buffer {
    void* data = nullptr;
    std::size_t bytes = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[static_cast<int>(WorkspaceSlot::count)];
  Buffer& b = buffers[static_cast<int>(slot)];
  const std::size_t bytes = ((count * sizeof(T) + 63) / 64) * 64;
  if (bytes > b.bytes) {
    std::free(b.data);
    b.data = std::aligned_alloc(64, bytes);
    if (b.data == nullptr) throw std::bad_alloc();
    b.bytes = bytes;
  }
  return static_cast<T*>(b.data);
}

}  // namespace fl
