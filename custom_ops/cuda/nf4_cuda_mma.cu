// Tensor-core CUDA NF4 kernel (larger M): per block a [BM, 128] output tile,
// 8 warps, mma.sync with float32 accumulators (nf4_cuda_plan.h, MmaConfig).
//
// Each k-step stages x [BM, BK] and the decoded W [128, BK] in shared
// memory (two stages): the next step's global loads (16-byte x vectors,
// 8-byte W units plus their scale) are issued into registers before the
// current step's mma loop, then decoded, converted and stored into the other
// stage, so one barrier per step suffices. W is decoded as code * scale in
// float32 and rounded once to the operand type (bf16 / f16, TF32 for float32
// activations). The transposed product uses the same kernel: its W units
// come from W^T rows indexed by the reduction, and are stored transposed.
// Split-K (gridDim.y) writes partial sums that the finalize kernel adds in
// order.
//
// I8 (int8 weights): the same tiles; a unit's 16 codes are 16 bytes (one
// 16-byte load), its scale the W^T row's, and each element is decoded as
// nf4::Int8Value (two unfused float32 multiplies) before the rounding to
// the operand type.

#include <type_traits>

#include "nf4_cuda_device.cuh"
#include "nf4_cuda_kernels.h"

namespace keras_qlora {
namespace nf4_cuda {
namespace {

// Registers holding one k-step of a thread's global loads: x vectors, and
// W units (8 bytes of 4-bit codes, or 16 int8 bytes with I8) with scales.
template <typename T, typename C, bool I8>
struct Stage {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kXItems = C::kBM * C::kBK / kVec;
  static constexpr int kWItems = C::kBN * C::kBK / kGemvUnit;
  static constexpr int kXPer = (kXItems + kMmaThreads - 1) / kMmaThreads;
  static constexpr int kWPer = (kWItems + kMmaThreads - 1) / kMmaThreads;
  uint4 x[kXPer];
  typename std::conditional<I8, uint4, uint2>::type w[kWPer];
  float scale[kWPer];
};

template <typename T, typename C, bool I8>
__device__ __forceinline__ void LoadStage(const Nf4Args& a, bool x_vec,
                                          int64_t m0, int64_t o0, int64_t r0,
                                          const SharedTables& tables,
                                          float offset, Stage<T, C, I8>* s) {
  using S = Stage<T, C, I8>;
  using Bits = typename Operand<T>::Bits;
  const int64_t red = a.red();
  const T* x = static_cast<const T*>(a.x);
#pragma unroll
  for (int it = 0; it < S::kXPer; ++it) {
    const int i = threadIdx.x + it * kMmaThreads;
    s->x[it] = make_uint4(0, 0, 0, 0);
    if (i >= S::kXItems) continue;
    int row, col;
    XItem<C>(i, S::kVec, &row, &col);
    const int64_t gm = m0 + row, gr = r0 + col;
    if (gm >= a.m) continue;
    const T* src = x + gm * red + gr;
    if (x_vec) {  // red % kVec == 0: the vector is all in or all out
      if (gr < red) s->x[it] = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
      Bits bits[S::kVec];
#pragma unroll
      for (int e = 0; e < S::kVec; ++e)
        bits[e] = gr + e < red ? reinterpret_cast<const Bits*>(src)[e] : 0;
      s->x[it] = Pack16B(bits);
    }
  }
#pragma unroll
  for (int it = 0; it < S::kWPer; ++it) {
    const int i = threadIdx.x + it * kMmaThreads;
    s->w[it] = {};
    s->scale[it] = 0.0f;
    if (i >= S::kWItems) continue;
    int64_t n, k;
    if (a.transpose) {
      int j, u;
      WItemTransposed<C>(i, &j, &u);
      n = r0 + j;
      k = o0 + kGemvUnit * u;
    } else {
      int o, kk;
      WItemForward<C>(i, &o, &kk);
      n = o0 + o;
      k = r0 + kk;
    }
    if (n >= a.n || k >= a.k) continue;  // k % 16 == 0: whole unit
    const int64_t flat = FlatIndex(n, k, a.k);
    if constexpr (I8) {
      s->w[it] = __ldg(reinterpret_cast<const uint4*>(a.packed) + (flat >> 4));
      s->scale[it] = __ldg(a.absmax_f32 + n);
    } else {
      s->w[it] =
          __ldg(reinterpret_cast<const uint2*>(a.packed) + (flat >> 4));
      s->scale[it] = LoadScale(a, flat >> a.block_shift, tables, offset);
    }
  }
}

// The value of code e (0..15) of a staged W unit: the 4-bit format's table
// value times the block scale, or the int8 element (nf4::Int8Value).
__device__ __forceinline__ float UnitValue(const uint2& w, int e, float scale,
                                           const SharedTables& tables) {
  return MulRn(tables.code[CodeOf(e < 8 ? w.x : w.y, e & 7)], scale);
}

__device__ __forceinline__ float UnitValue(const uint4& w, int e, float scale,
                                           const SharedTables&) {
  return nf4::Int8Value(Int8CodeOf(Word(w, e >> 2), e & 3), scale);
}

template <typename T, typename C, bool I8>
__device__ __forceinline__ void StoreStage(
    const Nf4Args& a, const Stage<T, C, I8>& s, const SharedTables& tables,
    typename Operand<T>::Bits* as, typename Operand<T>::Bits* bs) {
  using S = Stage<T, C, I8>;
  using Op = Operand<T>;
  using Bits = typename Op::Bits;
#pragma unroll
  for (int it = 0; it < S::kXPer; ++it) {
    const int i = threadIdx.x + it * kMmaThreads;
    if (i >= S::kXItems) continue;
    int row, col;
    XItem<C>(i, S::kVec, &row, &col);
    Bits raw[S::kVec], conv[S::kVec];
    Unpack16B(s.x[it], raw);
#pragma unroll
    for (int e = 0; e < S::kVec; ++e) conv[e] = Op::FromActivation(raw[e]);
    // Rows are multiples of 16 bytes and col * sizeof(Bits) is too.
    *reinterpret_cast<uint4*>(as + row * C::kStride + col) = Pack16B(conv);
  }
#pragma unroll
  for (int it = 0; it < S::kWPer; ++it) {
    const int i = threadIdx.x + it * kMmaThreads;
    if (i >= S::kWItems) continue;
    Bits v[kGemvUnit];
#pragma unroll
    for (int e = 0; e < kGemvUnit; ++e)
      v[e] = Op::FromFloat(UnitValue(s.w[it], e, s.scale[it], tables));
    if (a.transpose) {
      int j, u;
      WItemTransposed<C>(i, &j, &u);
#pragma unroll
      for (int e = 0; e < kGemvUnit; ++e)
        bs[(kGemvUnit * u + e) * C::kStride + j] = v[e];
    } else {
      int o, kk;
      WItemForward<C>(i, &o, &kk);
      constexpr int kPerVec = 16 / static_cast<int>(sizeof(Bits));
#pragma unroll
      for (int q = 0; q < kGemvUnit / kPerVec; ++q)
        *reinterpret_cast<uint4*>(bs + o * C::kStride + kk + q * kPerVec) =
            Pack16B(v + q * kPerVec);
    }
  }
}

// 32 bits of shared memory at element offset `off` (an even offset for
// 16-bit operands: a pair of consecutive elements).
template <typename Bits>
__device__ __forceinline__ uint32_t Ld32(const Bits* base, int off) {
  return *reinterpret_cast<const uint32_t*>(base + off);
}

template <typename T, typename C>
__device__ __forceinline__ void ComputeStage(
    const typename Operand<T>::Bits* as, const typename Operand<T>::Bits* bs,
    int wm, int wn, int lane, float (&acc)[C::kMI][C::kNI][4]) {
  as += wm * C::kWM * C::kStride;
  bs += wn * C::kWN * C::kStride;
#pragma unroll
  for (int ks = 0; ks < C::kBK; ks += C::kKStep) {
    uint32_t af[C::kMI][4], bf[C::kNI][2];
#pragma unroll
    for (int mi = 0; mi < C::kMI; ++mi)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        af[mi][r] = Ld32(as + mi * 16 * C::kStride + ks,
                         FragAOffset<C>(lane, r));
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        bf[ni][r] = Ld32(bs + ni * 8 * C::kStride + ks,
                         FragBOffset<C>(lane, r));
#pragma unroll
    for (int mi = 0; mi < C::kMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < C::kNI; ++ni)
        Operand<T>::Mma(acc[mi][ni], af[mi], bf[ni]);
  }
}

// Two blocks per SM (16 warps) to hide the global loads: the 128-row tile
// then fits 128 registers (ptxas: 8 bytes of spill on sm_90).
template <typename T, typename C, bool I8>
__global__ void __launch_bounds__(kMmaThreads, 2)
    MmaKernel(Nf4Args a, int64_t tiles_o, bool x_vec) {
  using Bits = typename Operand<T>::Bits;
  __shared__ SharedTables tables;
  __shared__ __align__(16) Bits as[2][C::kBM * C::kStride];
  __shared__ __align__(16) Bits bs[2][C::kBN * C::kStride];
  LoadTables(&tables, a);
  __syncthreads();
  const float offset = LoadOffset(a);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / C::kWarpsN, wn = warp % C::kWarpsN;
  const int64_t o0 = blockIdx.x % tiles_o * int64_t{C::kBN};
  const int64_t m0 = blockIdx.x / tiles_o * int64_t{C::kBM};
  int64_t kt_begin, kt_end;
  SplitRange(CeilDiv(a.red(), C::kBK), a.plan.split_len, blockIdx.y,
             &kt_begin, &kt_end);

  float acc[C::kMI][C::kNI][4] = {};
  Stage<T, C, I8> stage;
  LoadStage<T, C, I8>(a, x_vec, m0, o0, kt_begin * C::kBK, tables, offset,
                      &stage);
  StoreStage<T, C, I8>(a, stage, tables, as[0], bs[0]);
  __syncthreads();
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    const int buf = static_cast<int>((kt - kt_begin) & 1);
    const bool more = kt + 1 < kt_end;
    if (more)  // in flight during this step's mma
      LoadStage<T, C, I8>(a, x_vec, m0, o0, (kt + 1) * C::kBK, tables,
                          offset, &stage);
    ComputeStage<T, C>(as[buf], bs[buf], wm, wn, lane, acc);
    if (more)
      StoreStage<T, C, I8>(a, stage, tables, as[buf ^ 1], bs[buf ^ 1]);
    __syncthreads();
  }

  const int64_t out = a.out();
#pragma unroll
  for (int mi = 0; mi < C::kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::kNI; ++ni) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int r, c;
        FragC(lane, e, &r, &c);
        const int64_t row = m0 + wm * C::kWM + mi * 16 + r;
        const int64_t col = o0 + wn * C::kWN + ni * 8 + c;
        if (row >= a.m || col >= out) continue;
        if (a.plan.splits == 1) {
          static_cast<T*>(a.y)[row * out + col] =
              Act<T>::FromFloat(acc[mi][ni][e]);
        } else {
          a.workspace[(blockIdx.y * a.m + row) * out + col] = acc[mi][ni][e];
        }
      }
    }
  }
}

template <typename T, int BM, bool I8>
cudaError_t Launch(const Nf4Args& a, bool x_vec, cudaStream_t stream) {
  using C = MmaConfig<BM, Act<T>::kDtype == KQ_NF4_F32>;
  const int64_t tiles_o = CeilDiv(a.out(), C::kBN);
  const int64_t blocks = tiles_o * CeilDiv(a.m, C::kBM);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(a.plan.splits));
  KQ_LAUNCH(grid, kMmaThreads, stream,
            MmaKernel<T, C, I8>)(a, tiles_o, x_vec);
  return cudaGetLastError();
}

template <typename T, bool I8>
cudaError_t DispatchTile(const Nf4Args& a, bool x_vec, cudaStream_t stream) {
  if (a.plan.variant == 16) return Launch<T, 16, I8>(a, x_vec, stream);
  if (a.plan.variant == 64) return Launch<T, 64, I8>(a, x_vec, stream);
  return Launch<T, 128, I8>(a, x_vec, stream);
}

template <typename T>
cudaError_t Dispatch(const Nf4Args& a, bool x_vec, cudaStream_t stream) {
  return a.int8() ? DispatchTile<T, true>(a, x_vec, stream)
                  : DispatchTile<T, false>(a, x_vec, stream);
}

}  // namespace

cudaError_t LaunchMma(const Nf4Args& a, bool x_vec, cudaStream_t stream) {
  switch (a.x_dtype) {
    case KQ_NF4_BF16:
      return Dispatch<__nv_bfloat16>(a, x_vec, stream);
    case KQ_NF4_F16:
      return Dispatch<__half>(a, x_vec, stream);
    default:
      return Dispatch<float>(a, x_vec, stream);
  }
}

}  // namespace nf4_cuda
}  // namespace keras_qlora
