// GroupNorm (+SiLU) (+residual) forward; group_norm.cuh has the math and the interface.
//
// Three launches, two when the statistics are given:
// 1. Moments. The values of every (b, g) are cut into chunks spread over many blocks; a block reduces its
//    chunk to one or more (count, mean, m2) partials in fp32 (per-thread updates, Chan merges across
//    threads; common/moments.cuh).
//    NCHW: a group is one contiguous run of Cg·S values; blocks take chunks of it, one partial per
//      (b, g, chunk).
//    channels_last: a block takes a range of positions of one sample and a tile of channel vectors; each
//      thread follows the same VEC channels down the positions (Welford), the threads of a column merge
//      in a shared-memory tree, and the block writes one partial per (b, chunk, channel), stored as
//      (b, g, chunk, channel within the group).
// 2. Finalize. One block per (b, g) merges its partials into mean and rstd (or reads the given pair) and
//    writes, for each channel c of the group, mean, scale = rstd·weight[c] and shift = bias[c]: three
//    planes of B·C floats.
// 3. Apply. One pass reads x (and the residual) and writes y = (x - mean)·scale + shift, SiLU, + residual.
//    Rows are the contiguous runs of the layout (NCHW: the S values of a channel; channels_last: the C
//    values of a position), cut into vectors of VEC values: 8 (fp16, bf16) or 4 (fp32), 16 bytes, when
//    the row length is a multiple of VEC and the tensors are 16-byte aligned, else 1. A thread keeps the
//    affine terms of its rows (NCHW) or of its channel vector (channels_last) in registers while it walks.
//
// Memory traffic: x is read twice (the second read mostly from L2 when x fits in it, as at UNet sizes),
// the residual once, y written once; partials and affine terms are a few KB to a few MB.
#include "group_norm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/moments.cuh"
#include "common/vec.cuh"

namespace flashstep::kernels {
namespace {

constexpr int kThreads = 256;
// Work sizing: about this many moment blocks and apply blocks per launch (8 per SM on a 132-SM GPU), and
// chunks of at least kMinChunkValues values so that every thread of a moment block reads a few vectors.
constexpr std::int64_t kMomentBlocks = 1024;
constexpr std::int64_t kApplyBlocks = 2048;
constexpr std::int64_t kMinChunkValues = 4096;
// The widest vector (fp16, bf16); chunk boundaries are multiples of it.
constexpr int kMaxVec = 8;

struct Plan {
  std::int64_t chunk;               // NCHW: values per chunk, a multiple of kMaxVec; channels_last: positions
  std::int64_t chunks;              // NCHW: per group; channels_last: per sample
  std::int64_t partials_per_group;  // NCHW: chunks; channels_last: chunks·Cg
};

Plan make_plan(std::int64_t batch, std::int64_t channels, std::int64_t spatial, std::int64_t groups,
               bool channels_last) {
  const std::int64_t per_group = channels / groups;
  if (!channels_last) {
    const std::int64_t group_size = per_group * spatial;
    const std::int64_t wanted = ceil_div(kMomentBlocks, batch * groups);
    std::int64_t chunk = std::max(kMinChunkValues, ceil_div(group_size, wanted));
    chunk = ceil_div(chunk, kMaxVec) * kMaxVec;
    const std::int64_t chunks = ceil_div(group_size, chunk);
    return Plan{chunk, chunks, chunks};
  }
  const std::int64_t wanted = ceil_div(kMomentBlocks, batch);
  const std::int64_t chunk = std::max(ceil_div(kMinChunkValues, channels), ceil_div(spatial, wanted));
  const std::int64_t chunks = ceil_div(spatial, chunk);
  return Plan{chunk, chunks, chunks * per_group};
}

__device__ __forceinline__ float silu(float v) { return __fdividef(v, 1.0f + __expf(-v)); }

// ---- 1. moments -------------------------------------------------------------------------------------------

// grid: (B·G·chunks); block: kThreads. x: (B·G, group_size) contiguous; partials: (B·G, chunks, 3).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    group_moments_nchw_kernel(const T* __restrict__ x, float* __restrict__ partials, std::int64_t group_size,
                              std::int64_t chunk, std::int64_t chunks) {
  const std::int64_t block = blockIdx.x;
  const std::int64_t group = block / chunks;
  const std::int64_t begin = (block - group * chunks) * chunk;
  const std::int64_t end = std::min(begin + chunk, group_size);
  const T* values = x + group * group_size;
  Moments m = empty_moments();
#pragma unroll 4
  for (std::int64_t i = begin + static_cast<std::int64_t>(threadIdx.x) * VEC; i < end;
       i += static_cast<std::int64_t>(kThreads) * VEC) {
    float v[VEC];
    load_floats<VEC>(values + i, v);
    m = merge(m, moments_of<VEC>(v));
  }
  m = block_merge<kThreads>(m);
  if (threadIdx.x == 0) {
    float* out = partials + block * 3;
    out[0] = m.count;
    out[1] = m.mean;
    out[2] = m.m2;
  }
}

// grid: (B·chunks, channel-vector tiles); block: (TX, TY), TY a power of two, TX·TY <= kThreads.
// x: (B, S, C); partials: (B, G, chunks, Cg, 3).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    group_moments_channels_last_kernel(const T* __restrict__ x, float* __restrict__ partials, std::int64_t spatial,
                                       std::int64_t channels, std::int64_t per_group, std::int64_t chunk,
                                       std::int64_t chunks) {
  constexpr int kStride = 2 * VEC + 1;  // count, mean[VEC], m2[VEC]
  __shared__ float shared[kThreads * kStride];
  const std::int64_t b = blockIdx.x / chunks;
  const std::int64_t chunk_index = blockIdx.x - b * chunks;
  const std::int64_t vector = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const std::int64_t vectors = channels / VEC;
  const std::int64_t row_begin = chunk_index * chunk;
  const std::int64_t row_end = std::min(row_begin + chunk, spatial);

  float count = 0.0f, mean[VEC], m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = 0.0f;
  if (vector < vectors) {
    const T* column = x + b * spatial * channels + vector * VEC;
    for (std::int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      float v[VEC];
      load_floats<VEC>(column + row * channels, v);
      count += 1.0f;
      const float inverse = 1.0f / count;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float delta = v[k] - mean[k];
        mean[k] += delta * inverse;
        m2[k] += delta * (v[k] - mean[k]);
      }
    }
  }

  float* mine = shared + (threadIdx.y * blockDim.x + threadIdx.x) * kStride;
  mine[0] = count;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    mine[1 + k] = mean[k];
    mine[1 + VEC + k] = m2[k];
  }
  for (unsigned stride = blockDim.y / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.y < stride) {
      const float* other = shared + ((threadIdx.y + stride) * blockDim.x + threadIdx.x) * kStride;
      float merged_count = count;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const Moments merged = merge(Moments{count, mean[k], m2[k]}, Moments{other[0], other[1 + k], other[1 + VEC + k]});
        merged_count = merged.count;
        mean[k] = merged.mean;
        m2[k] = merged.m2;
        mine[1 + k] = mean[k];
        mine[1 + VEC + k] = m2[k];
      }
      count = merged_count;
      mine[0] = count;
    }
  }

  if (threadIdx.y == 0 && vector < vectors) {
    const std::int64_t groups = channels / per_group;
    // Channel counts fit in 32 bits; 32-bit division keeps this loop free of a division call.
    const std::uint32_t group_channels = static_cast<std::uint32_t>(per_group);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const std::uint32_t c = static_cast<std::uint32_t>(vector * VEC + k);
      const std::uint32_t g = c / group_channels;
      float* out = partials + (((b * groups + g) * chunks + chunk_index) * per_group + (c - g * group_channels)) * 3;
      out[0] = count;
      out[1] = mean[k];
      out[2] = m2[k];
    }
  }
}

// ---- 2. finalize ------------------------------------------------------------------------------------------

// grid: (B·G); block: kThreads. affine: planes mean, scale, shift, each (B, C).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_norm_finalize_kernel(const float* __restrict__ partials, std::int64_t partials_per_group,
                               const float* __restrict__ given_mean, const float* __restrict__ given_rstd,
                               const T* __restrict__ weight, const T* __restrict__ bias, float* __restrict__ affine,
                               std::int64_t batch_channels, std::int64_t channels, std::int64_t groups, float eps) {
  __shared__ float group_mean, group_rstd;
  const std::int64_t group = blockIdx.x;
  const std::int64_t b = group / groups;
  const std::int64_t g = group - b * groups;
  if (given_mean != nullptr) {
    if (threadIdx.x == 0) {
      group_mean = given_mean[group];
      group_rstd = given_rstd[group];
    }
  } else {
    Moments m = empty_moments();
    for (std::int64_t i = threadIdx.x; i < partials_per_group; i += kThreads) {
      const float* p = partials + (group * partials_per_group + i) * 3;
      m = merge(m, Moments{p[0], p[1], p[2]});
    }
    m = block_merge<kThreads>(m);
    if (threadIdx.x == 0) {
      const float variance = fmaxf(m.m2 / m.count, 0.0f);
      group_mean = m.mean;
      group_rstd = 1.0f / sqrtf(variance + eps);
    }
  }
  __syncthreads();
  const std::int64_t per_group = channels / groups;
  for (std::int64_t j = threadIdx.x; j < per_group; j += kThreads) {
    const std::int64_t c = g * per_group + j;
    const float w = weight != nullptr ? to_float(weight[c]) : 1.0f;
    const float s = bias != nullptr ? to_float(bias[c]) : 0.0f;
    const std::int64_t index = b * channels + c;
    affine[index] = group_mean;
    affine[batch_channels + index] = group_rstd * w;
    affine[2 * batch_channels + index] = s;
  }
}

// ---- 3. apply ---------------------------------------------------------------------------------------------

template <int VEC, typename T>
__device__ __forceinline__ void apply_vector(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                                             std::int64_t offset, const float (&mean)[VEC], const float (&scale)[VEC],
                                             const float (&shift)[VEC], bool with_silu) {
  float v[VEC];
  load_floats<VEC>(x + offset, v);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    v[k] = (v[k] - mean[k]) * scale[k] + shift[k];
    if (with_silu) v[k] = silu(v[k]);
  }
  if (residual != nullptr) {
    float r[VEC];
    load_floats<VEC>(residual + offset, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] += r[k];
  }
  store_floats<VEC>(y + offset, v);
}

// grid: (row blocks, vector blocks, B); block: (TX, TY). Rows of sample b: NCHW the C channels (S values
// each), channels_last the S positions (C values each); a row is cut into vectors of VEC values.
template <typename T, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kThreads)
    group_norm_apply_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                            const float* __restrict__ affine, std::int64_t batch_channels, std::int64_t channels,
                            std::int64_t spatial, bool with_silu) {
  const std::int64_t b = blockIdx.z;
  const std::int64_t rows = CHANNELS_LAST ? spatial : channels;
  const std::int64_t row_length = CHANNELS_LAST ? channels : spatial;
  const std::int64_t vectors = row_length / VEC;
  const std::int64_t sample = b * channels * spatial;
  const float* mean = affine + b * channels;
  const float* scale = mean + batch_channels;
  const float* shift = scale + batch_channels;
  const std::int64_t first_row = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.x) * blockDim.y;
  const std::int64_t first_vector = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const std::int64_t vector_step = static_cast<std::int64_t>(gridDim.y) * blockDim.x;
  if constexpr (CHANNELS_LAST) {
    for (std::int64_t vector = first_vector; vector < vectors; vector += vector_step) {
      float m[VEC], s[VEC], t[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        m[k] = mean[vector * VEC + k];
        s[k] = scale[vector * VEC + k];
        t[k] = shift[vector * VEC + k];
      }
#pragma unroll 2
      for (std::int64_t row = first_row; row < rows; row += row_step) {
        apply_vector<VEC>(x, residual, y, sample + row * row_length + vector * VEC, m, s, t, with_silu);
      }
    }
  } else {
    for (std::int64_t row = first_row; row < rows; row += row_step) {
      float m[VEC], s[VEC], t[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        m[k] = mean[row];
        s[k] = scale[row];
        t[k] = shift[row];
      }
#pragma unroll 2
      for (std::int64_t vector = first_vector; vector < vectors; vector += vector_step) {
        apply_vector<VEC>(x, residual, y, sample + row * row_length + vector * VEC, m, s, t, with_silu);
      }
    }
  }
}

// ---- launch -----------------------------------------------------------------------------------------------

template <typename T, int VEC>
cudaError_t launch(const GroupNormParams& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const std::int64_t per_group = p.channels / p.groups;
  const std::int64_t batch_channels = p.batch * p.channels;
  const Plan plan = make_plan(p.batch, p.channels, p.spatial, p.groups, p.channels_last);
  float* partials = p.workspace;
  float* affine = p.workspace + p.batch * p.groups * plan.partials_per_group * 3;

  if (p.mean == nullptr) {
    if (p.channels_last) {
      const std::int64_t vectors = p.channels / VEC;
      const int tx = static_cast<int>(std::min<std::int64_t>(vectors, 128));
      int ty = 1;
      while (tx * ty * 2 <= kThreads) ty *= 2;
      const dim3 grid(static_cast<unsigned>(p.batch * plan.chunks), static_cast<unsigned>(ceil_div(vectors, tx)));
      group_moments_channels_last_kernel<T, VEC><<<grid, dim3(tx, ty), 0, stream>>>(
          x, partials, p.spatial, p.channels, per_group, plan.chunk, plan.chunks);
    } else {
      const std::int64_t blocks = p.batch * p.groups * plan.chunks;
      group_moments_nchw_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x, partials, per_group * p.spatial, plan.chunk, plan.chunks);
    }
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }

  group_norm_finalize_kernel<T><<<static_cast<unsigned>(p.batch * p.groups), kThreads, 0, stream>>>(
      partials, plan.partials_per_group, p.mean, p.rstd, static_cast<const T*>(p.weight),
      static_cast<const T*>(p.bias), affine, batch_channels, p.channels, p.groups, p.eps);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;

  const std::int64_t rows = p.channels_last ? p.spatial : p.channels;
  const std::int64_t vectors = (p.channels_last ? p.channels : p.spatial) / VEC;
  const int tx = static_cast<int>(std::min<std::int64_t>(vectors, kThreads));
  const int ty = std::max(1, kThreads / tx);
  const std::int64_t vector_blocks = std::min(ceil_div(vectors, tx), kMaxGridYZ);
  const std::int64_t row_blocks =
      clamp_to<std::int64_t>(ceil_div(kApplyBlocks, vector_blocks * p.batch), 1, ceil_div(rows, ty));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(vector_blocks),
                  static_cast<unsigned>(p.batch));
  if (p.channels_last) {
    group_norm_apply_kernel<T, VEC, true><<<grid, dim3(tx, ty), 0, stream>>>(
        x, residual, y, affine, batch_channels, p.channels, p.spatial, p.silu);
  } else {
    group_norm_apply_kernel<T, VEC, false><<<grid, dim3(tx, ty), 0, stream>>>(
        x, residual, y, affine, batch_channels, p.channels, p.spatial, p.silu);
  }
  status = cudaGetLastError();
  return status;
}

}  // namespace

std::size_t group_norm_workspace_floats(std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                                        std::int64_t groups, bool channels_last) {
  if (batch <= 0 || channels <= 0 || spatial <= 0 || groups <= 0 || channels % groups != 0) return 0;
  const Plan plan = make_plan(batch, channels, spatial, groups, channels_last);
  return static_cast<std::size_t>(batch * groups * plan.partials_per_group * 3 + 3 * batch * channels);
}

cudaError_t group_norm(const GroupNormParams& p, cudaStream_t stream) {
  if (p.x == nullptr || p.y == nullptr || p.workspace == nullptr || (p.mean == nullptr) != (p.rstd == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.batch <= 0 || p.channels <= 0 || p.spatial <= 0 || p.groups <= 0 || p.channels % p.groups != 0 ||
      p.batch > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = kVec16<T>;
    const std::int64_t row_length = p.channels_last ? p.channels : p.spatial;
    const bool vectorised = row_length % kVec == 0 && aligned_to(p.x, 16) && aligned_to(p.y, 16) &&
                            (p.residual == nullptr || aligned_to(p.residual, 16));
    return vectorised ? launch<T, kVec>(p, stream) : launch<T, 1>(p, stream);
  });
}

}  // namespace flashstep::kernels
