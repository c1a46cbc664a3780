/* C ABI of the CUDA NF4 matmul (keras_qlora). No TensorFlow, no CUDA
 * headers: the TensorFlow GPU kernel (custom_ops/kernels/nf4_matmul_gpu.cc)
 * and the standalone GPU harness (benchmarks/gpu/harness.py, via ctypes)
 * both call exactly these functions.
 *
 * The product, for x [M, K] (or [M, N] with transpose) in row-major order:
 *   transpose == 0:  y[M, N] = x @ W        y[m, n] = sum_k x[m, k] W[k, n]
 *   transpose == 1:  y[M, K] = x @ W^T      y[m, k] = sum_n x[m, n] W[k, n]
 * with W [K, N] stored in one of the base formats (`quant_type`, the
 * format's rules in custom_ops/include/nf4_format.h) exactly as
 * keras_qlora / bitsandbytes store it:
 * - KQ_NF4_QUANT_NF4 / KQ_NF4_QUANT_FP4 (4-bit):
 *   packed   uint8 [ceil(K*N/2)]: the 4-bit codes of W^T ([N, K]) flattened
 *            row-major, two per byte, the FIRST element in the HIGH nibble;
 *   blocks of `block_size` (32/64/128/256) consecutive elements of that flat
 *            array share one scale: absmax[b] (float32), or with double
 *            quantization (absmax_is_u8) the uint8 code q[b] decoded as
 *            dynamic_map[q[b]] * absmax_scale[b / 256] + *absmax_offset
 *            (one float32 multiply, then one add; the 256-entry signed
 *            dynamic map is built into the library);
 *   element i = code_table[code_i] * scale[i / block_size], code_table the
 *            16 NF4 or FP4 values (built into the library).
 * - KQ_NF4_QUANT_INT8: packed holds K*N bytes, the int8 codes of W^T
 *   row-major (two's complement); absmax is float32 [N], one scale per ROW
 *   of W^T (bitsandbytes' SCB); block_size must equal K (any K >= 1); no
 *   double quantization (absmax_is_u8 must be 0);
 *   element (n, k) = (float(code) * absmax[n]) * float32(1/127), two
 *   float32 multiplies, never fused (bitsandbytes' int8_vectorwise_dequant).
 * Activations x and y are float32, bfloat16 or float16 (the same dtype);
 * products accumulate in float32.
 *
 * Every pointer is a DEVICE pointer, including absmax_offset (a device
 * scalar, read by the kernels: the launcher never synchronizes). All work is
 * enqueued on `stream` (a cudaStream_t; NULL is the legacy default stream)
 * on the device that owns the stream. Nothing is allocated: when the chosen
 * kernels need scratch (split-K partial sums), the caller passes at least
 * kq_nf4_cuda_workspace_size() bytes. Deterministic: split-K partial sums
 * are reduced in a fixed order, never with atomics.
 *
 * Return value: KQ_NF4_OK (0) or an error code; on error a message is
 * written to `err` (NUL-terminated, at most errlen bytes) when err != NULL.
 */
#ifndef KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_H_
#define KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; only these are exported. */
#if defined(__GNUC__)
#define KQ_NF4_EXPORT __attribute__((visibility("default")))
#else
#define KQ_NF4_EXPORT
#endif

/* Bumped on any incompatible change of the functions below. */
#define KQ_NF4_CUDA_ABI_VERSION 2

/* Activation dtypes (x and y). */
#define KQ_NF4_F32 0
#define KQ_NF4_BF16 1
#define KQ_NF4_F16 2

/* Base formats of W (`quant_type`; the values of nf4::QuantType). */
#define KQ_NF4_QUANT_NF4 0
#define KQ_NF4_QUANT_FP4 1
#define KQ_NF4_QUANT_INT8 2

/* Kernel choice. AUTO picks by M (see nf4_cuda_plan.h); the others force
 * one kernel family (tests and the harness run each one on every shape).
 * A forced fast kernel whose preconditions do not hold (e.g. K % 16 != 0,
 * misaligned pointers) runs REFERENCE instead. int8 has no GEMV kernel:
 * it runs MMA or REFERENCE at every M (nf4_cuda_plan.h). */
#define KQ_NF4_ALGO_AUTO 0
#define KQ_NF4_ALGO_REFERENCE 1 /* simple, obviously correct, any shape */
#define KQ_NF4_ALGO_GEMV 2      /* small M: bandwidth-bound, exact fp32 */
#define KQ_NF4_ALGO_MMA 3       /* tensor cores (bf16/f16, tf32 for f32) */

/* Return codes. */
#define KQ_NF4_OK 0
#define KQ_NF4_ERR_INVALID_ARGUMENT 1
#define KQ_NF4_ERR_WORKSPACE 2 /* workspace too small */
#define KQ_NF4_ERR_CUDA 3      /* a CUDA runtime call or launch failed */

/* What AUTO (or a forced algo) will run for a problem. */
typedef struct KqNf4Plan {
  int algo;                /* KQ_NF4_ALGO_REFERENCE / _GEMV / _MMA */
  int variant;             /* GEMV: rows of x per pass; MMA: tile rows */
  int splits;              /* reduction splits (1: no partial sums) */
  int64_t workspace_bytes; /* scratch the launch needs (0 when splits==1) */
} KqNf4Plan;

/* KQ_NF4_CUDA_ABI_VERSION of the built library. */
KQ_NF4_EXPORT int kq_nf4_cuda_abi_version(void);

/* Host only, no CUDA call: the plan for a problem on a GPU with
 * `sm_count` multiprocessors. allow_tf32 != 0 lets float32 activations use
 * TF32 tensor cores for large M (what TensorFlow does for float32 matmuls
 * unless tf.config.experimental.enable_tensor_float_32_execution(False));
 * with 0, float32 stays exact fp32 (SIMT kernels) at every M. */
KQ_NF4_EXPORT int kq_nf4_cuda_plan(int64_t m, int64_t k, int64_t n,
                                   int x_dtype, int block_size,
                                   int quant_type, int transpose, int algo,
                                   int allow_tf32, int sm_count,
                                   KqNf4Plan* plan, char* err, int errlen);

/* Scratch bytes kq_nf4_matmul_cuda needs for these arguments on the device
 * that owns `stream` (queries its multiprocessor count; no allocation, no
 * synchronization). */
KQ_NF4_EXPORT int kq_nf4_cuda_workspace_size(
    int64_t m, int64_t k, int64_t n, int x_dtype, int block_size,
    int quant_type, int transpose, int algo, int allow_tf32, void* stream,
    size_t* bytes, char* err, int errlen);

/* Enqueues y = x @ W (or x @ W^T) on `stream`. absmax_scale and
 * absmax_offset are used only when absmax_is_u8 (else they may be NULL;
 * int8 never has them).
 * M == 0 is a no-op. `workspace` may be NULL when the size query gave 0. */
KQ_NF4_EXPORT int kq_nf4_matmul_cuda(
    const void* x, int x_dtype, const uint8_t* packed, const void* absmax,
    int absmax_is_u8, const float* absmax_scale, const float* absmax_offset,
    void* y, int64_t m, int64_t k, int64_t n, int block_size, int quant_type,
    int transpose, int algo, int allow_tf32, void* workspace,
    size_t workspace_bytes, void* stream, char* err, int errlen);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_H_ */
