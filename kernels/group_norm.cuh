// GroupNorm (+SiLU) (+residual) forward: the launcher's interface.
//
// x (B, C, S) with S the product of the spatial sizes, stored NCHW-contiguous, or channels_last as
// (B, S, C); G groups of Cg = C/G consecutive channels. Per (b, g), over its Cg·S values:
//   mean, var (biased), rstd = 1/sqrt(var + eps)            or the given (mean, rstd), each (B, G) fp32
//   y = (x - mean)·rstd·weight[c] + bias[c];  y = y·sigmoid(y) when silu;  y += residual
// y and the residual have x's shape and layout. Arithmetic and statistics are fp32. The algorithm is
// described in kernels/group_norm.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.cuh"

namespace flashstep::kernels {

struct GroupNormParams {
  const void* x;         // (B, C, S) or (B, S, C)
  void* y;               // like x
  const void* weight;    // (C,) or null (ones)
  const void* bias;      // (C,) or null (zeros)
  const void* residual;  // like x, or null
  const float* mean;     // (B, G) given statistics, or null to compute them
  const float* rstd;     // (B, G), given with mean
  float* workspace;      // group_norm_workspace_floats(...) floats, any contents
  std::int64_t batch;
  std::int64_t channels;
  std::int64_t spatial;
  std::int64_t groups;
  float eps;
  bool silu;
  bool channels_last;
  DType dtype;  // of x, y, weight, bias and residual
};

// Floats of workspace the launch needs for these sizes.
std::size_t group_norm_workspace_floats(std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                                        std::int64_t groups, bool channels_last);

// Launches on `stream`. cudaErrorInvalidValue when the sizes are not positive, G does not divide C, B exceeds
// 65535 or a required pointer is null; otherwise the status of the launches.
cudaError_t group_norm(const GroupNormParams& params, cudaStream_t stream);

}  // namespace flashstep::kernels
