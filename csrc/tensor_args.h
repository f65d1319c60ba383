// What the host glue needs to receive tensors from Python without torch: raw pointers and streams as
// integers, a dtype code, argument checks that raise Python exceptions, and CUDA error conversion.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flashstep {

// Dtype codes shared with python/flashstep/_native.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Raises ValueError in Python.
inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

}  // namespace flashstep

#ifdef FLASHSTEP_WITH_CUDA
#include <cuda_runtime.h>

namespace flashstep {

inline cudaStream_t as_stream(std::uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }

// Raises RuntimeError in Python with the CUDA error string.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
}

}  // namespace flashstep
#endif
