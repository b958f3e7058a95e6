// The ops' C++ entry points: one function per op, which gradclip.cpp implements and
// registers with the dispatcher and python.cpp calls from its pybind11 fast path.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace gradclip {

// A list of tensors by reference: an ATen list (the ops) or pointers to tensors owned by
// Python objects (the fast path: no reference-count round trip per tensor; valid while the
// caller holds the GIL and the objects).
class TensorRefs {
 public:
  TensorRefs(at::TensorList list) : list_(list) {}  // NOLINT: implicit on purpose
  explicit TensorRefs(const std::vector<const at::Tensor*>& pointers)
      : pointers_(pointers.data()), size_(pointers.size()) {}
  size_t size() const { return pointers_ != nullptr ? size_ : list_.size(); }
  bool empty() const { return size() == 0; }
  const at::Tensor& operator[](size_t k) const { return pointers_ != nullptr ? *pointers_[k] : list_[k]; }

 private:
  at::TensorList list_;
  const at::Tensor* const* pointers_ = nullptr;
  size_t size_ = 0;
};

// The code of a supported dtype in the kernels' tables, or nullopt.
std::optional<DType> dtype_code(at::ScalarType type);

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

// How the kernels would split `tensors` among `grid` blocks, replayed on the host: for each
// tensor the fewest and most reads of one element (1 and 1 when the split is right).
struct SplitReplay {
  bool ok = true;  // no misaligned vector, no access outside a tensor
  int launches = 0;
  std::vector<int> min_visits, max_visits;
};
// With replay false, only packs (to time the host-side packing without a GPU).
SplitReplay simulate_split(TensorRefs tensors, int64_t grid, bool replay = true);

// Whether agc_'s kernels would read every gradient element of `grads` exactly once (each
// row by one warp, never outside its tensor) over `grid` blocks; no GPU needed.
bool simulate_agc(TensorRefs params, TensorRefs grads, int64_t grid);

// Whether the per-tensor norm slots line up (written once each, read exactly where
// written) for `tensors` over launches of at most `grid` blocks; no GPU needed.
bool simulate_tensor_slots(TensorRefs tensors, int64_t grid);

// For tests on any device: checks and packs `tensors` as an op that writes them does,
// bumping the version counters of those the kernels would write; returns how many are set
// aside for ATen (not dense), whose counters ATen bumps when it writes them.
int64_t pack_for_writing(TensorRefs tensors);

}  // namespace gradclip
