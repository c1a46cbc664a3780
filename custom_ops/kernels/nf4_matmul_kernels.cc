// CPU kernel of KerasQLoRA>NF4Matmul: y = x @ W, or x @ W^T with
// `transpose`, where W^T ([N, K]) is stored as nf4, fp4 or int8 (the
// `quant_type` attribute; nf4_format.h). The 4-bit formats share every
// kernel through their code table; int8 rows decode in natural order
// (nf4_int8.h) on every path below.
//
// Two paths, both accumulating in float32 and never materializing W:
// - small M (GEMV, nf4_gemv.h): every weight byte is read once;
// - large M (GEMM, nf4_gemm.h): blocks of W are decoded into per-thread
//   panels and a register-blocked micro-kernel writes y directly; bf16 x
//   runs in bf16 x bf16 -> float32 (vdpbf16ps) on CPUs with AVX512_BF16.
// The SIMD paths (AVX2, AVX-512, AVX512_BF16) are chosen at run time;
// KERAS_QLORA_CPU_ISA = auto|scalar|avx2|avx512|avx512_bf16 forces one (read
// once per process; avx512 leaves the bf16 kernels out). All scratch
// comes from ctx->allocate_temp before the work is sharded, so that worker
// threads never allocate (nor throw).

#include <algorithm>
#include <string>
#include <type_traits>

#include "nf4_common.h"
#include "nf4_matmul_args.h"
#include "nf4_decode.h"
#include "nf4_gemm.h"
#include "nf4_gemv.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/logging.h"

namespace keras_qlora {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using namespace ::keras_qlora::nf4_matmul;  // NOLINT(build/namespaces)

constexpr int64_t kMaxGemvRows = 12;  // M up to this uses the GEMV path

// ---------------------------------------------------------------- ISAs

constexpr IsaKernels kScalarKernels = {
    "scalar", DecodeNatural, DotScalar, Axpy4Scalar, nullptr, kMaxGemvRows};

constexpr IsaKernels kAvx2Kernels = {
    "avx2", DecodeAvx2, DotAvx2, Axpy4Avx2, nullptr, kMaxGemvRows};

// The register-decoding GEMV beats a (zero-padded) 32-row GEMM panel for
// M up to ~20; from M = 24 the panel is full enough to win or tie.
constexpr IsaKernels kAvx512Kernels = {
    "avx512", DecodeAvx512, DotAvx512, Axpy4Avx512, FusedRowsAvx512, 20};

// ---------------------------------------------------------------- dispatch

struct IsaChoice {
  const IsaKernels* kernels = nullptr;
  const GemmKernels* gemm = nullptr;
  const GemmKernels* gemm_bf16 = nullptr;  // bf16 x: vdpbf16ps, or nullptr
  std::string error;  // non-empty: KERAS_QLORA_CPU_ISA is invalid
};

IsaChoice ResolveIsa() {
  using nf4::CpuIsa;
  IsaChoice choice;
  CpuIsa cap;
  std::string want;
  if (!nf4::ReadCpuIsaCap(&cap, &want, &choice.error)) return choice;
  const CpuIsa isa = std::min(nf4::BestCpuIsa(), cap);
  choice.kernels = isa >= CpuIsa::kAvx512 ? &kAvx512Kernels
                   : isa == CpuIsa::kAvx2 ? &kAvx2Kernels
                                          : &kScalarKernels;
  choice.gemm = isa >= CpuIsa::kAvx512 ? &kGemmAvx512
                : isa == CpuIsa::kAvx2 ? &kGemmAvx2
                                       : &kGemmScalar;
  if (isa == CpuIsa::kAvx512Bf16) choice.gemm_bf16 = &kGemmBf16;
  // What runs, in KERAS_QLORA_CPU_ISA's words.
  const std::string got =
      choice.gemm_bf16 != nullptr ? "avx512_bf16" : choice.kernels->name;
  if (!want.empty() && want != "auto" && want != got) {
    LOG(WARNING) << "KERAS_QLORA_CPU_ISA=" << want << " is not supported by "
                 << "this CPU; using " << got;
  }
  VLOG(1) << "KerasQLoRA>NF4Matmul CPU kernels: " << got;
  return choice;
}

const IsaChoice& GetIsa() {
  static const IsaChoice choice = ResolveIsa();
  return choice;
}

// ---------------------------------------------------------------- op

// dst[i] = float(src[i]) for i < count (x -> float32), in parallel.
template <typename T>
void ToFloat(Pool* pool, const T* src, int64_t count, float* dst) {
  constexpr int64_t kGrain = 4096;
  ParallelRange(pool, nf4::CeilDiv(count, kGrain), 2 * kGrain,
                [&](int64_t b, int64_t e) {
    const int64_t end = std::min(count, e * kGrain);
    for (int64_t i = b * kGrain; i < end; ++i)
      dst[i] = static_cast<float>(src[i]);
  });
}

// dst[i] = T(src[i]) for i < count (float32 result -> T), in parallel.
template <typename T>
void FromFloat(Pool* pool, const float* src, int64_t count, T* dst) {
  constexpr int64_t kGrain = 4096;
  ParallelRange(pool, nf4::CeilDiv(count, kGrain), 2 * kGrain,
                [&](int64_t b, int64_t e) {
    const int64_t end = std::min(count, e * kGrain);
    for (int64_t i = b * kGrain; i < end; ++i) dst[i] = static_cast<T>(src[i]);
  });
}

// x rows (M x K) -> float32 in chunk or group order (xc[i, q] =
// x[i, source(q)], source = ChunkSource or GroupSource).
template <typename T>
void ToFloatChunkOrder(Pool* pool, const T* x, int64_t m, int64_t k,
                       int64_t (*source)(int64_t), float* xc) {
  ParallelRange(pool, m, 2 * k, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t q = 0; q < k; ++q)
        xc[i * k + q] = static_cast<float>(x[i * k + source(q)]);
  });
}

// A float32 temp of `count` floats.
Status AllocateFloats(OpKernelContext* ctx, int64_t count, Tensor* t) {
  return ctx->allocate_temp(tensorflow::DT_FLOAT,
                            TensorShape({std::max<int64_t>(count, 1)}), t);
}

template <typename T, typename AbsT>
class Nf4MatmulOp : public OpKernel {
 public:
  explicit Nf4MatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, attrs_.Read(ctx));
    const IsaChoice& isa = GetIsa();
    OP_REQUIRES(ctx, isa.error.empty(), InvalidArgument(isa.error));
    isa_ = isa.kernels;
    gemm_ = isa.gemm;
    gemm_bf16_ = isa.gemm_bf16;
  }

  void Compute(OpKernelContext* ctx) override {
    Tensor* y = nullptr;
    int64_t m = 0;
    OP_REQUIRES_OK(ctx, attrs_.Prepare<AbsT>(ctx, &y, &m));
    if (m == 0) return;
    const Tensor& x = ctx->input(0);
    const int64_t in_dim = attrs_.in_dim();
    const int64_t out_dim = attrs_.out_dim();

    Problem p = MakeProblem(ctx);
    p.chunk_order = isa_ != &kScalarKernels && p.NibbleChunks();
    Pool* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const T* xd = x.flat<T>().data();
    const bool float_out = std::is_same<T, float>::value;
    Tensor y32;
    if (!float_out) OP_REQUIRES_OK(ctx, AllocateFloats(ctx, m * out_dim, &y32));
    float* yf = float_out ? reinterpret_cast<float*>(y->flat<T>().data())
                          : y32.flat<float>().data();
    const bool fused = isa_->fused_rows != nullptr && p.chunk_order;
    // The group-order GEMV transpose beats the GEMM as far as the forward.
    const int64_t gemv_rows =
        fused && (!attrs_.transpose || GemvGroupOrder(*isa_, p))
            ? isa_->gemv_rows
            : kMaxGemvRows;
    // One scratch slice per worker id of ParallelForWithWorkerId.
    const int64_t threads = pool->NumThreads() + 1;
    Scratch scratch;
    Tensor tmp, scratch_t;
    if (m <= gemv_rows) {
      OP_REQUIRES_OK(ctx, AllocateFloats(ctx, m * in_dim, &tmp));
      float* xf = tmp.flat<float>().data();
      scratch.per_thread = attrs_.transpose ? GemvTransposeScratch(p, pool, m)
                           : fused          ? 0
                                            : GemvForwardScratch(attrs_.k);
      if (scratch.per_thread > 0) {
        OP_REQUIRES_OK(ctx, AllocateFloats(ctx, threads * scratch.per_thread,
                                           &scratch_t));
        scratch.base = scratch_t.flat<float>().data();
      }
      if (attrs_.transpose) {
        ToFloat(pool, xd, m * in_dim, xf);
        GemvTranspose(*isa_, p, pool, scratch, xf, m, attrs_.n, yf);
      } else {
        if (p.chunk_order) {
          ToFloatChunkOrder(pool, xd, m, attrs_.k,
                            GemvGroupOrder(*isa_, p) ? GroupSource
                                                     : ChunkSource, xf);
        } else {
          ToFloat(pool, xd, m * attrs_.k, xf);
        }
        GemvForward(*isa_, p, pool, scratch, xf, m, attrs_.n, yf);
      }
    } else {
      // bf16 x runs bf16 x bf16 -> float32 (vdpbf16ps) where the CPU has it
      // and rows of W^T decode in whole chunks (or are int8, any K);
      // otherwise x becomes float32.
      const bool bf16 = std::is_same<T, ::tensorflow::bfloat16>::value &&
                        gemm_bf16_ != nullptr &&
                        (p.int8 || p.NibbleChunks());
      const GemmPlan plan =
          PlanGemm(bf16 ? *gemm_bf16_ : *gemm_, bf16, float_out, m, out_dim,
                   in_dim, pool->NumThreads());
      const float* xs = reinterpret_cast<const float*>(xd);  // in place
      if (!plan.in_place) {
        OP_REQUIRES_OK(ctx, AllocateFloats(ctx, plan.SkewedFloats(m), &tmp));
        SkewRows(pool, xd, m, in_dim, plan, tmp.flat<float>().data());
        xs = tmp.flat<float>().data();
      }
      scratch.per_thread = GemmScratch(plan);
      OP_REQUIRES_OK(ctx, AllocateFloats(ctx, threads * scratch.per_thread,
                                         &scratch_t));
      scratch.base = scratch_t.flat<float>().data();
      Gemm(plan, p, pool, scratch, xs, m, out_dim, in_dim, attrs_.transpose,
           yf);
    }
    if (!float_out) FromFloat(pool, yf, m * out_dim, y->flat<T>().data());
  }

 private:
  Problem MakeProblem(OpKernelContext* ctx) const {
    Problem p;
    p.packed = ctx->input(1).flat<uint8_t>().data();
    p.k = attrs_.k;
    p.int8 = attrs_.is_int8();
    p.code = attrs_.code_table();
    // int8 "blocks" are rows of any length: nothing reads a shift then.
    p.block_shift =
        p.int8 ? 0
               : __builtin_ctzll(static_cast<uint64_t>(attrs_.block_size));
    p.chunk_order = false;
    const AbsT* absmax = ctx->input(2).flat<AbsT>().data();
    if (std::is_same<AbsT, uint8_t>::value) {
      p.scales.absmax_u8 = reinterpret_cast<const uint8_t*>(absmax);
      p.scales.nested_scale = ctx->input(3).flat<float>().data();
      p.scales.offset = ctx->input(4).scalar<float>()();
    } else {
      p.scales.absmax_f32 = reinterpret_cast<const float*>(absmax);
    }
    return p;
  }

  Nf4MatmulAttrs attrs_;
  const IsaKernels* isa_ = nullptr;
  const GemmKernels* gemm_ = nullptr;
  const GemmKernels* gemm_bf16_ = nullptr;
};

#define KQ_REGISTER(T, AbsT)                                       \
  REGISTER_KERNEL_BUILDER(Name("KerasQLoRA>NF4Matmul")             \
                              .Device(::tensorflow::DEVICE_CPU)    \
                              .TypeConstraint<T>("T")              \
                              .TypeConstraint<AbsT>("absmax_type"), \
                          Nf4MatmulOp<T, AbsT>)

KQ_REGISTER(float, float);
KQ_REGISTER(float, uint8_t);
KQ_REGISTER(::tensorflow::bfloat16, float);
KQ_REGISTER(::tensorflow::bfloat16, uint8_t);
KQ_REGISTER(Eigen::half, float);
KQ_REGISTER(Eigen::half, uint8_t);

}  // namespace
}  // namespace keras_qlora
