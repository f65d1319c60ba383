// Pixel shuffle and unshuffle, and the upscaling head's convolution written straight into the shuffled
// layout: the launchers' interfaces.
//
//   pixel_shuffle:   x (B, C·r², H, W) -> y (B, C, H·r, W·r),  y[b, c, h·r + i, w·r + j] = x[b, c·r² + i·r + j, h, w]
//   pixel_unshuffle: x (B, C, H·r, W·r) -> y (B, C·r², H, W), the inverse
//   conv2d_pixel_shuffle: y = act(pixel_shuffle(conv(x, W, pad = (kh/2, kw/2)) + bias, r)) + residual
//     x (B, Cin, H, W), W (C·r², Cin, kh, kw), stride 1, odd kernel; y and residual (B, C, H·r, W·r)
//
// The shuffles copy elements exactly from x with any strides into a contiguous y, NCHW or channels_last.
// The fused head reads x NCHW-contiguous or channels_last and writes y in the same layout.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.cuh"

namespace flashstep::kernels {

struct PixelShuffleParams {
  const void* x;
  void* y;                     // contiguous, NCHW or channels_last
  std::int64_t sizes[4];       // x's (B, C, H, W)
  std::int64_t strides[4];     // x's strides in elements
  int factor;                  // r >= 1
  bool channels_last;          // y's layout
  DType dtype;
};

// Launch on `stream`. cudaErrorInvalidValue when a pointer is null, a size is not positive, the sizes do not
// divide by r (C by r² for the shuffle, H and W by r for the unshuffle) or y has 2^31 elements or more.
cudaError_t pixel_shuffle(const PixelShuffleParams& params, cudaStream_t stream);
cudaError_t pixel_unshuffle(const PixelShuffleParams& params, cudaStream_t stream);

enum class HeadActivation : int { kNone = 0, kRelu = 1, kSilu = 2, kLeakyRelu = 3 };

// Kernel sizes the fused head takes: 1 or 3 along each axis.
constexpr int kHeadMaxKernel = 3;
// Largest shuffle factor: r² output channels of one output channel must fit one 64-wide channel tile.
constexpr int kHeadMaxFactor = 8;

struct Conv2dPixelShuffleParams {
  const void* x;         // (B, Cin, H, W)
  const void* weight;    // (C·r², Cin, kh, kw) contiguous
  const void* bias;      // (C·r²,) or null
  const void* residual;  // (B, C, H·r, W·r) laid out like y, or null
  void* y;               // (B, C, H·r, W·r)
  std::int64_t batch, in_channels, height, width, out_channels;  // out_channels = C·r²
  int kernel_h, kernel_w, factor;
  HeadActivation activation;
  float negative_slope;  // of kLeakyRelu
  bool channels_last;    // of x, y and residual; else NCHW-contiguous
  DType dtype;           // of every tensor
};

// Launch on `stream`. cudaErrorInvalidValue when a pointer is null, a size is not positive, kh or kw is not
// 1 or 3, r is outside 1..kHeadMaxFactor, r² does not divide the output channels, or the grid would exceed
// the hardware's limits; otherwise the launch's status.
cudaError_t conv2d_pixel_shuffle(const Conv2dPixelShuffleParams& params, cudaStream_t stream);

}  // namespace flashstep::kernels
