// The multi-tensor kernels and their launchers. CUDA and std only (no torch headers):
// this file is the slow one to compile, so it stays small.
//
// Every kernel walks a TensorTable the same way (device_helpers.cuh): a block takes a
// contiguous run of 64 KiB chunks, finds its first tensor by binary search and walks on;
// within a tensor, threads read 16-byte vectors, with scalar heads and tails where a
// tensor (a view with a storage offset) does not start on a 16-byte boundary.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "device_helpers.cuh"
#include "kernels.h"

namespace gradclip {
namespace {

// 16-byte vectors each thread keeps in flight.
constexpr int kUnroll = 4;
constexpr int kWarps = kBlockThreads / 32;
constexpr unsigned long long kInfBits = 0x7ff0000000000000ull;  // +inf as a double
constexpr unsigned long long kNanBits = 0x7ff8000000000000ull;

// How each dtype loads, stores, unpacks and packs; 16/32-bit types compute in float.
template <int D>
struct Traits;

template <>
struct Traits<kFloat> {
  using Compute = float;
  static constexpr int kSize = 4, kPerVector = 4;
  static __device__ __forceinline__ float load(const char* p, int64_t i) {
    return reinterpret_cast<const float*>(p)[i];
  }
  static __device__ __forceinline__ void store(char* p, int64_t i, float x) {
    reinterpret_cast<float*>(p)[i] = x;
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* x) {
    x[0] = __uint_as_float(v.x);
    x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z);
    x[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
};

template <>
struct Traits<kBFloat16> {
  using Compute = float;
  static constexpr int kSize = 2, kPerVector = 8;
  static __device__ __forceinline__ float load(const char* p, int64_t i) {
    return __uint_as_float(static_cast<unsigned int>(reinterpret_cast<const unsigned short*>(p)[i])
                           << 16);
  }
  static __device__ __forceinline__ void store(char* p, int64_t i, float x) {
    reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* x) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __uint_as_float(w[k] << 16);
      x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(x[2 * k], x[2 * k + 1]);
      memcpy(&w[k], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Traits<kHalf> {
  using Compute = float;
  static constexpr int kSize = 2, kPerVector = 8;
  static __device__ __forceinline__ float load(const char* p, int64_t i) {
    return __half2float(reinterpret_cast<const __half*>(p)[i]);
  }
  static __device__ __forceinline__ void store(char* p, int64_t i, float x) {
    reinterpret_cast<__half*>(p)[i] = __float2half_rn(x);
  }
  static __device__ __forceinline__ void unpack(const uint4& v, float* x) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      __half2 h;
      memcpy(&h, &w[k], 4);
      const float2 f = __half22float2(h);
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const float* x) {
    unsigned int w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __half2 h = __floats2half2_rn(x[2 * k], x[2 * k + 1]);
      memcpy(&w[k], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Traits<kDouble> {
  using Compute = double;
  static constexpr int kSize = 8, kPerVector = 2;
  static __device__ __forceinline__ double load(const char* p, int64_t i) {
    return reinterpret_cast<const double*>(p)[i];
  }
  static __device__ __forceinline__ void store(char* p, int64_t i, double x) {
    reinterpret_cast<double*>(p)[i] = x;
  }
  static __device__ __forceinline__ void unpack(const uint4& v, double* x) {
    x[0] = __hiloint2double(static_cast<int>(v.y), static_cast<int>(v.x));
    x[1] = __hiloint2double(static_cast<int>(v.w), static_cast<int>(v.z));
  }
  static __device__ __forceinline__ uint4 pack(const double* x) {
    return make_uint4(static_cast<unsigned int>(__double2loint(x[0])),
                      static_cast<unsigned int>(__double2hiint(x[0])),
                      static_cast<unsigned int>(__double2loint(x[1])),
                      static_cast<unsigned int>(__double2hiint(x[1])));
  }
};

__device__ __forceinline__ double read_scalar(const void* p, int dtype) {
  return dtype == kDouble ? *static_cast<const double*>(p)
                          : static_cast<double>(*static_cast<const float*>(p));
}

// Calls f(i, dtype, first, last) for each tensor i of the table that this block's chunks
// touch, with the element range [first, last) they cover.
template <typename F>
__device__ __forceinline__ void for_each_span(const TensorTable& table, F&& f) {
  int64_t c0, c1;
  block_chunk_range(table.num_chunks, gridDim.x, blockIdx.x, &c0, &c1);
  for (int i = first_tensor_after(table, c0); i < table.num_tensors && chunk_begin(table, i) < c1;
       ++i) {
    int64_t first, last;
    if (element_range(table, i, c0, c1, &first, &last)) f(i, table.dtype[i], first, last);
  }
}

// ---------------------------------------------------------------------------------------
// Norm

// Per-thread state. 16/32-bit inputs accumulate in float, float64 inputs in double. The
// largest |x| is kept as bits (sign cleared): as integers, NaN > inf > every finite
// value, so one integer max per element yields the inf-norm, the inf/NaN flag and the
// NaN flag, where fmaxf would drop a NaN.
template <NormKind K>
struct NormAcc {
  float sum_f = 0.f;
  double sum_d = 0.0;
  unsigned int amax_f = 0;
  unsigned long long amax_d = 0;
  float scale_f, p_f;
  double scale_d, p_d;

  __device__ __forceinline__ float term(float x) const {
    if constexpr (K == NormKind::kL2) {
      const float y = x * scale_f;
      return y * y;
    } else if constexpr (K == NormKind::kL1) {
      return fabsf(x * scale_f);
    } else {
      return powf(fabsf(x * scale_f), p_f);
    }
  }
  __device__ __forceinline__ double term(double x) const {
    if constexpr (K == NormKind::kL2) {
      const double y = x * scale_d;
      return y * y;
    } else if constexpr (K == NormKind::kL1) {
      return fabs(x * scale_d);
    } else {
      return pow(fabs(x * scale_d), p_d);
    }
  }
  __device__ __forceinline__ void track(float x) {
    amax_f = max(amax_f, __float_as_uint(x) & 0x7fffffffu);
  }
  __device__ __forceinline__ void track(double x) {
    amax_d = max(amax_d, static_cast<unsigned long long>(__double_as_longlong(x)) & ~(1ull << 63));
  }
  __device__ __forceinline__ void add_sum(float s) { sum_f += s; }
  __device__ __forceinline__ void add_sum(double s) { sum_d += s; }

  template <typename C>
  __device__ __forceinline__ void add(C x) {
    track(x);
    if constexpr (K != NormKind::kInf) add_sum(term(x));
  }

  // The same accumulator, emptied (for one tensor's span).
  __device__ __forceinline__ NormAcc fresh() const {
    NormAcc out;
    out.scale_f = scale_f;
    out.scale_d = scale_d;
    out.p_f = p_f;
    out.p_d = p_d;
    return out;
  }
  __device__ __forceinline__ void merge(const NormAcc& other) {
    sum_f += other.sum_f;
    sum_d += other.sum_d;
    amax_f = max(amax_f, other.amax_f);
    amax_d = max(amax_d, other.amax_d);
  }
  // This thread's (sum, largest |x| bits as a double) for a block reduction.
  __device__ __forceinline__ void totals(double* sum, unsigned long long* amax) const {
    *sum = static_cast<double>(sum_f) + sum_d;
    const double amax_float = static_cast<double>(__uint_as_float(amax_f));  // NaN stays NaN
    *amax = max(static_cast<unsigned long long>(__double_as_longlong(amax_float)), amax_d);
  }

  template <int D>
  __device__ __forceinline__ void add_vector(const uint4& v) {
    using C = typename Traits<D>::Compute;
    C x[Traits<D>::kPerVector];
    Traits<D>::unpack(v, x);
    C local = 0;
#pragma unroll
    for (int e = 0; e < Traits<D>::kPerVector; ++e) {
      track(x[e]);
      if constexpr (K != NormKind::kInf) local += term(x[e]);
    }
    if constexpr (K != NormKind::kInf) add_sum(local);
  }
};

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

// The norm from a (sum, largest |x| bits) total: NaN when any element was NaN.
template <NormKind K>
__device__ double norm_of(double sum, unsigned long long amax_bits, double p, double inv) {
  double norm;
  if constexpr (K == NormKind::kL2) {
    norm = sqrt(sum);
  } else if constexpr (K == NormKind::kL1) {
    norm = sum;
  } else if constexpr (K == NormKind::kP) {
    norm = pow(sum, 1.0 / p);
  } else {
    // The max was taken over the raw values; scaling by |inv| commutes with it exactly.
    norm = __longlong_as_double(static_cast<long long>(amax_bits)) * fabs(inv);
  }
  if (amax_bits > kInfBits) norm = __longlong_as_double(static_cast<long long>(kNanBits));
  return norm;
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
// AGC

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
// cache) only when its factor is not 1, and one norm per row. A warp per row: rows of
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
      if (lane == 0) static_cast<double*>(params.unit_norms)[table.row_offset + row] = grad_norm;
    } else {
      factor = agc_factor<float>(static_cast<float>(weight_norm), static_cast<float>(grad_norm),
                                 static_cast<float>(params.eps), static_cast<float>(params.clip_factor));
      if (lane == 0) static_cast<float*>(params.unit_norms)[table.row_offset + row] = static_cast<float>(grad_norm);
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

// ---------------------------------------------------------------------------------------
// Host side

constexpr int kCachedDevices = 64;

template <typename Kernel>
int grid_limit(int device, Kernel kernel, std::atomic<int>* cache, int threads = kBlockThreads) {
  if (device >= 0 && device < kCachedDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess) {
    cudaGetLastError();
    return 0;  // the launch that follows reports the error
  }
  const int limit = (sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  if (device >= 0 && device < kCachedDevices) cache[device].store(limit, std::memory_order_relaxed);
  return limit;
}

}  // namespace

int norm_grid_limit(int device, NormKind kind) {
  static std::atomic<int> cache[4][kCachedDevices];
  switch (kind) {
    case NormKind::kL2: return grid_limit(device, norm_kernel<NormKind::kL2>, cache[0]);
    case NormKind::kL1: return grid_limit(device, norm_kernel<NormKind::kL1>, cache[1]);
    case NormKind::kInf: return grid_limit(device, norm_kernel<NormKind::kInf>, cache[2]);
    default: return grid_limit(device, norm_kernel<NormKind::kP>, cache[3]);
  }
}

int agc_grid_limit(int device, NormKind kind) {
  static std::atomic<int> cache[4][kCachedDevices];
  switch (kind) {
    case NormKind::kL2: return grid_limit(device, agc_kernel<NormKind::kL2>, cache[0], kAgcThreads);
    case NormKind::kL1: return grid_limit(device, agc_kernel<NormKind::kL1>, cache[1], kAgcThreads);
    case NormKind::kInf: return grid_limit(device, agc_kernel<NormKind::kInf>, cache[2], kAgcThreads);
    default: return grid_limit(device, agc_kernel<NormKind::kP>, cache[3], kAgcThreads);
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

bool simulate_agc_rows(const AgcTable& table, int grid, uint8_t* const* visits) {
  bool ok = true;
  const int64_t warps = int64_t{grid} * (kAgcThreads / 32);
  for (int64_t warp = 0; warp < warps; ++warp) {
    for (int64_t row = warp; row < table.num_rows; row += warps) {
      const int i = agc_tensor_of(table, row);
      if (i >= table.num_tensors) {
        ok = false;
        continue;
      }
      const int64_t r = row - (i == 0 ? 0 : table.row_end[i - 1]);
      const int64_t rows = table.row_end[i] - (i == 0 ? 0 : table.row_end[i - 1]);
      if (r < 0 || r >= rows) {
        ok = false;
        continue;
      }
      for (int lane = 0; lane < 32; ++lane) {
        for (int64_t e = lane; e < table.width[i]; e += 32) ++visits[i][r * table.width[i] + e];
      }
    }
  }
  return ok;
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

bool simulate_tensor_slots(const TensorTable& table, int grid, int block_offset, int tensor_offset,
                           uint8_t* slot_writes, int64_t num_slots) {
  bool ok = true;
  // What the norm kernel writes: for_each_span's walk, block by block.
  for (int block = 0; block < grid; ++block) {
    int64_t c0, c1;
    block_chunk_range(table.num_chunks, grid, block, &c0, &c1);
    for (int i = first_tensor_after(table, c0); i < table.num_tensors && chunk_begin(table, i) < c1;
         ++i) {
      int64_t first, last;
      if (!element_range(table, i, c0, c1, &first, &last)) continue;
      const int64_t slot = int64_t{block_offset} + block + tensor_offset + i;
      if (slot < 0 || slot >= num_slots || slot_writes[slot] != 0) {
        ok = false;
        continue;
      }
      slot_writes[slot] = 1;
      // What the finaliser reads for tensor i must include this block.
      int64_t b0, b1;
      tensor_blocks(table.num_chunks, grid, chunk_begin(table, i), table.chunk_end[i], &b0, &b1);
      if (block < b0 || block >= b1) ok = false;
    }
  }
  // Every block the finaliser reads was written.
  for (int i = 0; i < table.num_tensors; ++i) {
    int64_t b0, b1;
    tensor_blocks(table.num_chunks, grid, chunk_begin(table, i), table.chunk_end[i], &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t slot = int64_t{block_offset} + b + tensor_offset + i;
      if (b < 0 || b >= grid || slot >= num_slots || slot_writes[slot] != 1) ok = false;
    }
  }
  return ok;
}

bool simulate_visits(const TensorTable& table, int grid, int threads, uint8_t* const* visits) {
  bool ok = true;
  auto visit = [&](int i, int64_t e) {
    if (e < 0 || e >= table.numel[i]) {
      ok = false;
    } else {
      ++visits[i][e];
    }
  };
  for (int block = 0; block < grid; ++block) {
    int64_t c0, c1;
    block_chunk_range(table.num_chunks, grid, block, &c0, &c1);
    for (int i = first_tensor_after(table, c0); i < table.num_tensors && chunk_begin(table, i) < c1;
         ++i) {
      int64_t first, last;
      if (!element_range(table, i, c0, c1, &first, &last)) continue;
      const int size = dtype_size(table.dtype[i]);
      const int per_vector = 16 / size;
      const uintptr_t address = reinterpret_cast<uintptr_t>(table.ptr[i]) + first * size;
      const SpanPlan plan = plan_span(address, size, last - first);
      if (plan.vectors > 0 && (address + plan.head * size) % 16 != 0) ok = false;
      if (plan.head + plan.vectors * per_vector + plan.tail != last - first) ok = false;
      const int64_t body = first + plan.head, tail = body + plan.vectors * per_vector;
      for (int t = 0; t < threads; ++t) {
        for (int64_t k = t; k < plan.head; k += threads) visit(i, first + k);
        for (int64_t v = t; v < plan.vectors; v += int64_t{threads} * kUnroll) {
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t j = v + int64_t{u} * threads;
            if (j < plan.vectors) {
              for (int e = 0; e < per_vector; ++e) visit(i, body + j * per_vector + e);
            }
          }
        }
        for (int64_t k = t; k < plan.tail; k += threads) visit(i, tail + k);
      }
    }
  }
  return ok;
}

}  // namespace gradclip
