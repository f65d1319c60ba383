// Mean and variance of many values in fp32 across threads: (count, mean, m2 = Σ (x - mean)²) triples,
// merged with Chan et al.'s parallel formula, which stays accurate when the mean is large against the spread.
#pragma once

namespace flashstep::kernels {

struct Moments {
  float count;
  float mean;
  float m2;
};

__device__ __forceinline__ Moments empty_moments() { return Moments{0.0f, 0.0f, 0.0f}; }

// The moments of the union of the two sets. An empty set has mean 0, so merging into it is exact.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0.0f) return a;
  const float count = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float weight = b.count / count;
  return Moments{count, a.mean + delta * weight, a.m2 + b.m2 + delta * delta * a.count * weight};
}

// The moments of N values, two passes over registers.
template <int N>
__device__ __forceinline__ Moments moments_of(const float (&v)[N]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) sum += v[i];
  const float mean = sum * (1.0f / N);
  float m2 = 0.0f;
#pragma unroll
  for (int i = 0; i < N; ++i) m2 += (v[i] - mean) * (v[i] - mean);
  return Moments{static_cast<float>(N), mean, m2};
}

// Every lane of a full warp gets the merge of the 32 lanes' moments.
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments other{__shfl_xor_sync(0xffffffffu, m.count, offset), __shfl_xor_sync(0xffffffffu, m.mean, offset),
                        __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, other);
  }
  return m;
}

// The merge of the moments of all THREADS threads of a one-dimensional block, valid in thread 0. Every thread
// of the block must call it (it synchronises the block).
template <int THREADS>
__device__ __forceinline__ Moments block_merge(Moments m) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
  constexpr int kWarps = THREADS / 32;
  __shared__ Moments warp_totals[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  m = warp_merge(m);
  __syncthreads();  // a previous call's readers are done with warp_totals
  if (lane == 0) warp_totals[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? warp_totals[lane] : empty_moments();
    m = warp_merge(m);
  }
  return m;
}

}  // namespace flashstep::kernels
