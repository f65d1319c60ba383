// Scaled dot-product attention forward, flash formulation (FlashAttention-2's forward pass).
//
//   out[b, h] = softmax(scale · q[b, h] · k[b, h]ᵀ) · v[b, h],   q: (N, D), k, v: (M, D) per (b, h)
//
// Algorithm. A thread block owns a tile of query rows and walks the keys in tiles of kBlockN. For each
// key tile it computes the scores S = scale·log2(e) · Q·Kᵀ, keeps per row the running maximum m and the
// running sum l of exp2(S - m), rescales its fp32 output accumulator by exp2(m_old - m_new) whenever the
// maximum grows, and adds exp2(S - m)·V. After the last tile it divides by l. The N×M score matrix never
// leaves registers (tensor-core kernel) or one key tile (fp32 kernel); global memory holds only q, k, v
// and out, O(N·D) per head. Keys past M are masked to -inf; rows past N and head-dim columns past D are
// zero in shared memory and never stored.
//
// FLOPs: 4·N·M·D per (b, h) (2·N·M·D for Q·Kᵀ, 2·N·M·D for P·V). D = 512 is split into two column halves of
// the output, each block recomputing Q·Kᵀ for its half, so it executes 6·N·M·D (see below).
//
// Tensor-core kernel (fp16, bf16; sm_80+). mma.sync.m16n8k16 with fp32 accumulation; each warp owns
// 16·kRowTilesPerWarp query rows, holds their scores and output accumulator in registers (fragment
// layouts in common/attention_mma.cuh), computes the row max and sum with two quad shuffles, and feeds the
// probabilities to P·V straight from the score registers (the accumulator layout of S is the A-operand
// layout of P). Q, K and V tiles reach shared memory by cp.async; V of tile j loads while Q·Kⱼᵀ runs and
// K of tile j+1 loads while Pⱼ·Vⱼ runs. Shared rows are padded by 16 bytes so that the 8 row addresses of
// an ldmatrix fall in distinct banks. The head dim is padded at compile time to 64, 128, 256 or 512;
// padded columns are zero and the 16-wide k-steps and column pairs wholly past D are skipped at run
// time, so D = 40, 80 or 160 costs little more than its own width.
//
//   D pad  warps  rows/warp  kBlockM  kBlockN  output cols/block  shared memory (bytes)
//     64     4       32        128       64         64            (128 + 64)·72·2 + 64·72·2    =  36,864
//    128     4       32        128       32        128            (128 + 32)·136·2 + 32·136·2  =  52,224
//    256     4       16         64       32        256            (64 + 32)·264·2 + 32·264·2   =  67,584
//    512     3       16         48       32        256 (2 blocks) (48 + 32)·520·2 + 32·264·2   = 100,096
//
// Output accumulators cost 128 registers per thread at D = 128 and 256; D = 512 therefore splits the output
// columns across two blocks, and its 48-row tile keeps the shared memory under the 99 KB that sm_86/89
// allow per block (sm_80: 163 KB, sm_90: 227 KB).
//
// fp32 kernel (fp32 FMA arithmetic, no TF32): 4 warps, 4 query rows per warp, key tiles of 32 with one key
// per lane for the scores and one output column per lane (strided by 32) for P·V, shuffles for the row
// max and sum; the scores read Q and K 16 bytes at a time. Shared memory: Q (16, Dpad) and one K-or-V tile
// (32, Dpad + 4), the +4 floats putting the 8 lanes of each quarter-warp's 16-byte key loads on distinct
// banks: 12,800 / 25,088 / 49,664 / 98,816 bytes for Dpad 64 / 128 / 256 / 512.
#include "attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/attention_mma.cuh"

namespace flashstep::kernels {

// The dynamic shared memory of every attention kernel; each kernel carves its tiles out of it.
extern __shared__ uint4 attention_shared[];

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kDefaultSharedLimit = 48 * 1024;    // more needs cudaFuncSetAttribute
constexpr int kPortableSharedLimit = 99 * 1024;   // the smallest opt-in limit of sm_80+ (sm_86, sm_89)

// ------------------------------------------------------------------------------------------------
// Tensor-core kernel (fp16, bf16)

template <int kHeadDimPad_, int kWarps_, int kRowTilesPerWarp_, int kBlockN_, int kValueCols_>
struct TensorCoreTiling {
  static constexpr int kHeadDimPad = kHeadDimPad_;
  static constexpr int kThreads = 32 * kWarps_;
  static constexpr int kRowTilesPerWarp = kRowTilesPerWarp_;  // 16-row mma tiles per warp
  static constexpr int kBlockM = 16 * kRowTilesPerWarp_ * kWarps_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kValueCols = kValueCols_;  // output columns per block
  static constexpr int kColumnBlocks = kHeadDimPad_ / kValueCols_;
  static constexpr int kQkStride = kHeadDimPad_ + 8;  // shared row stride (elements) of Q and K
  static constexpr int kVStride = kValueCols_ + 8;    // shared row stride (elements) of V
  static constexpr int kSharedBytes = 2 * ((kBlockM + kBlockN_) * kQkStride + kBlockN_ * kVStride);
  static_assert(kBlockN_ % 16 == 0 && kValueCols_ % 16 == 0 && kHeadDimPad_ % kValueCols_ == 0, "tile shapes");
  static_assert(kSharedBytes <= kPortableSharedLimit, "tiles must fit every sm_80+ GPU");
};

template <int kHeadDimPad>
struct TensorCoreTilingFor;
template <>
struct TensorCoreTilingFor<64> {
  using type = TensorCoreTiling<64, 4, 2, 64, 64>;
};
template <>
struct TensorCoreTilingFor<128> {
  using type = TensorCoreTiling<128, 4, 2, 32, 128>;
};
template <>
struct TensorCoreTilingFor<256> {
  using type = TensorCoreTiling<256, 4, 1, 32, 256>;
};
template <>
struct TensorCoreTilingFor<512> {
  using type = TensorCoreTiling<512, 3, 1, 32, 256>;
};

// Two floats rounded to Element, the first in the low 16 bits (the mma operand register layout).
template <typename Element>
__device__ __forceinline__ std::uint32_t pack_pair(float low, float high);

template <>
__device__ __forceinline__ std::uint32_t pack_pair<__half>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  std::uint32_t bits;
  std::memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

template <>
__device__ __forceinline__ std::uint32_t pack_pair<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  std::uint32_t bits;
  std::memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// The element offset of the row this lane addresses in an ldmatrix_x4 of the 16×16 block at
// (row0, col0) of a row-major shared tile, giving the matrices in the order
//   [0] rows 0-7, cols 0-7   [1] rows 8-15, cols 0-7   [2] rows 0-7, cols 8-15   [3] rows 8-15, cols 8-15.
// Untransposed that is the A fragment of the block; transposed, for a tile stored [k][n], it is the B
// fragment (b0, b1) of columns col0..col0+7 followed by that of columns col0+8..col0+15.
__device__ __forceinline__ int a_order_offset(int row0, int col0, int stride, int lane) {
  return (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + col0 + (lane >> 4) * 8;
}

// As a_order_offset with the order [0] rows 0-7, cols 0-7   [1] rows 0-7, cols 8-15   [2] rows 8-15,
// cols 0-7   [3] rows 8-15, cols 8-15: untransposed, for a tile stored [n][k] (K, whose rows are keys),
// the B fragment (b0, b1) of rows row0..row0+7 followed by that of rows row0+8..row0+15.
__device__ __forceinline__ int b_order_offset(int row0, int col0, int stride, int lane) {
  return (row0 + (lane & 7) + (lane >> 4) * 8) * stride + col0 + ((lane >> 3) & 1) * 8;
}

// Copies a (kRows, kCols) tile of which the first valid_rows rows and valid_cols columns exist in
// global memory (row stride source_stride) into shared memory (row stride kSharedStride), writing zeros
// elsewhere. 16-byte pieces; valid_cols is a multiple of 8 elements.
template <typename Element, int kRows, int kCols, int kSharedStride, int kThreads>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* source, std::int64_t source_stride,
                                                int valid_rows, int valid_cols) {
  constexpr int kPieceElements = 16 / sizeof(Element);
  constexpr int kPiecesPerRow = kCols / kPieceElements;
  constexpr int kPieces = kRows * kPiecesPerRow;
  // NOTE: unrolled fully, the copy keeps dozens of addresses live beside the output accumulators; at
  // D = 512 that took 255 registers and spilled (ptxas, sm_90); unrolled by 4: 167 registers, no spill.
#pragma unroll 4
  for (int step = 0; step < (kPieces + kThreads - 1) / kThreads; ++step) {
    const int piece = step * kThreads + static_cast<int>(threadIdx.x);
    if (kPieces % kThreads == 0 || piece < kPieces) {
      const int row = piece / kPiecesPerRow;
      const int col = (piece % kPiecesPerRow) * kPieceElements;
      Element* destination = tile + row * kSharedStride + col;
      if (row < valid_rows && col < valid_cols) {
        mma::cp_async_16(destination, source + row * source_stride + col);
      } else {
        mma::store_zero_16(destination);
      }
    }
  }
}

template <typename Element, typename Tiling>
__global__ void __launch_bounds__(Tiling::kThreads) attention_tensor_core_kernel(const AttentionParams p) {
  constexpr int kHeadDimPad = Tiling::kHeadDimPad;
  constexpr int kThreads = Tiling::kThreads;
  constexpr int kBlockM = Tiling::kBlockM;
  constexpr int kBlockN = Tiling::kBlockN;
  constexpr int kRowTiles = Tiling::kRowTilesPerWarp;
  constexpr int kValueCols = Tiling::kValueCols;
  constexpr int kQkStride = Tiling::kQkStride;
  constexpr int kVStride = Tiling::kVStride;
  constexpr int kScoreTiles = kBlockN / 8;     // n8 tiles of one row tile's scores
  constexpr int kOutputTiles = kValueCols / 8;  // n8 tiles of one row tile's output

  Element* q_tile = reinterpret_cast<Element*>(attention_shared);  // (kBlockM, kQkStride)
  Element* k_tile = q_tile + kBlockM * kQkStride;                  // (kBlockN, kQkStride)
  Element* v_tile = k_tile + kBlockN * kQkStride;                  // (kBlockN, kVStride)

  const int column_block = static_cast<int>(blockIdx.x) % Tiling::kColumnBlocks;
  const int row0 = static_cast<int>(blockIdx.x) / Tiling::kColumnBlocks * kBlockM;
  const int col0 = column_block * kValueCols;
  const std::int64_t head = blockIdx.y;
  const std::int64_t batch = blockIdx.z;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_row0 = static_cast<int>(threadIdx.x) / 32 * kRowTiles * 16;
  const int head_dim = p.head_dim;
  const int kv_len = p.kv_len;

  // q: rows row0.. of (N, D); k: (M, D); v and out: columns col0.. of (M, D) and of rows row0.. of (N, D).
  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_stride_batch + head * p.q_stride_head +
                     row0 * p.q_stride_row;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_stride_batch + head * p.k_stride_head;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_stride_batch + head * p.v_stride_head + col0;
  Element* out = static_cast<Element*>(p.out) + batch * p.out_stride_batch + head * p.out_stride_head +
                 row0 * p.out_stride_row + col0;

  load_tile_async<Element, kBlockM, kHeadDimPad, kQkStride, kThreads>(q_tile, q, p.q_stride_row,
                                                                      min(kBlockM, p.q_len - row0), head_dim);
  load_tile_async<Element, kBlockN, kHeadDimPad, kQkStride, kThreads>(k_tile, k, p.k_stride_row,
                                                                      min(kBlockN, kv_len), head_dim);
  mma::cp_async_commit();

  // Rows of this thread: warp_row0 + 16·r + lane/4 (half 0) and + 8 (half 1) for r < kRowTiles.
  float accumulator[kRowTiles][kOutputTiles][4];
  float row_max[kRowTiles][2];  // running max of the log2-scaled scores
  float row_sum[kRowTiles][2];  // this thread's part of the running sum of exp2(score - max)
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
    for (int t = 0; t < kOutputTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) accumulator[r][t][e] = 0.f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[r][h] = -INFINITY;
      row_sum[r][h] = 0.f;
    }
  }

  const float scale_log2 = p.scale * kLog2e;
  const int kv_tiles = (kv_len + kBlockN - 1) / kBlockN;
  for (int kv_tile = 0; kv_tile < kv_tiles; ++kv_tile) {
    const int kv0 = kv_tile * kBlockN;
    __syncthreads();  // every warp has finished reading the previous tile's V
    load_tile_async<Element, kBlockN, kValueCols, kVStride, kThreads>(
        v_tile, v + kv0 * p.v_stride_row, p.v_stride_row, min(kBlockN, kv_len - kv0), head_dim - col0);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // Q (first tile) and this tile's K have landed
    __syncthreads();

    // scores: (16·kRowTiles, kBlockN) = Q · Kᵀ over the head dim.
    float scores[kRowTiles][kScoreTiles][4];
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
      for (int t = 0; t < kScoreTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) scores[r][t][e] = 0.f;
      }
    }
#pragma unroll
    for (int k_step = 0; k_step < kHeadDimPad / 16; ++k_step) {
      if (k_step * 16 < head_dim) {
        std::uint32_t a[kRowTiles][4];
#pragma unroll
        for (int r = 0; r < kRowTiles; ++r) {
          mma::ldmatrix_x4(a[r], q_tile + a_order_offset(warp_row0 + 16 * r, 16 * k_step, kQkStride, lane));
        }
#pragma unroll
        for (int pair = 0; pair < kBlockN / 16; ++pair) {
          std::uint32_t b[4];
          mma::ldmatrix_x4(b, k_tile + b_order_offset(16 * pair, 16 * k_step, kQkStride, lane));
#pragma unroll
          for (int r = 0; r < kRowTiles; ++r) {
            mma::mma_m16n8k16<Element>(scores[r][2 * pair], a[r], b[0], b[1]);
            mma::mma_m16n8k16<Element>(scores[r][2 * pair + 1], a[r], b[2], b[3]);
          }
        }
      }
    }

    // Log2-scaled scores; keys past M get -inf (only the last tile has any).
    const bool partial_tile = kv0 + kBlockN > kv_len;
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
      for (int t = 0; t < kScoreTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kv0 + 8 * t + 2 * (lane & 3) + (e & 1);
          scores[r][t][e] = partial_tile && key >= kv_len ? -INFINITY : scores[r][t][e] * scale_log2;
        }
      }
    }

    // Online softmax. The four lanes of a quad hold one row between them; key 0 of the first tile is
    // never masked, so the running max is finite from the first tile on and no -inf - -inf arises.
#pragma unroll
    for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float new_max = row_max[r][h];
#pragma unroll
        for (int t = 0; t < kScoreTiles; ++t) {
          new_max = fmaxf(new_max, fmaxf(scores[r][t][2 * h], scores[r][t][2 * h + 1]));
        }
        new_max = fmaxf(new_max, __shfl_xor_sync(kFullWarp, new_max, 1));
        new_max = fmaxf(new_max, __shfl_xor_sync(kFullWarp, new_max, 2));
        const float correction = exp2f(row_max[r][h] - new_max);
        row_max[r][h] = new_max;
        row_sum[r][h] *= correction;
#pragma unroll
        for (int t = 0; t < kOutputTiles; ++t) {
          accumulator[r][t][2 * h] *= correction;
          accumulator[r][t][2 * h + 1] *= correction;
        }
#pragma unroll
        for (int t = 0; t < kScoreTiles; ++t) {
          scores[r][t][2 * h] = exp2f(scores[r][t][2 * h] - new_max);
          scores[r][t][2 * h + 1] = exp2f(scores[r][t][2 * h + 1] - new_max);
          row_sum[r][h] += scores[r][t][2 * h] + scores[r][t][2 * h + 1];
        }
      }
    }

    __syncthreads();  // every warp has finished reading this tile's K
    if (kv_tile + 1 < kv_tiles) {
      const int next_kv0 = kv0 + kBlockN;
      load_tile_async<Element, kBlockN, kHeadDimPad, kQkStride, kThreads>(
          k_tile, k + next_kv0 * p.k_stride_row, p.k_stride_row, min(kBlockN, kv_len - next_kv0), head_dim);
    }
    mma::cp_async_commit();
    mma::cp_async_wait<1>();  // this tile's V has landed
    __syncthreads();

    // accumulator += P · V, P (16·kRowTiles, kBlockN) taken from the score registers.
#pragma unroll
    for (int k_step = 0; k_step < kBlockN / 16; ++k_step) {
      std::uint32_t a[kRowTiles][4];
#pragma unroll
      for (int r = 0; r < kRowTiles; ++r) {
        a[r][0] = pack_pair<Element>(scores[r][2 * k_step][0], scores[r][2 * k_step][1]);
        a[r][1] = pack_pair<Element>(scores[r][2 * k_step][2], scores[r][2 * k_step][3]);
        a[r][2] = pack_pair<Element>(scores[r][2 * k_step + 1][0], scores[r][2 * k_step + 1][1]);
        a[r][3] = pack_pair<Element>(scores[r][2 * k_step + 1][2], scores[r][2 * k_step + 1][3]);
      }
#pragma unroll
      for (int pair = 0; pair < kValueCols / 16; ++pair) {
        if (col0 + 16 * pair < head_dim) {
          std::uint32_t b[4];
          mma::ldmatrix_x4_trans(b, v_tile + a_order_offset(16 * k_step, 16 * pair, kVStride, lane));
#pragma unroll
          for (int r = 0; r < kRowTiles; ++r) {
            mma::mma_m16n8k16<Element>(accumulator[r][2 * pair], a[r], b[0], b[1]);
            mma::mma_m16n8k16<Element>(accumulator[r][2 * pair + 1], a[r], b[2], b[3]);
          }
        }
      }
    }
  }

  // out = accumulator / row sum, two elements (one 32-bit store) per n8 tile and row.
#pragma unroll
  for (int r = 0; r < kRowTiles; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[r][h];
      sum += __shfl_xor_sync(kFullWarp, sum, 1);
      sum += __shfl_xor_sync(kFullWarp, sum, 2);
      const float inverse = 1.f / sum;
      const int row = warp_row0 + 16 * r + (lane >> 2) + 8 * h;
      if (row0 + row < p.q_len) {
        Element* out_row = out + row * p.out_stride_row;
#pragma unroll
        for (int t = 0; t < kOutputTiles; ++t) {
          const int col = 8 * t + 2 * (lane & 3);
          if (col0 + col < head_dim) {
            *reinterpret_cast<std::uint32_t*>(out_row + col) =
                pack_pair<Element>(accumulator[r][t][2 * h] * inverse, accumulator[r][t][2 * h + 1] * inverse);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// fp32 kernel

template <int kHeadDimPad_>
struct Fp32Tiling {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = 4;
  static constexpr int kBlockM = kRowsPerWarp * kWarps;
  static constexpr int kBlockN = 32;  // one key per lane
  static constexpr int kColsPerLane = kHeadDimPad_ / 32;
  static constexpr int kKvStride = kHeadDimPad_ + 4;  // floats; rows stay 16-byte aligned
  static constexpr int kSharedBytes = 4 * (kBlockM * kHeadDimPad_ + kBlockN * kKvStride);
  static_assert(kSharedBytes <= kPortableSharedLimit, "tiles must fit every sm_80+ GPU");
};

// As load_tile_async for fp32, element by element through registers.
template <int kRows, int kCols, int kSharedStride, int kThreads>
__device__ __forceinline__ void load_fp32_tile(float* tile, const float* source, std::int64_t source_stride,
                                               int valid_rows, int valid_cols) {
  for (int index = static_cast<int>(threadIdx.x); index < kRows * kCols; index += kThreads) {
    const int row = index / kCols;
    const int col = index % kCols;
    tile[row * kSharedStride + col] = row < valid_rows && col < valid_cols ? source[row * source_stride + col] : 0.f;
  }
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(kFullWarp, value, offset));
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarp, value, offset);
  return value;
}

template <int kHeadDimPad>
__global__ void __launch_bounds__(Fp32Tiling<kHeadDimPad>::kThreads) attention_fp32_kernel(const AttentionParams p) {
  using Tiling = Fp32Tiling<kHeadDimPad>;
  constexpr int kThreads = Tiling::kThreads;
  constexpr int kRowsPerWarp = Tiling::kRowsPerWarp;
  constexpr int kBlockM = Tiling::kBlockM;
  constexpr int kBlockN = Tiling::kBlockN;
  constexpr int kColsPerLane = Tiling::kColsPerLane;
  constexpr int kKvStride = Tiling::kKvStride;

  float* q_tile = reinterpret_cast<float*>(attention_shared);  // (kBlockM, kHeadDimPad)
  float* kv_tile = q_tile + kBlockM * kHeadDimPad;             // (kBlockN, kKvStride): K, then V, of a key tile

  const int row0 = static_cast<int>(blockIdx.x) * kBlockM;
  const std::int64_t head = blockIdx.y;
  const std::int64_t batch = blockIdx.z;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_row0 = static_cast<int>(threadIdx.x) / 32 * kRowsPerWarp;
  const int head_dim = p.head_dim;
  const int kv_len = p.kv_len;

  const float* q = static_cast<const float*>(p.q) + batch * p.q_stride_batch + head * p.q_stride_head +
                   row0 * p.q_stride_row;
  const float* k = static_cast<const float*>(p.k) + batch * p.k_stride_batch + head * p.k_stride_head;
  const float* v = static_cast<const float*>(p.v) + batch * p.v_stride_batch + head * p.v_stride_head;
  float* out = static_cast<float*>(p.out) + batch * p.out_stride_batch + head * p.out_stride_head +
               row0 * p.out_stride_row;

  load_fp32_tile<kBlockM, kHeadDimPad, kHeadDimPad, kThreads>(q_tile, q, p.q_stride_row, min(kBlockM, p.q_len - row0),
                                                              head_dim);

  // Row warp_row0 + r of the block; this lane's output columns are lane + 32·c.
  float accumulator[kRowsPerWarp][kColsPerLane];
  float row_max[kRowsPerWarp];
  float row_sum[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) accumulator[r][c] = 0.f;
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  for (int kv0 = 0; kv0 < kv_len; kv0 += kBlockN) {
    const int valid_keys = min(kBlockN, kv_len - kv0);
    __syncthreads();  // Q is written (first tile); every warp has finished reading the previous V
    load_fp32_tile<kBlockN, kHeadDimPad, kKvStride, kThreads>(kv_tile, k + kv0 * p.k_stride_row, p.k_stride_row,
                                                              valid_keys, head_dim);
    __syncthreads();

    // Lane j scores key kv0 + j against the warp's rows.
    float scores[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) scores[r] = 0.f;
    // 16-byte shared loads, 4 columns at a time: the columns past D up to a multiple of 4 are zero.
    const float4* key = reinterpret_cast<const float4*>(kv_tile + lane * kKvStride);
    const float4* query = reinterpret_cast<const float4*>(q_tile + warp_row0 * kHeadDimPad);
    for (int col4 = 0; col4 < (head_dim + 3) / 4; ++col4) {
      const float4 key_values = key[col4];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float4 query_values = query[r * (kHeadDimPad / 4) + col4];
        scores[r] = fmaf(query_values.x, key_values.x, scores[r]);
        scores[r] = fmaf(query_values.y, key_values.y, scores[r]);
        scores[r] = fmaf(query_values.z, key_values.z, scores[r]);
        scores[r] = fmaf(query_values.w, key_values.w, scores[r]);
      }
    }

    // Online softmax over the 32 keys of the tile; key 0 of the first tile is never masked.
    float probabilities[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float score = lane < valid_keys ? scores[r] * p.scale : -INFINITY;
      const float new_max = fmaxf(row_max[r], warp_max(score));
      const float correction = expf(row_max[r] - new_max);
      probabilities[r] = expf(score - new_max);
      row_sum[r] = row_sum[r] * correction + warp_sum(probabilities[r]);
      row_max[r] = new_max;
#pragma unroll
      for (int c = 0; c < kColsPerLane; ++c) accumulator[r][c] *= correction;
    }

    __syncthreads();  // every warp has finished reading K
    load_fp32_tile<kBlockN, kHeadDimPad, kKvStride, kThreads>(kv_tile, v + kv0 * p.v_stride_row, p.v_stride_row,
                                                              valid_keys, head_dim);
    __syncthreads();

    for (int j = 0; j < valid_keys; ++j) {
      const float* value = kv_tile + j * kKvStride;
      float weight[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) weight[r] = __shfl_sync(kFullWarp, probabilities[r], j);
#pragma unroll
      for (int c = 0; c < kColsPerLane; ++c) {
        if (32 * c < head_dim) {
          const float value_c = value[lane + 32 * c];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) accumulator[r][c] = fmaf(weight[r], value_c, accumulator[r][c]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp_row0 + r;
    if (row0 + row < p.q_len) {
      const float inverse = 1.f / row_sum[r];
#pragma unroll
      for (int c = 0; c < kColsPerLane; ++c) {
        const int col = lane + 32 * c;
        if (col < head_dim) out[row * p.out_stride_row + col] = accumulator[r][c] * inverse;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launch

template <typename Kernel>
cudaError_t launch(Kernel* kernel, dim3 grid, int threads, int shared_bytes, const AttentionParams& params,
                   cudaStream_t stream) {
  if (shared_bytes > kDefaultSharedLimit) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
    if (status != cudaSuccess) return status;
  }
  AttentionParams arguments = params;
  void* argument_pointers[] = {&arguments};
  return cudaLaunchKernel(kernel, grid, dim3(threads), argument_pointers, static_cast<std::size_t>(shared_bytes),
                          stream);
}

template <typename Element, int kHeadDimPad>
cudaError_t launch_tensor_core(const AttentionParams& params, cudaStream_t stream) {
  using Tiling = typename TensorCoreTilingFor<kHeadDimPad>::type;
  const int row_blocks = (params.q_len + Tiling::kBlockM - 1) / Tiling::kBlockM;
  const dim3 grid(static_cast<unsigned>(row_blocks * Tiling::kColumnBlocks), static_cast<unsigned>(params.heads),
                  static_cast<unsigned>(params.batch));
  return launch(attention_tensor_core_kernel<Element, Tiling>, grid, Tiling::kThreads, Tiling::kSharedBytes, params,
                stream);
}

template <int kHeadDimPad>
cudaError_t launch_fp32(const AttentionParams& params, cudaStream_t stream) {
  using Tiling = Fp32Tiling<kHeadDimPad>;
  const int row_blocks = (params.q_len + Tiling::kBlockM - 1) / Tiling::kBlockM;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(params.heads),
                  static_cast<unsigned>(params.batch));
  return launch(attention_fp32_kernel<kHeadDimPad>, grid, Tiling::kThreads, Tiling::kSharedBytes, params, stream);
}

template <typename Element>
cudaError_t dispatch_tensor_core(const AttentionParams& params, cudaStream_t stream) {
  if (params.head_dim <= 64) return launch_tensor_core<Element, 64>(params, stream);
  if (params.head_dim <= 128) return launch_tensor_core<Element, 128>(params, stream);
  if (params.head_dim <= 256) return launch_tensor_core<Element, 256>(params, stream);
  return launch_tensor_core<Element, 512>(params, stream);
}

cudaError_t dispatch_fp32(const AttentionParams& params, cudaStream_t stream) {
  if (params.head_dim <= 64) return launch_fp32<64>(params, stream);
  if (params.head_dim <= 128) return launch_fp32<128>(params, stream);
  if (params.head_dim <= 256) return launch_fp32<256>(params, stream);
  return launch_fp32<512>(params, stream);
}

bool is_multiple(std::int64_t value, std::int64_t divisor) { return value % divisor == 0; }

bool is_aligned(const void* pointer, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(pointer) % bytes == 0;
}

bool satisfies_contract(const AttentionParams& p, AttentionElement element) {
  constexpr int kMaxGridDim = 65535;  // grid.y (heads) and grid.z (batch)
  if (p.batch < 0 || p.heads < 0 || p.q_len < 0 || p.kv_len < 1) return false;
  if (p.batch > kMaxGridDim || p.heads > kMaxGridDim) return false;
  if (p.head_dim < 1 || p.head_dim > kAttentionMaxHeadDim || !std::isfinite(p.scale)) return false;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr) return false;
  if (element == AttentionElement::kFloat32) {
    return is_aligned(p.q, 4) && is_aligned(p.k, 4) && is_aligned(p.v, 4) && is_aligned(p.out, 4);
  }
  const std::int64_t strides[] = {p.q_stride_batch,   p.q_stride_head,   p.q_stride_row,   p.k_stride_batch,
                                  p.k_stride_head,    p.k_stride_row,    p.v_stride_batch, p.v_stride_head,
                                  p.v_stride_row,     p.out_stride_batch, p.out_stride_head, p.out_stride_row};
  for (const std::int64_t stride : strides) {
    if (!is_multiple(stride, kAttentionLowPrecisionAlignment)) return false;
  }
  return is_multiple(p.head_dim, kAttentionLowPrecisionAlignment) && is_aligned(p.q, 16) && is_aligned(p.k, 16) &&
         is_aligned(p.v, 16) && is_aligned(p.out, 16);
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& params, AttentionElement element, cudaStream_t stream) {
  if (params.batch == 0 || params.heads == 0 || params.q_len == 0) return cudaSuccess;
  if (!satisfies_contract(params, element)) return cudaErrorInvalidValue;
  switch (element) {
    case AttentionElement::kFloat16:
      return dispatch_tensor_core<__half>(params, stream);
    case AttentionElement::kBFloat16:
      return dispatch_tensor_core<__nv_bfloat16>(params, stream);
    case AttentionElement::kFloat32:
      return dispatch_fp32(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace flashstep::kernels
