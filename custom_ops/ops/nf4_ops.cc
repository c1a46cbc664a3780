// Registration of the keras_qlora NF4 ops: interfaces and shape functions
// only. Kernels live in custom_ops/kernels/.
//
// The NF4 state is passed exactly as the Keras layers store it:
//   packed         uint8 [ceil(K * N / 2)]  two 4-bit codes per byte, first
//                                           element in the high nibble, of
//                                           W^T ([N, K]) flattened row-major
//   absmax         float [blocks]  or uint8 [blocks] with double quant
//   absmax_scale   float [ceil(blocks / 256)]  (double quant; else empty)
//   absmax_offset  float scalar                (double quant; else ignored)
// with blocks = ceil(K * N / block_size). `quant_type` picks the base
// format (nf4_format.h): "nf4" and "fp4" as above with their code tables;
// "int8": packed holds K * N signed bytes of W^T, absmax one float32 scale
// per row of W^T (block_size == K), no double quantization.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_qlora {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

Status Nf4MatmulShape(InferenceContext* c) {
  int64_t k = 0, n = 0;
  bool transpose = false;
  TF_RETURN_IF_ERROR(c->GetAttr("k", &k));
  TF_RETURN_IF_ERROR(c->GetAttr("n", &n));
  TF_RETURN_IF_ERROR(c->GetAttr("transpose", &transpose));
  const int64_t in_dim = transpose ? n : k;
  const int64_t out_dim = transpose ? k : n;

  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &x));
  DimensionHandle last;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, -1), c->MakeDim(in_dim), &last));

  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &unused));

  ShapeHandle batch;
  TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &batch));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(
      c->Concatenate(batch, c->Vector(c->MakeDim(out_dim)), &out));
  c->set_output(0, out);
  return Status();
}

}  // namespace

// y = x @ W (x [..., K] -> y [..., N]), or with transpose y = x @ W^T
// (x [..., N] -> y [..., K], the input gradient). W is never materialized.
REGISTER_OP("KerasQLoRA>NF4Matmul")
    .Input("x: T")
    .Input("packed: uint8")
    .Input("absmax: absmax_type")
    .Input("absmax_scale: float")
    .Input("absmax_offset: float")
    .Output("y: T")
    .Attr("T: {float, bfloat16, half}")
    .Attr("absmax_type: {float, uint8}")
    .Attr("k: int >= 1")
    .Attr("n: int >= 1")
    .Attr("block_size: int >= 1")
    .Attr("transpose: bool = false")
    .Attr("quant_type: {'nf4', 'fp4', 'int8'} = 'nf4'")
    .SetShapeFn(Nf4MatmulShape);

// Per-block scales of W^T ([N, K] row-major, given as `weight_t`): the
// absmax, or with `scale_search` the scale from the fixed grid that
// minimizes the block's squared error (float64, sequential sum).
REGISTER_OP("KerasQLoRA>NF4BlockScales")
    .Input("weight_t: float")
    .Output("scales: float")
    .Attr("block_size: int >= 1")
    .Attr("scale_search: bool = true")
    .Attr("quant_type: {'nf4', 'fp4'} = 'nf4'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle w;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &w));
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      return Status();
    });

// Packs the NF4 codes of `weight_t` ([N, K]) under per-block `scales`:
// code = nearest NF4 value of w * (1 / s) (w / s for the partial last block
// when `divide_tail`, as bitsandbytes does); zero codes where s <= 0.
// Both ops refuse NaN and Inf in `weight_t` (and in `scales`), naming where.
REGISTER_OP("KerasQLoRA>NF4Encode")
    .Input("weight_t: float")
    .Input("scales: float")
    .Output("packed: uint8")
    .Attr("block_size: int >= 1")
    .Attr("divide_tail: bool = false")
    .Attr("quant_type: {'nf4', 'fp4'} = 'nf4'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle w, s;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &w));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &s));
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      return Status();
    });

}  // namespace keras_qlora
