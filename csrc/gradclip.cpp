// The torch side of the CUDA backend: op schemas (declared once, here), their CUDA
// implementations and the host-side packing of tensor lists into kernel tables.
// Only light ATen/c10 headers: this unit, python.cpp and kernels.cu compile in parallel.

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

namespace gradclip {
namespace {

// Numbers in error messages go in as strings: an ostream's numeric formatting crashed
// (SIGSEGV in num_put) where the toolchain linked a second, static libstdc++ into the
// extension, and std::to_string does not touch stream locales.
template <typename Number>
std::string text(Number value) {
  return std::to_string(value);
}

// What a call does with the tensors it packs.
enum class Access {
  // Reads only (norm): a tensor that is not dense (a strided view such as x[:, ::2]) is
  // read as a contiguous copy.
  kRead,
  // Writes in place: a tensor that is not dense is set aside for ATen (the op must write
  // the tensor itself), and every other one has its autograd version counter bumped, as
  // an ATen in-place op would (the kernels write through raw pointers, which autograd
  // cannot see; ATen bumps the ones set aside itself).
  kWrite,
};

// Tables are 32 KB each: a call takes the thread's spare set and gives it back when done,
// instead of allocating per call.
std::vector<TensorTable>& spare_tables() {
  thread_local std::vector<TensorTable> spare;
  return spare;
}

// The tables of one call: tensors split into launches of kMaxTensorsPerLaunch at most.
// Zero-size tensors are left out (they have no chunks); an apex bug dropped the pending
// launch when one came last, so the packing does not depend on what comes last.
struct Packed {
  std::vector<TensorTable> tables;
  int num_tables = 0;
  bool any_double = false;
  std::vector<at::Tensor> copies;   // Access::kRead: contiguous copies, alive until launched
  std::vector<at::Tensor> strided;  // Access::kWrite: the tensors that are not dense, for ATen
  std::vector<int64_t> strided_at;  // with kPerTensor: their positions in the input

  Packed() { tables.swap(spare_tables()); }
  Packed(Packed&&) = default;
  Packed& operator=(Packed&&) = delete;
  ~Packed() {
    if (tables.capacity() > spare_tables().capacity()) tables.swap(spare_tables());
  }
};

TensorTable& next_table(Packed& packed) {
  if (static_cast<int>(packed.tables.size()) <= packed.num_tables) {
    packed.tables.resize(packed.num_tables + 1);
  }
  TensorTable& table = packed.tables[packed.num_tables++];
  table.num_chunks = 0;
  table.num_tensors = 0;
  table.block_offset = 0;
  return table;
}

void append(Packed& packed, TensorTable*& table, void* ptr, int64_t numel, DType dtype) {
  if (table == nullptr || table->num_tensors == kMaxTensorsPerLaunch) table = &next_table(packed);
  const int64_t bytes = numel * dtype_size(dtype);
  const int i = table->num_tensors++;
  table->num_chunks += (bytes + kChunkBytes - 1) / kChunkBytes;
  table->chunk_end[i] = table->num_chunks;
  table->ptr[i] = ptr;
  table->numel[i] = numel;
  table->dtype[i] = dtype;
}

// Whether the tables keep one entry per input tensor (the per-tensor ops index their
// outputs by it): zero-size tensors get an entry with no chunks, and with Access::kWrite a
// tensor set aside for ATen does too.
enum class Layout { kCompact, kPerTensor };

// Checks every tensor (defined, strided layout, float dtype, on `device` when given) and
// packs the dense ones; `op` names the caller in error messages.
Packed pack(TensorRefs tensors, const char* op, std::optional<at::Device> device,
            Access access, Layout layout = Layout::kCompact) {
  const bool per_tensor = layout == Layout::kPerTensor;
  Packed packed;
  TensorTable* table = nullptr;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.defined(), op, ": tensors[", text(k), "] is None; pass only defined tensors");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", text(k), "] has layout ", t.layout(),
                "; only dense (strided) tensors are supported, densify it with .to_dense()");
    const auto dtype = dtype_code(t.scalar_type());
    TORCH_CHECK(dtype.has_value(), op, ": tensors[", text(k), "] has dtype ", c10::toString(t.scalar_type()),
                "; supported are float16, bfloat16, float32 and float64");
    TORCH_CHECK(!device.has_value() || t.device() == *device, op, ": tensors[", text(k), "] is on ",
                t.device().str(), " but tensors[0] is on ", device->str(),
                "; pass the tensors of one CUDA device per call");
    packed.any_double |= *dtype == kDouble;
    // Dense tensors, permuted or not, are read as their storage span; others are not.
    const bool dense = t.is_non_overlapping_and_dense();
    if (access == Access::kWrite) {
      if (!dense) {
        packed.strided.push_back(t);
        if (per_tensor) {
          packed.strided_at.push_back(static_cast<int64_t>(k));
          append(packed, table, nullptr, 0, *dtype);
        }
        continue;
      }
      // Raises for an inference tensor outside inference mode, as ATen's in-place ops do.
      t.unsafeGetTensorImpl()->bump_version();
    }
    const int64_t numel = t.numel();
    if (numel == 0) {
      if (per_tensor) append(packed, table, nullptr, 0, *dtype);
      continue;
    }
    const at::Tensor* source = &t;
    if (!dense) {
      packed.copies.push_back(t.contiguous());
      source = &packed.copies.back();
    }
    void* ptr = source->data_ptr();
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % dtype_size(*dtype) == 0, op, ": tensors[", text(k),
                "] is not aligned to its element size; pass a tensor made by torch, or .clone() it");
    append(packed, table, ptr, numel, *dtype);
  }
  return packed;
}

at::Device check_device(TensorRefs tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": tensors is empty; pass at least one tensor");
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(first.defined(), op, ": tensors[0] is None; pass only defined tensors");
  TORCH_CHECK(first.is_cuda(), op, ": tensors[0] is on ", first.device().str(),
              "; the cuda backend runs CUDA tensors only, use backend='torch' for others");
  return first.device();
}

// A one-element device tensor for the kernels: float32 or float64 (others are converted).
at::Tensor device_scalar(const at::Tensor& t, const char* op, const char* name, at::Device device) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got ", text(t.numel()));
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device().str(),
              " but the tensors are on ", device.str(), "; move it with .to(", device.str(),
              ") (a device scalar avoids a host sync)");
  if (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) return t;
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), true), op,
              ": ", name, " has dtype ", c10::toString(t.scalar_type()), "; pass a float32 tensor");
  return t.to(at::kFloat);
}

NormKind norm_kind(double p) {
  if (std::isinf(p)) return NormKind::kInf;
  if (p == 2.0) return NormKind::kL2;
  if (p == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

cudaStream_t current_stream(at::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

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
  for (size_t s = 0; s < packed.strided.size(); ++s) {
    const at::Tensor& t = packed.strided[s];
    const at::Tensor factor = coefs.select(0, packed.strided_at[s]);
    if (at::isReducedFloatingType(t.scalar_type())) {
      t.copy_(t.to(at::kFloat).mul_(factor));
    } else {
      t.mul_(factor);
    }
  }
}

// Non-dense tensors take ATen's mul_, with the skip rules applied to the factor on the
// device: no host sync, but the tensor is written (multiplied by 1) when nothing changes.
void scale_strided(const std::vector<at::Tensor>& strided, const at::Tensor& scale,
                   const std::optional<at::Tensor>& found_inf) {
  if (strided.empty()) return;
  at::Tensor factor = scale.reshape({});
  if (found_inf.has_value()) {
    factor = factor.new_ones({}).where(found_inf->reshape({}).ne(0), factor);
  }
  for (const at::Tensor& t : strided) {
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

std::optional<DType> dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kHalf;
    case at::kDouble: return kDouble;
    default: return std::nullopt;
  }
}

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
  scale_strided(packed.strided, s, skip);
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
  for (const at::Tensor& t : packed.strided) t.clamp_(-clip_value, clip_value);
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
  if (packed.strided.empty()) {
    stats = run_norm(packed, grads[0], norm_type, max_norm, inv_scale);
  } else {
    Packed reading = pack(grads, op, device, Access::kRead);  // rare: non-dense grads
    stats = run_norm(reading, grads[0], norm_type, max_norm, inv_scale);
  }
  const bool amp = inv_scale.has_value() && inv_scale->defined();
  const at::Tensor coef = stats.narrow(0, 1, 1);
  const std::optional<at::Tensor> skip =
      amp ? std::optional<at::Tensor>(stats.narrow(0, 2, 1)) : std::nullopt;
  run_pointwise(packed, device, Pointwise::kScale, scale_params(coef, skip));
  scale_strided(packed.strided, coef, skip);
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
  if (packed.strided.empty()) {
    run_norm(packed, tensors[0], norm_type, std::numeric_limits<double>::infinity(), std::nullopt, &out);
  } else {
    Packed reading = pack(tensors, op, device, Access::kRead, Layout::kPerTensor);  // rare
    run_norm(reading, tensors[0], norm_type, std::numeric_limits<double>::infinity(), std::nullopt, &out);
  }
  scale_each(packed, device, *out.coefs);
  return out.norms;
}

// AGC of one tensor with ATen ops (a gradient whose rows are not contiguous memory): the
// same rule and precision as the kernel; returns its rows' gradient norms.
at::Tensor agc_aten(const at::Tensor& w, const at::Tensor& g, double clip_factor, double eps,
                    double norm_type, at::ScalarType out_type) {
  const int64_t units = g.dim() <= 1 ? 1 : g.size(0);
  const int64_t width = units == 0 ? 0 : g.numel() / units;
  const auto wide = [&](const at::Tensor& t) {
    const auto type = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return t.reshape({units, width}).to(type);
  };
  const at::Tensor g_rows = wide(g);
  if (width == 0) return g_rows.new_zeros({units}, g_rows.options().dtype(out_type));
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
  if (at::isReducedFloatingType(g.scalar_type())) {
    g.copy_(g.to(at::kFloat).mul_(factor));
  } else {
    g.mul_(factor.to(g.scalar_type()));
  }
  return grad_norms;
}

// The AGC tables of a call: (weight, gradient) pairs as rows, split into launches.
struct AgcPacked {
  std::vector<AgcTable> tables;
  std::vector<at::Tensor> copies;   // contiguous copies of weights that are not
  std::vector<size_t> aside;        // gradients whose rows are not contiguous: ATen
  int64_t total_rows = 0;
  bool any_double = false;
};

AgcPacked pack_agc(TensorRefs params, TensorRefs grads, const char* op, std::optional<at::Device> device,
                   bool writing) {
  TORCH_CHECK(params.size() == grads.size(), op, ": ", text(params.size()), " params for ",
              text(grads.size()), " grads; pass one parameter per gradient");
  AgcPacked packed;
  AgcTable* table = nullptr;
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& w = params[k];
    const at::Tensor& g = grads[k];
    TORCH_CHECK(w.defined() && g.defined(), op, ": params[", text(k), "] or grads[", text(k), "] is None");
    const auto wd = dtype_code(w.scalar_type()), gd = dtype_code(g.scalar_type());
    TORCH_CHECK(wd.has_value() && gd.has_value(), op, ": params[", text(k), "] and grads[", text(k),
                "] must be float16, bfloat16, float32 or float64");
    TORCH_CHECK(w.sizes() == g.sizes(), op, ": params[", text(k), "] and grads[", text(k),
                "] differ in shape");
    TORCH_CHECK(!device.has_value() || (w.device() == *device && g.device() == *device), op,
                ": params[", text(k), "] or grads[", text(k), "] is not on ", device->str());
    TORCH_CHECK(w.layout() == at::kStrided && g.layout() == at::kStrided, op,
                ": only dense (strided) tensors are supported");
    packed.any_double |= *gd == kDouble;
    if (!g.is_contiguous()) {
      packed.aside.push_back(k);
      continue;
    }
    const int64_t rows = g.dim() <= 1 ? 1 : g.size(0);
    if (rows == 0) continue;
    if (writing) g.unsafeGetTensorImpl()->bump_version();
    const at::Tensor* weight = &w;
    if (!w.is_contiguous()) {
      packed.copies.push_back(w.contiguous());
      weight = &packed.copies.back();
    }
    if (table == nullptr || table->num_tensors == kMaxAgcTensorsPerLaunch) {
      packed.tables.emplace_back();
      table = &packed.tables.back();
      table->num_rows = 0;
      table->row_offset = packed.total_rows;
      table->num_tensors = 0;
    }
    const int i = table->num_tensors++;
    table->num_rows += rows;
    table->row_end[i] = table->num_rows;
    table->width[i] = g.numel() / rows;
    table->weight[i] = weight->data_ptr();
    table->grad[i] = g.data_ptr();
    table->weight_dtype[i] = *wd;
    table->grad_dtype[i] = *gd;
    packed.total_rows += rows;
  }
  return packed;
}

// AGC in one kernel per table: a warp per row reads the weight row and the gradient row
// once and rescales the gradient row only when it clips. Returns the norm of all
// gradients before clipping (the norm of the rows' norms).
at::Tensor agc_cuda(TensorRefs params, TensorRefs grads, double clip_factor, double eps, double norm_type) {
  const char* op = "gradclip::agc_";
  const at::Device device = check_device(grads, op);
  TORCH_CHECK(clip_factor >= 0 && eps >= 0, op, ": clip_factor and eps must be >= 0, got ",
              text(clip_factor), " and ", text(eps));
  TORCH_CHECK(norm_type > 0, op, ": norm_type must be > 0 or inf, got ", text(norm_type));
  const c10::cuda::CUDAGuard guard(device);
  AgcPacked packed = pack_agc(params, grads, op, device, /*writing=*/true);
  const auto out_type = packed.any_double ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> unit_norms;
  unit_norms.push_back(grads[0].new_zeros({packed.total_rows}, grads[0].options().dtype(out_type)));
  AgcParams p{};
  p.p = norm_type;
  p.clip_factor = clip_factor;
  p.eps = eps;
  p.unit_norms = unit_norms[0].data_ptr();
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
    unit_norms.push_back(agc_aten(params[k], grads[k], clip_factor, eps, norm_type, out_type));
  }
  return at::linalg_vector_norm(at::cat(unit_norms), norm_type, std::nullopt, false, std::nullopt);
}

int64_t pack_for_writing(TensorRefs tensors) {
  return static_cast<int64_t>(pack(tensors, "pack_for_writing", std::nullopt, Access::kWrite).strided.size());
}

// For tests without a GPU: only the tensors' addresses and sizes are used.
SplitReplay simulate_split(TensorRefs tensors, int64_t grid, bool replay) {
  TORCH_CHECK(grid > 0, "simulate_split: grid must be > 0, got ", text(grid));
  Packed packed = pack(tensors, "simulate_split", std::nullopt, Access::kRead);
  TORCH_CHECK(packed.copies.empty(), "simulate_split: pass dense tensors");
  SplitReplay result;
  result.launches = packed.num_tables;
  if (!replay) return result;
  std::vector<std::vector<uint8_t>> visits(tensors.size());
  std::vector<uint8_t*> rows;
  for (size_t k = 0; k < tensors.size(); ++k) {
    visits[k].assign(static_cast<size_t>(tensors[k].numel()), 0);
    if (!visits[k].empty()) rows.push_back(visits[k].data());
  }
  size_t row = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    const TensorTable& table = packed.tables[l];
    const int g = static_cast<int>(std::min<int64_t>(grid, table.num_chunks));
    result.ok &= simulate_visits(table, g, kBlockThreads, rows.data() + row);
    row += table.num_tensors;
  }
  for (const auto& row_visits : visits) {
    uint8_t lo = 1, hi = 1;
    if (!row_visits.empty()) {
      lo = *std::min_element(row_visits.begin(), row_visits.end());
      hi = *std::max_element(row_visits.begin(), row_visits.end());
    }
    result.min_visits.push_back(lo);
    result.max_visits.push_back(hi);
  }
  return result;
}

bool simulate_agc(TensorRefs params, TensorRefs grads, int64_t grid) {
  TORCH_CHECK(grid > 0, "simulate_agc: grid must be > 0, got ", text(grid));
  AgcPacked packed = pack_agc(params, grads, "simulate_agc", std::nullopt, /*writing=*/false);
  TORCH_CHECK(packed.aside.empty() && packed.copies.empty(), "simulate_agc: pass contiguous tensors");
  std::vector<std::vector<uint8_t>> visits(grads.size());
  std::vector<uint8_t*> rows;
  for (size_t k = 0; k < grads.size(); ++k) {
    visits[k].assign(static_cast<size_t>(grads[k].numel()), 0);
    const int64_t units = grads[k].dim() <= 1 ? 1 : grads[k].size(0);
    if (units > 0) rows.push_back(visits[k].data());  // the tensors pack_agc keeps, in order
  }
  bool ok = true;
  int64_t rows_seen = 0;
  size_t first = 0;
  for (const AgcTable& table : packed.tables) {
    ok &= table.row_offset == rows_seen;
    ok &= gradclip::simulate_agc_rows(table, static_cast<int>(grid), rows.data() + first);
    rows_seen += table.num_rows;
    first += static_cast<size_t>(table.num_tensors);
  }
  for (const auto& tensor_visits : visits) {
    for (const uint8_t v : tensor_visits) ok &= v == 1;
  }
  return ok && rows_seen == packed.total_rows;
}

bool simulate_tensor_slots(TensorRefs tensors, int64_t grid) {
  TORCH_CHECK(grid > 0, "simulate_tensor_slots: grid must be > 0, got ", text(grid));
  Packed packed = pack(tensors, "simulate_tensor_slots", std::nullopt, Access::kRead, Layout::kPerTensor);
  TORCH_CHECK(packed.copies.empty(), "simulate_tensor_slots: pass dense tensors");
  std::vector<int> grids(packed.num_tables);
  int total_blocks = 0, total_tensors = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    grids[l] = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(packed.tables[l].num_chunks, grid)));
    total_blocks += grids[l];
    total_tensors += packed.tables[l].num_tensors;
  }
  if (total_tensors != static_cast<int>(tensors.size())) return false;  // one entry per tensor
  std::vector<uint8_t> writes(static_cast<size_t>(total_blocks + total_tensors), 0);
  bool ok = true;
  int block_offset = 0, tensor_offset = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    ok &= gradclip::simulate_tensor_slots(packed.tables[l], grids[l], block_offset, tensor_offset,
                                         writes.data(), static_cast<int64_t>(writes.size()));
    block_offset += grids[l];
    tensor_offset += packed.tables[l].num_tensors;
  }
  return ok;
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
  m.impl("agc_", [](at::TensorList params, at::TensorList grads, double clip_factor, double eps,
                    double norm_type) {
    return gradclip::agc_cuda(params, grads, clip_factor, eps, norm_type);
  });
}
