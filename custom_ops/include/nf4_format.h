// The NF4 storage format (and the FP4 and int8 base formats), in ONE place for the CPU kernels (kernels/), the
// CUDA kernels (cuda/, also compiled for the device by nvcc) and the CPU
// stand-ins for CUDA (testing/): code tables, the allowed block sizes, size
// arithmetic and the double-quantized block scale. Header-only, plain C++
// (no TensorFlow or CUDA headers). Part of the op library's cache key
// (keras_qlora/ops/build.py), so a change here rebuilds the library.
//
// Format (bit-compatible with bitsandbytes; keras_qlora.quantizers is the
// Python twin): W^T ([N, K]) flattened row-major, blocks of `block_size`
// (32, 64, 128 or 256) consecutive elements, two 4-bit codes per byte with
// the FIRST element in the HIGH nibble. An element's value is
// kNf4Code[code] * scale[block] (one float32 multiply). With double quant,
// scale[b] = kDynamicMap[absmax_u8[b]] * absmax_scale[b / 256] + offset,
// one float32 multiply then one add, never fused into an FMA.

#ifndef KERAS_QLORA_CUSTOM_OPS_INCLUDE_NF4_FORMAT_H_
#define KERAS_QLORA_CUSTOM_OPS_INCLUDE_NF4_FORMAT_H_

#include <cstdint>

// Functions that both the host and CUDA kernels use.
#ifndef KQ_HD
#if defined(__CUDACC__)
#define KQ_HD __host__ __device__ __forceinline__
#else
#define KQ_HD inline
#endif
#endif

namespace keras_qlora {
namespace nf4 {

// Elements per quantization block: one of these (smallest to largest).
constexpr int kAllowedBlockSizes[4] = {32, 64, 128, 256};
constexpr int kMinBlockSize = 32;
constexpr int kMaxBlockSize = 256;
// The error every entry point gives for another block size (followed by
// the value received), as keras_qlora.quantizers.check_block_size.
#define KQ_NF4_BLOCK_SIZE_ERROR \
  "block_size must be one of (32, 64, 128, 256). Received: block_size="

KQ_HD bool IsAllowedBlockSize(int64_t block_size) {
  return block_size == 32 || block_size == 64 || block_size == 128 ||
         block_size == 256;
}

// Double quantization quantizes the block scales in blocks of this size.
constexpr int64_t kNestedBlockSize = 256;
constexpr int kNestedBlockShift = 8;  // block >> 8 == block / 256
static_assert(kNestedBlockSize == int64_t{1} << kNestedBlockShift,
              "kNestedBlockShift must match kNestedBlockSize");

constexpr int kNf4CodeSize = 16;
constexpr int kDynamicMapSize = 256;

// The 16 NF4 values; index i is the 4-bit code i (keras_qlora.quantizers.
// codes.NF4_CODE, exact float32 values as hex literals).
alignas(64) inline constexpr float kNf4Code[kNf4CodeSize] = {
    -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f,
    0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f,
    0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f,
};

// Index of the code 0.0 (what padding nibbles hold).
constexpr int kNf4ZeroIndex = 7;

// The base formats a weight can be stored in (the op's `quant_type`
// attribute: "nf4", "fp4", "int8"; keras_qlora.quantizers.QUANT_TYPES).
// nf4 / fp4: 4-bit codes into kNf4Code / kFp4Code, blocks of block_size.
// int8: one signed byte per element (stored in the uint8 `packed` buffer as
// its two's complement byte) and one float32 scale per row of W^T (the
// "block" is a whole row: block_size == K); bitsandbytes' Int8Params /
// Linear8bitLt layout (CB, SCB), element value Int8Value(code, SCB[row]).
enum class QuantType : int { kNf4 = 0, kFp4 = 1, kInt8 = 2 };

// bitsandbytes' FP4 values (functional.get_4bit_type("fp4")): 1 sign bit
// (bit 3), 2 exponent bits, 1 mantissa bit, divided by 12; index i is the
// 4-bit code i. Not sorted: the quantizers sort it (kFp4SortedCodes).
alignas(64) inline constexpr float kFp4Code[kNf4CodeSize] = {
    0x0p+0f, 0x1.555556p-8f, 0x1.555556p-1f, 0x1p+0f,
    0x1.555556p-2f, 0x1p-1f, 0x1.555556p-3f, 0x1p-2f,
    0x0p+0f, -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,
    -0x1.555556p-2f, -0x1p-1f, -0x1.555556p-3f, -0x1p-2f,
};

// The FP4 codes in increasing order of value (bitsandbytes' argsort of the
// table: the zero code 0 sorts before the zero code 8). Quantizing rounds
// to the nearest sorted value (midpoints of neighbours, ties to the lower
// one) and stores kFp4SortedCodes[position]: 0.0 gets code 0, a tiny
// positive value code 8, padding nibbles code 0.
inline constexpr uint8_t kFp4SortedCodes[kNf4CodeSize] = {
    11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
constexpr int kFp4ZeroIndex = 0;

// The code table of a 4-bit format (host code; device code keeps a copy).
inline const float* CodeTable(QuantType type) {
  return type == QuantType::kFp4 ? kFp4Code : kNf4Code;
}

// The 4-bit code of 0.0 (padding nibbles, zero blocks) of a 4-bit format.
inline int ZeroIndex(QuantType type) {
  return type == QuantType::kFp4 ? kFp4ZeroIndex : kNf4ZeroIndex;
}

// float32(1 / 127) as bitsandbytes writes it (7.874015718698502e-3).
constexpr float kInt8InvMax = 0x1.020408p-7f;

// bitsandbytes' signed 8-bit dynamic map (keras_qlora.quantizers.codes.
// dynamic_map(), generated with float(v).hex()).
alignas(64) inline constexpr float kDynamicMap[kDynamicMapSize] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f,
    -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f,
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f,
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f,
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f,
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f,
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f,
    -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f,
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f,
    -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f,
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f,
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f,
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f,
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0p+0f,
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f,
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f,
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f,
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f,
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f,
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f,
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f,
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f,
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};

// ceil(a / b) for a >= 0, b > 0.
KQ_HD int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Bytes of the packed codes of `count` elements.
KQ_HD int64_t PackedBytes(int64_t count) { return CeilDiv(count, 2); }

// Bytes of the `packed` buffer of `count` elements in format `type`.
KQ_HD int64_t StorageBytes(QuantType type, int64_t count) {
  return type == QuantType::kInt8 ? count : PackedBytes(count);
}

// Number of quantization blocks of `count` elements.
KQ_HD int64_t NumBlocks(int64_t count, int64_t block_size) {
  return CeilDiv(count, block_size);
}

// Number of float32 absmax_scale entries with double quant.
KQ_HD int64_t NumNestedBlocks(int64_t blocks) {
  return CeilDiv(blocks, kNestedBlockSize);
}

// The 4-bit code of flat element i (high nibble first).
KQ_HD int CodeAt(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0F) : (byte >> 4);
}

// Correctly rounded float32 multiply / add that the compiler must not fuse
// into an FMA (host code is built with -ffp-contract=off), so every side
// decodes double-quantized scales bit for bit alike.
KQ_HD float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KQ_HD float AddRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The double-quantized block scale: `dynamic` = kDynamicMap[absmax_u8[b]]
// (device code reads its own copy of the table), `nested` =
// absmax_scale[b / 256].
KQ_HD float DoubleQuantScale(float dynamic, float nested, float offset) {
  return AddRn(MulRn(dynamic, nested), offset);
}

// The value of an int8 element with code `code` in a row whose scale
// (bitsandbytes' SCB, the row's absmax) is `row_scale`: (code * SCB) / 127
// as bitsandbytes' int8_vectorwise_dequant computes it, two float32
// multiplies, never fused.
KQ_HD float Int8Value(int code, float row_scale) {
  return MulRn(MulRn(static_cast<float>(code), row_scale), kInt8InvMax);
}

}  // namespace nf4
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_INCLUDE_NF4_FORMAT_H_
