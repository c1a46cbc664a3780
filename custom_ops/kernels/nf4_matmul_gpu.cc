// GPU kernel of KerasQLoRA>NF4Matmul: validates the inputs like the CPU
// kernel, then calls the CUDA C ABI (custom_ops/cuda/nf4_cuda.h) on
// TensorFlow's stream. This file includes TensorFlow headers but no CUDA
// headers; the .cu sources include no TensorFlow headers, and are compiled
// by nvcc and linked into the same library with a static, hidden CUDA
// runtime (see keras_qlora/ops/_library.py). Compiled to nothing unless the
// build defines GOOGLE_CUDA=1 (nvcc found).
//
// The op's quant_type (nf4 / fp4 / int8) goes to the C ABI as is; its
// checks (int8: block_size == k, float32 absmax) are Nf4MatmulAttrs'.
//
// float32 inputs use TF32 tensor cores for large M exactly when TensorFlow
// allows TF32 for its own float32 matmuls
// (tf.config.experimental.enable_tensor_float_32_execution); otherwise they
// stay exact float32.

#if GOOGLE_CUDA

#include <cstdint>
#include <string>
#include <type_traits>

#include "../cuda/nf4_cuda.h"
#include "nf4_common.h"
#include "nf4_matmul_args.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tsl/platform/tensor_float_32_utils.h"
#include "xla/stream_executor/stream.h"

namespace keras_qlora {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

template <typename T>
constexpr int DtypeCode() {
  return std::is_same<T, float>::value                     ? KQ_NF4_F32
         : std::is_same<T, ::tensorflow::bfloat16>::value ? KQ_NF4_BF16
                                                           : KQ_NF4_F16;
}

// The C ABI's error code as a TensorFlow status.
Status AbiStatus(int rc, const char* message) {
  if (rc == KQ_NF4_OK) return Status();
  const std::string text = std::string("NF4Matmul (GPU): ") + message;
  if (rc == KQ_NF4_ERR_INVALID_ARGUMENT) return InvalidArgument(text);
  return ::tensorflow::errors::Internal(text);
}

// The C ABI's quant type (KQ_NF4_QUANT_*, nf4::QuantType's values).
int QuantTypeArg(const Nf4MatmulAttrs& a) {
  return static_cast<int>(a.quant_type);
}

// block_size as the C ABI's int: int8's block_size is k, which can exceed
// an int; the ABI then rejects it (block_size != k) with a message.
int BlockSizeArg(const Nf4MatmulAttrs& a) {
  return a.block_size <= INT32_MAX ? static_cast<int>(a.block_size) : -1;
}

template <typename T, typename AbsT>
class Nf4MatmulGpuOp : public OpKernel {
 public:
  explicit Nf4MatmulGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, attrs_.Read(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    Tensor* y = nullptr;
    int64_t m = 0;
    OP_REQUIRES_OK(ctx, attrs_.Prepare<AbsT>(ctx, &y, &m));
    if (m == 0) return;
    const Tensor& x = ctx->input(0);

    void* stream =
        ctx->op_device_context()->stream()->platform_specific_handle().stream;
    const bool double_quant = std::is_same<AbsT, uint8_t>::value;
    const int allow_tf32 = tsl::tensor_float_32_execution_enabled() ? 1 : 0;
    char err[512] = {0};
    size_t ws_bytes = 0;
    const Nf4MatmulAttrs& a = attrs_;
    OP_REQUIRES_OK(ctx, AbiStatus(kq_nf4_cuda_workspace_size(
                                      m, a.k, a.n, DtypeCode<T>(),
                                      BlockSizeArg(a), QuantTypeArg(a),
                                      a.transpose,
                                      KQ_NF4_ALGO_AUTO, allow_tf32, stream,
                                      &ws_bytes, err, sizeof(err)),
                                  err));
    Tensor workspace;
    void* ws = nullptr;
    if (ws_bytes > 0) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                              ::tensorflow::DT_UINT8,
                              TensorShape({static_cast<int64_t>(ws_bytes)}),
                              &workspace));
      ws = workspace.flat<uint8_t>().data();
    }
    const Tensor& scale = ctx->input(3);
    const Tensor& offset = ctx->input(4);
    const int rc = kq_nf4_matmul_cuda(
        x.flat<T>().data(), DtypeCode<T>(),
        ctx->input(1).flat<uint8_t>().data(),
        ctx->input(2).flat<AbsT>().data(), double_quant ? 1 : 0,
        double_quant ? scale.flat<float>().data() : nullptr,
        double_quant ? offset.flat<float>().data() : nullptr,
        y->flat<T>().data(), m, a.k, a.n, BlockSizeArg(a), QuantTypeArg(a),
        a.transpose,
        KQ_NF4_ALGO_AUTO, allow_tf32, ws, ws_bytes, stream, err, sizeof(err));
    OP_REQUIRES_OK(ctx, AbiStatus(rc, err));
  }

 private:
  Nf4MatmulAttrs attrs_;
};

#define KQ_REGISTER_GPU(T, AbsT)                                   \
  REGISTER_KERNEL_BUILDER(Name("KerasQLoRA>NF4Matmul")             \
                              .Device(::tensorflow::DEVICE_GPU)    \
                              .TypeConstraint<T>("T")              \
                              .TypeConstraint<AbsT>("absmax_type"), \
                          Nf4MatmulGpuOp<T, AbsT>)

KQ_REGISTER_GPU(float, float);
KQ_REGISTER_GPU(float, uint8_t);
KQ_REGISTER_GPU(::tensorflow::bfloat16, float);
KQ_REGISTER_GPU(::tensorflow::bfloat16, uint8_t);
KQ_REGISTER_GPU(Eigen::half, float);
KQ_REGISTER_GPU(Eigen::half, uint8_t);

}  // namespace
}  // namespace keras_qlora

#endif  // GOOGLE_CUDA
