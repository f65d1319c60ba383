// Scaled dot-product attention forward (no mask), flash formulation: the launcher's interface.
//
//   out[b, h] = softmax(scale · q[b, h] · k[b, h]ᵀ) · v[b, h]
//
// q: (B, H, N, D), k and v: (B, H, M, D), out: (B, H, N, D), all of one element type, each with its own
// batch, head and row strides (in elements) and a contiguous last dim. D from 1 to
// kAttentionMaxHeadDim. The algorithm, the tiling and the shared-memory budget are described in
// kernels/attention.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace flashstep::kernels {

constexpr int kAttentionMaxHeadDim = 512;

// fp16 and bf16 rows are copied in 16-byte pieces: their head dim, strides and base addresses must be
// multiples of this many elements (8) and of 16 bytes. fp32 has no such requirement.
constexpr int kAttentionLowPrecisionAlignment = 8;

enum class AttentionElement { kFloat32, kFloat16, kBFloat16 };

struct AttentionParams {
  const void* q;  // (B, H, N, D)
  const void* k;  // (B, H, M, D)
  const void* v;  // (B, H, M, D)
  void* out;      // (B, H, N, D)
  std::int64_t q_stride_batch, q_stride_head, q_stride_row;
  std::int64_t k_stride_batch, k_stride_head, k_stride_row;
  std::int64_t v_stride_batch, v_stride_head, v_stride_row;
  std::int64_t out_stride_batch, out_stride_head, out_stride_row;
  int batch;     // B
  int heads;     // H
  int q_len;     // N
  int kv_len;    // M, at least 1
  int head_dim;  // D
  float scale;   // any finite value; D^-1/2 is the usual one
};

// Launches the forward on `stream`. Returns cudaErrorInvalidValue when the sizes, strides or alignment
// break the contract above, else the launch's status. Nothing is launched when B, H or N is 0.
cudaError_t attention_forward(const AttentionParams& params, AttentionElement element, cudaStream_t stream);

}  // namespace flashstep::kernels
