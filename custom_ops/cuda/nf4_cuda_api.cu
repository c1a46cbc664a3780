// The C ABI of nf4_cuda.h: argument checks, kernel choice (nf4_cuda_plan.h),
// workspace checks and launches on the caller's stream. Never allocates and
// never synchronizes.

#if defined(KQ_CUDA_SIM)
#include "cuda_sim.h"  // testing/cuda_sim/, on the include path
#else
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>

#include "nf4_cuda.h"
#include "nf4_cuda_kernels.h"
#include "nf4_cuda_plan.h"

namespace {

using keras_qlora::nf4_cuda::FitAlignment;
using keras_qlora::nf4_cuda::LaunchFinalize;
using keras_qlora::nf4_cuda::LaunchGemv;
using keras_qlora::nf4_cuda::LaunchMma;
using keras_qlora::nf4_cuda::LaunchReference;
using keras_qlora::nf4_cuda::MakePlan;
using keras_qlora::nf4_cuda::Nf4Args;
using keras_qlora::nf4_cuda::Plan;
using keras_qlora::nf4_cuda::Problem;
using keras_qlora::nf4_cuda::ValidateProblem;

int Fail(int code, char* err, int errlen, const char* fmt, ...) {
  if (err != nullptr && errlen > 0) {
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(err, static_cast<size_t>(errlen), fmt, args);
    va_end(args);
  }
  return code;
}

Problem MakeProblem(int64_t m, int64_t k, int64_t n, int x_dtype,
                    int block_size, int quant_type, int transpose) {
  Problem p;
  p.m = m, p.k = k, p.n = n;
  p.x_dtype = x_dtype;
  p.block_size = block_size;
  p.quant_type = quant_type;
  p.transpose = transpose != 0;
  return p;
}

// Multiprocessor count per device, cached (a benign race: every thread
// stores the same value).
constexpr int kMaxDevices = 64;
std::atomic<int> g_sm_count[kMaxDevices];

// Makes the device that owns `stream` current for this thread (this
// library's CUDA runtime keeps its own per-thread device) and returns its
// multiprocessor count.
int UseStreamDevice(void* stream, int* sm_count, char* err, int errlen) {
  int device = 0;
  cudaError_t status =
      cudaStreamGetDevice(static_cast<cudaStream_t>(stream), &device);
  int current = -1;
  if (status == cudaSuccess) status = cudaGetDevice(&current);
  if (status == cudaSuccess && current != device)
    status = cudaSetDevice(device);
  if (status != cudaSuccess)
    return Fail(KQ_NF4_ERR_CUDA, err, errlen,
                "kq_nf4: cannot use the stream's device: %s (%s)",
                cudaGetErrorString(status), cudaGetErrorName(status));
  int sms = device < kMaxDevices ? g_sm_count[device].load() : 0;
  if (sms <= 0) {
    status =
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (status != cudaSuccess)
      return Fail(KQ_NF4_ERR_CUDA, err, errlen,
                  "kq_nf4: cannot read the multiprocessor count: %s",
                  cudaGetErrorString(status));
    if (device < kMaxDevices) g_sm_count[device].store(sms);
  }
  *sm_count = sms;
  return KQ_NF4_OK;
}

cudaError_t Launch(const Nf4Args& a, bool x_vec, int sm_count,
                   cudaStream_t stream) {
  cudaError_t status;
  switch (a.plan.algo) {
    case KQ_NF4_ALGO_GEMV:
      status = LaunchGemv(a, stream);
      break;
    case KQ_NF4_ALGO_MMA:
      status = LaunchMma(a, x_vec, stream);
      break;
    default:
      return LaunchReference(a, sm_count, stream);
  }
  if (status == cudaSuccess && a.plan.splits > 1)
    status = LaunchFinalize(a, sm_count, stream);
  return status;
}

const char* AlgoName(int algo) {
  switch (algo) {
    case KQ_NF4_ALGO_GEMV:
      return "gemv";
    case KQ_NF4_ALGO_MMA:
      return "mma";
    default:
      return "reference";
  }
}

}  // namespace

extern "C" {

int kq_nf4_cuda_abi_version(void) { return KQ_NF4_CUDA_ABI_VERSION; }

int kq_nf4_cuda_plan(int64_t m, int64_t k, int64_t n, int x_dtype,
                     int block_size, int quant_type, int transpose, int algo,
                     int allow_tf32, int sm_count, KqNf4Plan* plan, char* err,
                     int errlen) {
  const Problem p =
      MakeProblem(m, k, n, x_dtype, block_size, quant_type, transpose);
  if (!ValidateProblem(p, algo, sm_count, err, errlen))
    return KQ_NF4_ERR_INVALID_ARGUMENT;
  if (plan == nullptr)
    return Fail(KQ_NF4_ERR_INVALID_ARGUMENT, err, errlen,
                "kq_nf4: plan must not be NULL");
  const Plan full = MakePlan(p, algo, allow_tf32 != 0, sm_count);
  plan->algo = full.algo;
  plan->variant = full.variant;
  plan->splits = full.splits;
  plan->workspace_bytes = full.workspace_bytes;
  return KQ_NF4_OK;
}

int kq_nf4_cuda_workspace_size(int64_t m, int64_t k, int64_t n, int x_dtype,
                               int block_size, int quant_type, int transpose,
                               int algo, int allow_tf32, void* stream,
                               size_t* bytes, char* err, int errlen) {
  const Problem p =
      MakeProblem(m, k, n, x_dtype, block_size, quant_type, transpose);
  if (!ValidateProblem(p, algo, 1, err, errlen))
    return KQ_NF4_ERR_INVALID_ARGUMENT;
  if (bytes == nullptr)
    return Fail(KQ_NF4_ERR_INVALID_ARGUMENT, err, errlen,
                "kq_nf4: bytes must not be NULL");
  *bytes = 0;
  if (m == 0) return KQ_NF4_OK;
  int sm_count = 0;
  const int rc = UseStreamDevice(stream, &sm_count, err, errlen);
  if (rc != KQ_NF4_OK) return rc;
  *bytes = static_cast<size_t>(
      MakePlan(p, algo, allow_tf32 != 0, sm_count).workspace_bytes);
  return KQ_NF4_OK;
}

int kq_nf4_matmul_cuda(const void* x, int x_dtype, const uint8_t* packed,
                       const void* absmax, int absmax_is_u8,
                       const float* absmax_scale, const float* absmax_offset,
                       void* y, int64_t m, int64_t k, int64_t n,
                       int block_size, int quant_type, int transpose, int algo,
                       int allow_tf32, void* workspace, size_t workspace_bytes,
                       void* stream, char* err, int errlen) {
  const Problem p =
      MakeProblem(m, k, n, x_dtype, block_size, quant_type, transpose);
  if (!ValidateProblem(p, algo, 1, err, errlen))
    return KQ_NF4_ERR_INVALID_ARGUMENT;
  if (m == 0) return KQ_NF4_OK;
  if (x == nullptr || packed == nullptr || absmax == nullptr || y == nullptr)
    return Fail(KQ_NF4_ERR_INVALID_ARGUMENT, err, errlen,
                "kq_nf4: x, packed, absmax and y must not be NULL");
  if (absmax_is_u8 && p.int8())
    return Fail(KQ_NF4_ERR_INVALID_ARGUMENT, err, errlen,
                "kq_nf4: quant_type=2 (int8) takes float32 absmax (one scale "
                "per row of W^T) and has no double quantization. Received: "
                "absmax_is_u8=%d", absmax_is_u8);
  if (absmax_is_u8 && (absmax_scale == nullptr || absmax_offset == nullptr))
    return Fail(KQ_NF4_ERR_INVALID_ARGUMENT, err, errlen,
                "kq_nf4: with absmax_is_u8 (double quantization), "
                "absmax_scale and absmax_offset must not be NULL");
  int sm_count = 0;
  const int rc = UseStreamDevice(stream, &sm_count, err, errlen);
  if (rc != KQ_NF4_OK) return rc;

  Nf4Args a;
  bool x_vec = false;
  a.plan = FitAlignment(p, x, packed,
                        MakePlan(p, algo, allow_tf32 != 0, sm_count), &x_vec);
  if (a.plan.workspace_bytes > 0 &&
      (workspace == nullptr ||
       workspace_bytes < static_cast<size_t>(a.plan.workspace_bytes)))
    return Fail(KQ_NF4_ERR_WORKSPACE, err, errlen,
                "kq_nf4: the %s kernel needs a workspace of %lld bytes. "
                "Received: workspace=%p, workspace_bytes=%zu",
                AlgoName(a.plan.algo),
                static_cast<long long>(a.plan.workspace_bytes), workspace,
                workspace_bytes);
  a.x = x;
  a.packed = packed;
  if (absmax_is_u8) {
    a.absmax_u8 = static_cast<const uint8_t*>(absmax);
    a.nested = absmax_scale;
    a.offset = absmax_offset;
  } else {
    a.absmax_f32 = static_cast<const float*>(absmax);
  }
  a.y = y;
  a.workspace = static_cast<float*>(workspace);
  a.m = m, a.k = k, a.n = n;
  a.block_shift =
      p.int8() ? 0 : __builtin_ctz(static_cast<unsigned>(block_size));
  a.x_dtype = x_dtype;
  a.quant_type = quant_type;
  a.transpose = transpose != 0;
  const cudaError_t status =
      Launch(a, x_vec, sm_count, static_cast<cudaStream_t>(stream));
  if (status != cudaSuccess)
    return Fail(KQ_NF4_ERR_CUDA, err, errlen,
                "kq_nf4: launching the %s kernel failed: %s (%s)",
                AlgoName(a.plan.algo), cudaGetErrorString(status),
                cudaGetErrorName(status));
  return KQ_NF4_OK;
}

}  // extern "C"
