// Shared parts of the CPU emulator of the CUDA NF4 kernels (see
// nf4_cuda_emulator.cc): number formats, bounds-checked buffers, the
// emulated kernel environment and the per-kernel entry points.

#ifndef KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_EMULATOR_NF4_CUDA_EMULATOR_H_
#define KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_EMULATOR_NF4_CUDA_EMULATOR_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../include/nf4_format.h"
#include "../../cuda/nf4_cuda_math.h"

namespace keras_qlora {
namespace nf4_cuda {
namespace emulator {

// ------------------------------------------------------------ numbers

inline float BitsToFloat(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline uint16_t Bf16FromFloat(float f) {  // round to nearest even
  const uint32_t b = FloatToBits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((b >> 16) | 0x40);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

inline float Bf16ToFloat(uint16_t b) { return BitsToFloat(uint32_t{b} << 16); }

// _Float16 (GCC >= 12 on x86-64) converts with round to nearest even.
inline uint16_t F16FromFloat(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

inline float F16ToFloat(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}

inline uint32_t Tf32FromFloat(float f) {  // cvt.rna.tf32.f32: ties away from 0
  const uint32_t b = FloatToBits(f);
  if (!std::isfinite(f)) return b;
  return (b + 0x1000u) & 0xFFFFE000u;
}

// ------------------------------------------------------------ memory

struct OutOfBounds : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
struct Buffer {
  const T* data = nullptr;
  int64_t size = 0;
  const char* name = "";

  T operator[](int64_t i) const {
    if (data == nullptr || i < 0 || i >= size)
      throw OutOfBounds(std::string("read of ") + name + "[" +
                        std::to_string(i) + "], size " +
                        std::to_string(size));
    return data[i];
  }
};

// The kernel arguments on the host, with sizes.
struct Env {
  Nf4Args a;
  Buffer<uint32_t> x32;  // float32 activations as bits
  Buffer<uint16_t> x16;  // bf16 / f16 activations as bits
  Buffer<uint8_t> packed;
  Buffer<float> absmax_f32;
  Buffer<uint8_t> absmax_u8;
  Buffer<float> nested;
  float offset = 0.0f;
  // The 4-bit format's code table (nf4::CodeTable), the host twin of the
  // table the kernels copy into shared memory.
  const float* code = nf4::kNf4Code;
  void* y = nullptr;
  std::vector<float> workspace;

  bool f32() const { return a.x_dtype == KQ_NF4_F32; }

  // Raw activation bits of x[i].
  uint32_t XBits(int64_t i) const { return f32() ? x32[i] : x16[i]; }

  float XValue(int64_t i) const {
    if (f32()) return BitsToFloat(x32[i]);
    return a.x_dtype == KQ_NF4_BF16 ? Bf16ToFloat(x16[i]) : F16ToFloat(x16[i]);
  }

  // Bytes [byte, byte + count) of packed as little-endian 32-bit words.
  void PackedWords(int64_t byte, int words, uint32_t* out) const {
    for (int w = 0; w < words; ++w) {
      uint32_t v = 0;
      for (int b = 0; b < 4; ++b)
        v |= uint32_t{packed[byte + 4 * w + b]} << (8 * b);
      out[w] = v;
    }
  }

  float Scale(int64_t block) const {  // LoadScale of the kernels
    if (a.absmax_u8 == nullptr) return absmax_f32[block];
    return DoubleQuantScale(nf4::kDynamicMap[absmax_u8[block]],
                            nested[block >> nf4::kNestedBlockShift], offset);
  }

  // W^T[n, k] of an int8 weight (flat = n * K + k): LoadInt8Weight.
  float Int8Weight(int64_t flat, int64_t n) const {
    const int code = static_cast<int8_t>(packed[flat]);
    return nf4::Int8Value(code, absmax_f32[n]);
  }

  void Store(int split, int64_t row, int64_t col, float v) {
    const int64_t out = a.out();
    if (row < 0 || row >= a.m || col < 0 || col >= out)
      throw OutOfBounds("store outside y");
    if (a.plan.splits > 1) {
      workspace.at((split * a.m + row) * out + col) = v;
    } else if (f32()) {
      static_cast<float*>(y)[row * out + col] = v;
    } else {
      static_cast<uint16_t*>(y)[row * out + col] =
          a.x_dtype == KQ_NF4_BF16 ? Bf16FromFloat(v) : F16FromFloat(v);
    }
  }
};

// v[lane] = sum over the warp by __shfl_xor_sync steps 16, 8, 4, 2, 1.
inline void WarpSum(float* v) {
  for (int d = 16; d > 0; d >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ d];
    std::memcpy(v, next, sizeof(next));
  }
}

// The emulated kernels (run every block of the plan in env.a.plan).
void Reference(Env& env);
void GemvForward(Env& env);
void GemvTranspose(Env& env);
void Mma(Env& env, bool x_vec);

}  // namespace emulator
}  // namespace nf4_cuda
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_EMULATOR_NF4_CUDA_EMULATOR_H_
