// Device-side helpers of the CUDA NF4 kernels (nvcc only): the code tables,
// activation dtype traits, block scales, warp sums and mma.sync wrappers.

#ifndef KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_DEVICE_CUH_
#define KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_DEVICE_CUH_

#if defined(KQ_CUDA_SIM)
#include "cuda_sim.h"  // the kernels on the host (testing/cuda_sim/)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// kernel<<<grid, block, 0, stream>>>(args), spelled so that the simulator
// can run the same launch on the host.
#define KQ_LAUNCH(grid, block, stream, ...) \
  __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

#include <cstdint>

#include "../include/nf4_format.h"
#include "nf4_cuda_math.h"

namespace keras_qlora {
namespace nf4_cuda {

// ------------------------------------------------------------ tables

// The 4-bit formats' code tables (NF4 and FP4, indexed by quant type) and
// bitsandbytes' dynamic map, copied at compile time from the format's
// tables (nf4_format.h), so both sides use the same bits. The kernels are
// the same for every 4-bit format: only the table a block loads differs.
struct CodeTable {
  float v[nf4::kNf4CodeSize];
};
struct DynamicTable {
  float v[nf4::kDynamicMapSize];
};

constexpr int kNumCodeTables = 2;  // nf4 (0) and fp4 (1)

constexpr CodeTable MakeCodeTable(nf4::QuantType type) {
  CodeTable t{};
  for (int i = 0; i < nf4::kNf4CodeSize; ++i)
    t.v[i] = type == nf4::QuantType::kFp4 ? nf4::kFp4Code[i]
                                          : nf4::kNf4Code[i];
  return t;
}

constexpr DynamicTable MakeDynamicTable() {
  DynamicTable t{};
  for (int i = 0; i < nf4::kDynamicMapSize; ++i)
    t.v[i] = nf4::kDynamicMap[i];
  return t;
}

// One copy per translation unit (no relocatable device code needed). One
// array indexed by the quant type, so that every table load reads one
// global symbol (benchmarks/gpu/inspect_ptx.py traces loads to it).
static __device__ const CodeTable kDevCode[kNumCodeTables] = {
    MakeCodeTable(nf4::QuantType::kNf4), MakeCodeTable(nf4::QuantType::kFp4)};
static __device__ const DynamicTable kDevDynamic = MakeDynamicTable();

// Per-block shared copies: lanes look codes up with divergent indices,
// which shared memory serves in one pass (the constant cache would
// serialize them).
struct SharedTables {
  float code[nf4::kNf4CodeSize];
  float dynamic[nf4::kDynamicMapSize];
};

// Fills `t` with the code table of a's format (and the dynamic map with
// double quant); the caller synchronizes before use. int8 reads no table
// (its element values need none); it loads the NF4 one, unused.
__device__ __forceinline__ void LoadTables(SharedTables* t,
                                           const Nf4Args& a) {
  const int table = a.quant_type == KQ_NF4_QUANT_FP4 ? 1 : 0;
  for (int i = threadIdx.x; i < nf4::kNf4CodeSize; i += blockDim.x)
    t->code[i] = kDevCode[table].v[i];
  if (a.absmax_u8 == nullptr) return;
  for (int i = threadIdx.x; i < nf4::kDynamicMapSize; i += blockDim.x)
    t->dynamic[i] = kDevDynamic.v[i];
}

// The float32 scale of quantization block `block`.
__device__ __forceinline__ float LoadScale(const Nf4Args& a, int64_t block,
                                           const SharedTables& t,
                                           float offset) {
  if (a.absmax_u8 == nullptr) return __ldg(a.absmax_f32 + block);
  return DoubleQuantScale(t.dynamic[__ldg(a.absmax_u8 + block)],
                          __ldg(a.nested + (block >> nf4::kNestedBlockShift)),
                          offset);
}

__device__ __forceinline__ float LoadOffset(const Nf4Args& a) {
  return a.absmax_u8 != nullptr ? __ldg(a.offset) : 0.0f;
}

// W^T[n, k] of an int8 weight (`flat` = n * K + k): its byte as a signed
// code times the row's scale, nf4::Int8Value (two unfused multiplies).
__device__ __forceinline__ float LoadInt8Weight(const Nf4Args& a,
                                                int64_t flat, int64_t n) {
  const int code = static_cast<int8_t>(__ldg(a.packed + flat));
  return nf4::Int8Value(code, __ldg(a.absmax_f32 + n));
}

// ------------------------------------------------------------ dtypes

template <typename T>
struct Act;

template <>
struct Act<float> {
  static constexpr int kDtype = KQ_NF4_F32;
  __device__ static float ToFloat(float v) { return v; }
  __device__ static float FromFloat(float v) { return v; }
};

template <>
struct Act<__nv_bfloat16> {
  static constexpr int kDtype = KQ_NF4_BF16;
  __device__ static float ToFloat(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  __device__ static __nv_bfloat16 FromFloat(float v) {
    return __float2bfloat16_rn(v);
  }
  __device__ static __nv_bfloat16 FromBits(uint16_t b) {
    return __ushort_as_bfloat16(b);
  }
};

template <>
struct Act<__half> {
  static constexpr int kDtype = KQ_NF4_F16;
  __device__ static float ToFloat(__half v) { return __half2float(v); }
  __device__ static __half FromFloat(float v) { return __float2half_rn(v); }
  __device__ static __half FromBits(uint16_t b) { return __ushort_as_half(b); }
};

// Eight consecutive activations from a 16-byte-aligned address, as floats.
__device__ __forceinline__ void Load8(const float* p, float v[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void Load8(const T* p, float v[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = Act<T>::ToFloat(
        Act<T>::FromBits(static_cast<uint16_t>(w[i] & 0xFFFFu)));
    v[2 * i + 1] =
        Act<T>::ToFloat(Act<T>::FromBits(static_cast<uint16_t>(w[i] >> 16)));
  }
}

// 16 bytes of operand bits <-> a uint4 (first element in the low bits), so
// that shared-memory stores are single 128-bit stores.
__device__ __forceinline__ uint4 Pack16B(const uint32_t* v) {
  return make_uint4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ uint4 Pack16B(const uint16_t* v) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = uint32_t{v[2 * i]} | (uint32_t{v[2 * i + 1]} << 16);
  return Pack16B(w);
}

__device__ __forceinline__ void Unpack16B(const uint4& p, uint32_t* v) {
  v[0] = p.x, v[1] = p.y, v[2] = p.z, v[3] = p.w;
}

__device__ __forceinline__ void Unpack16B(const uint4& p, uint16_t* v) {
  uint32_t w[4];
  Unpack16B(p, w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = static_cast<uint16_t>(w[i] & 0xFFFFu);
    v[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
  }
}

// Component p (0..3, a compile-time constant after unrolling) of a uint4.
__device__ __forceinline__ uint32_t Word(const uint4& v, int p) {
  return p == 0 ? v.x : p == 1 ? v.y : p == 2 ? v.z : v.w;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, d);
  return v;
}

// ------------------------------------------------------------ mma

// Tensor-core operand of activation type T: the bits one shared-memory
// element holds, how a float becomes one, and the matching mma.sync.
// bf16/f16 activations are used as they are (W is rounded to their type);
// float32 activations and W are rounded to TF32 (cvt.rna), as TensorFlow
// does for float32 matmuls on Ampere and later unless TF32 is disabled.
template <typename T>
struct Operand;

__device__ __forceinline__ uint32_t ToTf32(float v) {
#if defined(KQ_CUDA_SIM)
  return kqsim::CvtRnaTf32(v);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
#endif
}

template <>
struct Operand<float> {
  using Bits = uint32_t;
  __device__ static Bits FromFloat(float v) { return ToTf32(v); }
  __device__ static Bits FromActivation(uint32_t raw) {
    return ToTf32(__uint_as_float(raw));
  }
  // m16n8k8: a[4] and b[2] each hold one TF32 element.
  __device__ static void Mma(float c[4], const uint32_t a[4],
                             const uint32_t b[2]) {
#if defined(KQ_CUDA_SIM)
    kqsim::Mma(kqsim::MmaShape::kM16N8K8Tf32, c, a, b);
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]),
          "r"(b[1]));
#endif
  }
};

template <>
struct Operand<__nv_bfloat16> {
  using Bits = uint16_t;
  __device__ static Bits FromFloat(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  __device__ static Bits FromActivation(uint16_t raw) { return raw; }
  // m16n8k16: a[4] and b[2] each hold two bf16 (lower column in the low
  // half).
  __device__ static void Mma(float c[4], const uint32_t a[4],
                             const uint32_t b[2]) {
#if defined(KQ_CUDA_SIM)
    kqsim::Mma(kqsim::MmaShape::kM16N8K16Bf16, c, a, b);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]),
          "r"(b[1]));
#endif
  }
};

template <>
struct Operand<__half> {
  using Bits = uint16_t;
  // |W| <= absmax, far below float16's 65504 for real weights; larger
  // values would become inf, as they would in a float16 model.
  __device__ static Bits FromFloat(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
  __device__ static Bits FromActivation(uint16_t raw) { return raw; }
  __device__ static void Mma(float c[4], const uint32_t a[4],
                             const uint32_t b[2]) {
#if defined(KQ_CUDA_SIM)
    kqsim::Mma(kqsim::MmaShape::kM16N8K16F16, c, a, b);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]),
          "r"(b[1]));
#endif
  }
};

}  // namespace nf4_cuda
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_DEVICE_CUH_
