// Tensors that later calls may hand out again. An op's saved activations are freed by autograd after the
// backward, and a fresh multi-megabyte tensor costs a page fault per 4 KiB when first written (a fifth of a MAF
// forward at hidden 256, and as much again when the allocator has returned the pages). A small pool per kind and
// shape keeps the tensors handed out, and hands one out again once nothing but the pool refers to it or to its
// storage (no tensor, view or autograd record): so its contents can never be observed changing. At most 256 MiB
// stay pooled, free buffers of shapes no longer in use dropped first.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fl {

// An uninitialised tensor of `sizes` and `options`; `kind` names what it holds (the pool is per kind and shape).
at::Tensor reusable_empty(const std::string& kind, at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every pooled tensor (with the derived-weight cache's clear).
void clear_reusable_tensors();

// The bytes pooled now, in use or not (for tests).
int64_t reusable_pooled_bytes();

}  // namespace fl
