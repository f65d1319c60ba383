// Entry points of the CUDA kernels (csrc/cuda/<op>.cpp -> kernels/<op>.cu), bound into flashstep._C.
#pragma once
#include <pybind11/pybind11.h>

namespace flashstep::cuda {
void register_ops(pybind11::module_& m);
}  // namespace flashstep::cuda
