// Small-M CUDA NF4 kernels: bandwidth-bound, every weight byte read once
// per pass of `MR` rows of x, decoded through the 16-entry table in shared
// memory and multiplied in exact float32 (fmaf).
//
// Forward (y = x @ W, reduction over K = along a W^T row): a warp owns R
// consecutive W^T rows (outputs) and its lanes walk them in 16-byte chunks
// (32 codes, one scale), so each warp-wide load reads 512 contiguous bytes
// of a row. A chunk's dot product is summed before its scale is applied:
// acc += scale * sum(code * x). Warp-shuffle sums at the end; split-K
// (gridDim.y) when N alone cannot fill the GPU.
//
// Transposed (y = x @ W^T, reduction over N = across W^T rows): a block
// owns 512 output columns; lane l reads 8 bytes (16 codes) of each row at
// column 16 * l, so a warp reads 256 contiguous bytes per row. The 8 warps
// take every 8th row and are summed in shared memory in a fixed order;
// row splits (gridDim.y) write partial sums reduced by the finalize kernel.

#include "nf4_cuda_device.cuh"
#include "nf4_cuda_kernels.h"

namespace keras_qlora {
namespace nf4_cuda {
namespace {

// Stores one result: into y, or into this split's partial sums.
template <typename T>
__device__ __forceinline__ void StoreResult(const Nf4Args& a, int split,
                                            int64_t row, int64_t col,
                                            float v) {
  const int64_t out = a.out();
  if (a.plan.splits == 1) {
    static_cast<T*>(a.y)[row * out + col] = Act<T>::FromFloat(v);
  } else {
    a.workspace[(split * a.m + row) * out + col] = v;
  }
}

template <typename T, int MR, int R>
__global__ void __launch_bounds__(kGemvForwardWarps * 32)
    GemvForwardKernel(Nf4Args a, int64_t row_blocks) {
  __shared__ SharedTables tables;
  LoadTables(&tables, a);
  __syncthreads();
  const float offset = LoadOffset(a);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 =
      (blockIdx.x % row_blocks * kGemvForwardWarps + warp) * int64_t{R};
  const int64_t m0 = blockIdx.x / row_blocks * int64_t{MR};
  const int64_t chunks = a.k / kGemvChunk;
  int64_t c_begin, c_end;
  SplitRange(chunks, a.plan.split_len, blockIdx.y, &c_begin, &c_end);
  const uint4* packed = reinterpret_cast<const uint4*>(a.packed);
  const T* x = static_cast<const T*>(a.x);

  float acc[R][MR] = {};
  for (int64_t c = c_begin + lane; c < c_end; c += 32) {
    uint4 w[R];
    float scale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      w[r] = make_uint4(0, 0, 0, 0);
      scale[r] = 0.0f;
      if (n < a.n) {
        w[r] = __ldg(packed + n * chunks + c);
        const int64_t flat = FlatIndex(n, c * kGemvChunk, a.k);
        scale[r] = LoadScale(a, flat >> a.block_shift, tables, offset);
      }
    }
    float dot[R][MR] = {};
    // Fully unrolled, the x loads of all four words are hoisted: 32 * MR
    // registers. From MR = 4 on, one word at a time keeps occupancy.
#pragma unroll(MR >= 4 ? 1 : 4)
    for (int p = 0; p < 4; ++p) {  // 8 codes per 32-bit word
      float xv[MR][8];
#pragma unroll
      for (int i = 0; i < MR; ++i) {
        const int64_t row = m0 + i;
        if (row < a.m) {
          Load8(x + row * a.k + c * kGemvChunk + 8 * p, xv[i]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[i][e] = 0.0f;
        }
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float code = tables.code[CodeOf(Word(w[r], p), e)];
#pragma unroll
          for (int i = 0; i < MR; ++i)
            dot[r][i] = fmaf(code, xv[i][e], dot[r][i]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < MR; ++i)
        acc[r][i] = fmaf(scale[r], dot[r][i], acc[r][i]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      const float v = WarpSum(acc[r][i]);
      const int64_t n = n0 + r, row = m0 + i;
      if (lane == r * MR + i && n < a.n && row < a.m)
        StoreResult<T>(a, blockIdx.y, row, n, v);
    }
  }
}

template <typename T, int MR>
__global__ void __launch_bounds__(kGemvTransposeWarps * 32)
    GemvTransposeKernel(Nf4Args a, int64_t col_blocks) {
  __shared__ SharedTables tables;
  // [row of x][code of the lane's unit][lane]: conflict-free per warp.
  __shared__ float partial[MR][kGemvUnit][32];
  LoadTables(&tables, a);
  __syncthreads();
  const float offset = LoadOffset(a);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t col0 = blockIdx.x % col_blocks * int64_t{kGemvTransposeCols};
  const int64_t kcol = col0 + lane * kGemvUnit;
  const int64_t m0 = blockIdx.x / col_blocks * int64_t{MR};
  int64_t n_begin, n_end;
  SplitRange(a.n, a.plan.split_len, blockIdx.y, &n_begin, &n_end);
  const T* x = static_cast<const T*>(a.x);

  float acc[MR][kGemvUnit] = {};
  if (kcol < a.k) {  // k % 16 == 0: a unit is all in or all out
#pragma unroll 4
    for (int64_t n = n_begin + warp; n < n_end; n += kGemvTransposeWarps) {
      const int64_t flat = FlatIndex(n, kcol, a.k);
      const uint2 w = __ldg(reinterpret_cast<const uint2*>(a.packed) +
                            (flat >> 4));
      const float scale =
          LoadScale(a, flat >> a.block_shift, tables, offset);
      float xs[MR];
#pragma unroll
      for (int i = 0; i < MR; ++i) {
        const int64_t row = m0 + i;
        xs[i] = row < a.m ? Act<T>::ToFloat(x[row * a.n + n]) * scale : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kGemvUnit; ++e) {
        const float code = tables.code[CodeOf(e < 8 ? w.x : w.y, e & 7)];
#pragma unroll
        for (int i = 0; i < MR; ++i) acc[i][e] = fmaf(xs[i], code, acc[i][e]);
      }
    }
  }
  // Sum the 8 warps in a fixed order (deterministic).
  for (int wi = 0; wi < kGemvTransposeWarps; ++wi) {
    if (warp == wi) {
#pragma unroll
      for (int i = 0; i < MR; ++i)
#pragma unroll
        for (int e = 0; e < kGemvUnit; ++e)
          partial[i][e][lane] =
              (wi == 0 ? 0.0f : partial[i][e][lane]) + acc[i][e];
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < MR * kGemvTransposeCols;
       idx += kGemvTransposeWarps * 32) {
    const int i = idx / kGemvTransposeCols, cc = idx % kGemvTransposeCols;
    const int64_t row = m0 + i, col = col0 + cc;
    if (row < a.m && col < a.k)
      StoreResult<T>(a, blockIdx.y, row, col,
                     partial[i][cc % kGemvUnit][cc / kGemvUnit]);
  }
}

template <typename T, int MR>
cudaError_t Forward(const Nf4Args& a, cudaStream_t stream) {
  constexpr int R = MR <= 4 ? 4 : 2;  // keep in sync with PlanGemv
  const int64_t row_blocks = CeilDiv(a.n, kGemvForwardWarps * R);
  const int64_t blocks = row_blocks * CeilDiv(a.m, MR);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(a.plan.splits));
  KQ_LAUNCH(grid, kGemvForwardWarps * 32, stream,
            GemvForwardKernel<T, MR, R>)(a, row_blocks);
  return cudaGetLastError();
}

template <typename T, int MR>
cudaError_t Transposed(const Nf4Args& a, cudaStream_t stream) {
  const int64_t col_blocks = CeilDiv(a.k, kGemvTransposeCols);
  const int64_t blocks = col_blocks * CeilDiv(a.m, MR);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(a.plan.splits));
  KQ_LAUNCH(grid, kGemvTransposeWarps * 32, stream,
            GemvTransposeKernel<T, MR>)(a, col_blocks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Dispatch(const Nf4Args& a, cudaStream_t stream) {
  const int rows = a.plan.variant;
  if (a.transpose) {
    if (rows == 1) return Transposed<T, 1>(a, stream);
    if (rows == 2) return Transposed<T, 2>(a, stream);
    return Transposed<T, 4>(a, stream);
  }
  if (rows == 1) return Forward<T, 1>(a, stream);
  if (rows == 2) return Forward<T, 2>(a, stream);
  if (rows == 4) return Forward<T, 4>(a, stream);
  return Forward<T, 8>(a, stream);
}

}  // namespace

cudaError_t LaunchGemv(const Nf4Args& a, cudaStream_t stream) {
  switch (a.x_dtype) {
    case KQ_NF4_BF16:
      return Dispatch<__nv_bfloat16>(a, stream);
    case KQ_NF4_F16:
      return Dispatch<__half>(a, stream);
    default:
      return Dispatch<float>(a, stream);
  }
}

}  // namespace nf4_cuda
}  // namespace keras_qlora
