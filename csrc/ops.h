// The ops' C++ entry points, shared by gradclip.cpp (which implements and registers them)
// and python.cpp (the pybind11 fast path).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

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

// gradclip::norm_stats, gradclip::scale_ and gradclip::clamp_ on CUDA tensors.
at::Tensor norm_stats_cuda(TensorRefs tensors, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale);
void scale_cuda(TensorRefs tensors, const at::Tensor& scale,
                const std::optional<at::Tensor>& found_inf);
void clamp_cuda(TensorRefs tensors, double clip_value);

// norm_stats then scale_ by stats[COEF] (skipped when stats[FOUND_INF] is set and
// inv_scale is given), with the tensor list packed once for both launches.
at::Tensor clip_grads_cuda(TensorRefs grads, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale);

// How the kernels would split `tensors` among `grid` blocks, replayed on the host: for each
// tensor the fewest and most reads of one element (1 and 1 when the split is right).
struct SplitReplay {
  bool ok = true;  // no misaligned vector, no access outside a tensor
  int launches = 0;
  std::vector<int> min_visits, max_visits;
};
// With replay false, only packs (to time the host-side packing without a GPU).
SplitReplay simulate_split(TensorRefs tensors, int64_t grid, bool replay = true);

}  // namespace gradclip
