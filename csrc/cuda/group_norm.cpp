// Host glue of kernels/group_norm.cuh: flashstep._C.group_norm_cuda and group_norm_cuda_workspace.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "group_norm.cuh"
#include "op_registration.h"
#include "tensor_args.h"

namespace py = pybind11;

namespace flashstep {
namespace {

std::size_t group_norm_cuda_workspace(std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                                      std::int64_t groups, bool channels_last) {
  require(batch > 0 && channels > 0 && spatial > 0, "group_norm_cuda: batch, channels and spatial size must be positive");
  require(groups > 0 && channels % groups == 0, "group_norm_cuda: groups must divide the channels");
  return kernels::group_norm_workspace_floats(batch, channels, spatial, groups, channels_last);
}

void group_norm_cuda(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias,
                     std::uintptr_t residual, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t workspace,
                     std::int64_t batch, std::int64_t channels, std::int64_t spatial, std::int64_t groups, double eps,
                     bool silu, bool channels_last, int dtype, std::uintptr_t stream) {
  require(x != 0 && y != 0 && workspace != 0, "group_norm_cuda: x, y and the workspace must be given");
  require(batch > 0 && channels > 0 && spatial > 0, "group_norm_cuda: batch, channels and spatial size must be positive");
  require(batch <= 65535, "group_norm_cuda: at most 65535 samples");
  require(groups > 0 && channels % groups == 0, "group_norm_cuda: groups must divide the channels");
  require((mean == 0) == (rstd == 0), "group_norm_cuda: give both mean and rstd, or neither");
  kernels::GroupNormParams params{};
  params.x = as_ptr<const void>(x);
  params.y = as_ptr<void>(y);
  params.weight = as_ptr<const void>(weight);
  params.bias = as_ptr<const void>(bias);
  params.residual = as_ptr<const void>(residual);
  params.mean = as_ptr<const float>(mean);
  params.rstd = as_ptr<const float>(rstd);
  params.workspace = as_ptr<float>(workspace);
  params.batch = batch;
  params.channels = channels;
  params.spatial = spatial;
  params.groups = groups;
  params.eps = static_cast<float>(eps);
  params.silu = silu;
  params.channels_last = channels_last;
  params.dtype = static_cast<kernels::DType>(static_cast<int>(to_dtype(dtype)));
  check_cuda(kernels::group_norm(params, as_stream(stream)), "group_norm_cuda");
}

void bind(py::module_& m) {
  m.def("group_norm_cuda_workspace", &group_norm_cuda_workspace, py::arg("batch"), py::arg("channels"),
        py::arg("spatial"), py::arg("groups"), py::arg("channels_last"),
        "Floats of fp32 workspace group_norm_cuda needs for these sizes");
  m.def("group_norm_cuda", &group_norm_cuda, py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"),
        py::arg("residual"), py::arg("mean"), py::arg("rstd"), py::arg("workspace"), py::arg("batch"),
        py::arg("channels"), py::arg("spatial"), py::arg("groups"), py::arg("eps"), py::arg("silu"),
        py::arg("channels_last"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "GroupNorm(+SiLU)(+residual) of a contiguous NCHW or channels_last CUDA tensor on a stream; pointers as "
        "integers, 0 for an absent weight, bias, residual or (mean, rstd) pair");
}

OpRegistration registration(&bind);

}  // namespace
}  // namespace flashstep
