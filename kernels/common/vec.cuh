// Vector accesses: N consecutive elements read or written as one load or store (16 bytes for the widest),
// converted to and from fp32.
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.cuh"

namespace flashstep::kernels {

// Elements of T in one 16-byte access: 4 for fp32, 8 for fp16 and bf16.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T values[N];
};

// out[i] = src[i] for i < N; src must be aligned to N·sizeof(T) bytes.
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* src, float (&out)[N]) {
  const Packed<T, N> packed = *reinterpret_cast<const Packed<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(packed.values[i]);
}

// dst[i] = in[i] rounded to T, for i < N; dst must be aligned to N·sizeof(T) bytes.
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* dst, const float (&in)[N]) {
  Packed<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.values[i] = from_float<T>(in[i]);
  *reinterpret_cast<Packed<T, N>*>(dst) = packed;
}

inline bool aligned_to(const void* pointer, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0;
}

}  // namespace flashstep::kernels
