// A small cache of tensors derived from weights (e.g. a weight repacked for the GEMM engine), so that calling a
// layer again with unchanged weights skips the repacking. An entry is reused only while the source is the same
// live tensor, at the same version counter (bumped by every in-place change autograd knows of), with the same
// bytes at a spread of sampled positions (which catches rewrites through `.data`, which bumps no counter).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

namespace fl {

at::Tensor cached_derived(const at::Tensor& source, const std::string& kind,
                          const std::function<at::Tensor()>& make);
void clear_derived_cache();
void set_derived_cache_enabled(bool enabled);
bool derived_cache_enabled();

}  // namespace fl
