// CPU kernels of KerasQLoRA>NF4BlockScales and KerasQLoRA>NF4Encode: 4-bit
// (nf4 or fp4, the `quant_type` attribute) quantization of W^T ([N, K],
// flattened row-major, cut into blocks), bit for bit equal to the numpy
// reference keras_qlora.quantizers.quantize_nf4 (and its fp4 twin).
//
// What "bit for bit" pins down (all float32 unless said otherwise):
//   candidate scale s   = absmax * SCALE_SEARCH_GRID[c]
//   inv                 = 1 / max(s, 1e-38)          (0 where s <= 0)
//   position p          = #{midpoints m : m < w * inv}   (searchsorted left
//                         over the midpoints of the SORTED code values)
//   stored code         = p (nf4), kFp4SortedCodes[p] (fp4)
//   d                   = w - sorted[p] * s          (no fused multiply-add)
//   block error         = sum over the block, first element first, of
//                         double(d)^2, added in float64 (squares are exact)
//   chosen scale        = first candidate with the least error (strict <)
// A partial last block is zero-padded (padding nibbles and blocks with
// s <= 0 get the format's code of 0.0); an all-zero one gets absmax 1e-38
// (bitsandbytes' clamp). Denormals are kept (TF threads may flush them).
//
// Three code paths, bit-identical: AVX-512F (16 blocks in the lanes of one
// register during the scale search), AVX2 (8 blocks) and scalar. The scale
// search walks a block-transposed copy of 16 (8) blocks so that each lane
// adds its own block's squares in order, which makes the float64 sum both
// sequential and vectorized. KERAS_QLORA_CPU_ISA (auto, scalar, avx2,
// avx512 or avx512_bf16, which quantizes as avx512) caps the path; unlike the matmul kernels it is read on every call, so
// tests can switch paths within one process.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "nf4_common.h"
#include "nf4_quantize_simd.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace keras_qlora {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

using nf4::CpuIsa;
using namespace ::keras_qlora::nf4_quantize;  // NOLINT(build/namespaces)

// Keeps denormals for the duration of a shard (TF may run with FTZ/DAZ).
class KeepDenormals {
 public:
  KeepDenormals() {
#ifdef KERAS_QLORA_X86
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~((1u << 15) | (1u << 6)));  // clear FTZ and DAZ
#endif
  }
  ~KeepDenormals() {
#ifdef KERAS_QLORA_X86
    _mm_setcsr(saved_);
#endif
  }

 private:
  unsigned saved_ = 0;
};

// The ISA to run: the best supported one, capped by KERAS_QLORA_CPU_ISA
// (read on every call; avx512_bf16 quantizes as avx512).
::tensorflow::Status ChooseIsa(CpuIsa* isa) {
  static const CpuIsa best = nf4::BestCpuIsa();
  CpuIsa cap;
  std::string name, error;
  if (!nf4::ReadCpuIsaCap(&cap, &name, &error))
    return errors::InvalidArgument(error);
  *isa = std::min({best, cap, CpuIsa::kAvx512});
  return ::tensorflow::Status();
}

// Reads the `quant_type` attribute of the quantize ops ('nf4' or 'fp4';
// the op registration refuses any other).
::tensorflow::Status ReadQuantType(OpKernelConstruction* ctx,
                                   nf4::QuantType* type) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("quant_type", &name));
  if (name != "nf4" && name != "fp4")
    return errors::InvalidArgument(
        "quant_type must be one of nf4, fp4. Received: quant_type=", name);
  *type = name == "fp4" ? nf4::QuantType::kFp4 : nf4::QuantType::kNf4;
  return ::tensorflow::Status();
}

// ----------------------------------------------------------------- scalar

inline int NearestIndex(float v, const float* mids) {
  int idx = 0;
  for (int i = 0; i < 15; ++i) idx += mids[i] < v;
  return idx;
}

inline float InvScale(float s) {
  return s <= 0.0f ? 0.0f : 1.0f / std::max(s, kTiny);
}

// Squared error of one block (len elements, zero padded to bs) under s.
double BlockSse(const Format& f, const float* w, int64_t len, float s) {
  const float inv = InvScale(s);
  double err = 0.0;
  for (int64_t j = 0; j < len; ++j) {
    float q = f.sorted[NearestIndex(w[j] * inv, f.mids)] * s;
    KQ_ROUNDED(q);
    const double d = static_cast<double>(w[j] - q);
    err += d * d;
  }
  // Padding zeros: position 7 (value 0), d = 0, adding +0.0 changes
  // nothing.
  return err;
}

void ScalesScalar(const Layout& L, int64_t b0, int64_t b1, bool search,
                  float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* w = L.w + b * L.bs;
    const int64_t len = L.BlockLen(b);
    float am = 0.0f;
    for (int64_t j = 0; j < len; ++j) am = std::max(am, std::fabs(w[j]));
    ClampTail(L, b, 1, &am);
    float best = am;
    if (search) {
      double best_err = INFINITY;
      for (int c = 0; c < kGridSize; ++c) {
        const float s = am * kGrid[c];
        const double err = BlockSse(*L.fmt, w, len, s);
        if (err < best_err) {
          best_err = err;
          best = s;
        }
      }
    }
    out[b] = best;
  }
}

// Codes of one block (starts on a byte: bs is even) into ceil(len / 2)
// bytes; `divide` uses w / s instead of w * (1 / s). An odd last element
// gets the code of 0.0 in the low nibble, as bitsandbytes pads.
void EncodeBlockScalar(const Format& f, const float* w, int64_t len, float s,
                       bool divide, uint8_t* dst) {
  const float inv = InvScale(s);
  auto code = [&](int64_t j) -> int {
    if (j >= len || !(s > 0.0f)) return f.zero;
    return f.code[NearestIndex(divide ? w[j] / s : w[j] * inv, f.mids)];
  };
  for (int64_t j = 0; j < len; j += 2)
    dst[j / 2] = static_cast<uint8_t>((code(j) << 4) | code(j + 1));
}


// ---------------------------------------------------------------- kernels

// Index of the first NaN or Inf in p[0, n) (all exponent bits set), or -1.
// The bit test, OR-ed over chunks, vectorizes; NaN compares would not.
int64_t FirstNonFinite(const float* p, int64_t n) {
  constexpr int64_t kChunk = 4096;
  constexpr uint32_t kExponent = 0x7f800000u;
  auto bad = [&](int64_t i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof(bits));
    return (bits & kExponent) == kExponent;
  };
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t end = std::min(n, c + kChunk);
    bool any = false;
    for (int64_t i = c; i < end; ++i) any |= bad(i);
    if (!any) continue;
    for (int64_t i = c; i < end; ++i)
      if (bad(i)) return i;
  }
  return -1;
}

::tensorflow::Status CheckInputs(const Tensor& w, int block_size) {
  if (w.dims() != 2) {
    return errors::InvalidArgument(
        "weight_t must be a 2-D [N, K] float32 tensor. Received shape: ",
        w.shape().DebugString());
  }
  if (!nf4::IsAllowedBlockSize(block_size)) {
    return errors::InvalidArgument(KQ_NF4_BLOCK_SIZE_ERROR, block_size);
  }
  // A NaN would be skipped by the block maximum and coded as -1.0: refuse.
  const int64_t bad = FirstNonFinite(w.flat<float>().data(), w.NumElements());
  if (bad >= 0) {
    const int64_t cols = w.dim_size(1);
    return errors::InvalidArgument(
        "weight_t holds a non-finite value (", w.flat<float>()(bad),
        ") at [", bad / cols, ", ", bad % cols,
        "]; NF4 has no code for NaN or Inf. Fix or drop the non-finite "
        "weights before quantizing.");
  }
  return ::tensorflow::Status();
}

Layout MakeLayout(const Tensor& w, int block_size, nf4::QuantType type) {
  const int64_t size = w.NumElements();
  return Layout{&GetFormat(type), w.flat<float>().data(), size,
                (size + block_size - 1) / block_size, block_size};
}

class Nf4BlockScalesOp : public OpKernel {
 public:
  explicit Nf4BlockScalesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale_search", &scale_search_));
    OP_REQUIRES_OK(ctx, ReadQuantType(ctx, &type_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckInputs(w, block_size_));
    CpuIsa isa;
    OP_REQUIRES_OK(ctx, ChooseIsa(&isa));
    const Layout layout = MakeLayout(w, block_size_, type_);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({layout.blocks}),
                                             &out));
    float* scales = out->flat<float>().data();
    const bool search = scale_search_;
    const int lanes =
        isa == CpuIsa::kAvx512 ? 16 : isa == CpuIsa::kAvx2 ? 8 : 1;
    const int64_t groups = (layout.blocks + lanes - 1) / lanes;
    // Rough cycles per group: ~2 per element and candidate.
    const int64_t cost =
        int64_t{lanes} * block_size_ * (search ? 2 * kGridSize : 2);
    auto work = [&](int64_t g0, int64_t g1) {
      KeepDenormals keep;
      switch (isa) {
#ifdef KERAS_QLORA_X86
        case CpuIsa::kAvx512:
          ScalesAvx512(layout, g0, g1, search, scales);
          break;
        case CpuIsa::kAvx2:
          ScalesAvx2(layout, g0, g1, search, scales);
          break;
#endif
        default:
          ScalesScalar(layout, g0, g1, search, scales);
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        groups, cost, work);
  }

 private:
  int block_size_ = 64;
  bool scale_search_ = true;
  nf4::QuantType type_ = nf4::QuantType::kNf4;
};

class Nf4EncodeOp : public OpKernel {
 public:
  explicit Nf4EncodeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("divide_tail", &divide_tail_));
    OP_REQUIRES_OK(ctx, ReadQuantType(ctx, &type_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    const Tensor& scales_t = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckInputs(w, block_size_));
    const Layout layout = MakeLayout(w, block_size_, type_);
    OP_REQUIRES(ctx,
                scales_t.dims() == 1 && scales_t.NumElements() == layout.blocks,
                errors::InvalidArgument(
                    "scales must be a vector of one float32 per block: ",
                    layout.blocks, " blocks for weight_t of shape ",
                    w.shape().DebugString(), " and block_size=", block_size_,
                    ". Received shape: ", scales_t.shape().DebugString()));
    const int64_t bad_scale =
        FirstNonFinite(scales_t.flat<float>().data(), layout.blocks);
    OP_REQUIRES(ctx, bad_scale < 0,
                errors::InvalidArgument(
                    "scales must be finite: scales[", bad_scale, "] = ",
                    scales_t.flat<float>()(bad_scale < 0 ? 0 : bad_scale),
                    ". A block's scale is its (searched) absolute maximum."));
    CpuIsa isa;
    OP_REQUIRES_OK(ctx, ChooseIsa(&isa));
    Tensor* out = nullptr;
    const int64_t bytes = (layout.size + 1) / 2;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(0, TensorShape({bytes}), &out));
    uint8_t* packed = out->flat<uint8_t>().data();
    const float* scales = scales_t.flat<float>().data();
    const bool divide_tail = divide_tail_;
    const Format& fmt = *layout.fmt;
    auto work = [&](int64_t b0, int64_t b1) {
      KeepDenormals keep;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = layout.BlockLen(b);
        const float* src = layout.w + b * layout.bs;
        uint8_t* dst = packed + b * layout.bs / 2;
        const float s = scales[b];
        if (len < layout.bs) {  // partial last block
          EncodeBlockScalar(fmt, src, len, s, divide_tail, dst);
        } else if (!(s > 0.0f)) {
          std::memset(dst, fmt.zero_byte, layout.bs / 2);
        }
#ifdef KERAS_QLORA_X86
        else if (isa == CpuIsa::kAvx512) {
          EncodeBlockAvx512(fmt, src, layout.bs, s, dst);
        } else if (isa == CpuIsa::kAvx2) {
          EncodeBlockAvx2(fmt, src, layout.bs, s, dst);
        }
#endif
        else {
          EncodeBlockScalar(fmt, src, len, s, false, dst);
        }
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        layout.blocks, 4 * int64_t{block_size_}, work);
  }

 private:
  int block_size_ = 64;
  bool divide_tail_ = false;
  nf4::QuantType type_ = nf4::QuantType::kNf4;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("KerasQLoRA>NF4BlockScales").Device(DEVICE_CPU),
                        Nf4BlockScalesOp);
REGISTER_KERNEL_BUILDER(Name("KerasQLoRA>NF4Encode").Device(DEVICE_CPU),
                        Nf4EncodeOp);

}  // namespace keras_qlora
