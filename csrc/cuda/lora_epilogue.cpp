// Host glue of kernels/lora_epilogue.cuh: flashstep._C.lora_epilogue_cuda.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "lora_epilogue.cuh"
#include "op_registration.h"
#include "tensor_args.h"

namespace py = pybind11;

namespace flashstep {
namespace {

void lora_epilogue_cuda(std::uintptr_t y, std::uintptr_t t, std::uintptr_t mixed_up, std::int64_t mixed_up_stride,
                        std::int64_t batch, std::int64_t channels, std::int64_t positions, int rank,
                        bool channels_inner, int dtype, std::uintptr_t stream) {
  require(y != 0 && t != 0 && mixed_up != 0, "lora_epilogue_cuda: y, t and the mixed up-projection must be given");
  require(batch > 0 && channels > 0 && positions > 0, "lora_epilogue_cuda: sizes must be positive");
  require(batch <= 65535, "lora_epilogue_cuda: at most 65535 samples");
  require(rank >= 1 && rank <= kernels::kLoraMaxRank, "lora_epilogue_cuda: the rank must be in 1..64");
  require(mixed_up_stride == 0 || mixed_up_stride == channels * rank,
          "lora_epilogue_cuda: the mixed up-projection's sample stride must be 0 or channels·rank");
  kernels::LoraEpilogueParams params{};
  params.y = as_ptr<void>(y);
  params.t = as_ptr<const void>(t);
  params.mixed_up = as_ptr<const float>(mixed_up);
  params.mixed_up_stride = mixed_up_stride;
  params.batch = batch;
  params.channels = channels;
  params.positions = positions;
  params.rank = rank;
  params.channels_inner = channels_inner;
  params.dtype = static_cast<kernels::DType>(static_cast<int>(to_dtype(dtype)));
  check_cuda(kernels::lora_epilogue(params, as_stream(stream)), "lora_epilogue_cuda");
}

void bind(py::module_& m) {
  m.def("lora_epilogue_cuda", &lora_epilogue_cuda, py::arg("y"), py::arg("t"), py::arg("mixed_up"),
        py::arg("mixed_up_stride"), py::arg("batch"), py::arg("channels"), py::arg("positions"), py::arg("rank"),
        py::arg("channels_inner"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "y[b] += P_b · t[b] in place: y (B, positions, Cout) with t (B, positions, r) when channels_inner, else "
        "y (B, Cout, positions) with t (B, r, positions); P (B or 1, Cout, r) fp32; pointers as integers");
}

OpRegistration registration(&bind);

}  // namespace
}  // namespace flashstep
