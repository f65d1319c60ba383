// Host glue of kernels/geglu.cuh: flashstep._C.geglu_cuda.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "geglu.cuh"
#include "op_registration.h"
#include "tensor_args.h"

namespace py = pybind11;

namespace flashstep {
namespace {

void geglu_cuda(std::uintptr_t projection, std::uintptr_t out, std::int64_t rows, std::int64_t inner, int dtype,
                std::uintptr_t stream) {
  require(projection != 0 && out != 0, "geglu_cuda: the projection and the output must be given");
  require(rows > 0 && inner > 0, "geglu_cuda: rows and inner features must be positive");
  kernels::GegluParams params{};
  params.projection = as_ptr<const void>(projection);
  params.out = as_ptr<void>(out);
  params.rows = rows;
  params.inner = inner;
  params.dtype = static_cast<kernels::DType>(static_cast<int>(to_dtype(dtype)));
  check_cuda(kernels::geglu(params, as_stream(stream)), "geglu_cuda");
}

void bind(py::module_& m) {
  m.def("geglu_cuda", &geglu_cuda, py::arg("projection"), py::arg("out"), py::arg("rows"), py::arg("inner"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "out (rows, inner) = h · gelu(g) of a contiguous (rows, 2·inner) projection [h, g]; pointers as integers");
}

OpRegistration registration(&bind);

}  // namespace
}  // namespace flashstep
