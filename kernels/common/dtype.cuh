// Element types of the kernels: the dtype code a launcher receives, fp32 conversion of each element type in
// device code, and the dispatch from a run-time code to a template argument in the launchers.
//
// Host code that only declares or calls launchers (csrc/) may include this header with a plain C++
// compiler: the device part is compiled only by nvcc.
#pragma once

namespace flashstep::kernels {

// The codes of csrc/tensor_args.h (flashstep::DType) and python/flashstep/_native.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace flashstep::kernels

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace flashstep::kernels {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<T>{}) with T the element type of `dtype` (float, __half or __nv_bfloat16) and returns
// its status; an unknown code gives cudaErrorInvalidValue.
template <typename Launch>
cudaError_t dispatch_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(TypeTag<float>{});
    case DType::kFloat16:
      return launch(TypeTag<__half>{});
    case DType::kBFloat16:
      return launch(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace flashstep::kernels
#endif
