// Warp-level tensor-core and asynchronous-copy primitives (sm_80+) used by kernels/attention.cu.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4·g + t:
//   A (16×16, row-major), 4 registers of 2 elements:  a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//                                                      a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   B (16×8, "col": B[k][n]), 2 registers:             b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C, D (16×8, fp32), 4 registers:                    c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// The lower-indexed element of a pair sits in the low 16 bits of its register.
//
// ldmatrix.x4 loads four 8×8 matrices of 16-bit elements from shared memory: lanes 8j..8j+7 give the
// addresses of the rows of matrix j (16 bytes each, 16-byte aligned) and register j of lane 4·g + t
// receives row g, columns 2t and 2t+1 of matrix j; with .trans it receives rows 2t and 2t+1 of column g.
// So an untransposed load of a row-major 8×8 block yields the A or B fragment piece of that block, and a
// transposed load of a row-major [k][n] block yields the B fragment piece b = B[2t, 2t+1][g].
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flashstep::kernels::mma {

__device__ __forceinline__ std::uint32_t shared_address(const void* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

// fragment[j] <- matrix j, rows addressed by lanes 8j..8j+7.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&fragment)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address(row_address)));
}

// As ldmatrix_x4, each 8×8 matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&fragment)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address(row_address)));
}

// accumulator (16×8 fp32) += a (16×16) · b (16×8), Element = __half or __nv_bfloat16.
template <typename Element>
__device__ __forceinline__ void mma_m16n8k16(float (&accumulator)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&accumulator)[4], const std::uint32_t (&a)[4],
                                                     std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(accumulator[0]), "+f"(accumulator[1]), "+f"(accumulator[2]), "+f"(accumulator[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&accumulator)[4], const std::uint32_t (&a)[4],
                                                            std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(accumulator[0]), "+f"(accumulator[1]), "+f"(accumulator[2]), "+f"(accumulator[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared without passing through registers; both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* shared_destination, const void* global_source) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(shared_destination)),
               "l"(global_source)
               : "memory");
}

// Closes the group of this thread's cp.async issued since the last commit (an empty group is allowed).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's most recent groups are still in flight. Other threads
// see the data only after a following __syncthreads().
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// 16 zero bytes to shared memory (tile padding and rows past the end of the sequence).
__device__ __forceinline__ void store_zero_16(void* shared_destination) {
  *static_cast<uint4*>(shared_destination) = make_uint4(0u, 0u, 0u, 0u);
}

}  // namespace flashstep::kernels::mma
