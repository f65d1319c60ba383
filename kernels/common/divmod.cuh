// Division by a run-time divisor that stays fixed over a launch, as a multiply-high, an add and a shift
// (Granlund and Montgomery; the form of PyTorch's IntDivider): for 1 <= d < 2^31 and 0 <= n < 2^31,
//   shift = ceil(log2 d),  magic = floor(2^32 · (2^shift - d) / d) + 1,  n / d = (umulhi(n, magic) + n) >> shift.
#pragma once
#include <cstdint>

namespace flashstep::kernels {

struct DivMod {
  std::uint32_t divisor = 1;
  std::uint32_t magic = 1;
  std::uint32_t shift = 0;

  DivMod() = default;

  // divisor in [1, 2^31).
  explicit DivMod(std::uint32_t d) : divisor(d) {
    while (shift < 32 && (std::uint64_t{1} << shift) < d) ++shift;
    magic = static_cast<std::uint32_t>(((std::uint64_t{1} << 32) * ((std::uint64_t{1} << shift) - d)) / d + 1);
  }

  // n in [0, 2^31).
  __device__ __forceinline__ std::uint32_t div(std::uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }

  // quotient and remainder of n in [0, 2^31).
  __device__ __forceinline__ void divmod(std::uint32_t n, std::uint32_t& quotient, std::uint32_t& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }
};

}  // namespace flashstep::kernels
