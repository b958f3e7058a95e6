// The plain C++ interface of AGC's kernel (agc_kernels.cu), called by agc.cpp. No torch types here.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "tables.h"

namespace gradclip {

struct AgcParams {
  double p;
  double clip_factor;
  double eps;
  void* unit_norms;     // one gradient norm per row of the call, dtype out_dtype
  void* unit_factors;   // one factor per row (1 where not clipped), dtype out_dtype
  int32_t out_dtype;    // kFloat or kDouble: also the precision of the factor
};

static_assert(sizeof(AgcTable) + sizeof(AgcParams) <= 32764, "AGC kernel parameters too large");

// AGC over one table: each row's weight and gradient read once, the gradient row scaled
// in place (re-read from cache) only when its factor is not 1; writes every row's norm and
// factor.
int agc_grid_limit(int device, NormKind kind);
cudaError_t launch_agc(NormKind kind, const AgcTable& table, const AgcParams& params, int grid,
                       cudaStream_t stream);

}  // namespace gradclip
