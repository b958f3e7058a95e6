// The tables the host packs and the kernels walk: plain C++, no CUDA and no torch types, so
// that the packing (pack.cpp), the kernels (kernels.cu, agc_kernels.cu) and the tests' host replay
// of the kernels' split (tests/csrc/replay.cpp, built without CUDA) share one definition.
#pragma once

#include <cstddef>
#include <cstdint>

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
// 16-byte vectors each thread of the norm and pointwise kernels keeps in flight.
constexpr int kUnroll = 4;

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

}  // namespace gradclip
