// Self-registration of native op bindings: each csrc/{cpu,cuda}/<op>.cpp defines a function that adds its
// entry points to the module and registers it with a file-scope OpRegistration, so adding an op means
// adding a file, and module.cpp never lists the ops.
//
//   namespace { void bind(pybind11::module_& m) { m.def("group_norm_cpu", ...); }
//               flashstep::OpRegistration registration(&bind); }
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace flashstep {

using BindFunction = void (*)(pybind11::module_&);

// Function-local static: safe to use from static initialisers in any translation unit.
inline std::vector<BindFunction>& registered_bindings() {
  static std::vector<BindFunction> bindings;
  return bindings;
}

struct OpRegistration {
  explicit OpRegistration(BindFunction bind) { registered_bindings().push_back(bind); }
};

inline void bind_registered_ops(pybind11::module_& m) {
  for (BindFunction bind : registered_bindings()) bind(m);
}

}  // namespace flashstep
