// The LoRA branch added onto a base output in place; lora_epilogue.cuh has the math and the interface.
//
// Per sample this is a small GEMM, y_b += P_b · t_b (Cout × r times r × positions), accumulated into y in
// one pass over y. A block owns a tile of positions of one sample: it stages that tile of t (r × tile) in
// shared memory once, then walks tiles of channels, staging the matching rows of P (r × tile, fp32) in
// shared memory and giving each thread a 4 × VEC block of outputs: VEC consecutive values along the
// contiguous dim of y (one 16-byte load and store) by 4 along the other dim. Per k each thread reads one
// float4 and VEC floats from shared memory for 4·VEC FMAs.
//
//                     contiguous dim of y   tile: positions × channels   per thread
//   channels inner    channels              32 × 16·VEC                  4 positions × VEC channels
//   channels outer    positions             128 × 4·VEC                  VEC positions × 4 channels
//
// VEC is 8 (fp16, bf16) or 4 (fp32) when the contiguous dim is a multiple of it and y is 16-byte
// aligned, else 1. Shared memory: r·(positions + channels of a tile)·4 bytes, at most 40 KB at r = 64.
// When there are few position tiles, the channel tiles of one position tile are split over blockIdx.y so
// that the GPU fills; the t tile is then read once per split (from L2).
//
// Cost: FMAs 2·r per output value; bytes one read and one write of y plus one read of t (r/Cout of y).
#include "lora_epilogue.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "common/vec.cuh"

namespace flashstep::kernels {
namespace {

constexpr int kThreads = 128;
// About this many blocks per launch (8 per SM on a 132-SM GPU) before channel tiles are split.
constexpr std::int64_t kTargetBlocks = 1024;

template <int VEC, bool CHANNELS_INNER>
struct Tile {
  static constexpr int kPositions = CHANNELS_INNER ? 32 : 128;
  static constexpr int kChannels = CHANNELS_INNER ? 16 * VEC : 4 * VEC;
  // Threads along the contiguous dim; the rest of the block goes along the other dim, 4 values each.
  static constexpr int kLanes = CHANNELS_INNER ? 16 : 128 / VEC;
  static_assert(kLanes * VEC == (CHANNELS_INNER ? kChannels : kPositions), "lanes cover the contiguous dim");
  static_assert((kThreads / kLanes) * 4 == (CHANNELS_INNER ? kPositions : kChannels), "4 per thread across");
};

// out[i] = src[i], i < N, from shared memory; src 16-byte aligned when N is a multiple of 4.
template <int N>
__device__ __forceinline__ void load_shared(const float* src, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + i);
      out[i] = v.x;
      out[i + 1] = v.y;
      out[i + 2] = v.z;
      out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = src[i];
  }
}

// grid: (position tiles, channel splits, B); block: kThreads; dynamic shared memory r·(kPositions + kChannels)
// floats.
template <typename T, int VEC, bool CHANNELS_INNER>
__global__ void __launch_bounds__(kThreads)
    lora_epilogue_kernel(T* __restrict__ y, const T* __restrict__ t, const float* __restrict__ mixed_up,
                         std::int64_t mixed_up_stride, std::int64_t channels, std::int64_t positions, int rank) {
  using Shape = Tile<VEC, CHANNELS_INNER>;
  constexpr int kPositions = Shape::kPositions;
  constexpr int kChannels = Shape::kChannels;
  extern __shared__ float4 shared_storage[];
  float* t_tile = reinterpret_cast<float*>(shared_storage);  // [r][kPositions]
  float* p_tile = t_tile + rank * kPositions;                // [r][kChannels]

  const std::int64_t b = blockIdx.z;
  const std::int64_t p0 = static_cast<std::int64_t>(blockIdx.x) * kPositions;
  const float* mixed = mixed_up + b * mixed_up_stride;
  const T* t_sample = t + b * rank * positions;
  const int tid = threadIdx.x;

  // t_tile[k][p] = t[b, p0 + p, k] (channels inner) or t[b, k, p0 + p] (outer); 0 past the last position.
  for (int i = tid; i < rank * kPositions; i += kThreads) {
    int k, p;
    if constexpr (CHANNELS_INNER) {
      p = i / rank;
      k = i - p * rank;
    } else {
      k = i / kPositions;
      p = i - k * kPositions;
    }
    const std::int64_t position = p0 + p;
    float value = 0.0f;
    if (position < positions) {
      value = to_float(CHANNELS_INNER ? t_sample[position * rank + k] : t_sample[k * positions + position]);
    }
    t_tile[k * kPositions + p] = value;
  }

  const int lane = tid % Shape::kLanes;  // along the contiguous dim, VEC values each
  const int across = tid / Shape::kLanes;  // along the other dim, 4 values each

  for (std::int64_t c0 = static_cast<std::int64_t>(blockIdx.y) * kChannels; c0 < channels;
       c0 += static_cast<std::int64_t>(gridDim.y) * kChannels) {
    __syncthreads();  // the t tile is written; the previous channel tile's reads of p_tile are done
    // p_tile[k][c] = P_b[c0 + c, k]; 0 past the last channel.
    for (int i = tid; i < rank * kChannels; i += kThreads) {
      const int c = i / rank;
      const int k = i - c * rank;
      p_tile[k * kChannels + c] = c0 + c < channels ? mixed[(c0 + c) * rank + k] : 0.0f;
    }
    __syncthreads();

    // acc[a][v]: a along the non-contiguous dim, v along the contiguous one.
    float acc[4][VEC];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[a][v] = 0.0f;
    }
    for (int k = 0; k < rank; ++k) {
      float across_values[4], lane_values[VEC];
      if constexpr (CHANNELS_INNER) {
        load_shared<4>(t_tile + k * kPositions + across * 4, across_values);  // 4 positions
        load_shared<VEC>(p_tile + k * kChannels + lane * VEC, lane_values);  // VEC channels
      } else {
        load_shared<4>(p_tile + k * kChannels + across * 4, across_values);    // 4 channels
        load_shared<VEC>(t_tile + k * kPositions + lane * VEC, lane_values);  // VEC positions
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[a][v] += across_values[a] * lane_values[v];
      }
    }

    // Whole vectors are in range or out of it: the contiguous dim is a multiple of VEC.
    if constexpr (CHANNELS_INNER) {
      const std::int64_t c = c0 + lane * VEC;
      if (c < channels) {
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const std::int64_t position = p0 + across * 4 + a;
          if (position < positions) {
            T* out = y + (b * positions + position) * channels + c;
            float v[VEC];
            load_floats<VEC>(out, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] += acc[a][i];
            store_floats<VEC>(out, v);
          }
        }
      }
    } else {
      const std::int64_t position = p0 + lane * VEC;
      if (position < positions) {
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const std::int64_t c = c0 + across * 4 + a;
          if (c < channels) {
            T* out = y + (b * channels + c) * positions + position;
            float v[VEC];
            load_floats<VEC>(out, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] += acc[a][i];
            store_floats<VEC>(out, v);
          }
        }
      }
    }
  }
}

template <typename T, int VEC, bool CHANNELS_INNER>
cudaError_t launch(const LoraEpilogueParams& p, cudaStream_t stream) {
  using Shape = Tile<VEC, CHANNELS_INNER>;
  const std::int64_t position_tiles = ceil_div(p.positions, Shape::kPositions);
  const std::int64_t channel_tiles = ceil_div(p.channels, Shape::kChannels);
  const std::int64_t splits = clamp_to<std::int64_t>(ceil_div(kTargetBlocks, position_tiles * p.batch), 1,
                                                     std::min(channel_tiles, kMaxGridYZ));
  if (position_tiles > kMaxGridX) return cudaErrorInvalidValue;
  const std::size_t shared_bytes =
      static_cast<std::size_t>(p.rank) * (Shape::kPositions + Shape::kChannels) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(position_tiles), static_cast<unsigned>(splits), static_cast<unsigned>(p.batch));
  lora_epilogue_kernel<T, VEC, CHANNELS_INNER><<<grid, kThreads, shared_bytes, stream>>>(
      static_cast<T*>(p.y), static_cast<const T*>(p.t), p.mixed_up, p.mixed_up_stride, p.channels, p.positions,
      p.rank);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_epilogue(const LoraEpilogueParams& p, cudaStream_t stream) {
  if (p.y == nullptr || p.t == nullptr || p.mixed_up == nullptr || p.mixed_up_stride < 0) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.channels <= 0 || p.positions <= 0 || p.rank < 1 || p.rank > kLoraMaxRank ||
      p.batch > kMaxGridYZ) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = kVec16<T>;
    const std::int64_t contiguous = p.channels_inner ? p.channels : p.positions;
    const bool vectorised = contiguous % kVec == 0 && aligned_to(p.y, 16);
    if (p.channels_inner) {
      return vectorised ? launch<T, kVec, true>(p, stream) : launch<T, 1, true>(p, stream);
    }
    return vectorised ? launch<T, kVec, false>(p, stream) : launch<T, 1, false>(p, stream);
  });
}

}  // namespace flashstep::kernels
