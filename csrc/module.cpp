// The pybind11 module flashstep._C: build facts, CUDA device discovery and the native op entry points.
// It never sees a torch type: pointers and streams arrive as integers (see csrc/tensor_args.h).
#include <pybind11/pybind11.h>

#include "op_registration.h"
#ifdef FLASHSTEP_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace {

int cuda_device_count() {
#ifdef FLASHSTEP_WITH_CUDA
  int count = 0;
  // With no driver this returns an error instead of throwing; the module must still import.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

int cuda_runtime_version() {
#ifdef FLASHSTEP_WITH_CUDA
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
#else
  return 0;
#endif
}

int cuda_driver_version() {
#ifdef FLASHSTEP_WITH_CUDA
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashstep native kernels (CPU and, when built, CUDA)";
#ifdef FLASHSTEP_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = FLASHSTEP_CUDA_ARCHS;
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  m.def("cuda_device_count", &cuda_device_count, "Number of CUDA devices the runtime sees (0 without a driver)");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version the module was built with (0 without CUDA)");
  m.def("cuda_driver_version", &cuda_driver_version, "CUDA driver version (0 without a driver)");

  // Every csrc/cpu/<op>.cpp and (when built) csrc/cuda/<op>.cpp registered itself.
  flashstep::bind_registered_ops(m);
}
