// The ops' C++ entry points, shared by gradclip.cpp (which implements and registers them)
// and python.cpp (the pybind11 fast path).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace gradclip {

// gradclip::norm_stats, gradclip::scale_ and gradclip::clamp_ on CUDA tensors.
at::Tensor norm_stats_cuda(at::TensorList tensors, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale);
void scale_cuda(at::TensorList tensors, const at::Tensor& scale,
                const std::optional<at::Tensor>& found_inf);
void clamp_cuda(at::TensorList tensors, double clip_value);

// norm_stats then scale_ by stats[COEF] (skipped when stats[FOUND_INF] is set and
// inv_scale is given), with the tensor list packed once for both launches.
at::Tensor clip_grads_cuda(at::TensorList grads, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale);

// How the kernels would split `tensors` among `grid` blocks, replayed on the host: for each
// tensor the fewest and most reads of one element (1 and 1 when the split is right).
struct SplitReplay {
  bool ok = true;  // no misaligned vector, no access outside a tensor
  int launches = 0;
  std::vector<int> min_visits, max_visits;
};
SplitReplay simulate_split(at::TensorList tensors, int64_t grid);

}  // namespace gradclip
