// The plain C++ interface between the torch binding (gradclip.cpp) and the norm and
// pointwise kernels (kernels.cu). No torch types here: kernels.cu must compile without
// torch headers. AGC's kernel has its own pair, agc.h and agc_kernels.cu.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "tables.h"

namespace gradclip {

// One block's contribution: the sum (of x^2, |x| or |x|^p) and the bit pattern of the
// largest |x| as a double, whose integer order puts NaN above inf above every finite value.
struct Partial {
  double sum;
  unsigned long long amax_bits;
};

struct NormParams {
  double p;
  double max_norm;
  const void* inv_scale;  // nullptr, or one element of dtype inv_scale_dtype (kFloat or kDouble)
  void* stats;            // 3 elements of dtype stats_dtype (kFloat or kDouble)
  Partial* slots;         // one per block of all launches of the call
  unsigned int* counter;  // zero before the first launch of the call
  // Per-tensor norms: nullptr, or total_blocks + (tensors of the call) slots. Block b of
  // the call writes its part of tensor t of the call (each that it touches) to slot b + t:
  // blocks and tensors advance together, so no two (block, tensor) pairs share a slot.
  Partial* tensor_slots;
  int32_t tensor_offset;  // tensors of the call in earlier launches
  int32_t inv_scale_dtype;
  int32_t stats_dtype;
  int32_t total_blocks;   // blocks of all launches of the call
};

// The per-tensor finaliser: each tensor's norm from its slots, in block order.
struct TensorNormParams {
  double p;
  double max_norm;        // with coefs: torch's factor min(1, max_norm / (norm + 1e-6))
  const Partial* tensor_slots;
  const void* inv_scale;  // as NormParams
  void* norms;            // one per tensor of the call, dtype out_dtype (kFloat or kDouble)
  void* coefs;            // nullptr, or one factor per tensor, dtype out_dtype
  int32_t inv_scale_dtype;
  int32_t out_dtype;
  int32_t tensor_offset;
  int32_t grid;           // blocks of this table's norm launch
};

enum class Pointwise : int32_t { kScale = 0, kClamp = 1, kScaleEach = 2 };

struct PointwiseParams {
  const void* scale;      // kScale: one element of dtype scale_dtype (kFloat or kDouble)
  const void* found_inf;  // kScale: nullptr, or one element of dtype found_inf_dtype
  const void* coefs;      // kScaleEach: one factor per tensor of the call, dtype scale_dtype;
                          // a tensor whose factor is exactly 1 is neither read nor written
  double clip_value;      // kClamp
  int32_t scale_dtype;
  int32_t found_inf_dtype;
  int32_t tensor_offset;  // kScaleEach: tensors of the call in earlier launches
};

static_assert(sizeof(TensorTable) + sizeof(NormParams) <= 32764, "norm kernel parameters too large");
static_assert(sizeof(TensorTable) + sizeof(PointwiseParams) <= 32764,
              "pointwise kernel parameters too large");
static_assert(sizeof(TensorTable) + sizeof(TensorNormParams) <= 32764,
              "tensor norm kernel parameters too large");

// Blocks that fill the device (multiprocessors x resident blocks per multiprocessor); cached.
int norm_grid_limit(int device, NormKind kind);
int pointwise_grid_limit(int device, Pointwise op);

// Bytes of scratch a norm over `total_blocks` blocks needs: a counter then the slots.
size_t norm_workspace_bytes(int total_blocks);

// Zero the counter at the start of `workspace` on `stream` (before the first launch).
cudaError_t reset_norm_workspace(void* workspace, cudaStream_t stream);

cudaError_t launch_norm(NormKind kind, const TensorTable& table, const NormParams& params,
                        int grid, cudaStream_t stream);
cudaError_t launch_pointwise(Pointwise op, const TensorTable& table,
                             const PointwiseParams& params, int grid, cudaStream_t stream);
// One thread per tensor of `table`: its norm (and factor) from the slots its blocks wrote.
cudaError_t launch_tensor_norms(NormKind kind, const TensorTable& table,
                                const TensorNormParams& params, cudaStream_t stream);

}  // namespace gradclip
