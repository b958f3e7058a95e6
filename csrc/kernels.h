// The plain C++ interface between the torch binding (gradclip.cpp) and the kernels
// (kernels.cu). No torch types here: kernels.cu must compile without torch headers.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#if defined(__CUDACC__)
#define GRADCLIP_HOST_DEVICE __host__ __device__
#else
#define GRADCLIP_HOST_DEVICE
#endif

namespace gradclip {

// Element types by their codes in TensorTable::dtype: the codes of the Triton backend's table
// (gradclip.backends.base.DTYPE_CODES), so both fused backends read one table; a test pins them.
enum DType : uint8_t { kFloat = 0, kBFloat16 = 1, kHalf = 2, kDouble = 3 };

GRADCLIP_HOST_DEVICE constexpr int dtype_size(int dtype) {
  return dtype == kHalf || dtype == kBFloat16 ? 2 : dtype == kFloat ? 4 : 8;
}

// Work is split in chunks of equal bytes whatever the dtype, so blocks get equal
// traffic on a mixed list. A block takes a contiguous run of chunks.
constexpr int64_t kChunkBytes = 64 * 1024;
constexpr int kBlockThreads = 512;

// Tensors per launch. The table goes to the kernel by value (CUDA >= 12.1 allows 32764
// bytes of kernel parameters on sm_70+), so a CUDA graph bakes it in and no host-to-device
// copy is needed; a call with more tensors makes several launches.
constexpr int kMaxTensorsPerLaunch = 1280;

struct TensorTable {
  int64_t num_chunks;   // chunks of all tensors of this launch
  int32_t num_tensors;
  int32_t block_offset; // slot of this launch's first block among all launches of the call
  // chunk_end[i]: chunks of tensors 0..i together; a zero-size tensor adds none.
  int64_t chunk_end[kMaxTensorsPerLaunch];
  void* ptr[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  uint8_t dtype[kMaxTensorsPerLaunch];
};

enum class NormKind : int32_t { kL2 = 0, kL1 = 1, kInf = 2, kP = 3 };

// AGC: tensors seen as (rows, width), a row per unit (one row for ndim <= 1), weight and
// gradient of the same shape; a warp takes a row, grid-stride over the rows of a launch.
constexpr int kMaxAgcTensorsPerLaunch = 896;
constexpr int kAgcThreads = 256;

struct AgcTable {
  int64_t num_rows;     // rows of the tensors of this launch
  int64_t row_offset;   // rows of the call in earlier launches (index of unit_norms)
  int32_t num_tensors;
  int32_t unused;
  int64_t row_end[kMaxAgcTensorsPerLaunch];  // rows of tensors 0..i together
  int64_t width[kMaxAgcTensorsPerLaunch];    // elements per row (0 for an empty 1-d tensor)
  const void* weight[kMaxAgcTensorsPerLaunch];
  void* grad[kMaxAgcTensorsPerLaunch];
  uint8_t weight_dtype[kMaxAgcTensorsPerLaunch];
  uint8_t grad_dtype[kMaxAgcTensorsPerLaunch];
};

struct AgcParams {
  double p;
  double clip_factor;
  double eps;
  void* unit_norms;     // one gradient norm per row of the call, dtype out_dtype
  int32_t out_dtype;    // kFloat or kDouble: also the precision of the factor
};

static_assert(sizeof(AgcTable) + sizeof(AgcParams) <= 32764, "AGC kernel parameters too large");

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

// AGC over one table: each row's weight and gradient read once, the gradient row scaled
// in place (re-read from cache) only when its factor is not 1; writes every row's norm.
int agc_grid_limit(int device, NormKind kind);
cudaError_t launch_agc(NormKind kind, const AgcTable& table, const AgcParams& params, int grid,
                       cudaStream_t stream);

// Host replay of how agc_kernel assigns rows to the warps of `grid` blocks: adds to
// visits[i][e] for each gradient element e of tensor i a lane would read; false if an
// access would leave its tensor (weight or gradient).
bool simulate_agc_rows(const AgcTable& table, int grid, uint8_t* const* visits);

// Host replay of the per-tensor slots of a norm launch over `grid` blocks: true when the
// slots the norm kernel writes for each tensor are exactly those the finaliser reads, and
// no slot is written twice. `block_offset` and `tensor_offset` place the launch in its call.
bool simulate_tensor_slots(const TensorTable& table, int grid, int block_offset,
                           int tensor_offset, uint8_t* slot_writes, int64_t num_slots);

// Host replay of how the kernels split `table` over `grid` blocks of `threads` threads:
// adds to visits[i][e] for each element e of tensor i that some thread would read, and
// returns false if a vector access would be misaligned or a thread would leave its tensor.
// For tests on machines without a GPU; it reads no tensor memory.
bool simulate_visits(const TensorTable& table, int grid, int threads, uint8_t* const* visits);

}  // namespace gradclip
