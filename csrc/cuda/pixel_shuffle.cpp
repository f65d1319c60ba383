// Host glue of kernels/pixel_shuffle.cuh: flashstep._C.pixel_shuffle_cuda, pixel_unshuffle_cuda and
// conv2d_pixel_shuffle_cuda.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "op_registration.h"
#include "pixel_shuffle.cuh"
#include "tensor_args.h"

namespace py = pybind11;

namespace flashstep {
namespace {

using Shape4 = std::array<std::int64_t, 4>;

kernels::PixelShuffleParams shuffle_params(std::uintptr_t x, std::uintptr_t y, const Shape4& sizes,
                                           const Shape4& strides, int factor, bool channels_last, int dtype) {
  require(x != 0 && y != 0, "pixel_shuffle_cuda: x and y must be given");
  require(factor >= 1, "pixel_shuffle_cuda: the factor must be positive");
  for (std::int64_t size : sizes) require(size > 0, "pixel_shuffle_cuda: sizes must be positive");
  kernels::PixelShuffleParams params{};
  params.x = as_ptr<const void>(x);
  params.y = as_ptr<void>(y);
  for (int d = 0; d < 4; ++d) {
    params.sizes[d] = sizes[d];
    params.strides[d] = strides[d];
  }
  params.factor = factor;
  params.channels_last = channels_last;
  params.dtype = static_cast<kernels::DType>(static_cast<int>(to_dtype(dtype)));
  return params;
}

void pixel_shuffle_cuda(std::uintptr_t x, std::uintptr_t y, const Shape4& sizes, const Shape4& strides, int factor,
                        bool channels_last, int dtype, std::uintptr_t stream) {
  const kernels::PixelShuffleParams params = shuffle_params(x, y, sizes, strides, factor, channels_last, dtype);
  require(sizes[1] % (static_cast<std::int64_t>(factor) * factor) == 0,
          "pixel_shuffle_cuda: channels must be divisible by factor²");
  check_cuda(kernels::pixel_shuffle(params, as_stream(stream)), "pixel_shuffle_cuda");
}

void pixel_unshuffle_cuda(std::uintptr_t x, std::uintptr_t y, const Shape4& sizes, const Shape4& strides, int factor,
                          bool channels_last, int dtype, std::uintptr_t stream) {
  const kernels::PixelShuffleParams params = shuffle_params(x, y, sizes, strides, factor, channels_last, dtype);
  require(sizes[2] % factor == 0 && sizes[3] % factor == 0,
          "pixel_unshuffle_cuda: height and width must be divisible by the factor");
  check_cuda(kernels::pixel_unshuffle(params, as_stream(stream)), "pixel_unshuffle_cuda");
}

void conv2d_pixel_shuffle_cuda(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t residual,
                               std::uintptr_t y, std::int64_t batch, std::int64_t in_channels, std::int64_t height,
                               std::int64_t width, std::int64_t out_channels, int kernel_h, int kernel_w, int factor,
                               int activation, double negative_slope, bool channels_last, int dtype,
                               std::uintptr_t stream) {
  require(x != 0 && weight != 0 && y != 0, "conv2d_pixel_shuffle_cuda: x, weight and y must be given");
  require(batch > 0 && in_channels > 0 && height > 0 && width > 0 && out_channels > 0,
          "conv2d_pixel_shuffle_cuda: sizes must be positive");
  require((kernel_h == 1 || kernel_h == 3) && (kernel_w == 1 || kernel_w == 3),
          "conv2d_pixel_shuffle_cuda: kernels of 1 or 3 along each axis");
  require(factor >= 1 && factor <= kernels::kHeadMaxFactor, "conv2d_pixel_shuffle_cuda: the factor must be in 1..8");
  require(out_channels % (factor * factor) == 0, "conv2d_pixel_shuffle_cuda: output channels must be divisible by factor²");
  require(activation >= 0 && activation <= 3, "conv2d_pixel_shuffle_cuda: unknown activation code");
  kernels::Conv2dPixelShuffleParams params{};
  params.x = as_ptr<const void>(x);
  params.weight = as_ptr<const void>(weight);
  params.bias = as_ptr<const void>(bias);
  params.residual = as_ptr<const void>(residual);
  params.y = as_ptr<void>(y);
  params.batch = batch;
  params.in_channels = in_channels;
  params.height = height;
  params.width = width;
  params.out_channels = out_channels;
  params.kernel_h = kernel_h;
  params.kernel_w = kernel_w;
  params.factor = factor;
  params.activation = static_cast<kernels::HeadActivation>(activation);
  params.negative_slope = static_cast<float>(negative_slope);
  params.channels_last = channels_last;
  params.dtype = static_cast<kernels::DType>(static_cast<int>(to_dtype(dtype)));
  check_cuda(kernels::conv2d_pixel_shuffle(params, as_stream(stream)), "conv2d_pixel_shuffle_cuda");
}

void bind(py::module_& m) {
  m.def("pixel_shuffle_cuda", &pixel_shuffle_cuda, py::arg("x"), py::arg("y"), py::arg("sizes"), py::arg("strides"),
        py::arg("factor"), py::arg("channels_last"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "y (B, C, H·r, W·r), contiguous NCHW or channels_last, from x (B, C·r², H, W) of the given sizes and "
        "strides (elements); pointers as integers");
  m.def("pixel_unshuffle_cuda", &pixel_unshuffle_cuda, py::arg("x"), py::arg("y"), py::arg("sizes"),
        py::arg("strides"), py::arg("factor"), py::arg("channels_last"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "y (B, C·r², H, W), contiguous NCHW or channels_last, from x (B, C, H·r, W·r) of the given sizes and "
        "strides (elements); pointers as integers");
  m.def("conv2d_pixel_shuffle_cuda", &conv2d_pixel_shuffle_cuda, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("residual"), py::arg("y"), py::arg("batch"), py::arg("in_channels"), py::arg("height"),
        py::arg("width"), py::arg("out_channels"), py::arg("kernel_h"), py::arg("kernel_w"), py::arg("factor"),
        py::arg("activation"), py::arg("negative_slope"), py::arg("channels_last"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y = act(pixel_shuffle(conv(x, W, 'same') + bias, r)) + residual; activation 0 none, 1 relu, 2 silu, "
        "3 leaky_relu; pointers as integers, 0 for an absent bias or residual");
}

OpRegistration registration(&bind);

}  // namespace
}  // namespace flashstep
