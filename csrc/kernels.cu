// The multi-tensor norm and pointwise kernels and their launchers (AGC's are in agc_kernels.cu).
// CUDA and std only (no torch headers): the kernel files are the slow ones to compile, so
// they stay small.
//
// Every kernel walks a TensorTable the same way (device_helpers.cuh): a block takes a
// contiguous run of 64 KiB chunks, finds its first tensor by binary search and walks on;
// within a tensor, threads read 16-byte vectors, with scalar heads and tails where a
// tensor (a view with a storage offset) does not start on a 16-byte boundary.

#include <atomic>
#include <cstdint>

#include "device_helpers.cuh"
#include "kernel_common.cuh"
#include "kernels.h"

namespace gradclip {
namespace {

constexpr int kWarps = kBlockThreads / 32;

// Calls f(i, dtype, first, last) for each tensor i of the table that this block's chunks
// touch, with the element range [first, last) they cover.
template <typename F>
__device__ __forceinline__ void for_each_span(const TensorTable& table, F&& f) {
  for_each_block_span(table, gridDim.x, blockIdx.x, [&](int i, int64_t first, int64_t last) {
    f(i, table.dtype[i], first, last);
  });
}

// ---------------------------------------------------------------------------------------
// Norm

template <int D, NormKind K>
__device__ __forceinline__ void norm_span(NormAcc<K>& acc, const void* base, int64_t first,
                                          int64_t n) {
  using T = Traits<D>;
  const char* p = static_cast<const char*>(base) + first * T::kSize;
  const SpanPlan plan = plan_span(reinterpret_cast<uintptr_t>(p), T::kSize, n);
  for (int64_t i = threadIdx.x; i < plan.head; i += kBlockThreads) acc.add(T::load(p, i));
  const uint4* body = reinterpret_cast<const uint4*>(p + plan.head * T::kSize);
  for (int64_t v = threadIdx.x; v < plan.vectors; v += int64_t{kBlockThreads} * kUnroll) {
    uint4 r[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = v + int64_t{k} * kBlockThreads;
      r[k] = j < plan.vectors ? __ldg(body + j) : make_uint4(0, 0, 0, 0);  // zeros add nothing
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) acc.template add_vector<D>(r[k]);
  }
  const char* tail = p + (plan.head + plan.vectors * T::kPerVector) * T::kSize;
  for (int64_t i = threadIdx.x; i < plan.tail; i += kBlockThreads) acc.add(T::load(tail, i));
}

template <NormKind K>
__device__ __forceinline__ void norm_any(NormAcc<K>& acc, int dtype, const void* base, int64_t first,
                                         int64_t n) {
  switch (dtype) {
    case kHalf: norm_span<kHalf>(acc, base, first, n); break;
    case kBFloat16: norm_span<kBFloat16>(acc, base, first, n); break;
    case kFloat: norm_span<kFloat>(acc, base, first, n); break;
    default: norm_span<kDouble>(acc, base, first, n); break;
  }
}

// Sum and max over the block, in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ void block_reduce(double& sum, unsigned long long& amax) {
  __shared__ double warp_sum[kWarps];
  __shared__ unsigned long long warp_max[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
    amax = max(amax, __shfl_down_sync(0xffffffffu, amax, offset));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // the shared arrays may still be read by a previous call
  if (lane == 0) {
    warp_sum[warp] = sum;
    warp_max[warp] = amax;
  }
  __syncthreads();
  if (warp == 0) {
    sum = lane < kWarps ? warp_sum[lane] : 0.0;
    amax = lane < kWarps ? warp_max[lane] : 0ull;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
      amax = max(amax, __shfl_down_sync(0xffffffffu, amax, offset));
    }
  }
}

// norm, coef, found_inf in the stats dtype T, with torch's rounding: the coefficient is
// reciprocal-then-multiply, and a NaN norm gives a NaN coefficient (clamp keeps NaN).
template <typename T>
__device__ void write_stats(void* stats, double norm_value, double max_norm, bool has_inv,
                            double inv, bool found_inf) {
  T* out = static_cast<T*>(stats);
  const T norm = static_cast<T>(norm_value);
  T coef = T(1) / (norm + static_cast<T>(1e-6));
  coef = coef * static_cast<T>(max_norm);
  coef = coef > T(1) ? T(1) : coef;
  if (has_inv) coef = coef * static_cast<T>(inv);
  out[0] = norm;
  out[1] = coef;
  out[2] = found_inf ? T(1) : T(0);
}

template <NormKind K>
__device__ void finalise(const NormParams& params, double sum, unsigned long long amax_bits) {
  const bool has_inv = params.inv_scale != nullptr;
  const double inv = has_inv ? read_scalar(params.inv_scale, params.inv_scale_dtype) : 1.0;
  const double norm = norm_of<K>(sum, amax_bits, params.p, inv);
  const bool found_inf = amax_bits >= kInfBits;
  if (params.stats_dtype == kDouble) {
    write_stats<double>(params.stats, norm, params.max_norm, has_inv, inv, found_inf);
  } else {
    write_stats<float>(params.stats, norm, params.max_norm, has_inv, inv, found_inf);
  }
}

// Reads each gradient once; writes one 16-byte partial per block. The last block to
// finish (an integer counter, no float atomics) sums the partials in a fixed order,
// so the result is bitwise reproducible, and writes the 3 stats.
template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads)
    norm_kernel(const __grid_constant__ TensorTable table, const NormParams params) {
  NormAcc<K> acc;
  const double inv = params.inv_scale ? read_scalar(params.inv_scale, params.inv_scale_dtype) : 1.0;
  acc.scale_d = inv;
  acc.scale_f = static_cast<float>(inv);
  acc.p_d = params.p;
  acc.p_f = static_cast<float>(params.p);

  for_each_span(table, [&](int i, int dtype, int64_t first, int64_t last) {
    if (params.tensor_slots == nullptr) {
      norm_any(acc, dtype, table.ptr[i], first, last - first);
      return;
    }
    // Per-tensor norms: this block's part of tensor i, reduced over the block (all threads
    // walk the same spans) into its slot, then merged into the block's total.
    NormAcc<K> span = acc.fresh();
    norm_any(span, dtype, table.ptr[i], first, last - first);
    acc.merge(span);
    double span_sum;
    unsigned long long span_amax;
    span.totals(&span_sum, &span_amax);
    block_reduce(span_sum, span_amax);
    if (threadIdx.x == 0) {
      params.tensor_slots[table.block_offset + blockIdx.x + params.tensor_offset + i] =
          Partial{span_sum, span_amax};
    }
  });

  double sum;
  unsigned long long amax;
  acc.totals(&sum, &amax);
  block_reduce(sum, amax);

  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    params.slots[table.block_offset + blockIdx.x] = Partial{sum, amax};
    __threadfence();
    is_last = atomicAdd(params.counter, 1u) == static_cast<unsigned int>(params.total_blocks) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  sum = 0.0;
  amax = 0;
  for (int s = threadIdx.x; s < params.total_blocks; s += kBlockThreads) {
    sum += __ldcg(&params.slots[s].sum);
    amax = max(amax, __ldcg(&params.slots[s].amax_bits));
  }
  block_reduce(sum, amax);
  if (threadIdx.x == 0) finalise<K>(params, sum, amax);
}

// Each tensor's norm from the slots of the blocks that read it, summed in block order
// (deterministic), and with coefs torch's clip factor of that norm. Reads 16 bytes per
// (block, tensor) pair; no tensor data.
template <NormKind K, typename T>
__device__ void write_tensor_norm(const TensorNormParams& params, int64_t at, double norm_value) {
  const T norm = static_cast<T>(norm_value);
  static_cast<T*>(params.norms)[at] = norm;
  if (params.coefs != nullptr) {
    T coef = T(1) / (norm + static_cast<T>(1e-6));
    coef = coef * static_cast<T>(params.max_norm);
    static_cast<T*>(params.coefs)[at] = coef > T(1) ? T(1) : coef;  // NaN stays NaN
  }
}

constexpr int kTensorNormThreads = 128;

template <NormKind K>
__global__ void __launch_bounds__(kTensorNormThreads)
    tensor_norms_kernel(const __grid_constant__ TensorTable table, const TensorNormParams params) {
  const int i = blockIdx.x * kTensorNormThreads + threadIdx.x;
  if (i >= table.num_tensors) return;
  int64_t b0, b1;
  tensor_blocks(table.num_chunks, params.grid, chunk_begin(table, i), table.chunk_end[i], &b0, &b1);
  double sum = 0.0;
  unsigned long long amax = 0;
  const int64_t base = int64_t{table.block_offset} + params.tensor_offset + i;
  for (int64_t b = b0; b < b1; ++b) {
    const Partial part = params.tensor_slots[base + b];
    sum += part.sum;
    amax = max(amax, part.amax_bits);
  }
  const double inv = params.inv_scale ? read_scalar(params.inv_scale, params.inv_scale_dtype) : 1.0;
  const double norm = norm_of<K>(sum, amax, params.p, inv);
  const int64_t at = int64_t{params.tensor_offset} + i;
  if (params.out_dtype == kDouble) {
    write_tensor_norm<K, double>(params, at, norm);
  } else {
    write_tensor_norm<K, float>(params, at, norm);
  }
}

// ---------------------------------------------------------------------------------------
// Pointwise: scale and clamp

template <Pointwise Op, typename C>
__device__ __forceinline__ C apply(C x, C a) {
  if constexpr (Op == Pointwise::kScale) {
    return x * a;
  } else {
    return x < -a ? -a : (x > a ? a : x);  // NaN stays NaN, as torch.clamp
  }
}

template <int D, Pointwise Op>
__device__ __forceinline__ void pointwise_span(void* base, int64_t first, int64_t n, double a64) {
  using T = Traits<D>;
  using C = typename T::Compute;
  const C a = static_cast<C>(a64);
  char* p = static_cast<char*>(base) + first * T::kSize;
  const SpanPlan plan = plan_span(reinterpret_cast<uintptr_t>(p), T::kSize, n);
  for (int64_t i = threadIdx.x; i < plan.head; i += kBlockThreads) {
    T::store(p, i, apply<Op>(T::load(p, i), a));
  }
  uint4* body = reinterpret_cast<uint4*>(p + plan.head * T::kSize);
  for (int64_t v = threadIdx.x; v < plan.vectors; v += int64_t{kBlockThreads} * kUnroll) {
    uint4 r[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = v + int64_t{k} * kBlockThreads;
      if (j < plan.vectors) r[k] = body[j];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t j = v + int64_t{k} * kBlockThreads;
      if (j < plan.vectors) {
        C x[T::kPerVector];
        T::unpack(r[k], x);
#pragma unroll
        for (int e = 0; e < T::kPerVector; ++e) x[e] = apply<Op>(x[e], a);
        body[j] = T::pack(x);
      }
    }
  }
  char* tail = p + (plan.head + plan.vectors * T::kPerVector) * T::kSize;
  for (int64_t i = threadIdx.x; i < plan.tail; i += kBlockThreads) {
    T::store(tail, i, apply<Op>(T::load(tail, i), a));
  }
}

// kScale: when the factor is exactly 1, or found_inf is given and nonzero, every block
// returns before touching gradient memory (moves nothing); otherwise reads and writes each
// gradient once. kClamp: reads and writes each gradient once (torch's foreach clamp: twice).
template <Pointwise Op>
__global__ void __launch_bounds__(kBlockThreads)
    pointwise_kernel(const __grid_constant__ TensorTable table, const PointwiseParams params) {
  if constexpr (Op == Pointwise::kScaleEach) {
    // Each tensor by its own factor; a factor of exactly 1 skips the tensor's span.
    for_each_span(table, [&](int i, int dtype, int64_t first, int64_t last) {
      const int64_t at = int64_t{params.tensor_offset} + i;
      const double a = params.scale_dtype == kDouble ? static_cast<const double*>(params.coefs)[at]
                                                     : static_cast<const float*>(params.coefs)[at];
      if (a == 1.0) return;
      constexpr Pointwise kScale = Pointwise::kScale;
      switch (dtype) {
        case kHalf: pointwise_span<kHalf, kScale>(table.ptr[i], first, last - first, a); break;
        case kBFloat16: pointwise_span<kBFloat16, kScale>(table.ptr[i], first, last - first, a); break;
        case kFloat: pointwise_span<kFloat, kScale>(table.ptr[i], first, last - first, a); break;
        default: pointwise_span<kDouble, kScale>(table.ptr[i], first, last - first, a); break;
      }
    });
  } else {
    double a;
    if constexpr (Op == Pointwise::kScale) {
      a = read_scalar(params.scale, params.scale_dtype);
      if (a == 1.0) return;
      if (params.found_inf != nullptr && read_scalar(params.found_inf, params.found_inf_dtype) != 0.0) {
        return;
      }
    } else {
      a = params.clip_value;
    }
    for_each_span(table, [&](int i, int dtype, int64_t first, int64_t last) {
      switch (dtype) {
        case kHalf: pointwise_span<kHalf, Op>(table.ptr[i], first, last - first, a); break;
        case kBFloat16: pointwise_span<kBFloat16, Op>(table.ptr[i], first, last - first, a); break;
        case kFloat: pointwise_span<kFloat, Op>(table.ptr[i], first, last - first, a); break;
        default: pointwise_span<kDouble, Op>(table.ptr[i], first, last - first, a); break;
      }
    });
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Host side

int norm_grid_limit(int device, NormKind kind) {
  static std::atomic<int> cache[4][kCachedDevices];
  switch (kind) {
    case NormKind::kL2: return grid_limit(device, norm_kernel<NormKind::kL2>, cache[0]);
    case NormKind::kL1: return grid_limit(device, norm_kernel<NormKind::kL1>, cache[1]);
    case NormKind::kInf: return grid_limit(device, norm_kernel<NormKind::kInf>, cache[2]);
    default: return grid_limit(device, norm_kernel<NormKind::kP>, cache[3]);
  }
}

int pointwise_grid_limit(int device, Pointwise op) {
  static std::atomic<int> cache[3][kCachedDevices];
  switch (op) {
    case Pointwise::kScale: return grid_limit(device, pointwise_kernel<Pointwise::kScale>, cache[0]);
    case Pointwise::kClamp: return grid_limit(device, pointwise_kernel<Pointwise::kClamp>, cache[1]);
    default: return grid_limit(device, pointwise_kernel<Pointwise::kScaleEach>, cache[2]);
  }
}

size_t norm_workspace_bytes(int total_blocks) {
  return 16 + sizeof(Partial) * static_cast<size_t>(total_blocks);
}

cudaError_t reset_norm_workspace(void* workspace, cudaStream_t stream) {
  return cudaMemsetAsync(workspace, 0, sizeof(unsigned int), stream);
}

cudaError_t launch_norm(NormKind kind, const TensorTable& table, const NormParams& params, int grid,
                        cudaStream_t stream) {
  switch (kind) {
    case NormKind::kL2:
      norm_kernel<NormKind::kL2><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
    case NormKind::kL1:
      norm_kernel<NormKind::kL1><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
    case NormKind::kInf:
      norm_kernel<NormKind::kInf><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
    default:
      norm_kernel<NormKind::kP><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_pointwise(Pointwise op, const TensorTable& table, const PointwiseParams& params,
                             int grid, cudaStream_t stream) {
  switch (op) {
    case Pointwise::kScale:
      pointwise_kernel<Pointwise::kScale><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
    case Pointwise::kClamp:
      pointwise_kernel<Pointwise::kClamp><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
    default:
      pointwise_kernel<Pointwise::kScaleEach><<<grid, kBlockThreads, 0, stream>>>(table, params);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_tensor_norms(NormKind kind, const TensorTable& table, const TensorNormParams& params,
                                cudaStream_t stream) {
  if (table.num_tensors == 0) return cudaSuccess;
  const int grid = (table.num_tensors + kTensorNormThreads - 1) / kTensorNormThreads;
  switch (kind) {
    case NormKind::kL2:
      tensor_norms_kernel<NormKind::kL2><<<grid, kTensorNormThreads, 0, stream>>>(table, params);
      break;
    case NormKind::kL1:
      tensor_norms_kernel<NormKind::kL1><<<grid, kTensorNormThreads, 0, stream>>>(table, params);
      break;
    case NormKind::kInf:
      tensor_norms_kernel<NormKind::kInf><<<grid, kTensorNormThreads, 0, stream>>>(table, params);
      break;
    default:
      tensor_norms_kernel<NormKind::kP><<<grid, kTensorNormThreads, 0, stream>>>(table, params);
      break;
  }
  return cudaGetLastError();
}

}  // namespace gradclip
