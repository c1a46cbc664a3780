// Launchers of the CUDA NF4 kernels (internal; the C ABI in nf4_cuda.h is
// the public interface). Each enqueues its kernels on `stream` and returns
// the launch status; none synchronizes.

#ifndef KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_KERNELS_H_
#define KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_KERNELS_H_

#if defined(KQ_CUDA_SIM)
#include "cuda_sim.h"  // testing/cuda_sim/, on the include path
#else
#include <cuda_runtime_api.h>
#endif

#include "nf4_cuda_math.h"

namespace keras_qlora {
namespace nf4_cuda {

// One warp per output element; any shape and alignment
// (nf4_cuda_reference.cu).
cudaError_t LaunchReference(const Nf4Args& a, int sm_count,
                            cudaStream_t stream);

// y = sum of the `plan.splits` partial sums in the workspace, in split
// order (nf4_cuda_reference.cu).
cudaError_t LaunchFinalize(const Nf4Args& a, int sm_count,
                           cudaStream_t stream);

// Small-M kernels, forward and transposed (nf4_cuda_gemv.cu).
cudaError_t LaunchGemv(const Nf4Args& a, cudaStream_t stream);

// Tensor-core kernels (nf4_cuda_mma.cu). `x_vec`: x rows can be read in
// 16-byte vectors (aligned base, reduction length a multiple of 16 bytes).
cudaError_t LaunchMma(const Nf4Args& a, bool x_vec, cudaStream_t stream);

}  // namespace nf4_cuda
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_KERNELS_H_
