// AGC's host side: packs (weight, gradient) pairs into its tables (pack.cpp), launches its
// kernel (agc_kernels.cu), and takes gradients whose rows are not contiguous memory with ATen ops.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "agc.h"
#include "ops.h"
#include "ops_common.h"
#include "pack.h"

namespace gradclip {
namespace {

// AGC of one tensor with ATen ops (a gradient whose rows are not contiguous memory): the
// same rule and precision as the kernel; returns its rows' gradient norms and factors.
std::pair<at::Tensor, at::Tensor> agc_aten(const at::Tensor& w, const at::Tensor& g,
                                           double clip_factor, double eps, double norm_type,
                                           at::ScalarType out_type) {
  const int64_t units = g.dim() <= 1 ? 1 : g.size(0);
  const int64_t width = units == 0 ? 0 : g.numel() / units;
  const auto wide = [&](const at::Tensor& t) {
    const auto type = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return t.reshape({units, width}).to(type);
  };
  const at::Tensor g_rows = wide(g);
  if (width == 0) {
    return {g_rows.new_zeros({units}, g_rows.options().dtype(out_type)),
            g_rows.new_ones({units}, g_rows.options().dtype(out_type))};
  }
  const at::Tensor grad_norms = at::linalg_vector_norm(g_rows, norm_type, {1}, false, std::nullopt).to(out_type);
  const at::Tensor weight_norms =
      at::linalg_vector_norm(wide(w), norm_type, {1}, false, std::nullopt).to(out_type);
  const at::Tensor limit = weight_norms.clamp_min(eps).mul_(clip_factor);
  const at::Tensor scaled = limit.div(grad_norms.clamp_min(1e-6));
  // timm's rule: 1 below the limit, else limit / max(norm, 1e-6) (NaN norms give NaN).
  const at::Tensor coefs = scaled.new_ones({}).where(grad_norms.lt(limit), scaled);
  std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(g.dim(), 1)), 1);
  shape[0] = units;
  const at::Tensor factor = g.dim() == 0 ? coefs.reshape({}) : coefs.reshape(shape);
  // Rounded as the kernel: in float32 (float64 for float64) by the factor in that
  // precision, once to the gradient's dtype.
  if (at::isReducedFloatingType(g.scalar_type())) {
    g.copy_(g.to(at::kFloat).mul_(factor.to(at::kFloat)));
  } else {
    g.mul_(factor.to(g.scalar_type()));
  }
  return {grad_norms, coefs};
}

}  // namespace

// AGC in one kernel per table: a warp per row reads the weight row and the gradient row
// once and rescales the gradient row only when it clips. Returns [the norm of the distinct
// gradients before clipping (the norm of their rows' norms), the smallest factor applied
// (1 for no row)].
at::Tensor agc_cuda(TensorRefs params, TensorRefs grads, double clip_factor, double eps, double norm_type) {
  const char* op = "gradclip::agc_";
  const at::Device device = check_device(grads, op);
  TORCH_CHECK(clip_factor >= 0 && eps >= 0, op, ": clip_factor and eps must be >= 0, got ",
              text(clip_factor), " and ", text(eps));
  TORCH_CHECK(norm_type > 0, op, ": norm_type must be > 0 or inf, got ", text(norm_type));
  const c10::cuda::CUDAGuard guard(device);
  AgcPacked packed = pack_agc(params, grads, op, device, /*writing=*/true);
  const auto out_type = packed.any_double ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> unit_norms, unit_factors;
  unit_norms.push_back(grads[0].new_zeros({packed.total_rows}, grads[0].options().dtype(out_type)));
  unit_factors.push_back(grads[0].new_ones({packed.total_rows}, grads[0].options().dtype(out_type)));
  AgcParams p{};
  p.p = norm_type;
  p.clip_factor = clip_factor;
  p.eps = eps;
  p.unit_norms = unit_norms[0].data_ptr();
  p.unit_factors = unit_factors[0].data_ptr();
  p.out_dtype = packed.any_double ? kDouble : kFloat;
  const NormKind kind = norm_kind(norm_type);
  const int64_t limit = std::max(1, agc_grid_limit(device.index(), kind));
  const cudaStream_t stream = current_stream(device);
  for (const AgcTable& table : packed.tables) {
    const int64_t wanted = (table.num_rows + kAgcThreads / 32 - 1) / (kAgcThreads / 32);
    const int grid = static_cast<int>(std::max<int64_t>(1, std::min(wanted, limit)));
    C10_CUDA_CHECK(launch_agc(kind, table, p, grid, stream));
  }
  for (const size_t k : packed.aside) {
    auto [norms, factors] = agc_aten(params[k], grads[k], clip_factor, eps, norm_type, out_type);
    unit_norms.push_back(norms);
    unit_factors.push_back(factors);
  }
  const at::Tensor norm =
      at::linalg_vector_norm(at::cat(unit_norms), norm_type, std::nullopt, false, std::nullopt);
  // A leading 1: the smallest factor of no row at all is 1 (min keeps a NaN factor).
  const at::Tensor factors = at::cat({norm.new_ones({1}), at::cat(unit_factors)});
  return at::stack({norm, at::amin(factors)});
}

}  // namespace gradclip

TORCH_LIBRARY_IMPL(gradclip, CUDA, m) {
  m.impl("agc_", [](at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                    double norm_type) {
    return gradclip::agc_cuda(params, grads, clip_factor, eps, norm_type);
  });
}
