// What the two kernel files (kernels.cu, agc_kernels.cu) share: how each dtype loads, stores, unpacks
// and packs, the norm accumulator and how a norm is finished, and the cached grid sizes.
// CUDA and std only (no torch headers). Templates and inline functions: each file that
// includes this compiles its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tables.h"

namespace gradclip {

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

constexpr int kCachedDevices = 64;

// Blocks that fill the device (multiprocessors x resident blocks per multiprocessor) for
// ``kernel``, cached per device in ``cache``; 0 when CUDA cannot tell (the launch that
// follows reports the error).

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

}  // namespace gradclip
