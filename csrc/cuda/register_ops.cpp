#include "cuda/register_ops.h"

namespace flashstep::cuda {

void register_ops(pybind11::module_& m) {
  (void)m;
}

}  // namespace flashstep::cuda
