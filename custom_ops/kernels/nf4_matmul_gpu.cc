// GPU kernel of KerasQLoRA>NF4Matmul: validates the inputs like the CPU
// kernel, then calls the CUDA C ABI (custom_ops/cuda/nf4_cuda.h) on
// TensorFlow's stream. This file includes TensorFlow headers but no CUDA
// headers; the .cu sources include no TensorFlow headers, and are compiled
// by nvcc and linked into the same library with a static, hidden CUDA
// runtime (see keras_qlora/ops/_library.py). Compiled to nothing unless the
// build defines GOOGLE_CUDA=1 (nvcc found).
//
// float32 inputs use TF32 tensor cores for large M exactly when TensorFlow
// allows TF32 for its own float32 matmuls
// (tf.config.experimental.enable_tensor_float_32_execution); otherwise they
// stay exact float32.

#if GOOGLE_CUDA

#include <string>
#include <type_traits>

#include "../cuda/nf4_cuda.h"
#include "nf4_common.h"
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

template <typename T, typename AbsT>
class Nf4MatmulGpuOp : public OpKernel {
 public:
  explicit Nf4MatmulGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("k", &k_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("n", &n_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose", &transpose_));
    OP_REQUIRES(ctx, k_ >= 1 && n_ >= 1,
                InvalidArgument("NF4Matmul: k and n must be >= 1. Received: "
                                "k=", k_, ", n=", n_));
    OP_REQUIRES(ctx, nf4::IsAllowedBlockSize(block_size_),
                InvalidArgument("NF4Matmul: block_size must be one of (32, "
                                "64, 128, 256). Received: block_size=",
                                block_size_));
    OP_REQUIRES(ctx, nf4::CheckedMul(k_, n_, &count_),
                InvalidArgument("NF4Matmul: k * n overflows int64. Received: "
                                "k=", k_, ", n=", n_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const int64_t in_dim = transpose_ ? n_ : k_;
    const int64_t out_dim = transpose_ ? k_ : n_;
    OP_REQUIRES(ctx, x.dims() >= 2,
                InvalidArgument("NF4Matmul: x must have rank >= 2. Received "
                                "shape ", x.shape().DebugString()));
    OP_REQUIRES(ctx, x.dim_size(x.dims() - 1) == in_dim,
                InvalidArgument("NF4Matmul: the last axis of x must be ",
                                transpose_ ? "n" : "k", "=", in_dim,
                                ". Received shape ", x.shape().DebugString()));
    OP_REQUIRES_OK(ctx, ValidateState(ctx));
    TensorShape out_shape = x.shape();
    out_shape.set_dim(x.dims() - 1, out_dim);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &y));
    const int64_t m = x.NumElements() / in_dim;
    if (m == 0) return;

    void* stream =
        ctx->op_device_context()->stream()->platform_specific_handle().stream;
    const bool double_quant = std::is_same<AbsT, uint8_t>::value;
    const int allow_tf32 = tsl::tensor_float_32_execution_enabled() ? 1 : 0;
    char err[512] = {0};
    size_t ws_bytes = 0;
    OP_REQUIRES_OK(ctx, AbiStatus(kq_nf4_cuda_workspace_size(
                                      m, k_, n_, DtypeCode<T>(), block_size_,
                                      transpose_, KQ_NF4_ALGO_AUTO, allow_tf32,
                                      stream, &ws_bytes, err, sizeof(err)),
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
        y->flat<T>().data(), m, k_, n_, block_size_, transpose_,
        KQ_NF4_ALGO_AUTO, allow_tf32, ws, ws_bytes, stream, err, sizeof(err));
    OP_REQUIRES_OK(ctx, AbiStatus(rc, err));
  }

 private:
  // Exactly the sizes the attributes imply (as the CPU kernel checks), so
  // that no kernel reads past a buffer.
  Status ValidateState(OpKernelContext* ctx) const {
    const Tensor& packed = ctx->input(1);
    const Tensor& absmax = ctx->input(2);
    const int64_t blocks = nf4::NumBlocks(count_, block_size_);
    if (packed.dims() != 1 || packed.NumElements() != nf4::PackedBytes(count_))
      return InvalidArgument(
          "NF4Matmul: packed must be 1-D with ceil(k * n / 2) = ",
          nf4::PackedBytes(count_), " bytes for k=", k_, ", n=", n_,
          ". Received shape ", packed.shape().DebugString());
    if (absmax.dims() != 1 || absmax.NumElements() != blocks)
      return InvalidArgument(
          "NF4Matmul: absmax must be 1-D with ceil(k * n / block_size) = ",
          blocks, " entries for k=", k_, ", n=", n_, ", block_size=",
          block_size_, ". Received shape ", absmax.shape().DebugString());
    if (!std::is_same<AbsT, uint8_t>::value) return Status();
    const Tensor& scale = ctx->input(3);
    const Tensor& offset = ctx->input(4);
    const int64_t nested = nf4::NumNestedBlocks(blocks);
    if (scale.dims() != 1 || scale.NumElements() != nested)
      return InvalidArgument(
          "NF4Matmul: with uint8 absmax (double quantization), absmax_scale "
          "must be 1-D with ceil(blocks / 256) = ", nested, " entries. "
          "Received shape ", scale.shape().DebugString());
    if (offset.dims() != 0)
      return InvalidArgument(
          "NF4Matmul: absmax_offset must be a scalar. Received shape ",
          offset.shape().DebugString());
    return Status();
  }

  int64_t k_ = 0, n_ = 0, block_size_ = 0, count_ = 0;
  bool transpose_ = false;
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
