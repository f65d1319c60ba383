// The LoRA branch added onto a base output in place: the launcher's interface.
//
// For every sample b, with P_b = scale·B·Mᵀ_b (Cout × r, fp32, precomputed) and t_b = A·x_b the rank-r
// activations (the LoRA down projection or convolution):
//   y[b, c, p] += Σ_k P_b[c, k] · t[b, k, p]          for c < Cout, p < positions, k < r
// in one pass over y, fp32 accumulation. Two arrangements:
//   channels inner (channels_last maps, linear rows): y (B, positions, Cout), t (B, positions, r)
//   channels outer (NCHW maps):                       y (B, Cout, positions), t (B, r, positions)
// all contiguous; positions is H·W of a feature map or the rows of a linear layer per sample.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace flashstep::kernels {

constexpr int kLoraMaxRank = 64;

struct LoraEpilogueParams {
  void* y;                        // updated in place
  const void* t;                  // same element type as y
  const float* mixed_up;          // P: (B or 1, Cout, r) contiguous fp32
  std::int64_t mixed_up_stride;   // elements between samples of P: Cout·r, or 0 when one P serves all
  std::int64_t batch;             // B
  std::int64_t channels;          // Cout
  std::int64_t positions;         // per sample
  int rank;                       // r, 1..kLoraMaxRank
  bool channels_inner;
  DType dtype;                    // of y and t
};

// Launches on `stream`. cudaErrorInvalidValue when a pointer is null, a size is not positive, the rank is
// outside 1..kLoraMaxRank or B exceeds 65535; otherwise the launch's status.
cudaError_t lora_epilogue(const LoraEpilogueParams& params, cudaStream_t stream);

}  // namespace flashstep::kernels
