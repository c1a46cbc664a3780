// CPU emulator of the CUDA NF4 kernels, for testing without a GPU
// (tests/ops/test_cuda_build.py builds it with g++ and drives it through
// ctypes). It runs the kernels' algorithms block by block, warp by warp and
// lane by lane, through the SAME plan (nf4_cuda_plan.h) and index, decode
// and fragment helpers (nf4_cuda_math.h) the .cu kernels use:
//
// - GEMV and reference kernels: per-lane accumulation order and the
//   xor-shuffle warp sums are reproduced, so results should match the GPU
//   bit for bit;
// - MMA kernel: the shared-memory stages are filled through the kernel's
//   item mappings and operand rounding (bf16 / f16 RNE, TF32 RNA), every
//   lane's fragment registers are gathered through the kernel's fragment
//   offsets, and mma.sync itself is emulated from the PTX ISA's fragment
//   layout tables (written out independently below), accumulating in
//   double per instruction (the hardware's internal order differs).
//
// Shared memory starts as NaN and the output buffers are the caller's, so an
// element read before it is written, or never written, shows up as NaN;
// every global-memory index is bounds-checked (an out-of-range read the
// kernel would make is reported as an error even if its value were unused).
//
// Not emulated: concurrency. Threads run one phase at a time, so a missing
// barrier, a race or a bank conflict cannot show here; launch limits and
// the CUDA runtime are not exercised either.

#include "nf4_cuda_emulator.h"

#include <cstdio>

namespace keras_qlora {
namespace nf4_cuda {
namespace emulator {

// ------------------------------------------------------------ reference

void Reference(Env& env) {
  const Nf4Args& a = env.a;
  const int64_t red = a.red(), out = a.out();
  for (int64_t row = 0; row < a.m; ++row) {
    for (int64_t o = 0; o < out; ++o) {
      float acc[32] = {};
      for (int lane = 0; lane < 32; ++lane) {
        for (int64_t r = lane; r < red; r += 32) {
          const int64_t n = a.transpose ? r : o;  // the W^T row
          const int64_t flat = FlatIndex(n, a.transpose ? o : r, a.k);
          float w;
          if (a.int8()) {
            w = env.Int8Weight(flat, n);
          } else {
            const uint8_t byte = env.packed[flat >> 1];
            const int code = (flat & 1) ? (byte & 15) : (byte >> 4);
            w = MulRn(env.code[code], env.Scale(flat >> a.block_shift));
          }
          acc[lane] = std::fma(env.XValue(row * red + r), w, acc[lane]);
        }
      }
      WarpSum(acc);
      env.Store(0, row, o, acc[0]);
    }
  }
}

// ------------------------------------------------------------ GEMV

void GemvForward(Env& env) {
  const Nf4Args& a = env.a;
  const int mr = a.plan.variant, rpw = a.plan.rows_per_warp;
  const int64_t row_blocks = CeilDiv(a.n, kGemvForwardWarps * rpw);
  const int64_t blocks = row_blocks * CeilDiv(a.m, mr);
  const int64_t chunks = a.k / kGemvChunk;
  for (int64_t bx = 0; bx < blocks; ++bx) {
    for (int by = 0; by < a.plan.splits; ++by) {
      int64_t c_begin, c_end;
      SplitRange(chunks, a.plan.split_len, by, &c_begin, &c_end);
      for (int warp = 0; warp < kGemvForwardWarps; ++warp) {
        const int64_t n0 = (bx % row_blocks * kGemvForwardWarps + warp) * rpw;
        const int64_t m0 = bx / row_blocks * mr;
        std::vector<float> acc(32 * 8 * 8, 0.0f);  // [lane][r][i]
        for (int lane = 0; lane < 32; ++lane) {
          for (int64_t c = c_begin + lane; c < c_end; c += 32) {
            uint32_t w[4][4] = {};
            float scale[4] = {};
            for (int r = 0; r < rpw; ++r) {
              const int64_t n = n0 + r;
              if (n >= a.n) continue;
              env.PackedWords((n * chunks + c) * 16, 4, w[r]);
              scale[r] = env.Scale(FlatIndex(n, c * kGemvChunk, a.k) >>
                                   a.block_shift);
            }
            float dot[4][8] = {};
            for (int p = 0; p < 4; ++p) {
              float xv[8][8] = {};
              for (int i = 0; i < mr; ++i) {
                const int64_t row = m0 + i;
                if (row >= a.m) continue;
                for (int e = 0; e < 8; ++e)
                  xv[i][e] = env.XValue(row * a.k + c * kGemvChunk + 8 * p + e);
              }
              for (int e = 0; e < 8; ++e)
                for (int r = 0; r < rpw; ++r) {
                  const float code = env.code[CodeOf(w[r][p], e)];
                  for (int i = 0; i < mr; ++i)
                    dot[r][i] = std::fma(code, xv[i][e], dot[r][i]);
                }
            }
            for (int r = 0; r < rpw; ++r)
              for (int i = 0; i < mr; ++i) {
                float& slot = acc[(lane * 8 + r) * 8 + i];
                slot = std::fma(scale[r], dot[r][i], slot);
              }
          }
        }
        for (int r = 0; r < rpw; ++r)
          for (int i = 0; i < mr; ++i) {
            float v[32];
            for (int l = 0; l < 32; ++l) v[l] = acc[(l * 8 + r) * 8 + i];
            WarpSum(v);
            const int64_t n = n0 + r, row = m0 + i;
            if (n < a.n && row < a.m) env.Store(by, row, n, v[r * mr + i]);
          }
      }
    }
  }
}

void GemvTranspose(Env& env) {
  const Nf4Args& a = env.a;
  const int mr = a.plan.variant;
  const int64_t col_blocks = CeilDiv(a.k, kGemvTransposeCols);
  const int64_t blocks = col_blocks * CeilDiv(a.m, mr);
  for (int64_t bx = 0; bx < blocks; ++bx) {
    for (int by = 0; by < a.plan.splits; ++by) {
      const int64_t col0 = bx % col_blocks * kGemvTransposeCols;
      const int64_t m0 = bx / col_blocks * mr;
      int64_t n_begin, n_end;
      SplitRange(a.n, a.plan.split_len, by, &n_begin, &n_end);
      std::vector<float> partial(4 * kGemvUnit * 32, NAN);  // [i][e][lane]
      for (int warp = 0; warp < kGemvTransposeWarps; ++warp) {
        for (int lane = 0; lane < 32; ++lane) {
          float acc[4][kGemvUnit] = {};
          const int64_t kcol = col0 + lane * kGemvUnit;
          if (kcol < a.k) {
            for (int64_t n = n_begin + warp; n < n_end;
                 n += kGemvTransposeWarps) {
              const int64_t flat = FlatIndex(n, kcol, a.k);
              uint32_t w[2];
              env.PackedWords((flat >> 4) * 8, 2, w);
              const float scale = env.Scale(flat >> a.block_shift);
              float xs[4];
              for (int i = 0; i < mr; ++i) {
                const int64_t row = m0 + i;
                xs[i] = row < a.m ? env.XValue(row * a.n + n) * scale : 0.0f;
              }
              for (int e = 0; e < kGemvUnit; ++e) {
                const float code =
                    env.code[CodeOf(e < 8 ? w[0] : w[1], e & 7)];
                for (int i = 0; i < mr; ++i)
                  acc[i][e] = std::fma(xs[i], code, acc[i][e]);
              }
            }
          }
          for (int i = 0; i < mr; ++i)  // the ordered warp reduction
            for (int e = 0; e < kGemvUnit; ++e) {
              float& slot = partial[(i * kGemvUnit + e) * 32 + lane];
              slot = (warp == 0 ? 0.0f : slot) + acc[i][e];
            }
        }
      }
      for (int idx = 0; idx < mr * kGemvTransposeCols; ++idx) {
        const int i = idx / kGemvTransposeCols, cc = idx % kGemvTransposeCols;
        const int64_t row = m0 + i, col = col0 + cc;
        if (row < a.m && col < a.k)
          env.Store(by, row, col,
                    partial[(i * kGemvUnit + cc % kGemvUnit) * 32 +
                            cc / kGemvUnit]);
      }
    }
  }
}

// ------------------------------------------------------------ driver

void Finalize(Env& env) {
  const int64_t count = env.a.m * env.a.out();
  for (int64_t i = 0; i < count; ++i) {
    float sum = 0.0f;
    for (int z = 0; z < env.a.plan.splits; ++z)
      sum += env.workspace.at(z * count + i);
    const int64_t row = i / env.a.out(), col = i % env.a.out();
    const int splits = env.a.plan.splits;
    env.a.plan.splits = 1;  // Store into y
    env.Store(0, row, col, sum);
    env.a.plan.splits = splits;
  }
}

int Fail(char* err, int errlen, const std::string& what) {
  if (err != nullptr && errlen > 0)
    std::snprintf(err, static_cast<size_t>(errlen), "%s", what.c_str());
  return KQ_NF4_ERR_INVALID_ARGUMENT;
}

}  // namespace emulator
}  // namespace nf4_cuda
}  // namespace keras_qlora

extern "C" {

// kq_nf4_matmul_cuda on host memory, emulated: same arguments (pointers to
// host buffers; absmax_offset a host scalar), no stream or workspace, the
// GPU's multiprocessor count given. Writes the plan it ran into *ran.
__attribute__((visibility("default"))) int kq_nf4_emulate(
    const void* x, int x_dtype, const uint8_t* packed, const void* absmax,
    int absmax_is_u8, const float* absmax_scale, const float* absmax_offset,
    void* y, int64_t m, int64_t k, int64_t n, int block_size, int quant_type,
    int transpose, int algo, int allow_tf32, int sm_count, KqNf4Plan* ran,
    char* err, int errlen) {
  using namespace keras_qlora::nf4_cuda;  // NOLINT(build/namespaces)
  using namespace keras_qlora::nf4_cuda::emulator;  // NOLINT
  Problem p;
  p.m = m, p.k = k, p.n = n;
  p.x_dtype = x_dtype;
  p.block_size = block_size;
  p.quant_type = quant_type;
  p.transpose = transpose != 0;
  if (!ValidateProblem(p, algo, sm_count, err, errlen))
    return KQ_NF4_ERR_INVALID_ARGUMENT;
  if (absmax_is_u8 && p.int8())
    return Fail(err, errlen, "kq_nf4_emulate: int8 has no double quant");
  Env env;
  bool x_vec = false;
  env.a.plan =
      FitAlignment(p, x, packed, MakePlan(p, algo, allow_tf32 != 0, sm_count),
                   &x_vec);
  if (ran != nullptr) {
    ran->algo = env.a.plan.algo;
    ran->variant = env.a.plan.variant;
    ran->splits = env.a.plan.splits;
    ran->workspace_bytes = env.a.plan.workspace_bytes;
  }
  if (m == 0) return KQ_NF4_OK;
  const int64_t count = k * n, blocks = CeilDiv(count, block_size);
  env.a.m = m, env.a.k = k, env.a.n = n;
  env.a.block_shift =
      p.int8() ? 0 : __builtin_ctz(static_cast<unsigned>(block_size));
  env.a.x_dtype = x_dtype;
  env.a.quant_type = quant_type;
  const auto type = static_cast<keras_qlora::nf4::QuantType>(quant_type);
  env.code = keras_qlora::nf4::CodeTable(type);
  env.a.transpose = p.transpose;
  env.x32 = {static_cast<const uint32_t*>(x), m * p.red(), "x"};
  env.x16 = {static_cast<const uint16_t*>(x), m * p.red(), "x"};
  env.packed = {packed, keras_qlora::nf4::StorageBytes(type, count),
                "packed"};
  if (absmax_is_u8) {
    env.absmax_u8 = {static_cast<const uint8_t*>(absmax), blocks, "absmax"};
    env.nested = {absmax_scale, keras_qlora::nf4::NumNestedBlocks(blocks),
                  "absmax_scale"};
    env.offset = *absmax_offset;
    env.a.absmax_u8 = static_cast<const uint8_t*>(absmax);
  } else {
    env.absmax_f32 = {static_cast<const float*>(absmax), blocks, "absmax"};
    env.a.absmax_f32 = static_cast<const float*>(absmax);
  }
  env.y = y;
  if (env.a.plan.splits > 1)
    env.workspace.assign(env.a.plan.splits * m * p.out(), NAN);
  try {
    if (env.a.plan.algo == KQ_NF4_ALGO_GEMV) {
      p.transpose ? GemvTranspose(env) : GemvForward(env);
    } else if (env.a.plan.algo == KQ_NF4_ALGO_MMA) {
      Mma(env, x_vec);
    } else {
      Reference(env);
    }
    if (env.a.plan.splits > 1) Finalize(env);
  } catch (const std::exception& e) {
    return Fail(err, errlen, std::string("kq_nf4_emulate: ") + e.what());
  }
  return KQ_NF4_OK;
}

}  // extern "C"
