// Launch arithmetic shared by the launchers: grid sizes and the hardware's grid limits.
#pragma once
#include <cstdint>

namespace flashstep::kernels {

// Largest gridDim.y and gridDim.z.
constexpr std::int64_t kMaxGridYZ = 65535;
// Largest gridDim.x.
constexpr std::int64_t kMaxGridX = 2147483647;

constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

template <typename T>
constexpr T clamp_to(T value, T low, T high) {
  return value < low ? low : (value > high ? high : value);
}

}  // namespace flashstep::kernels
