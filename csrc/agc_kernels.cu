// AGC's kernel and its launcher: a warp per unit (a row of a tensor seen as (rows, width)).
// CUDA and std only (no torch headers); the host side is agc.cpp.

#include "agc.h"
#include "device_helpers.cuh"
#include "kernel_common.cuh"

namespace gradclip {
namespace {

template <NormKind K>
__device__ __forceinline__ NormAcc<K> empty_acc(double p) {
  NormAcc<K> acc;
  acc.scale_f = 1.f;
  acc.scale_d = 1.0;
  acc.p_f = static_cast<float>(p);
  acc.p_d = p;
  return acc;
}

// This lane's part of a row: elements lane, lane + 32, ... (a warp reads 32 consecutive).
template <NormKind K>
__device__ __forceinline__ void row_part(NormAcc<K>& acc, int dtype, const char* row, int64_t n, int lane) {
  switch (dtype) {
    case kHalf: for (int64_t e = lane; e < n; e += 32) acc.add(Traits<kHalf>::load(row, e)); break;
    case kBFloat16: for (int64_t e = lane; e < n; e += 32) acc.add(Traits<kBFloat16>::load(row, e)); break;
    case kFloat: for (int64_t e = lane; e < n; e += 32) acc.add(Traits<kFloat>::load(row, e)); break;
    default: for (int64_t e = lane; e < n; e += 32) acc.add(Traits<kDouble>::load(row, e)); break;
  }
}

// Sum and max over the warp; every lane gets the result, summed in a fixed order.
__device__ __forceinline__ void warp_reduce(double& sum, unsigned long long& amax) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
}

template <int D>
__device__ __forceinline__ void scale_row(char* row, int64_t n, double a, int lane) {
  using C = typename Traits<D>::Compute;
  const C c = static_cast<C>(a);
  for (int64_t e = lane; e < n; e += 32) Traits<D>::store(row, e, Traits<D>::load(row, e) * c);
}

// timm's factor in T: 1 below max(weight_norm, eps) * clip_factor, else that limit over
// max(grad_norm, 1e-6); NaN norms give NaN (the clamps keep NaN, as torch.clamp).
template <typename T>
__device__ __forceinline__ T agc_factor(T weight_norm, T grad_norm, T eps, T clip_factor) {
  const T limit = (weight_norm != weight_norm ? weight_norm : (weight_norm < eps ? eps : weight_norm)) *
                  clip_factor;
  const T floor = static_cast<T>(1e-6);
  const T denominator = grad_norm != grad_norm ? grad_norm : (grad_norm < floor ? floor : grad_norm);
  return grad_norm < limit ? T(1) : limit / denominator;
}

// Reads each weight row and each gradient row once; writes a gradient row (re-read from
// cache) only when its factor is not 1, and one norm and one factor per row. A warp per row: rows of
// NFNet/ResNet/LLM weights are 10^2-10^4 elements; a single very wide row (a 1-d tensor
// of millions of elements) is read by one warp alone, slowly but correctly.
template <NormKind K>
__global__ void __launch_bounds__(kAgcThreads)
    agc_kernel(const __grid_constant__ AgcTable table, const AgcParams params) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * (kAgcThreads / 32);
  for (int64_t row = (int64_t{blockIdx.x} * kAgcThreads + threadIdx.x) / 32; row < table.num_rows;
       row += warps) {
    const int i = agc_tensor_of(table, row);
    const int64_t r = row - (i == 0 ? 0 : table.row_end[i - 1]);
    const int64_t width = table.width[i];
    const int wd = table.weight_dtype[i], gd = table.grad_dtype[i];
    const char* w = static_cast<const char*>(table.weight[i]) + r * width * dtype_size(wd);
    char* g = static_cast<char*>(table.grad[i]) + r * width * dtype_size(gd);
    NormAcc<K> wacc = empty_acc<K>(params.p), gacc = empty_acc<K>(params.p);
    row_part(wacc, wd, w, width, lane);
    row_part(gacc, gd, g, width, lane);
    double wsum, gsum;
    unsigned long long wmax, gmax;
    wacc.totals(&wsum, &wmax);
    gacc.totals(&gsum, &gmax);
    warp_reduce(wsum, wmax);
    warp_reduce(gsum, gmax);
    const double weight_norm = norm_of<K>(wsum, wmax, params.p, 1.0);
    const double grad_norm = norm_of<K>(gsum, gmax, params.p, 1.0);
    double factor;
    if (params.out_dtype == kDouble) {
      factor = agc_factor<double>(weight_norm, grad_norm, params.eps, params.clip_factor);
      if (lane == 0) {
        static_cast<double*>(params.unit_norms)[table.row_offset + row] = grad_norm;
        static_cast<double*>(params.unit_factors)[table.row_offset + row] = factor;
      }
    } else {
      factor = agc_factor<float>(static_cast<float>(weight_norm), static_cast<float>(grad_norm),
                                 static_cast<float>(params.eps), static_cast<float>(params.clip_factor));
      if (lane == 0) {
        static_cast<float*>(params.unit_norms)[table.row_offset + row] = static_cast<float>(grad_norm);
        static_cast<float*>(params.unit_factors)[table.row_offset + row] = static_cast<float>(factor);
      }
    }
    if (factor == 1.0) continue;
    switch (gd) {
      case kHalf: scale_row<kHalf>(g, width, factor, lane); break;
      case kBFloat16: scale_row<kBFloat16>(g, width, factor, lane); break;
      case kFloat: scale_row<kFloat>(g, width, factor, lane); break;
      default: scale_row<kDouble>(g, width, factor, lane); break;
    }
  }
}

}  // namespace

int agc_grid_limit(int device, NormKind kind) {
  static std::atomic<int> cache[4][kCachedDevices];
  switch (kind) {
    case NormKind::kL2: return grid_limit(device, agc_kernel<NormKind::kL2>, cache[0], kAgcThreads);
    case NormKind::kL1: return grid_limit(device, agc_kernel<NormKind::kL1>, cache[1], kAgcThreads);
    case NormKind::kInf: return grid_limit(device, agc_kernel<NormKind::kInf>, cache[2], kAgcThreads);
    default: return grid_limit(device, agc_kernel<NormKind::kP>, cache[3], kAgcThreads);
  }
}

cudaError_t launch_agc(NormKind kind, const AgcTable& table, const AgcParams& params, int grid,
                       cudaStream_t stream) {
  switch (kind) {
    case NormKind::kL2: agc_kernel<NormKind::kL2><<<grid, kAgcThreads, 0, stream>>>(table, params); break;
    case NormKind::kL1: agc_kernel<NormKind::kL1><<<grid, kAgcThreads, 0, stream>>>(table, params); break;
    case NormKind::kInf: agc_kernel<NormKind::kInf><<<grid, kAgcThreads, 0, stream>>>(table, params); break;
    default: agc_kernel<NormKind::kP><<<grid, kAgcThreads, 0, stream>>>(table, params); break;
  }
  return cudaGetLastError();
}

}  // namespace gradclip
