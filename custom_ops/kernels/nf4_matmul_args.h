// Attributes and argument checks of the NF4Matmul op, shared by its CPU and
// GPU kernels, so both refuse exactly the same inputs with the same
// messages. Every buffer must have exactly the size the attributes imply,
// so that no kernel can read past its end.
#ifndef KERAS_QLORA_NF4_MATMUL_ARGS_H_
#define KERAS_QLORA_NF4_MATMUL_ARGS_H_

#include <cstdint>
#include <string>
#include <type_traits>

#include "nf4_common.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace keras_qlora {

struct Nf4MatmulAttrs {
  int64_t k = 0, n = 0, block_size = 0, count = 0;
  bool transpose = false;
  nf4::QuantType quant_type = nf4::QuantType::kNf4;

  bool is_int8() const { return quant_type == nf4::QuantType::kInt8; }
  // The 16-entry code table of a 4-bit format (nullptr for int8).
  const float* code_table() const {
    return is_int8() ? nullptr : nf4::CodeTable(quant_type);
  }

  int64_t in_dim() const { return transpose ? n : k; }
  int64_t out_dim() const { return transpose ? k : n; }

  // Reads and checks the op's attributes.
  ::tensorflow::Status Read(::tensorflow::OpKernelConstruction* ctx) {
    using ::tensorflow::errors::InvalidArgument;
    TF_RETURN_IF_ERROR(ctx->GetAttr("k", &k));
    TF_RETURN_IF_ERROR(ctx->GetAttr("n", &n));
    TF_RETURN_IF_ERROR(ctx->GetAttr("block_size", &block_size));
    TF_RETURN_IF_ERROR(ctx->GetAttr("transpose", &transpose));
    std::string type_name;
    TF_RETURN_IF_ERROR(ctx->GetAttr("quant_type", &type_name));
    if (type_name == "nf4") {
      quant_type = nf4::QuantType::kNf4;
    } else if (type_name == "fp4") {
      quant_type = nf4::QuantType::kFp4;
    } else if (type_name == "int8") {
      quant_type = nf4::QuantType::kInt8;
    } else {
      return InvalidArgument("NF4Matmul: quant_type must be one of nf4, fp4, "
                             "int8. Received: quant_type=", type_name);
    }
    if (k < 1 || n < 1)
      return InvalidArgument("NF4Matmul: k and n must be >= 1. Received: "
                             "k=", k, ", n=", n);
    if (is_int8() && block_size != k)
      return InvalidArgument(
          "NF4Matmul: with quant_type=int8 every row of W^T has one scale, "
          "so block_size must equal k=", k, ". Received: block_size=",
          block_size);
    if (!is_int8() && !nf4::IsAllowedBlockSize(block_size))
      return InvalidArgument("NF4Matmul: " KQ_NF4_BLOCK_SIZE_ERROR,
                             block_size);
    if (!nf4::CheckedMul(k, n, &count))
      return InvalidArgument("NF4Matmul: k * n overflows int64. Received: "
                             "k=", k, ", n=", n);
    return ::tensorflow::Status();
  }

  // Checks x and the NF4 buffers and allocates the output `y`; `m` is the
  // number of rows of x (0: nothing to compute).
  template <typename AbsT>
  ::tensorflow::Status Prepare(::tensorflow::OpKernelContext* ctx,
                               ::tensorflow::Tensor** y, int64_t* m) const {
    using ::tensorflow::errors::InvalidArgument;
    const ::tensorflow::Tensor& x = ctx->input(0);
    if (x.dims() < 2)
      return InvalidArgument("NF4Matmul: x must have rank >= 2. Received "
                             "shape ", x.shape().DebugString());
    if (x.dim_size(x.dims() - 1) != in_dim())
      return InvalidArgument("NF4Matmul: the last axis of x must be ",
                             transpose ? "n" : "k", "=", in_dim(),
                             ". Received shape ", x.shape().DebugString());
    TF_RETURN_IF_ERROR(ValidateState<AbsT>(ctx));
    ::tensorflow::TensorShape out_shape = x.shape();
    out_shape.set_dim(x.dims() - 1, out_dim());
    TF_RETURN_IF_ERROR(ctx->allocate_output(0, out_shape, y));
    *m = x.NumElements() / in_dim();
    return ::tensorflow::Status();
  }

 private:
  template <typename AbsT>
  ::tensorflow::Status ValidateState(::tensorflow::OpKernelContext* ctx) const {
    using ::tensorflow::errors::InvalidArgument;
    const ::tensorflow::Tensor& packed = ctx->input(1);
    const ::tensorflow::Tensor& absmax = ctx->input(2);
    const int64_t blocks = nf4::NumBlocks(count, block_size);
    if (is_int8() && std::is_same<AbsT, uint8_t>::value)
      return InvalidArgument(
          "NF4Matmul: quant_type=int8 takes float32 absmax (one scale per "
          "row of W^T); it has no double quantization. Received: uint8 "
          "absmax");
    const int64_t bytes = nf4::StorageBytes(quant_type, count);
    if (packed.dims() != 1 || packed.NumElements() != bytes)
      return InvalidArgument(
          "NF4Matmul: packed must be 1-D with ",
          is_int8() ? "k * n = " : "ceil(k * n / 2) = ", bytes,
          " bytes for k=", k, ", n=", n, ", quant_type=",
          is_int8() ? "int8" : (quant_type == nf4::QuantType::kFp4 ? "fp4"
                                                                  : "nf4"),
          ". Received shape ", packed.shape().DebugString());
    if (absmax.dims() != 1 || absmax.NumElements() != blocks)
      return InvalidArgument(
          "NF4Matmul: absmax must be 1-D with ceil(k * n / block_size) = ",
          blocks, " entries for k=", k, ", n=", n, ", block_size=",
          block_size, ". Received shape ", absmax.shape().DebugString());
    if (!std::is_same<AbsT, uint8_t>::value) return ::tensorflow::Status();
    const ::tensorflow::Tensor& scale = ctx->input(3);
    const ::tensorflow::Tensor& offset = ctx->input(4);
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
    return ::tensorflow::Status();
  }
};

}  // namespace keras_qlora

#endif  // KERAS_QLORA_NF4_MATMUL_ARGS_H_
