// The ops' C++ entry points: one function per op, which gradclip.cpp implements and
// registers with the dispatcher and python.cpp calls from its pybind11 fast path.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "pack.h"

namespace gradclip {

// gradclip::norm_stats, gradclip::scale_ and gradclip::clamp_ on CUDA tensors. The ops that
// write bump the autograd version counter of every tensor they may write.
at::Tensor norm_stats_cuda(TensorRefs tensors, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale);
void scale_cuda(TensorRefs tensors, const at::Tensor& scale,
                const std::optional<at::Tensor>& found_inf);
void clamp_cuda(TensorRefs tensors, double clip_value);

// gradclip::clip_grads_: norm_stats then scale_ by stats[COEF] (skipped when
// stats[FOUND_INF] is set and inv_scale is given), with the list packed once for both.
at::Tensor clip_grads_cuda(TensorRefs grads, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale);

// The per-tensor ops (gradclip/backends/base.py): each tensor's norm from the same read as
// the stats; each tensor by its own factor (1 skips it); each tensor clipped to its own
// norm (returns the norms); AGC, a warp per unit (returns the global norm).
std::tuple<at::Tensor, at::Tensor> norm_stats_per_tensor_cuda(TensorRefs tensors, double norm_type,
                                                             double max_norm,
                                                             const std::optional<at::Tensor>& inv_scale);
void scale_per_tensor_cuda(TensorRefs tensors, const at::Tensor& coefs);
at::Tensor clip_per_tensor_cuda(TensorRefs tensors, double norm_type, double max_norm);
at::Tensor agc_cuda(TensorRefs params, TensorRefs grads, double clip_factor, double eps, double norm_type);

}  // namespace gradclip
