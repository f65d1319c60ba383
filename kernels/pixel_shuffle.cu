// Pixel shuffle, unshuffle and the fused upscaling head; pixel_shuffle.cuh has the math and the interfaces.
//
// Shuffle and unshuffle are one gather: y, traversed in its memory order, is a 6-D array whose every
// index maps to x through a stride (for the NCHW shuffle, y's (b, c, h, i, w, j) reads x at
// b·s0 + (c·r² + i·r + j)·s1 + h·s2 + w·s3). One thread per y element, consecutive threads on consecutive
// y elements: stores are coalesced, loads gather through L1/L2. Index arithmetic is 32-bit with
// precomputed divisions (common/divmod.cuh); elements are copied as raw 2- or 4-byte words.
//
// The fused head is a direct implicit-GEMM convolution: GEMM rows are output pixels, columns output
// channels, the reduction runs over (input channel, tap). A block of 8 warps owns an 8 × 16 pixel tile
// and a 64-wide tile of output channels (the largest multiple of r² up to 64, so a tile holds whole groups
// of r² channels). Per chunk of input channels it stages in shared memory the input halo
// ((8 + kh - 1) × (16 + kw - 1) pixels × chunk, zero outside the image: the 'same' padding) and the
// weights of every tap (tap × chunk × 64); for each tap, the 16 pixels of a warp's row read a shifted
// window of the halo. fp16 / bf16: WMMA 16×16×16 tensor-core fragments, fp32 accumulation, chunks of 16
// channels, each warp one pixel row × up to 4 column fragments. fp32: FMA, chunks of 8 channels, each
// lane one pixel × 32 channels. The accumulators then go to shared memory (the staging space reused), and
// the epilogue adds the bias, applies the activation and the residual, and stores each value at its
// shuffled place: NCHW stores walk output rows (consecutive lanes, consecutive columns), channels_last
// stores walk (column, channel) pairs.
//
// Shared memory (bytes): staging fp16/bf16 10·18·16·2 + 9·16·72·2 = 26,496; fp32 10·18·9·4 + 9·8·64·4 =
// 24,912; accumulator tile 128·68·4 = 34,816. The 72- and 9-element row strides keep the rows of an
// ldmatrix and the 16 pixels of an fp32 warp on distinct banks.
#include "pixel_shuffle.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/divmod.cuh"
#include "common/dtype.cuh"
#include "common/launch.cuh"

namespace flashstep::kernels {
namespace {

// ==== shuffle and unshuffle: a 6-D gather ====================================================================

constexpr int kGatherThreads = 256;
constexpr std::int64_t kGatherMaxBlocks = 65535;

// y in memory order as 6 dims (outermost first) and x's stride for each.
struct Gather {
  std::uint32_t total;
  DivMod size[6];
  std::int64_t stride[6];
};

template <typename Word>
__global__ void __launch_bounds__(kGatherThreads)
    gather_kernel(const Word* __restrict__ x, Word* __restrict__ y, Gather gather) {
  const std::uint32_t step = gridDim.x * blockDim.x;
  for (std::uint32_t index = blockIdx.x * blockDim.x + threadIdx.x; index < gather.total; index += step) {
    std::uint32_t rest = index;
    std::int64_t offset = 0;
#pragma unroll
    for (int d = 5; d >= 0; --d) {
      std::uint32_t quotient, remainder;
      gather.size[d].divmod(rest, quotient, remainder);
      offset += static_cast<std::int64_t>(remainder) * gather.stride[d];
      rest = quotient;
    }
    y[index] = x[offset];
  }
}

cudaError_t launch_gather(const PixelShuffleParams& p, const std::int64_t (&sizes)[6],
                          const std::int64_t (&strides)[6], cudaStream_t stream) {
  std::int64_t total = 1;
  for (std::int64_t size : sizes) total *= size;
  if (total >= (std::int64_t{1} << 31)) return cudaErrorInvalidValue;
  Gather gather;
  gather.total = static_cast<std::uint32_t>(total);
  for (int d = 0; d < 6; ++d) {
    gather.size[d] = DivMod(static_cast<std::uint32_t>(sizes[d]));
    gather.stride[d] = strides[d];
  }
  const unsigned blocks = static_cast<unsigned>(std::min(ceil_div(total, kGatherThreads), kGatherMaxBlocks));
  if (p.dtype == DType::kFloat32) {
    gather_kernel<std::uint32_t><<<blocks, kGatherThreads, 0, stream>>>(static_cast<const std::uint32_t*>(p.x),
                                                                         static_cast<std::uint32_t*>(p.y), gather);
  } else {
    gather_kernel<std::uint16_t><<<blocks, kGatherThreads, 0, stream>>>(static_cast<const std::uint16_t*>(p.x),
                                                                         static_cast<std::uint16_t*>(p.y), gather);
  }
  return cudaGetLastError();
}

bool valid_shuffle_args(const PixelShuffleParams& p) {
  if (p.x == nullptr || p.y == nullptr || p.factor < 1) return false;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  for (std::int64_t size : p.sizes) {
    if (size <= 0 || size >= (std::int64_t{1} << 31)) return false;
  }
  return true;
}

// ==== conv2d_pixel_shuffle =======================================================================================

constexpr int kTileH = 8;   // pixel rows per block: one per warp
constexpr int kTileW = 16;  // pixels per row: the 16 rows of a WMMA fragment
constexpr int kTileN = 64;  // GEMM columns per block
constexpr int kTileLd = kTileN + 4;
constexpr int kConvThreads = 32 * kTileH;
constexpr int kMaxHaloH = kTileH + kHeadMaxKernel - 1;
constexpr int kMaxHaloW = kTileW + kHeadMaxKernel - 1;
constexpr int kMaxTaps = kHeadMaxKernel * kHeadMaxKernel;

// Input channels per staged chunk, and the row strides (elements) of the halo pixels and weight rows.
template <typename T>
struct Staging {
  static constexpr int kChunk = 16;
  static constexpr int kHaloStride = 16;   // WMMA: 32-byte aligned rows
  static constexpr int kWeightStride = 72;  // 144 bytes: 8 rows of an ldmatrix on distinct banks
};
template <>
struct Staging<float> {
  static constexpr int kChunk = 8;
  static constexpr int kHaloStride = 9;  // odd: the 16 pixels of a half warp on distinct banks
  static constexpr int kWeightStride = 64;
};

template <typename T>
constexpr int kHaloBytes = kMaxHaloH * kMaxHaloW * Staging<T>::kHaloStride * static_cast<int>(sizeof(T));
template <typename T>
constexpr int kWeightBytes = kMaxTaps * Staging<T>::kChunk * Staging<T>::kWeightStride * static_cast<int>(sizeof(T));
constexpr int kTileBytes = kTileH * kTileW * kTileLd * static_cast<int>(sizeof(float));
constexpr int kSharedBytes = std::max({kHaloBytes<float> + kWeightBytes<float>, kHaloBytes<__half> + kWeightBytes<__half>,
                                       kTileBytes});
static_assert(kHaloBytes<__half> % 32 == 0 && kHaloBytes<float> % 16 == 0, "weights stay aligned after the halo");

struct Head {
  std::int64_t batch, in_channels, height, width, out_channels, channels;  // channels = out_channels / r²
  int kernel_h, kernel_w, factor;
  int tile_n;       // GEMM columns of a tile that are used: a multiple of r², at most kTileN
  int n_tiles;      // tiles along the output channels
  int halo_h, halo_w;
  DivMod halo_w_div, halo_h_div, factor_div, groups_per_tile_div;  // groups_per_tile = tile_n / r²
  HeadActivation activation;
  float negative_slope;
  bool channels_last;
};

template <typename T>
__device__ __forceinline__ T zero_value() {
  return from_float<T>(0.0f);
}

// Stages input channels [ci0, ci0 + kChunk) of the block's halo and of its weights.
//   halo[(hy·halo_w + hx)·kHaloStride + ci] = x[b, ci0 + ci, y0 + hy - kh/2, x0 + hx - kw/2], 0 outside
//   weights[(tap·kChunk + ci)·kWeightStride + n] = W[n0 + n, ci0 + ci, tap], 0 for n >= tile_n or past the ends
template <typename T>
__device__ __forceinline__ void stage_chunk(const T* __restrict__ x, const T* __restrict__ weight, T* halo, T* weights,
                                            const Head& h, std::int64_t b, std::int64_t y0, std::int64_t x0,
                                            std::int64_t n0, std::int64_t ci0) {
  constexpr int kChunk = Staging<T>::kChunk;
  const int pad_h = h.kernel_h / 2, pad_w = h.kernel_w / 2;
  const int halo_values = h.halo_h * h.halo_w * kChunk;
#pragma unroll 4
  for (int i = threadIdx.x; i < halo_values; i += kConvThreads) {
    std::uint32_t ci, hy, hx;
    if (h.channels_last) {  // consecutive threads: consecutive channels of a pixel
      ci = i % kChunk;
      h.halo_w_div.divmod(i / kChunk, hy, hx);
    } else {  // consecutive threads: consecutive pixels of a halo row
      std::uint32_t rest;
      h.halo_w_div.divmod(i, rest, hx);
      h.halo_h_div.divmod(rest, ci, hy);
    }
    const std::int64_t iy = y0 + hy - pad_h, ix = x0 + hx - pad_w, c = ci0 + ci;
    T value = zero_value<T>();
    if (iy >= 0 && iy < h.height && ix >= 0 && ix < h.width && c < h.in_channels) {
      value = h.channels_last ? x[((b * h.height + iy) * h.width + ix) * h.in_channels + c]
                              : x[((b * h.in_channels + c) * h.height + iy) * h.width + ix];
    }
    halo[(hy * h.halo_w + hx) * Staging<T>::kHaloStride + ci] = value;
  }
  const int taps = h.kernel_h * h.kernel_w;
  for (int i = threadIdx.x; i < kTileN * kChunk; i += kConvThreads) {
    const int n = i / kChunk, ci = i % kChunk;
    const std::int64_t co = n0 + n, c = ci0 + ci;
    const bool inside = n < h.tile_n && co < h.out_channels && c < h.in_channels;
    const T* source = weight + (co * h.in_channels + c) * taps;
    for (int tap = 0; tap < taps; ++tap) {
      weights[(tap * kChunk + ci) * Staging<T>::kWeightStride + n] = inside ? source[tap] : zero_value<T>();
    }
  }
}

// Tensor cores (fp16, bf16): the conv values of the block's tile into tile[(py·16 + px)·kTileLd + n].
template <typename T>
__device__ __forceinline__ void convolve_mma(const T* __restrict__ x, const T* __restrict__ weight,
                                             unsigned char* shared, const Head& h, std::int64_t b, std::int64_t y0,
                                             std::int64_t x0, std::int64_t n0) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int kChunk = Staging<T>::kChunk;
  constexpr int kWeightStride = Staging<T>::kWeightStride;
  T* halo = reinterpret_cast<T*>(shared);
  T* weights = reinterpret_cast<T*>(shared + kHaloBytes<T>);
  const int warp = threadIdx.x / 32;
  const int fragments = (h.tile_n + 15) / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileN / 16];
#pragma unroll
  for (int f = 0; f < kTileN / 16; ++f) wmma::fill_fragment(acc[f], 0.0f);

  for (std::int64_t ci0 = 0; ci0 < h.in_channels; ci0 += kChunk) {
    __syncthreads();  // the previous chunk's fragments are loaded
    stage_chunk<T>(x, weight, halo, weights, h, b, y0, x0, n0, ci0);
    __syncthreads();
    for (int tap = 0; tap < h.kernel_h * h.kernel_w; ++tap) {
      const int dy = tap / h.kernel_w, dx = tap - dy * h.kernel_w;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, halo + ((warp + dy) * h.halo_w + dx) * Staging<T>::kHaloStride, Staging<T>::kHaloStride);
#pragma unroll
      for (int f = 0; f < kTileN / 16; ++f) {
        if (f < fragments) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> w;
          wmma::load_matrix_sync(w, weights + tap * kChunk * kWeightStride + f * 16, kWeightStride);
          wmma::mma_sync(acc[f], a, w, acc[f]);
        }
      }
    }
  }
  __syncthreads();  // staging space becomes the accumulator tile
  float* tile = reinterpret_cast<float*>(shared);
#pragma unroll
  for (int f = 0; f < kTileN / 16; ++f) {
    wmma::store_matrix_sync(tile + warp * 16 * kTileLd + f * 16, acc[f], kTileLd, wmma::mem_row_major);
  }
#else
  __trap();  // tensor-core bf16 fragments need sm_80
#endif
}

// FMA (fp32): lane = 16·half + px computes pixel px of the warp's row for channels [32·half, 32·half + 32).
__device__ __forceinline__ void convolve_fma(const float* __restrict__ x, const float* __restrict__ weight,
                                             unsigned char* shared, const Head& h, std::int64_t b, std::int64_t y0,
                                             std::int64_t x0, std::int64_t n0) {
  constexpr int kChunk = Staging<float>::kChunk;
  constexpr int kHaloStride = Staging<float>::kHaloStride;
  constexpr int kWeightStride = Staging<float>::kWeightStride;
  float* halo = reinterpret_cast<float*>(shared);
  float* weights = reinterpret_cast<float*>(shared + kHaloBytes<float>);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int px = lane % 16, half = lane / 16;
  float acc[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) acc[j] = 0.0f;

  for (std::int64_t ci0 = 0; ci0 < h.in_channels; ci0 += kChunk) {
    __syncthreads();
    stage_chunk<float>(x, weight, halo, weights, h, b, y0, x0, n0, ci0);
    __syncthreads();
    for (int tap = 0; tap < h.kernel_h * h.kernel_w; ++tap) {
      const int dy = tap / h.kernel_w, dx = tap - dy * h.kernel_w;
      const float* a_row = halo + ((warp + dy) * h.halo_w + dx + px) * kHaloStride;
      const float* w_tap = weights + tap * kChunk * kWeightStride + half * 32;
#pragma unroll
      for (int ci = 0; ci < kChunk; ++ci) {
        const float a = a_row[ci];
        const float* w = w_tap + ci * kWeightStride;
#pragma unroll
        for (int j = 0; j < 32; j += 4) {
          const float4 v = *reinterpret_cast<const float4*>(w + j);
          acc[j] += a * v.x;
          acc[j + 1] += a * v.y;
          acc[j + 2] += a * v.z;
          acc[j + 3] += a * v.w;
        }
      }
    }
  }
  __syncthreads();
  float* tile = reinterpret_cast<float*>(shared);
#pragma unroll
  for (int j = 0; j < 32; ++j) tile[(warp * 16 + px) * kTileLd + half * 32 + j] = acc[j];
}

__device__ __forceinline__ float activate(float v, HeadActivation activation, float negative_slope) {
  switch (activation) {
    case HeadActivation::kRelu:
      return v < 0.0f ? 0.0f : v;  // NaN stays NaN, as in torch
    case HeadActivation::kSilu:
      return v / (1.0f + expf(-v));
    case HeadActivation::kLeakyRelu:
      return v < 0.0f ? v * negative_slope : v;
    case HeadActivation::kNone:
      break;
  }
  return v;
}

// grid: (ceil(W / 16), ceil(H / 8), B · n_tiles); block: 256 threads.
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    conv2d_pixel_shuffle_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                                const T* __restrict__ residual, T* __restrict__ y, const Head h) {
  __shared__ __align__(128) unsigned char shared[kSharedBytes];
  const std::int64_t x0 = static_cast<std::int64_t>(blockIdx.x) * kTileW;
  const std::int64_t y0 = static_cast<std::int64_t>(blockIdx.y) * kTileH;
  const std::int64_t b = blockIdx.z / h.n_tiles;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.z % h.n_tiles) * h.tile_n;
  if constexpr (std::is_same_v<T, float>) {
    convolve_fma(x, weight, shared, h, b, y0, x0, n0);
  } else {
    convolve_mma<T>(x, weight, shared, h, b, y0, x0, n0);
  }
  __syncthreads();

  // tile[(py·16 + px)·kTileLd + n]: conv value of pixel (y0 + py, x0 + px), output channel n0 + n, n < tile_n.
  // Output channel n0 + n = (c0 + cc)·r² + i·r + j lands at y[b, c0 + cc, (y0 + py)·r + i, (x0 + px)·r + j].
  const float* tile = reinterpret_cast<const float*>(shared);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = h.factor;
  const int groups_per_tile = h.tile_n / (r * r);
  const std::int64_t c0 = n0 / (r * r);
  const std::int64_t out_h = h.height * r, out_w = h.width * r;
  const int piece = kTileW * r;  // output columns of the tile

  auto finish = [&](float value, std::int64_t co, std::int64_t offset) {
    if (bias != nullptr) value += to_float(bias[co]);
    value = activate(value, h.activation, h.negative_slope);
    if (residual != nullptr) value += to_float(residual[offset]);
    y[offset] = from_float<T>(value);
  };

  if (!h.channels_last) {
    // A warp takes a segment (cc, i, py): piece consecutive values of output row (y0 + py)·r + i of channel c0 + cc.
    const int segments = groups_per_tile * r * kTileH;
    for (int segment = warp; segment < segments; segment += kTileH) {
      const int py = segment % kTileH;
      const int rest = segment / kTileH;
      const int i = rest % r, cc = rest / r;
      const std::int64_t c = c0 + cc, iy = y0 + py;
      if (c >= h.channels || iy >= h.height) continue;
      const std::int64_t row = ((b * h.channels + c) * out_h + iy * r + i) * out_w + x0 * r;
      for (int q = lane; q < piece; q += 32) {
        std::uint32_t px, j;
        h.factor_div.divmod(q, px, j);
        if (x0 + px >= h.width) break;  // px grows with q
        const int n = cc * r * r + i * r + static_cast<int>(j);
        finish(tile[(py * kTileW + px) * kTileLd + n], n0 + n, row + q);
      }
    }
  } else {
    // A warp takes a segment (py, i): piece output pixels of output row (y0 + py)·r + i, the tile's channels each.
    const int segments = kTileH * r;
    const int values = piece * groups_per_tile;
    for (int segment = warp; segment < segments; segment += kTileH) {
      const int py = segment / r, i = segment % r;
      const std::int64_t iy = y0 + py;
      if (iy >= h.height) continue;
      const std::int64_t first_pixel = (b * out_h + iy * r + i) * out_w + x0 * r;
      for (int e = lane; e < values; e += 32) {
        std::uint32_t q, cc, px, j;
        h.groups_per_tile_div.divmod(e, q, cc);
        h.factor_div.divmod(q, px, j);
        if (x0 + px >= h.width) break;  // px grows with e
        const std::int64_t c = c0 + cc;
        if (c >= h.channels) continue;
        const int n = static_cast<int>(cc) * r * r + i * r + static_cast<int>(j);
        finish(tile[(py * kTileW + px) * kTileLd + n], n0 + n, (first_pixel + q) * h.channels + c);
      }
    }
  }
}

}  // namespace

cudaError_t pixel_shuffle(const PixelShuffleParams& p, cudaStream_t stream) {
  if (!valid_shuffle_args(p)) return cudaErrorInvalidValue;
  const std::int64_t r = p.factor, rr = r * r;
  const std::int64_t batch = p.sizes[0], height = p.sizes[2], width = p.sizes[3];
  if (p.sizes[1] % rr != 0) return cudaErrorInvalidValue;
  const std::int64_t channels = p.sizes[1] / rr;
  const std::int64_t s0 = p.strides[0], s1 = p.strides[1], s2 = p.strides[2], s3 = p.strides[3];
  if (p.channels_last) {  // y memory order (b, h, i, w, j, c)
    return launch_gather(p, {batch, height, r, width, r, channels}, {s0, s2, r * s1, s3, s1, rr * s1}, stream);
  }
  // y memory order (b, c, h, i, w, j)
  return launch_gather(p, {batch, channels, height, r, width, r}, {s0, rr * s1, s2, r * s1, s3, s1}, stream);
}

cudaError_t pixel_unshuffle(const PixelShuffleParams& p, cudaStream_t stream) {
  if (!valid_shuffle_args(p)) return cudaErrorInvalidValue;
  const std::int64_t r = p.factor;
  const std::int64_t batch = p.sizes[0], channels = p.sizes[1];
  if (p.sizes[2] % r != 0 || p.sizes[3] % r != 0) return cudaErrorInvalidValue;
  const std::int64_t height = p.sizes[2] / r, width = p.sizes[3] / r;
  const std::int64_t s0 = p.strides[0], s1 = p.strides[1], s2 = p.strides[2], s3 = p.strides[3];
  if (p.channels_last) {  // y memory order (b, h, w, c, i, j)
    return launch_gather(p, {batch, height, width, channels, r, r}, {s0, r * s2, r * s3, s1, s2, s3}, stream);
  }
  // y memory order (b, c, i, j, h, w)
  return launch_gather(p, {batch, channels, r, r, height, width}, {s0, s1, s2, s3, r * s2, r * s3}, stream);
}

cudaError_t conv2d_pixel_shuffle(const Conv2dPixelShuffleParams& p, cudaStream_t stream) {
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.in_channels <= 0 || p.height <= 0 || p.width <= 0 || p.out_channels <= 0) {
    return cudaErrorInvalidValue;
  }
  const bool kernel_ok = (p.kernel_h == 1 || p.kernel_h == 3) && (p.kernel_w == 1 || p.kernel_w == 3);
  if (!kernel_ok || p.factor < 1 || p.factor > kHeadMaxFactor) return cudaErrorInvalidValue;
  const int rr = p.factor * p.factor;
  if (p.out_channels % rr != 0) return cudaErrorInvalidValue;

  Head h;
  h.batch = p.batch;
  h.in_channels = p.in_channels;
  h.height = p.height;
  h.width = p.width;
  h.out_channels = p.out_channels;
  h.channels = p.out_channels / rr;
  h.kernel_h = p.kernel_h;
  h.kernel_w = p.kernel_w;
  h.factor = p.factor;
  h.tile_n = (kTileN / rr) * rr;
  h.n_tiles = static_cast<int>(ceil_div(p.out_channels, h.tile_n));
  h.halo_h = kTileH + p.kernel_h - 1;
  h.halo_w = kTileW + p.kernel_w - 1;
  h.halo_w_div = DivMod(static_cast<std::uint32_t>(h.halo_w));
  h.halo_h_div = DivMod(static_cast<std::uint32_t>(h.halo_h));
  h.factor_div = DivMod(static_cast<std::uint32_t>(p.factor));
  h.groups_per_tile_div = DivMod(static_cast<std::uint32_t>(h.tile_n / rr));
  h.activation = p.activation;
  h.negative_slope = p.negative_slope;
  h.channels_last = p.channels_last;

  const std::int64_t tiles_x = ceil_div(p.width, kTileW), tiles_y = ceil_div(p.height, kTileH);
  const std::int64_t tiles_z = p.batch * h.n_tiles;
  if (tiles_x > kMaxGridX || tiles_y > kMaxGridYZ || tiles_z > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles_x), static_cast<unsigned>(tiles_y), static_cast<unsigned>(tiles_z));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    conv2d_pixel_shuffle_kernel<T><<<grid, kConvThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
        static_cast<const T*>(p.residual), static_cast<T*>(p.y), h);
    return cudaGetLastError();
  });
}

}  // namespace flashstep::kernels
