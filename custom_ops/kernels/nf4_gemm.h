// Large-M (GEMM) path of the NF4 matmul: y (M x O) = x (M x R) @ B, where
// B (R x O) is W (forward) or W^T (transpose) decoded from its format
// (nf4, fp4: the code table of the Problem; int8: PackGeneric, or
// PackInt8Bf16 for the bf16 micro-kernel).
//
// Tasks are (output block of nc columns, row chunk of x) pairs, run in
// parallel. A task walks the reduction axis in blocks of kc: it decodes its
// B block (kc x nc, in L2) into panels of nr columns (nf4_gemm_pack.h),
// then for every mr rows of its chunk copies them (stride chosen so that
// the mr rows never share cache sets) and runs the mr x nr micro-kernel
// (nf4_gemm_micro.h) against each panel, storing (first block) or adding
// into y directly. No float copy of W exists beyond one B block per thread,
// and y needs no transposition. Inline-only.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "nf4_decode.h"
#include "nf4_gemm_micro.h"
#include "nf4_gemm_pack.h"

namespace keras_qlora {
namespace nf4_matmul {

constexpr int64_t kGemmKc = 256;   // reduction rows per B block (float32)
constexpr int64_t kGemmNc = 384;   // outputs per task, at most
constexpr int64_t kGemmMc = 1024;  // rows of x per task, at most about
constexpr int64_t kGemmSkew = 16;  // extra stride of the copied x rows

// The micro-kernels of one instruction set.
struct GemmKernels {
  const char* name;
  const MicroFn* micro;  // micro[rows - 1], rows in [1, mr]
  int64_t mr, nr;
  bool avx512_pack;      // decodes in registers when K % 32 == 0 (4-bit)
};

inline constexpr GemmKernels kGemmScalar = {"scalar", kMicroScalar.fn,
                                            kMrScalar, kNrScalar, false};
inline constexpr GemmKernels kGemmAvx2 = {"avx2", kMicroAvx2.fn, kMrAvx2,
                                          kNrAvx2, false};
inline constexpr GemmKernels kGemmAvx512 = {"avx512", kMicroAvx512.fn,
                                            kMrAvx512, kNrAvx512, true};
inline constexpr GemmKernels kGemmBf16 = {"avx512_bf16", kMicroBf16.fn,
                                          kMrAvx512, kNrAvx512, true};

// Block sizes and per-thread scratch of one call. With `bf16`, x and B hold
// bf16 pairs: kc counts elements, the micro-kernel's kc and lda count pairs.
struct GemmPlan {
  const GemmKernels* kernels;
  bool bf16;
  bool in_place;  // float32 x is read where it is (lda = R)
  int64_t kc, nc, mc, row_chunks, o_blocks, lda;
  int64_t b_floats, tmp_floats;

  int64_t PerThread() const { return b_floats + tmp_floats; }
  // Floats of the skewed copy of x (SkewRows).
  int64_t SkewedFloats(int64_t m) const { return in_place ? 0 : m * lda; }
  int64_t Tasks() const { return o_blocks * row_chunks; }
};

// Whether `rows` rows `stride` bytes apart put at most two lines in any set
// of a 32 KiB, 8-way L1 (64 sets of 64-byte lines).
inline bool RowsSpread(int64_t stride, int64_t rows) {
  int count[64] = {};
  for (int64_t i = 0; i < rows; ++i)
    if (++count[(i * stride / 64) % 64] > 2) return false;
  return true;
}

// `bf16`: x is bf16 and runs in bf16 pairs; `float_x`: x is float32.
inline GemmPlan PlanGemm(const GemmKernels& g, bool bf16, bool float_x,
                         int64_t m, int64_t o_dim, int64_t r_dim,
                         int64_t threads) {
  GemmPlan plan;
  plan.kernels = &g;
  plan.bf16 = bf16;
  plan.kc = std::min(bf16 ? 2 * kGemmKc : kGemmKc,
                     nf4::CeilDiv(r_dim, kChunk) * kChunk);
  const int64_t chunks = nf4::CeilDiv(m, kGemmMc);
  plan.mc = nf4::CeilDiv(nf4::CeilDiv(m, chunks), g.mr) * g.mr;
  plan.row_chunks = nf4::CeilDiv(m, plan.mc);
  // Wide output blocks reuse each copied row of x over more panels, but
  // the tasks must also split evenly over the threads: pick the number of
  // blocks (at least enough for nc <= kGemmNc) whose busiest thread has
  // the fewest panels to compute.
  const int64_t panels = nf4::CeilDiv(o_dim, g.nr);
  const int64_t fewest = nf4::CeilDiv(panels, kGemmNc / g.nr);
  const int64_t workers = std::max<int64_t>(threads, 1);
  int64_t blocks = fewest, best_load = -1;
  for (int64_t b = fewest; b <= std::min(panels, 4 * fewest + 2 * workers);
       ++b) {
    const int64_t load = nf4::CeilDiv(b * plan.row_chunks, workers) *
                         nf4::CeilDiv(panels, b);
    if (best_load < 0 || load < best_load) blocks = b, best_load = load;
  }
  plan.nc = nf4::CeilDiv(panels, blocks) * g.nr;
  plan.o_blocks = nf4::CeilDiv(o_dim, plan.nc);
  const int64_t depth = bf16 ? plan.kc / 2 : plan.kc;  // floats per B row
  // A float32 x whose row stride spreads mr rows over the cache sets is
  // read in place; any other is copied with a skewed stride (SkewRows).
  plan.in_place = float_x && RowsSpread(r_dim * 4, g.mr);
  plan.lda = plan.in_place ? r_dim
             : (bf16 ? nf4::CeilDiv(r_dim, 2) : r_dim) + kGemmSkew;
  plan.b_floats = ScratchFloats(plan.nc * depth);
  // PackGeneric (forward), PackInt8Bf16 (forward, one row).
  plan.tmp_floats = ScratchFloats(g.nr * plan.kc);
  return plan;
}

// x (M x R, any T) into `xs`, rows lda floats apart: lda = R + kGemmSkew
// keeps the mr rows that a micro-kernel reads in distinct cache sets
// whatever R is. bf16: raw pairs (uint32), an odd tail padded with 0.
template <typename T>
void SkewRows(Pool* pool, const T* x, int64_t m, int64_t r_dim,
              const GemmPlan& plan, float* xs) {
  ParallelRange(pool, m, 2 * r_dim, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* src = x + i * r_dim;
      if (plan.bf16) {
        uint16_t* dst = reinterpret_cast<uint16_t*>(xs + i * plan.lda);
        std::memcpy(dst, src, r_dim * sizeof(uint16_t));
        if (r_dim % 2 != 0) dst[r_dim] = 0;
      } else {
        float* dst = xs + i * plan.lda;
        for (int64_t r = 0; r < r_dim; ++r) dst[r] = static_cast<float>(src[r]);
      }
    }
  });
}

// Asks for the rows that the next CopyRows will read, which are usually
// far in L3 or memory: short rows of a wide x defeat the hardware
// prefetchers.
inline void PrefetchRows(const float* a, int64_t lda, int64_t rows,
                         int64_t floats) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t f = 0; f < floats; f += 16)
      _mm_prefetch(reinterpret_cast<const char*>(a + i * lda + f),
                   _MM_HINT_T0);
}

// Per-thread scratch floats of Gemm.
inline int64_t GemmScratch(const GemmPlan& plan) { return plan.PerThread(); }

// One task of Gemm: rows [i_begin, i_end) x outputs [o0, o0 + nc) of y.
// `bp` and `tmp` are this thread's scratch.
inline void GemmTask(const GemmPlan& plan, const Problem& p, const float* xs,
                     int64_t m, int64_t o_dim, int64_t r_dim, bool transpose,
                     int64_t task, float* bp, float* tmp, float* y) {
  const GemmKernels& g = *plan.kernels;
  const int64_t o0 = (task / plan.row_chunks) * plan.nc;
  const int64_t i_begin = (task % plan.row_chunks) * plan.mc;
  const int64_t i_end = std::min(m, i_begin + plan.mc);
  const int64_t cols = std::min(plan.nc, o_dim - o0);
  for (int64_t r0 = 0; r0 < r_dim; r0 += plan.kc) {
    const int64_t kc = std::min(plan.kc, r_dim - r0);
    const PanelBlock blk = {r0, kc, o0, cols, g.nr, transpose};
    int64_t depth = kc;  // rows of a panel that the micro-kernel walks
    if (plan.bf16) {
      if (p.int8) {
        PackInt8Bf16(p, blk, r_dim, tmp, reinterpret_cast<uint32_t*>(bp));
      } else {
        PackBf16(p, blk, r_dim, reinterpret_cast<uint32_t*>(bp));
      }
      depth = (kc + 1) / 2;
    } else if (g.avx512_pack && p.NibbleChunks()) {
      PackAvx512(p, blk, bp);
    } else {
      PackGeneric(p, blk, tmp, bp);
    }
    const int64_t a0 = plan.bf16 ? r0 / 2 : r0;  // r0 is even
    for (int64_t i0 = i_begin; i0 < i_end; i0 += g.mr) {
      const int64_t rows = std::min(g.mr, i_end - i0);
      const float* a = xs + i0 * plan.lda + a0;
      if (i0 + g.mr < i_end)
        PrefetchRows(a + g.mr * plan.lda, plan.lda,
                     std::min(g.mr, i_end - i0 - g.mr), depth);
      for (int64_t o = 0; o < cols; o += g.nr) {
        g.micro[rows - 1](rows, a, plan.lda, bp + (o / g.nr) * depth * g.nr,
                          depth, y + i0 * o_dim + o0 + o, o_dim,
                          std::min(g.nr, cols - o), r0 > 0);
      }
    }
  }
}

// y (M x O) = x @ B, x given as SkewRows made it (or in place).
inline void Gemm(const GemmPlan& plan, const Problem& p, Pool* pool,
                 const Scratch& scratch, const float* xs, int64_t m,
                 int64_t o_dim, int64_t r_dim, bool transpose, float* y) {
  // One shard per thread, each taking every shards-th task (the planner
  // made them even): more shards than threads let the calling thread join
  // the pool's, which oversubscribes the cores and measured up to 10%
  // slower.
  const int64_t tasks = plan.Tasks();
  const int64_t shards =
      std::min<int64_t>(tasks, std::max(1, pool->NumThreads()));
  const int64_t cost = plan.nc * r_dim * plan.mc * 2 * tasks / shards;
  ParallelShards(pool, shards, cost, scratch,
                 [&](int64_t first, int64_t last, float* buf) {
    for (int64_t shard = first; shard < last; ++shard) {
      for (int64_t task = shard; task < tasks; task += shards)
        GemmTask(plan, p, xs, m, o_dim, r_dim, transpose, task, buf,
                 buf + plan.b_floats, y);
    }
  });
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_H_
