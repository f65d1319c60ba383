// Entry points of the native CPU kernels (csrc/cpu/<op>.cpp), bound into flashstep._C.
#pragma once
#include <pybind11/pybind11.h>

namespace flashstep::cpu {
void register_ops(pybind11::module_& m);
}  // namespace flashstep::cpu
