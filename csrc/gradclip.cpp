// The torch side of the CUDA backend: op schemas (declared once, here) and the CUDA
// implementations of the norm, scale and clamp ops (AGC's is agc.cpp; the packing of tensor
// lists into kernel tables is pack.cpp). Only light ATen/c10 headers: the units compile in
// parallel.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "ops_common.h"
#include "pack.h"

namespace gradclip {
namespace {

// Per-tensor outputs of a norm: each tensor's norm, and with `coefs` its clip factor.
struct TensorNormsOut {
  at::Tensor norms;
  std::optional<at::Tensor> coefs;
  double max_norm = 0.0;
};

// Launches the norm over the packed tables; returns stats [norm, coef, found_inf]. With
// `per_tensor` (tables packed with Layout::kPerTensor) it also fills each tensor's norm
// (and factor), from the same read.
at::Tensor run_norm(Packed& packed, const at::Tensor& like, double norm_type, double max_norm,
                    const std::optional<at::Tensor>& inv_scale,
                    TensorNormsOut* per_tensor = nullptr) {
  const at::Device device = like.device();
  TORCH_CHECK(norm_type > 0, "gradclip::norm_stats: norm_type must be > 0 or inf, got ", text(norm_type));
  TORCH_CHECK(!std::isnan(max_norm), "gradclip::norm_stats: max_norm is NaN; pass a number >= 0");
  std::optional<at::Tensor> inv;
  if (inv_scale.has_value() && inv_scale->defined()) {
    inv = device_scalar(*inv_scale, "gradclip::norm_stats", "inv_scale", device);
  }
  if (packed.num_tables == 0) next_table(packed);  // only zero-size tensors: one empty block
  const NormKind kind = norm_kind(norm_type);
  const int limit = std::max(1, norm_grid_limit(device.index(), kind));
  auto& tables = packed.tables;
  int total_blocks = 0;
  std::vector<int> grids(packed.num_tables);
  for (int l = 0; l < packed.num_tables; ++l) {
    grids[l] = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tables[l].num_chunks, limit)));
    tables[l].block_offset = total_blocks;
    total_blocks += grids[l];
  }
  const auto stats_type = packed.any_double ? at::kDouble : at::kFloat;
  at::Tensor stats = like.new_empty({3}, at::TensorOptions().dtype(stats_type).device(device));
  at::Tensor workspace = like.new_empty({static_cast<int64_t>(norm_workspace_bytes(total_blocks))},
                                        at::TensorOptions().dtype(at::kByte).device(device));
  const cudaStream_t stream = current_stream(device);
  C10_CUDA_CHECK(reset_norm_workspace(workspace.data_ptr(), stream));
  NormParams params{};
  params.p = norm_type;
  params.max_norm = max_norm;
  params.inv_scale = inv.has_value() ? inv->data_ptr() : nullptr;
  params.inv_scale_dtype = inv.has_value() && inv->scalar_type() == at::kDouble ? kDouble : kFloat;
  params.stats = stats.data_ptr();
  params.stats_dtype = packed.any_double ? kDouble : kFloat;
  params.counter = static_cast<unsigned int*>(workspace.data_ptr());
  params.slots = reinterpret_cast<Partial*>(static_cast<char*>(workspace.data_ptr()) + 16);
  params.total_blocks = total_blocks;
  int total_tensors = 0;
  at::Tensor tensor_slots;
  if (per_tensor != nullptr) {
    for (int l = 0; l < packed.num_tables; ++l) total_tensors += tables[l].num_tensors;
    // Slots b + t are never read unless written (see NormParams): no zeroing needed.
    tensor_slots = like.new_empty({static_cast<int64_t>(sizeof(Partial)) * (total_blocks + total_tensors)},
                                  at::TensorOptions().dtype(at::kByte).device(device));
    params.tensor_slots = static_cast<Partial*>(tensor_slots.data_ptr());
  }
  int tensor_offset = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    params.tensor_offset = tensor_offset;
    C10_CUDA_CHECK(launch_norm(kind, tables[l], params, grids[l], stream));
    tensor_offset += tables[l].num_tensors;
  }
  if (per_tensor == nullptr) return stats;
  TensorNormParams finish{};
  finish.p = norm_type;
  finish.max_norm = per_tensor->max_norm;
  finish.tensor_slots = params.tensor_slots;
  finish.inv_scale = params.inv_scale;
  finish.inv_scale_dtype = params.inv_scale_dtype;
  finish.out_dtype = params.stats_dtype;
  per_tensor->norms = like.new_empty({total_tensors}, at::TensorOptions().dtype(stats_type).device(device));
  finish.norms = per_tensor->norms.data_ptr();
  if (per_tensor->coefs.has_value()) {
    per_tensor->coefs = per_tensor->norms.new_empty({total_tensors});
    finish.coefs = per_tensor->coefs->data_ptr();
  }
  tensor_offset = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    finish.tensor_offset = tensor_offset;
    finish.grid = grids[l];
    C10_CUDA_CHECK(launch_tensor_norms(kind, tables[l], finish, stream));
    tensor_offset += tables[l].num_tensors;
  }
  return stats;
}

void run_pointwise(Packed& packed, at::Device device, Pointwise op, PointwiseParams params) {
  const int limit = std::max(1, pointwise_grid_limit(device.index(), op));
  const cudaStream_t stream = current_stream(device);
  auto& tables = packed.tables;
  params.tensor_offset = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    const int grid = static_cast<int>(std::min<int64_t>(tables[l].num_chunks, limit));
    if (grid > 0) C10_CUDA_CHECK(launch_pointwise(op, tables[l], params, grid, stream));
    params.tensor_offset += tables[l].num_tensors;
  }
}

// Each tensor by its own factor coefs[k] (a float32/float64 device vector, one per input
// tensor), tables packed with Layout::kPerTensor; non-dense tensors take ATen's mul_ by
// their factor on the device (no host sync; written even when the factor is 1).
void scale_each(Packed& packed, at::Device device, const at::Tensor& coefs) {
  PointwiseParams params{};
  params.coefs = coefs.data_ptr();
  params.scale_dtype = coefs.scalar_type() == at::kDouble ? kDouble : kFloat;
  run_pointwise(packed, device, Pointwise::kScaleEach, params);
  for (size_t s = 0; s < packed.aside.size(); ++s) {
    const at::Tensor& t = packed.aside[s];
    // Rounded as the kernel: the factor in float32 (float64 for float64 tensors).
    const at::Tensor factor =
        coefs.select(0, packed.aside_at[s]).to(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    if (at::isReducedFloatingType(t.scalar_type())) {
      t.copy_(t.to(at::kFloat).mul_(factor));
    } else {
      t.mul_(factor);
    }
  }
}

// The tensors set aside for ATen (not dense, or overlapping an entry the kernels write)
// take ATen's mul_, one by one after the kernels, with the skip rules applied to the factor
// on the device: no host sync, but the tensor is written (multiplied by 1) when nothing
// changes.
void scale_aside(const std::vector<at::Tensor>& aside, const at::Tensor& scale,
                 const std::optional<at::Tensor>& found_inf) {
  if (aside.empty()) return;
  at::Tensor factor = scale.reshape({});
  if (found_inf.has_value()) {
    factor = factor.new_ones({}).where(found_inf->reshape({}).ne(0), factor);
  }
  for (const at::Tensor& t : aside) {
    // ATen's mul_ would round the 0-d float32 factor to a 16-bit tensor's dtype first; the
    // kernels multiply in float32 and round once, and so does this.
    if (at::isReducedFloatingType(t.scalar_type())) {
      t.copy_(t.to(at::kFloat).mul_(factor));
    } else {
      t.mul_(factor);
    }
  }
}

PointwiseParams scale_params(const at::Tensor& scale, const std::optional<at::Tensor>& found_inf) {
  PointwiseParams params{};
  params.scale = scale.data_ptr();
  params.scale_dtype = scale.scalar_type() == at::kDouble ? kDouble : kFloat;
  params.found_inf = found_inf.has_value() ? found_inf->data_ptr() : nullptr;
  params.found_inf_dtype = found_inf.has_value() && found_inf->scalar_type() == at::kDouble ? kDouble : kFloat;
  return params;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The ops (each serves both the dispatcher and the pybind11 fast path of python.cpp)

at::Tensor norm_stats_cuda(TensorRefs tensors, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale) {
  const at::Device device = check_device(tensors, "gradclip::norm_stats");
  const c10::cuda::CUDAGuard guard(device);
  Packed packed = pack(tensors, "gradclip::norm_stats", device, Access::kRead);
  return run_norm(packed, tensors[0], norm_type, max_norm, inv_scale);
}

void scale_cuda(TensorRefs tensors, const at::Tensor& scale,
                const std::optional<at::Tensor>& found_inf) {
  if (tensors.empty()) return;
  const at::Device device = check_device(tensors, "gradclip::scale_");
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor s = device_scalar(scale, "gradclip::scale_", "scale", device);
  std::optional<at::Tensor> skip;
  if (found_inf.has_value() && found_inf->defined()) {
    skip = device_scalar(*found_inf, "gradclip::scale_", "found_inf", device);
  }
  Packed packed = pack(tensors, "gradclip::scale_", device, Access::kWrite);
  run_pointwise(packed, device, Pointwise::kScale, scale_params(s, skip));
  scale_aside(packed.aside, s, skip);
}

void clamp_cuda(TensorRefs tensors, double clip_value) {
  if (tensors.empty()) return;
  TORCH_CHECK(clip_value >= 0, "gradclip::clamp_: clip_value must be >= 0, got ", text(clip_value));
  const at::Device device = check_device(tensors, "gradclip::clamp_");
  const c10::cuda::CUDAGuard guard(device);
  Packed packed = pack(tensors, "gradclip::clamp_", device, Access::kWrite);
  PointwiseParams params{};
  params.clip_value = clip_value;
  run_pointwise(packed, device, Pointwise::kClamp, params);
  for (const at::Tensor& t : packed.aside) t.clamp_(-clip_value, clip_value);
}

// Norm then rescale with the tables packed once. With inv_scale (AMP) the rescale is
// skipped on the device when an inf/NaN was found.
at::Tensor clip_grads_cuda(TensorRefs grads, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale) {
  const char* op = "gradclip::clip_grads_";
  const at::Device device = check_device(grads, op);
  const c10::cuda::CUDAGuard guard(device);
  Packed packed = pack(grads, op, device, Access::kWrite);
  at::Tensor stats;
  if (packed.aside.empty()) {
    stats = run_norm(packed, grads[0], norm_type, max_norm, inv_scale);
  } else {
    Packed reading = pack(grads, op, device, Access::kRead);  // rare: non-dense or aliased grads
    stats = run_norm(reading, grads[0], norm_type, max_norm, inv_scale);
  }
  const bool amp = inv_scale.has_value() && inv_scale->defined();
  const at::Tensor coef = stats.narrow(0, 1, 1);
  const std::optional<at::Tensor> skip =
      amp ? std::optional<at::Tensor>(stats.narrow(0, 2, 1)) : std::nullopt;
  run_pointwise(packed, device, Pointwise::kScale, scale_params(coef, skip));
  scale_aside(packed.aside, coef, skip);
  return stats;
}

std::tuple<at::Tensor, at::Tensor> norm_stats_per_tensor_cuda(TensorRefs tensors, double norm_type,
                                                             double max_norm,
                                                             const std::optional<at::Tensor>& inv_scale) {
  const char* op = "gradclip::norm_stats_per_tensor";
  const at::Device device = check_device(tensors, op);
  const c10::cuda::CUDAGuard guard(device);
  Packed packed = pack(tensors, op, device, Access::kRead, Layout::kPerTensor);
  TensorNormsOut out;
  at::Tensor stats = run_norm(packed, tensors[0], norm_type, max_norm, inv_scale, &out);
  return {stats, out.norms};
}

void scale_per_tensor_cuda(TensorRefs tensors, const at::Tensor& coefs) {
  const char* op = "gradclip::scale_per_tensor_";
  if (tensors.empty()) return;
  const at::Device device = check_device(tensors, op);
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(coefs.numel() == static_cast<int64_t>(tensors.size()), op, ": coefs has ",
              text(coefs.numel()), " elements for ", text(tensors.size()),
              " tensors; pass one factor per tensor");
  TORCH_CHECK(coefs.device() == device, op, ": coefs is on ", coefs.device().str(),
              " but the tensors are on ", device.str(), "; move it with .to(", device.str(), ")");
  at::Tensor factors = coefs.reshape({-1});
  if (factors.scalar_type() != at::kFloat && factors.scalar_type() != at::kDouble) {
    factors = factors.to(at::kFloat);
  }
  factors = factors.contiguous();
  Packed packed = pack(tensors, op, device, Access::kWrite, Layout::kPerTensor);
  scale_each(packed, device, factors);
}

at::Tensor clip_per_tensor_cuda(TensorRefs tensors, double norm_type, double max_norm) {
  const char* op = "gradclip::clip_per_tensor_";
  const at::Device device = check_device(tensors, op);
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(max_norm >= 0, op, ": max_norm must be >= 0, got ", text(max_norm));
  Packed packed = pack(tensors, op, device, Access::kWrite, Layout::kPerTensor);
  TensorNormsOut out;
  out.coefs = at::Tensor();
  out.max_norm = max_norm;
  if (packed.aside.empty() && !packed.has_repeats) {
    run_norm(packed, tensors[0], norm_type, std::numeric_limits<double>::infinity(), std::nullopt, &out);
  } else {
    // Rare: the norms of tensors the kernels do not write (not dense, or listed twice).
    Packed reading = pack(tensors, op, device, Access::kRead, Layout::kPerTensor);
    run_norm(reading, tensors[0], norm_type, std::numeric_limits<double>::infinity(), std::nullopt, &out);
  }
  scale_each(packed, device, *out.coefs);
  return out.norms;
}

}  // namespace gradclip

TORCH_LIBRARY(gradclip, m) {
  m.set_python_module("gradclip.backends.cuda");
  m.def("norm_stats(Tensor[] tensors, float norm_type, float max_norm, Tensor? inv_scale) -> Tensor");
  m.def("scale_(Tensor(a!)[] tensors, Tensor scale, Tensor? found_inf) -> ()");
  m.def("clamp_(Tensor(a!)[] tensors, float clip_value) -> ()");
  m.def("clip_grads_(Tensor(a!)[] grads, float norm_type, float max_norm, Tensor? inv_scale) -> Tensor");
  m.def("norm_stats_per_tensor(Tensor[] tensors, float norm_type, float max_norm, Tensor? inv_scale) "
        "-> (Tensor, Tensor)");
  m.def("scale_per_tensor_(Tensor(a!)[] tensors, Tensor coefs) -> ()");
  m.def("clip_per_tensor_(Tensor(a!)[] tensors, float norm_type, float max_norm) -> Tensor");
  m.def("agc_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps, float norm_type) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradclip, CUDA, m) {
  m.impl("norm_stats", [](at::TensorList tensors, double norm_type, double max_norm,
                          const std::optional<at::Tensor>& inv_scale) {
    return gradclip::norm_stats_cuda(tensors, norm_type, max_norm, inv_scale);
  });
  m.impl("scale_", [](at::TensorList tensors, const at::Tensor& scale,
                      const std::optional<at::Tensor>& found_inf) {
    gradclip::scale_cuda(tensors, scale, found_inf);
  });
  m.impl("clamp_", [](at::TensorList tensors, double clip_value) {
    gradclip::clamp_cuda(tensors, clip_value);
  });
  m.impl("clip_grads_", [](at::TensorList grads, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale) {
    return gradclip::clip_grads_cuda(grads, norm_type, max_norm, inv_scale);
  });
  m.impl("norm_stats_per_tensor", [](at::TensorList tensors, double norm_type, double max_norm,
                                     const std::optional<at::Tensor>& inv_scale) {
    return gradclip::norm_stats_per_tensor_cuda(tensors, norm_type, max_norm, inv_scale);
  });
  m.impl("scale_per_tensor_", [](at::TensorList tensors, const at::Tensor& coefs) {
    gradclip::scale_per_tensor_cuda(tensors, coefs);
  });
  m.impl("clip_per_tensor_", [](at::TensorList tensors, double norm_type, double max_norm) {
    return gradclip::clip_per_tensor_cuda(tensors, norm_type, max_norm);
  });
}
