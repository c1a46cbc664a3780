// Decoding int8 rows of W^T for the matmul kernels, per instruction set.
// An int8 weight (nf4_format.h) stores one signed byte per element and one
// float32 scale per row of W^T; every element decodes to exactly
// nf4::Int8Value(code, scale) = (float(code) * scale) * kInt8InvMax, two
// float32 multiplies in this order (vector multiplies round alike). Rows
// are whole "blocks" of any length (block_size == K, not a power of two),
// so nothing here uses block shifts or 32-element chunks. Inline-only
// (included by nf4_decode.h and nf4_gemm_pack.h).

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_INT8_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_INT8_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "nf4_common.h"

namespace keras_qlora {
namespace nf4_matmul {

// out[i] = Int8Value(codes[i], scale) for i < len.
inline void DecodeInt8Scalar(const uint8_t* codes, float scale, int64_t len,
                             float* out) {
  for (int64_t i = 0; i < len; ++i)
    out[i] = nf4::Int8Value(static_cast<int8_t>(codes[i]), scale);
}

KQ_AVX2 inline void DecodeInt8Avx2(const uint8_t* codes, float scale,
                                   int64_t len, float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 inv = _mm256_set1_ps(nf4::kInt8InvMax);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i v = _mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(
        _mm256_mul_ps(_mm256_cvtepi32_ps(v), s), inv));
  }
  DecodeInt8Scalar(codes + i, scale, len - i, out + i);
}

// The values of codes[0, count) (count <= 16) in the first lanes, 0 in the
// others (whatever the scale).
KQ_AVX512 inline __m512 Int8ValuesAvx512(const uint8_t* codes, int64_t count,
                                         __m512 scale) {
  __m128i bytes;
  if (count >= 16) {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  } else {
    alignas(16) uint8_t tail[16] = {};
    if (count > 0) std::memcpy(tail, codes, count);
    bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
  }
  const __m512 v = _mm512_mul_ps(
      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale),
      _mm512_set1_ps(nf4::kInt8InvMax));
  if (count >= 16) return v;
  const __mmask16 live =
      static_cast<__mmask16>(count <= 0 ? 0u : (1u << count) - 1);
  return _mm512_maskz_mov_ps(live, v);
}

KQ_AVX512 inline void DecodeInt8Avx512(const uint8_t* codes, float scale,
                                       int64_t len, float* out) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    _mm512_storeu_ps(out + i, Int8ValuesAvx512(codes + i, 16, s));
  DecodeInt8Scalar(codes + i, scale, len - i, out + i);
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_INT8_H_
