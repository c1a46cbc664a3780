// Helpers of the NF4 CPU kernels on top of the format (nf4_format.h):
// overflow-checked sizes, block-scale decoding and the KERAS_QLORA_CPU_ISA
// setting. Header-only: the matmul and the quantize kernels both include it.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_COMMON_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_COMMON_H_

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "../include/nf4_format.h"

// Target attributes of the matmul's SIMD kernels (chosen at run time).
#define KQ_AVX2 __attribute__((target("avx2,fma")))
#define KQ_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace keras_qlora {
namespace nf4 {

// Sets *out = a * b and returns true, or returns false when a, b >= 0 and
// the product does not fit in int64.
inline bool CheckedMul(int64_t a, int64_t b, int64_t* out) {
  if (a < 0 || b < 0) return false;
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

// The float32 scale of every block, from either storage: plain float32
// absmax (`absmax_u8 == nullptr`) or double-quantized uint8 codes. Cheap to
// copy; the pointers must outlive it and be validated by the caller.
struct BlockScales {
  const float* absmax_f32 = nullptr;
  const uint8_t* absmax_u8 = nullptr;
  const float* nested_scale = nullptr;
  float offset = 0.0f;

  float operator()(int64_t block) const {
    if (absmax_u8 == nullptr) return absmax_f32[block];
    return DoubleQuantScale(kDynamicMap[absmax_u8[block]],
                            nested_scale[block >> kNestedBlockShift], offset);
  }
};

// The instruction sets of the CPU kernels, in increasing order: the
// kernels run min(what the CPU has, the cap KERAS_QLORA_CPU_ISA sets).
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// Reads KERAS_QLORA_CPU_ISA (auto, scalar, avx2, avx512, avx512_bf16; unset
// or empty = auto) into *cap (auto: no cap) and *name (the value, "" when
// unset). Returns false, with the message in *error, for any other value.
inline bool ReadCpuIsaCap(CpuIsa* cap, std::string* name,
                          std::string* error) {
  const char* env = std::getenv("KERAS_QLORA_CPU_ISA");
  *name = env == nullptr ? "" : env;
  *cap = CpuIsa::kAvx512Bf16;
  if (name->empty() || *name == "auto" || *name == "avx512_bf16") return true;
  if (*name == "scalar") {
    *cap = CpuIsa::kScalar;
  } else if (*name == "avx2") {
    *cap = CpuIsa::kAvx2;
  } else if (*name == "avx512") {
    *cap = CpuIsa::kAvx512;
  } else {
    *error = "KERAS_QLORA_CPU_ISA must be one of auto, scalar, avx2, avx512, "
             "avx512_bf16. Received: KERAS_QLORA_CPU_ISA=" + *name;
    return false;
  }
  return true;
}

// The best instruction set this CPU has (x86 feature bits; scalar
// elsewhere).
inline CpuIsa BestCpuIsa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
    return CpuIsa::kScalar;
  if (!__builtin_cpu_supports("avx512f")) return CpuIsa::kAvx2;
  const bool bf16 = __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512bf16");
  return bf16 ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
#else
  return CpuIsa::kScalar;
#endif
}

}  // namespace nf4
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_COMMON_H_
