// CPU emulation of the tensor-core NF4 kernel (nf4_cuda_mma.cu): the same
// configs, item mappings, operand rounding and fragment offsets, phase by
// phase, for 4-bit and int8 weights; mma.sync itself is emulated from the
// PTX ISA fragment tables.

#include <type_traits>

#include "nf4_cuda_emulator.h"

namespace keras_qlora {
namespace nf4_cuda {
namespace emulator {
namespace {

// ------------------------------------------------------------ PTX tables
// "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8 with floating point
// type" (PTX ISA 9.7.14.5), element by element: a_i / b_i / c_i of lane.

void PtxA16(int lane, int i, int* row, int* col) {  // i = 0..7
  const int g = lane >> 2, t = lane % 4;
  *row = (i < 2 || (4 <= i && i < 6)) ? g : g + 8;
  *col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}

void PtxB16(int lane, int i, int* row, int* col) {  // i = 0..3
  const int g = lane >> 2, t = lane % 4;
  *row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  *col = g;
}

void PtxATf32(int lane, int i, int* row, int* col) {  // i = 0..3
  const int g = lane >> 2, t = lane % 4;
  *row = (i == 0 || i == 2) ? g : g + 8;
  *col = i < 2 ? t : t + 4;
}

void PtxBTf32(int lane, int i, int* row, int* col) {  // i = 0..1
  const int g = lane >> 2, t = lane % 4;
  *row = i == 0 ? t : t + 4;
  *col = g;
}

void PtxC(int lane, int i, int* row, int* col) {  // i = 0..3
  const int g = lane >> 2, t = lane % 4;
  *row = i < 2 ? g : g + 8;
  *col = t * 2 + (i & 1);
}

// ------------------------------------------------------------ operands

uint32_t OperandFromFloat(int dtype, float v) {
  if (dtype == KQ_NF4_F32) return Tf32FromFloat(v);
  return dtype == KQ_NF4_BF16 ? Bf16FromFloat(v) : F16FromFloat(v);
}

uint32_t OperandFromActivation(int dtype, uint32_t raw) {
  return dtype == KQ_NF4_F32 ? Tf32FromFloat(BitsToFloat(raw)) : raw;
}

float HalfValue(int dtype, uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  return dtype == KQ_NF4_BF16 ? Bf16ToFloat(bits) : F16ToFloat(bits);
}

void Put(double (*m)[16], int row, int col, double v) {
  if (!std::isnan(m[row][col]))
    throw std::logic_error("PTX table assigns an element twice");
  m[row][col] = v;
}

// c[lane] += a[lane] x b[lane] for one warp (m16n8k16, or m16n8k8 TF32).
void WarpMma(int dtype, const uint32_t (*a)[4], const uint32_t (*b)[2],
             float (*c)[4]) {
  const bool tf32 = dtype == KQ_NF4_F32;
  const int kdim = tf32 ? 8 : 16;
  double am[16][16], bm[16][16];  // bm [k][n], n < 8 used
  for (auto* m : {am, bm})
    for (int r = 0; r < 16; ++r)
      for (int q = 0; q < 16; ++q) m[r][q] = NAN;
  for (int lane = 0; lane < 32; ++lane) {
    int row, col;
    if (tf32) {
      for (int i = 0; i < 4; ++i) {
        PtxATf32(lane, i, &row, &col);
        Put(am, row, col, BitsToFloat(a[lane][i]));
      }
      for (int i = 0; i < 2; ++i) {
        PtxBTf32(lane, i, &row, &col);
        Put(bm, row, col, BitsToFloat(b[lane][i]));
      }
    } else {
      for (int i = 0; i < 8; ++i) {
        PtxA16(lane, i, &row, &col);
        Put(am, row, col, HalfValue(dtype, a[lane][i / 2], i % 2));
      }
      for (int i = 0; i < 4; ++i) {
        PtxB16(lane, i, &row, &col);
        Put(bm, row, col, HalfValue(dtype, b[lane][i / 2], i % 2));
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      int row, col;
      PtxC(lane, i, &row, &col);
      double sum = c[lane][i];
      for (int q = 0; q < kdim; ++q) sum += am[row][q] * bm[q][col];
      c[lane][i] = static_cast<float>(sum);
    }
  }
}

// ------------------------------------------------------------ the kernel

template <typename C>
class MmaBlock {
 public:
  using Bits = std::conditional_t<C::kTf32, uint32_t, uint16_t>;
  static constexpr int kVec = C::kTf32 ? 4 : 8;  // x elements per 16 bytes
  static constexpr int kXItems = C::kBM * C::kBK / kVec;
  static constexpr int kWItems = C::kBN * C::kBK / kGemvUnit;
  static constexpr int kXPer = (kXItems + kMmaThreads - 1) / kMmaThreads;
  static constexpr int kWPer = (kWItems + kMmaThreads - 1) / kMmaThreads;

  MmaBlock(Env& env, bool x_vec) : env_(env), a_(env.a), x_vec_(x_vec) {}

  void Run(int64_t bx, int by, int64_t tiles_o) {
    const Bits nan_bits = C::kTf32 ? 0x7FC00000u
                          : a_.x_dtype == KQ_NF4_BF16 ? 0x7FC0u : 0x7E00u;
    for (auto& buf : as_) buf.assign(C::kBM * C::kStride, nan_bits);
    for (auto& buf : bs_) buf.assign(C::kBN * C::kStride, nan_bits);
    acc_.assign(8 * 32 * C::kMI * C::kNI * 4, 0.0f);
    stage_.assign(kMmaThreads, Stage{});
    o0_ = bx % tiles_o * C::kBN;
    m0_ = bx / tiles_o * C::kBM;
    int64_t kt_begin, kt_end;
    SplitRange(CeilDiv(a_.red(), C::kBK), a_.plan.split_len, by, &kt_begin,
               &kt_end);
    LoadAll(kt_begin * C::kBK);
    StoreAll(0);
    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {  // one barrier per step
      const int buf = static_cast<int>((kt - kt_begin) & 1);
      const bool more = kt + 1 < kt_end;
      if (more) LoadAll((kt + 1) * C::kBK);
      Compute(buf);
      if (more) StoreAll(buf ^ 1);
    }
    Epilogue(by);
  }

 private:
  struct Stage {
    uint32_t x[kXPer][4];
    uint32_t w[kWPer][4];  // words 0..1 (4-bit) or 0..3 (int8) of a unit
    float scale[kWPer];
  };

  void LoadAll(int64_t r0) {
    for (int tid = 0; tid < kMmaThreads; ++tid) LoadStage(tid, r0);
  }

  void StoreAll(int buf) {
    for (int tid = 0; tid < kMmaThreads; ++tid) StoreStage(tid, buf);
  }

  void LoadStage(int tid, int64_t r0) {
    Stage& s = stage_[tid];
    const int64_t red = a_.red();
    for (int it = 0; it < kXPer; ++it) {
      const int i = tid + it * kMmaThreads;
      uint32_t bits[8] = {};
      std::memset(s.x[it], 0, sizeof(s.x[it]));
      if (i >= kXItems) continue;
      int row, col;
      XItem<C>(i, kVec, &row, &col);
      const int64_t gm = m0_ + row, gr = r0 + col;
      if (gm >= a_.m) continue;
      for (int e = 0; e < kVec; ++e) {
        // A vector load reads all kVec elements; the scalar path each one.
        const bool valid = x_vec_ ? gr < red : gr + e < red;
        bits[e] = valid ? env_.XBits(gm * red + gr + e) : 0;
      }
      for (int w = 0; w < 4; ++w)
        s.x[it][w] = C::kTf32 ? bits[w] : bits[2 * w] | (bits[2 * w + 1] << 16);
    }
    for (int it = 0; it < kWPer; ++it) {
      const int i = tid + it * kMmaThreads;
      std::memset(s.w[it], 0, sizeof(s.w[it]));
      s.scale[it] = 0.0f;
      if (i >= kWItems) continue;
      int64_t n, k;
      UnitOf(i, r0, &n, &k);
      if (n >= a_.n || k >= a_.k) continue;
      const int64_t flat = FlatIndex(n, k, a_.k);
      if (a_.int8()) {  // 16 bytes, the row's scale
        env_.PackedWords(flat, 4, s.w[it]);
        s.scale[it] = env_.absmax_f32[n];
      } else {
        env_.PackedWords((flat >> 4) * 8, 2, s.w[it]);
        s.scale[it] = env_.Scale(flat >> a_.block_shift);
      }
    }
  }

  // W^T row n and column k of W unit i (LoadStage of the kernel).
  void UnitOf(int i, int64_t r0, int64_t* n, int64_t* k) const {
    if (a_.transpose) {
      int j, u;
      WItemTransposed<C>(i, &j, &u);
      *n = r0 + j;
      *k = o0_ + kGemvUnit * u;
    } else {
      int o, kk;
      WItemForward<C>(i, &o, &kk);
      *n = o0_ + o;
      *k = r0 + kk;
    }
  }

  void StoreStage(int tid, int buf) {
    const Stage& s = stage_[tid];
    std::vector<Bits>& as = as_[buf];
    std::vector<Bits>& bs = bs_[buf];
    for (int it = 0; it < kXPer; ++it) {
      const int i = tid + it * kMmaThreads;
      if (i >= kXItems) continue;
      int row, col;
      XItem<C>(i, kVec, &row, &col);
      for (int e = 0; e < kVec; ++e) {
        const uint32_t raw =
            C::kTf32 ? s.x[it][e] : (s.x[it][e / 2] >> (16 * (e % 2))) & 0xFFFF;
        as.at(row * C::kStride + col + e) =
            static_cast<Bits>(OperandFromActivation(a_.x_dtype, raw));
      }
    }
    for (int it = 0; it < kWPer; ++it) {
      const int i = tid + it * kMmaThreads;
      if (i >= kWItems) continue;
      for (int e = 0; e < kGemvUnit; ++e) {
        const float value =
            a_.int8()
                ? nf4::Int8Value(Int8CodeOf(s.w[it][e >> 2], e & 3),
                                 s.scale[it])
                : MulRn(env_.code[CodeOf(s.w[it][e >> 3], e & 7)],
                        s.scale[it]);
        const Bits v =
            static_cast<Bits>(OperandFromFloat(a_.x_dtype, value));
        if (a_.transpose) {
          int j, u;
          WItemTransposed<C>(i, &j, &u);
          bs.at((kGemvUnit * u + e) * C::kStride + j) = v;
        } else {
          int o, kk;
          WItemForward<C>(i, &o, &kk);
          bs.at(o * C::kStride + kk + e) = v;
        }
      }
    }
  }

  // 32 bits of a stage at element offset `off` (Ld32 of the kernel).
  static uint32_t Ld32(const std::vector<Bits>& smem, int64_t off) {
    if (C::kTf32) return smem.at(off);
    return uint32_t{smem.at(off)} | (uint32_t{smem.at(off + 1)} << 16);
  }

  float* Acc(int warp, int lane, int mi, int ni) {
    return &acc_[(((warp * 32 + lane) * C::kMI + mi) * C::kNI + ni) * 4];
  }

  void Compute(int buf) {
    for (int warp = 0; warp < 8; ++warp) {
      const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
      const int64_t a_base = wm * C::kWM * C::kStride;
      const int64_t b_base = wn * C::kWN * C::kStride;
      for (int ks = 0; ks < C::kBK; ks += C::kKStep) {
        for (int mi = 0; mi < C::kMI; ++mi) {
          uint32_t af[32][4];
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r)
              af[lane][r] = Ld32(as_[buf], a_base + mi * 16 * C::kStride + ks +
                                                FragAOffset<C>(lane, r));
          for (int ni = 0; ni < C::kNI; ++ni) {
            uint32_t bf[32][2];
            float c[32][4];
            for (int lane = 0; lane < 32; ++lane) {
              for (int r = 0; r < 2; ++r)
                bf[lane][r] = Ld32(bs_[buf], b_base + ni * 8 * C::kStride +
                                                 ks + FragBOffset<C>(lane, r));
              std::memcpy(c[lane], Acc(warp, lane, mi, ni), sizeof(c[lane]));
            }
            WarpMma(a_.x_dtype, af, bf, c);
            for (int lane = 0; lane < 32; ++lane)
              std::memcpy(Acc(warp, lane, mi, ni), c[lane], sizeof(c[lane]));
          }
        }
      }
    }
  }

  void Epilogue(int by) {
    const int64_t out = a_.out();
    for (int warp = 0; warp < 8; ++warp) {
      const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
      for (int lane = 0; lane < 32; ++lane)
        for (int mi = 0; mi < C::kMI; ++mi)
          for (int ni = 0; ni < C::kNI; ++ni)
            for (int e = 0; e < 4; ++e) {
              int r, c;
              FragC(lane, e, &r, &c);
              const int64_t row = m0_ + wm * C::kWM + mi * 16 + r;
              const int64_t col = o0_ + wn * C::kWN + ni * 8 + c;
              if (row < a_.m && col < out)
                env_.Store(by, row, col, Acc(warp, lane, mi, ni)[e]);
            }
    }
  }

  Env& env_;
  const Nf4Args& a_;
  const bool x_vec_;
  int64_t o0_ = 0, m0_ = 0;
  std::vector<Bits> as_[2], bs_[2];
  std::vector<float> acc_;
  std::vector<Stage> stage_;
};

template <int BM, bool TF32>
void RunAll(Env& env, bool x_vec) {
  using C = MmaConfig<BM, TF32>;
  const int64_t tiles_o = CeilDiv(env.a.out(), C::kBN);
  const int64_t blocks = tiles_o * CeilDiv(env.a.m, C::kBM);
  MmaBlock<C> block(env, x_vec);
  for (int64_t bx = 0; bx < blocks; ++bx)
    for (int by = 0; by < env.a.plan.splits; ++by) block.Run(bx, by, tiles_o);
}

template <bool TF32>
void Dispatch(Env& env, bool x_vec) {
  if (env.a.plan.variant == 16) return RunAll<16, TF32>(env, x_vec);
  if (env.a.plan.variant == 64) return RunAll<64, TF32>(env, x_vec);
  RunAll<128, TF32>(env, x_vec);
}

}  // namespace

void Mma(Env& env, bool x_vec) {
  if (env.a.x_dtype == KQ_NF4_F32) {
    Dispatch<true>(env, x_vec);
  } else {
    Dispatch<false>(env, x_vec);
  }
}

}  // namespace emulator
}  // namespace nf4_cuda
}  // namespace keras_qlora
