// Helpers of the NF4 CPU kernels on top of the format (nf4_format.h):
// overflow-checked sizes and block-scale decoding. Header-only: the matmul
// and the quantize kernels both include it.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_COMMON_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_COMMON_H_

#include <cstdint>
#include <limits>

#include "../include/nf4_format.h"

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

}  // namespace nf4
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_COMMON_H_
