// Binding of kernels/attention.cuh: attention_forward(q, k, v, out as addresses and (batch, head, row)
// strides, sizes, scale, dtype code, stream). python/flashstep/backends/cuda/attention.py does the tensor work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention.cuh"
#include "op_registration.h"
#include "tensor_args.h"

namespace py = pybind11;

namespace {

using Strides = std::array<std::int64_t, 3>;  // (batch, head, row), in elements

flashstep::kernels::AttentionElement attention_element(flashstep::DType dtype) {
  switch (dtype) {
    case flashstep::DType::kFloat16:
      return flashstep::kernels::AttentionElement::kFloat16;
    case flashstep::DType::kBFloat16:
      return flashstep::kernels::AttentionElement::kBFloat16;
    case flashstep::DType::kFloat32:
      return flashstep::kernels::AttentionElement::kFloat32;
  }
  throw std::invalid_argument("attention: unknown dtype");
}

void require_low_precision_layout(const char* name, std::uintptr_t address, const Strides& strides) {
  constexpr int kAlignment = flashstep::kernels::kAttentionLowPrecisionAlignment;
  flashstep::require(address % 16 == 0, std::string(name) + ": fp16/bf16 data must start on a 16-byte boundary");
  for (const std::int64_t stride : strides) {
    flashstep::require(stride % kAlignment == 0, std::string(name) + ": fp16/bf16 strides must be multiples of " +
                                                     std::to_string(kAlignment) + " elements, got " +
                                                     std::to_string(stride));
  }
}

// q: (B, H, N, D), k and v: (B, H, M, D), out: (B, H, N, D); last dims contiguous.
void attention_forward(std::uintptr_t q, const Strides& q_strides, std::uintptr_t k, const Strides& k_strides,
                       std::uintptr_t v, const Strides& v_strides, std::uintptr_t out, const Strides& out_strides,
                       int batch, int heads, int q_len, int kv_len, int head_dim, double scale, int dtype_code,
                       std::uintptr_t stream) {
  const flashstep::DType dtype = flashstep::to_dtype(dtype_code);
  flashstep::require(batch >= 0 && heads >= 0 && q_len >= 0, "attention: negative size");
  flashstep::require(kv_len >= 1, "attention: at least one key is needed (M >= 1)");
  flashstep::require(batch <= 65535 && heads <= 65535, "attention: batch and heads are limited to 65535 each");
  flashstep::require(head_dim >= 1 && head_dim <= flashstep::kernels::kAttentionMaxHeadDim,
                     "attention: head dim " + std::to_string(head_dim) + " outside 1.." +
                         std::to_string(flashstep::kernels::kAttentionMaxHeadDim));
  flashstep::require(std::isfinite(scale), "attention: scale must be finite");
  flashstep::require(q != 0 && k != 0 && v != 0 && out != 0, "attention: null data pointer");
  if (dtype != flashstep::DType::kFloat32) {
    flashstep::require(head_dim % flashstep::kernels::kAttentionLowPrecisionAlignment == 0,
                       "attention: fp16/bf16 head dim must be a multiple of 8, got " + std::to_string(head_dim));
    require_low_precision_layout("q", q, q_strides);
    require_low_precision_layout("k", k, k_strides);
    require_low_precision_layout("v", v, v_strides);
    require_low_precision_layout("out", out, out_strides);
  }

  flashstep::kernels::AttentionParams params{};
  params.q = flashstep::as_ptr<const void>(q);
  params.k = flashstep::as_ptr<const void>(k);
  params.v = flashstep::as_ptr<const void>(v);
  params.out = flashstep::as_ptr<void>(out);
  params.q_stride_batch = q_strides[0];
  params.q_stride_head = q_strides[1];
  params.q_stride_row = q_strides[2];
  params.k_stride_batch = k_strides[0];
  params.k_stride_head = k_strides[1];
  params.k_stride_row = k_strides[2];
  params.v_stride_batch = v_strides[0];
  params.v_stride_head = v_strides[1];
  params.v_stride_row = v_strides[2];
  params.out_stride_batch = out_strides[0];
  params.out_stride_head = out_strides[1];
  params.out_stride_row = out_strides[2];
  params.batch = batch;
  params.heads = heads;
  params.q_len = q_len;
  params.kv_len = kv_len;
  params.head_dim = head_dim;
  params.scale = static_cast<float>(scale);
  flashstep::check_cuda(
      flashstep::kernels::attention_forward(params, attention_element(dtype), flashstep::as_stream(stream)),
      "attention_forward");
}

void bind(py::module_& m) {
  m.attr("attention_max_head_dim") = flashstep::kernels::kAttentionMaxHeadDim;
  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("q_strides"), py::arg("k"),
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"),
        py::arg("batch"), py::arg("heads"), py::arg("q_len"), py::arg("kv_len"), py::arg("head_dim"),
        py::arg("scale"), py::arg("dtype_code"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "out = softmax(scale · q·kᵀ)·v for (B, H, N, D) q and (B, H, M, D) k, v (kernels/attention.cu); "
        "pointers and the stream as integers");
}

flashstep::OpRegistration registration(&bind);

}  // namespace
