// The GEGLU gate; geglu.cuh has the math and the interface.
//
// A block is (TX, TY) threads: TX threads along a row's inner features in vectors of VEC values, TY rows
// at a time, grid-stride over rows. VEC is 8 (fp16, bf16) or 4 (fp32), 16-byte loads of h and g and a
// 16-byte store, when inner is a multiple of VEC and both tensors are 16-byte aligned, else 1. GELU is the
// exact erf form, as torch.nn.functional.gelu's default.
#include "geglu.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/vec.cuh"

namespace flashstep::kernels {
namespace {

constexpr int kThreads = 256;
// About this many blocks per launch (8 per SM on a 132-SM GPU); rows beyond them are grid-strided.
constexpr std::int64_t kTargetBlocks = 1024;

__device__ __forceinline__ float gelu(float g) { return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)); }

// grid: (row blocks, vector blocks); block: (TX, TY).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    geglu_kernel(const T* __restrict__ projection, T* __restrict__ out, std::int64_t rows, std::int64_t inner) {
  const std::int64_t vectors = inner / VEC;
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.x) * blockDim.y;
  const std::int64_t vector_step = static_cast<std::int64_t>(gridDim.y) * blockDim.x;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += row_step) {
    const T* hidden = projection + row * 2 * inner;
    const T* gate = hidden + inner;
    T* destination = out + row * inner;
    for (std::int64_t vector = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; vector < vectors;
         vector += vector_step) {
      float h[VEC], g[VEC];
      load_floats<VEC>(hidden + vector * VEC, h);
      load_floats<VEC>(gate + vector * VEC, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) h[k] *= gelu(g[k]);
      store_floats<VEC>(destination + vector * VEC, h);
    }
  }
}

template <typename T, int VEC>
cudaError_t launch(const GegluParams& p, cudaStream_t stream) {
  const std::int64_t vectors = p.inner / VEC;
  const int tx = static_cast<int>(std::min<std::int64_t>(vectors, kThreads));
  const int ty = std::max(1, kThreads / tx);
  const std::int64_t vector_blocks = std::min(ceil_div(vectors, tx), kMaxGridYZ);
  const std::int64_t row_blocks =
      clamp_to<std::int64_t>(ceil_div(kTargetBlocks, vector_blocks), 1, std::min(ceil_div(p.rows, ty), kMaxGridX));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(vector_blocks));
  geglu_kernel<T, VEC><<<grid, dim3(tx, ty), 0, stream>>>(static_cast<const T*>(p.projection), static_cast<T*>(p.out),
                                                          p.rows, p.inner);
  return cudaGetLastError();
}

}  // namespace

cudaError_t geglu(const GegluParams& p, cudaStream_t stream) {
  if (p.projection == nullptr || p.out == nullptr || p.rows <= 0 || p.inner <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = kVec16<T>;
    const bool vectorised = p.inner % kVec == 0 && aligned_to(p.projection, 16) && aligned_to(p.out, 16);
    return vectorised ? launch<T, kVec>(p, stream) : launch<T, 1>(p, stream);
  });
}

}  // namespace flashstep::kernels
