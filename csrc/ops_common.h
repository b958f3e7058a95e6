// What the CUDA op implementations (gradclip.cpp, agc.cpp) share: the checks of their
// scalar arguments, the norm kind, and the stream they launch on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "pack.h"
#include "tables.h"

namespace gradclip {

// The device of a list the CUDA ops take: that of tensors[0], a CUDA tensor.
inline at::Device check_device(TensorRefs tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": tensors is empty; pass at least one tensor");
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(first.defined(), op, ": tensors[0] is None; pass only defined tensors");
  TORCH_CHECK(first.is_cuda(), op, ": tensors[0] is on ", first.device().str(),
              "; the cuda backend runs CUDA tensors only, use backend='reference' for others");
  return first.device();
}

// A one-element device tensor for the kernels: float32 or float64 (others are converted).
inline at::Tensor device_scalar(const at::Tensor& t, const char* op, const char* name, at::Device device) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got ", text(t.numel()));
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device().str(),
              " but the tensors are on ", device.str(), "; move it with .to(", device.str(),
              ") (a device scalar avoids a host sync)");
  if (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) return t;
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), true), op,
              ": ", name, " has dtype ", c10::toString(t.scalar_type()), "; pass a float32 tensor");
  return t.to(at::kFloat);
}

inline NormKind norm_kind(double p) {
  if (std::isinf(p)) return NormKind::kInf;
  if (p == 2.0) return NormKind::kL2;
  if (p == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

inline cudaStream_t current_stream(at::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

}  // namespace gradclip
