// Kernel choice and work split of the CUDA NF4 matmul: plain host C++
// (no CUDA headers), shared by the launcher (nf4_cuda_api.cu) and the CPU
// emulator (testing/cuda_emulator/), so both see the same plan.
//
// Regimes (anchors: bitsandbytes' gemv_4bit / gemm_4bit, Marlin):
// - GEMV, small M: bandwidth-bound. Every weight byte is read once with
//   coalesced 16-byte (forward) or 8-byte (transposed) loads, decoded
//   through a 16-entry table in shared memory and multiplied in exact fp32;
//   rows of x are processed `rows` at a time. Split along the reduction
//   axis when the output alone cannot fill the GPU.
// - MMA, larger M: compute-bound. Tiles of W are decoded into shared memory
//   as the activations' 16-bit type (TF32 for float32) and fed to mma.sync
//   with fp32 accumulation; split-K when there are too few output tiles.
// - REFERENCE: one warp per output element, any shape or alignment.
//
// Base formats (`quant_type`, nf4_format.h): nf4 and fp4 run every kernel
// above, which differ only in the 16-entry code table each block copies
// into shared memory (nf4_cuda_device.cuh, LoadTables). int8 (one byte per
// element, one float32 scale per W^T row, block_size == K for any K >= 1)
// has no GEMV kernel (the GEMV kernels decode 4-bit chunks of 16 or 32
// codes): it runs MMA (the I8 instantiation: 16-byte units of 16 int8
// codes) at every M when tensor cores are allowed and K % 16 == 0, and
// REFERENCE otherwise (exact float32, K % 16 != 0, a forced GEMV, a
// misaligned `packed`).

#ifndef KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_PLAN_H_
#define KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_PLAN_H_

#include <cstdint>
#include <cstdio>

#include "../include/nf4_format.h"  // also defines KQ_HD
#include "nf4_cuda.h"

namespace keras_qlora {
namespace nf4_cuda {

// The format's helpers (nf4_format.h, shared with the CPU kernels).
using nf4::CeilDiv;
using nf4::IsAllowedBlockSize;

static_assert(KQ_NF4_QUANT_NF4 == static_cast<int>(nf4::QuantType::kNf4) &&
                  KQ_NF4_QUANT_FP4 == static_cast<int>(nf4::QuantType::kFp4) &&
                  KQ_NF4_QUANT_INT8 == static_cast<int>(nf4::QuantType::kInt8),
              "the C ABI's quant types must be nf4::QuantType's values");

// AUTO uses GEMV up to these M (the weight is decoded once per pass of this
// many rows of x; beyond them the tensor-core kernel amortizes decoding over
// 16-128 rows). To be tuned on the GPU (benchmarks/gpu/harness.py).
constexpr int64_t kGemvForwardMaxRows = 8;
constexpr int64_t kGemvTransposeMaxRows = 4;

// GEMV forward: 4 warps per block, each warp owns `rows_per_warp` rows of
// W^T (outputs) and walks their K codes in 16-byte chunks of 32 codes.
constexpr int kGemvForwardWarps = 4;
constexpr int kGemvChunk = 32;  // codes per 16-byte load
// GEMV transposed: 8 warps per block share 512 output columns (32 lanes x
// 16 codes, one 8-byte load per lane and row) and split the rows of W^T.
constexpr int kGemvTransposeWarps = 8;
constexpr int kGemvTransposeCols = 512;
constexpr int kGemvUnit = 16;  // codes per 8-byte load

// MMA tiles: BN output columns x BM rows of x per block, 8 warps.
constexpr int kMmaThreads = 256;
constexpr int kMmaTileN = 128;

// Largest gridDim.x (blocks are flattened into it).
constexpr int64_t kMaxGridX = 0x7FFFFFFF;

// Split-K partial sums are capped at this much scratch.
constexpr int64_t kMaxWorkspaceBytes = int64_t{64} << 20;

// Compile-time shape of one MMA configuration (shared by the kernel and
// the emulator). `tf32`: float32 activations (m16n8k8 TF32); otherwise
// 16-bit operands (m16n8k16 bf16/f16).
template <int BM, bool TF32>
struct MmaConfig {
  static constexpr int kBM = BM;
  static constexpr int kBN = kMmaTileN;
  // Shared memory holds two stages of X [BM, BK] and W [BN, BK]; float
  // operands take twice the bytes, so they get half the depth.
  static constexpr int kBK = (BM == 16 ? 64 : 32) / (TF32 ? 2 : 1);
  static constexpr int kWarpsM = BM == 16 ? 1 : 2;
  static constexpr int kWarpsN = 8 / kWarpsM;
  static constexpr int kWM = BM / kWarpsM;      // rows per warp
  static constexpr int kWN = kBN / kWarpsN;     // columns per warp
  static constexpr int kMI = kWM / 16;          // m16 tiles per warp
  static constexpr int kNI = kWN / 8;           // n8 tiles per warp
  static constexpr int kOpBytes = TF32 ? 4 : 2;  // bytes per smem operand
  // Row padding (elements) that keeps fragment loads conflict-free: 16
  // bytes for 16-bit operands, 4 floats for TF32.
  static constexpr int kPad = TF32 ? 4 : 8;
  static constexpr int kStride = kBK + kPad;    // smem row stride, elements
  static constexpr int kKStep = TF32 ? 8 : 16;  // k of one mma
  static constexpr bool kTf32 = TF32;
};

// A problem as the launcher sees it (sizes in elements).
struct Problem {
  int64_t m = 0, k = 0, n = 0;
  int x_dtype = KQ_NF4_F32;
  int block_size = 64;
  int quant_type = KQ_NF4_QUANT_NF4;
  bool transpose = false;

  bool int8() const { return quant_type == KQ_NF4_QUANT_INT8; }
  int64_t red() const { return transpose ? n : k; }  // reduction length
  int64_t out() const { return transpose ? k : n; }  // output columns
};

// The launcher's full plan (KqNf4Plan is its public subset).
struct Plan {
  int algo = KQ_NF4_ALGO_REFERENCE;
  int variant = 0;        // GEMV: rows of x per pass; MMA: tile rows BM
  int rows_per_warp = 0;  // GEMV forward only
  int splits = 1;
  int64_t split_len = 0;  // GEMV fwd: chunks; GEMV T: rows; MMA: k-tiles
  int64_t workspace_bytes = 0;
};

inline bool GemvShapeOk(const Problem& p) {
  // Forward: 16-byte chunks of one W^T row; transposed: 8-byte units.
  return p.transpose ? p.k % kGemvUnit == 0 : p.k % kGemvChunk == 0;
}

// W^T rows start on 8-byte boundaries and 16-code units never straddle a
// quantization block.
inline bool MmaShapeOk(const Problem& p) { return p.k % kGemvUnit == 0; }

// `want` (> 0) splits of `total` (> 0) items, evened out so that none is
// empty: sets *len to the items per split and returns the split count.
inline int EvenSplits(int64_t total, int64_t want, int64_t* len) {
  if (want < 1) want = 1;
  if (want > total) want = total;
  if (want > 65535) want = 65535;  // launched as gridDim.y
  *len = CeilDiv(total, want);
  return static_cast<int>(CeilDiv(total, *len));
}

// Caps splits so that the partial sums fit kMaxWorkspaceBytes.
inline int64_t CapSplits(int64_t want, const Problem& p) {
  const int64_t per_split = p.m * p.out() * 4;
  const int64_t cap = per_split > 0 ? kMaxWorkspaceBytes / per_split : want;
  return want < cap ? want : (cap > 1 ? cap : 1);
}

inline void PlanGemv(const Problem& p, int sm_count, Plan* plan) {
  plan->algo = KQ_NF4_ALGO_GEMV;
  const int64_t max_rows =
      p.transpose ? kGemvTransposeMaxRows : kGemvForwardMaxRows;
  int rows = 1;
  while (rows < max_rows && rows < p.m) rows *= 2;
  plan->variant = rows;
  const int64_t passes = CeilDiv(p.m, rows);
  int64_t blocks = 0, items = 0, min_items = 0, target = 0;
  if (p.transpose) {
    blocks = CeilDiv(p.k, kGemvTransposeCols) * passes;
    items = p.n;  // rows of W^T, split across blocks
    min_items = 8 * kGemvTransposeWarps;
    target = 3 * int64_t{sm_count};
  } else {
    plan->rows_per_warp = rows <= 4 ? 4 : 2;
    blocks = CeilDiv(p.n, kGemvForwardWarps * plan->rows_per_warp) * passes;
    items = p.k / kGemvChunk;  // 16-byte chunks per W^T row
    min_items = 2 * 32;        // at least two chunks per lane
    target = 8 * int64_t{sm_count};
  }
  int64_t want = CeilDiv(target, blocks);
  const int64_t max_splits = items / min_items;
  if (want > max_splits) want = max_splits;
  plan->splits = EvenSplits(items, CapSplits(want, p), &plan->split_len);
}

template <typename Config>
inline void PlanMmaTiles(const Problem& p, int sm_count, Plan* plan) {
  plan->variant = Config::kBM;
  const int64_t tiles =
      CeilDiv(p.out(), Config::kBN) * CeilDiv(p.m, Config::kBM);
  const int64_t k_tiles = CeilDiv(p.red(), Config::kBK);
  int64_t want = tiles >= sm_count ? 1 : CeilDiv(sm_count, tiles);
  const int64_t max_splits = k_tiles / 8;  // keep >= 8 k-tiles per split
  if (want > max_splits) want = max_splits;
  plan->splits = EvenSplits(k_tiles, CapSplits(want, p), &plan->split_len);
}

inline void PlanMma(const Problem& p, int sm_count, Plan* plan) {
  plan->algo = KQ_NF4_ALGO_MMA;
  const bool tf32 = p.x_dtype == KQ_NF4_F32;
  if (p.m <= 16) {
    tf32 ? PlanMmaTiles<MmaConfig<16, true>>(p, sm_count, plan)
         : PlanMmaTiles<MmaConfig<16, false>>(p, sm_count, plan);
  } else if (p.m <= 64) {
    tf32 ? PlanMmaTiles<MmaConfig<64, true>>(p, sm_count, plan)
         : PlanMmaTiles<MmaConfig<64, false>>(p, sm_count, plan);
  } else {
    tf32 ? PlanMmaTiles<MmaConfig<128, true>>(p, sm_count, plan)
         : PlanMmaTiles<MmaConfig<128, false>>(p, sm_count, plan);
  }
}

// Checks the arguments; on error writes a message and returns false.
inline bool ValidateProblem(const Problem& p, int algo, int sm_count,
                            char* err, int errlen) {
  const char* what = nullptr;
  char buf[200];
  if (p.m < 0 || p.k < 1 || p.n < 1) {
    std::snprintf(buf, sizeof(buf),
                  "m must be >= 0 and k, n >= 1. Received: m=%lld, k=%lld, "
                  "n=%lld", static_cast<long long>(p.m),
                  static_cast<long long>(p.k), static_cast<long long>(p.n));
    what = buf;
  } else if (p.k > (int64_t{1} << 40) / p.n || p.m > (int64_t{1} << 40)) {
    what = "k * n (or m) is too large (limit 2**40 elements)";
  } else if (p.x_dtype != KQ_NF4_F32 && p.x_dtype != KQ_NF4_BF16 &&
             p.x_dtype != KQ_NF4_F16) {
    std::snprintf(buf, sizeof(buf),
                  "x_dtype must be 0 (float32), 1 (bfloat16) or 2 "
                  "(float16). Received: x_dtype=%d", p.x_dtype);
    what = buf;
  } else if (p.quant_type < KQ_NF4_QUANT_NF4 ||
             p.quant_type > KQ_NF4_QUANT_INT8) {
    std::snprintf(buf, sizeof(buf),
                  "quant_type must be 0 (nf4), 1 (fp4) or 2 (int8). "
                  "Received: quant_type=%d", p.quant_type);
    what = buf;
  } else if (p.int8() && p.block_size != p.k) {
    std::snprintf(buf, sizeof(buf),
                  "with quant_type=2 (int8) every row of W^T has one scale, "
                  "so block_size must equal k=%lld. Received: block_size=%d",
                  static_cast<long long>(p.k), p.block_size);
    what = buf;
  } else if (!p.int8() && !IsAllowedBlockSize(p.block_size)) {
    std::snprintf(buf, sizeof(buf), KQ_NF4_BLOCK_SIZE_ERROR "%d",
                  p.block_size);
    what = buf;
  } else if (algo < KQ_NF4_ALGO_AUTO || algo > KQ_NF4_ALGO_MMA) {
    std::snprintf(buf, sizeof(buf),
                  "algo must be 0 (auto), 1 (reference), 2 (gemv) or 3 "
                  "(mma). Received: algo=%d", algo);
    what = buf;
  } else if (sm_count < 1) {
    std::snprintf(buf, sizeof(buf),
                  "sm_count must be >= 1. Received: sm_count=%d", sm_count);
    what = buf;
  }
  if (what == nullptr) return true;
  if (err != nullptr && errlen > 0)
    std::snprintf(err, static_cast<size_t>(errlen), "kq_nf4: %s", what);
  return false;
}

// int8: MMA when tensor cores are allowed and its shape holds (any M, any
// algo but a forced REFERENCE), else REFERENCE.
inline Plan MakeInt8Plan(const Problem& p, int algo, bool exact_f32,
                         int sm_count) {
  Plan plan;
  if (algo != KQ_NF4_ALGO_REFERENCE && !exact_f32 && MmaShapeOk(p)) {
    PlanMma(p, sm_count, &plan);
    if (plan.splits > 1)
      plan.workspace_bytes = plan.splits * p.m * p.out() * 4;
  }
  return plan;
}

// The plan for a validated problem. A forced fast kernel whose shape
// preconditions fail becomes REFERENCE; float32 without allow_tf32 never
// uses tensor cores (MMA becomes GEMV); int8 is MakeInt8Plan's.
inline Plan MakePlan(const Problem& p, int algo, bool allow_tf32,
                     int sm_count) {
  Plan plan;
  if (p.m == 0) return plan;
  const bool exact_f32 = p.x_dtype == KQ_NF4_F32 && !allow_tf32;
  if (p.int8()) return MakeInt8Plan(p, algo, exact_f32, sm_count);
  if (algo == KQ_NF4_ALGO_AUTO) {
    const int64_t gemv_rows =
        p.transpose ? kGemvTransposeMaxRows : kGemvForwardMaxRows;
    if (GemvShapeOk(p) && (exact_f32 || p.m <= gemv_rows)) {
      algo = KQ_NF4_ALGO_GEMV;
    } else if (!exact_f32 && MmaShapeOk(p)) {
      algo = KQ_NF4_ALGO_MMA;
    } else {
      algo = KQ_NF4_ALGO_REFERENCE;
    }
  }
  if (algo == KQ_NF4_ALGO_MMA && exact_f32) algo = KQ_NF4_ALGO_GEMV;
  if (algo == KQ_NF4_ALGO_GEMV && GemvShapeOk(p)) {
    PlanGemv(p, sm_count, &plan);
  } else if (algo == KQ_NF4_ALGO_MMA && MmaShapeOk(p)) {
    PlanMma(p, sm_count, &plan);
  }
  if (plan.splits > 1) plan.workspace_bytes = plan.splits * p.m * p.out() * 4;
  return plan;
}

inline bool Aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The fast kernels' pointer alignment needs (16-byte x and W^T chunks for
// the forward GEMV, 16-byte int8 W units, 8-byte 4-bit W units otherwise);
// a plan whose needs fail runs the reference kernel (which needs no
// workspace) instead. Sets *x_vec when
// the MMA kernel may read x rows as 16-byte vectors.
inline Plan FitAlignment(const Problem& p, const void* x,
                         const uint8_t* packed, Plan plan, bool* x_vec) {
  const int64_t row_bytes = p.red() * (p.x_dtype == KQ_NF4_F32 ? 4 : 2);
  *x_vec = Aligned(x, 16) && row_bytes % 16 == 0;
  bool ok = true;
  if (plan.algo == KQ_NF4_ALGO_GEMV) {
    ok = p.transpose ? Aligned(packed, 8)
                     : Aligned(packed, 16) && Aligned(x, 16);
  } else if (plan.algo == KQ_NF4_ALGO_MMA) {
    ok = Aligned(packed, p.int8() ? 16 : 8);
  }
  return ok ? plan : Plan();
}

}  // namespace nf4_cuda
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_PLAN_H_
