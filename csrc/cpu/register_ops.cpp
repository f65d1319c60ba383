#include "cpu/register_ops.h"

namespace flashstep::cpu {

void register_ops(pybind11::module_& m) {
  (void)m;
}

}  // namespace flashstep::cpu
