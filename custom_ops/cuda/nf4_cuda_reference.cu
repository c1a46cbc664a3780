// The simple CUDA NF4 kernels: the reference matmul (one warp per output
// element, any shape, alignment and base format; the fallback of the fast
// kernels, of int8 where MMA cannot run, and an oracle of the GPU harness)
// and the split-K finalize step.

#include <algorithm>

#include "nf4_cuda_device.cuh"
#include "nf4_cuda_kernels.h"

namespace keras_qlora {
namespace nf4_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// y[row, o] = sum_r x[row, r] * W(r, o), W(r, o) = code * scale rounded to
// float32 exactly as the CPU kernels compute it (4-bit formats: the
// block's table value times its scale; int8: nf4::Int8Value of the byte
// and the row's scale). Lanes stride over r, so
// the forward product reads each W^T row coalesced; the transposed one
// reads a column (slow, but this kernel is about being right).
template <typename T>
__global__ void __launch_bounds__(kThreads) ReferenceKernel(Nf4Args a) {
  __shared__ SharedTables tables;
  LoadTables(&tables, a);
  __syncthreads();
  const float offset = LoadOffset(a);
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int lane = threadIdx.x & 31;
  const int64_t red = a.red(), out = a.out();
  const int64_t total = a.m * out;
  const int64_t stride = int64_t{gridDim.x} * kWarps;
  for (int64_t w = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; w < total;
       w += stride) {
    const int64_t row = w / out, o = w % out;
    float acc = 0.0f;
    for (int64_t r = lane; r < red; r += 32) {
      const int64_t n = a.transpose ? r : o;  // the W^T row
      const int64_t flat = FlatIndex(n, a.transpose ? o : r, a.k);
      float weight;
      if (a.int8()) {
        weight = LoadInt8Weight(a, flat, n);
      } else {
        const uint8_t byte = __ldg(a.packed + (flat >> 1));
        const int code = (flat & 1) ? (byte & 15) : (byte >> 4);
        const float scale =
            LoadScale(a, flat >> a.block_shift, tables, offset);
        weight = MulRn(tables.code[code], scale);
      }
      acc = fmaf(Act<T>::ToFloat(x[row * red + r]), weight, acc);
    }
    acc = WarpSum(acc);
    if (lane == 0) y[row * out + o] = Act<T>::FromFloat(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    FinalizeKernel(const float* partial, int splits, int64_t count, T* y) {
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x; i < count;
       i += stride) {
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += partial[z * count + i];
    y[i] = Act<T>::FromFloat(sum);
  }
}

// Blocks for `total` items of `per_block` each, capped (grid-stride loops).
int GridFor(int64_t per_block, int64_t total, int sm_count) {
  const int64_t want = CeilDiv(total, per_block);
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(want, int64_t{sm_count} * 16)));
}

template <typename T>
cudaError_t Reference(const Nf4Args& a, int sm_count, cudaStream_t stream) {
  const int grid = GridFor(kWarps, a.m * a.out(), sm_count);
  KQ_LAUNCH(grid, kThreads, stream,
            ReferenceKernel<T>)(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Finalize(const Nf4Args& a, int sm_count, cudaStream_t stream) {
  const int64_t count = a.m * a.out();
  const int grid = GridFor(kThreads, count, sm_count);
  KQ_LAUNCH(grid, kThreads, stream,
            FinalizeKernel<T>)(
      a.workspace, a.plan.splits, count, static_cast<T*>(a.y));
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchReference(const Nf4Args& a, int sm_count,
                            cudaStream_t stream) {
  switch (a.x_dtype) {
    case KQ_NF4_BF16:
      return Reference<__nv_bfloat16>(a, sm_count, stream);
    case KQ_NF4_F16:
      return Reference<__half>(a, sm_count, stream);
    default:
      return Reference<float>(a, sm_count, stream);
  }
}

cudaError_t LaunchFinalize(const Nf4Args& a, int sm_count,
                           cudaStream_t stream) {
  switch (a.x_dtype) {
    case KQ_NF4_BF16:
      return Finalize<__nv_bfloat16>(a, sm_count, stream);
    case KQ_NF4_F16:
      return Finalize<__half>(a, sm_count, stream);
    default:
      return Finalize<float>(a, sm_count, stream);
  }
}

}  // namespace nf4_cuda
}  // namespace keras_qlora
