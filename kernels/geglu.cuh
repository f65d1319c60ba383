// The GEGLU gate: the launcher's interface.
//
//   out[i, j] = h · gelu(g),  h = projection[i, j],  g = projection[i, inner + j],  gelu(g) = g·½·(1 + erf(g/√2))
//
// projection: (rows, 2·inner) contiguous, the output of x·Wᵀ + bias (+ LoRA); out: (rows, inner)
// contiguous. fp32 arithmetic; reads the projection once and writes half of it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace flashstep::kernels {

struct GegluParams {
  const void* projection;  // (rows, 2·inner)
  void* out;               // (rows, inner)
  std::int64_t rows;
  std::int64_t inner;
  DType dtype;  // of both
};

// Launches on `stream`. cudaErrorInvalidValue when a pointer is null or a size is not positive; otherwise the
// launch's status.
cudaError_t geglu(const GegluParams& params, cudaStream_t stream);

}  // namespace flashstep::kernels
