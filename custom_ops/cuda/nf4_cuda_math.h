// Index and arithmetic helpers of the CUDA NF4 kernels that are plain C++:
// compiled for the device by nvcc and for the host by g++ (the CPU emulator,
// testing/cuda_emulator/nf4_cuda_emulator.cc, runs the kernels' tile
// algorithm through these same functions). No CUDA headers.
//
// Conventions: W^T is [N, K] row-major in nibbles (see nf4_cuda.h); a
// "unit" is 16 consecutive codes of one W^T row (8 bytes, one quantization
// block since blocks are >= 32 codes and units start at multiples of 16).

#ifndef KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_MATH_H_
#define KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_MATH_H_

#include <cstdint>

#include "../include/nf4_format.h"
#include "nf4_cuda_plan.h"  // KQ_HD (from nf4_format.h)

namespace keras_qlora {
namespace nf4_cuda {

// Unfused float32 arithmetic and the double-quantized block scale, shared
// with the CPU kernels (nf4_format.h).
using nf4::AddRn;
using nf4::DoubleQuantScale;
using nf4::MulRn;

// Everything a kernel needs, passed by value (device pointers).
struct Nf4Args {
  const void* x = nullptr;
  const uint8_t* packed = nullptr;
  const float* absmax_f32 = nullptr;  // plain float32 scales, or
  const uint8_t* absmax_u8 = nullptr;  // double-quantized codes with
  const float* nested = nullptr;       //   absmax_scale [blocks / 256]
  const float* offset = nullptr;       //   and the device scalar offset
  void* y = nullptr;
  float* workspace = nullptr;  // [splits, m, out] partial sums
  int64_t m = 0, k = 0, n = 0;
  int block_shift = 6;  // log2(block_size); unused by int8
  int x_dtype = KQ_NF4_F32;
  int quant_type = KQ_NF4_QUANT_NF4;  // the table 4-bit kernels decode with
  bool transpose = false;
  Plan plan;

  KQ_HD bool int8() const { return quant_type == KQ_NF4_QUANT_INT8; }
  KQ_HD int64_t red() const { return transpose ? n : k; }
  KQ_HD int64_t out() const { return transpose ? k : n; }
};

// ------------------------------------------------------------ decoding

// Bit shift of code e (0..7) in a little-endian 32-bit word of packed
// bytes: byte e / 2, the even element in the HIGH nibble.
KQ_HD int NibbleShift(int e) { return 8 * (e >> 1) + ((e & 1) ? 0 : 4); }

KQ_HD int CodeOf(uint32_t word, int e) {
  return static_cast<int>((word >> NibbleShift(e)) & 15u);
}

// Signed int8 code b (0..3) of a little-endian 32-bit word of int8 bytes.
KQ_HD int Int8CodeOf(uint32_t word, int b) {
  return static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * b)));
}

// Flat index of W^T[n, k] (also the nibble index into `packed`).
KQ_HD int64_t FlatIndex(int64_t n, int64_t k, int64_t kdim) {
  return n * kdim + k;
}

// ------------------------------------------------------------ MMA tiles

// Shared-memory tiles of one k-step (per stage), row-major with a padded
// stride: As [BM][stride] holds x, Bs [BN][stride] holds W with the
// OUTPUT column as the row and the reduction index contiguous, which is
// the "col" B operand of mma.sync (pairs of consecutive reduction indices
// in one 32-bit register).

// x item i of `vec` consecutive elements (one 16-byte load): tile row and
// first column.
template <typename C>
KQ_HD void XItem(int i, int vec, int* row, int* col) {
  const int per_row = C::kBK / vec;
  *row = i / per_row;
  *col = (i % per_row) * vec;
}

// W unit i of a forward tile: output column `o` (a W^T row) and reduction
// offset `kk` (multiple of 16); its 16 codes go to Bs[o][kk .. kk + 15].
template <typename C>
KQ_HD void WItemForward(int i, int* o, int* kk) {
  const int per_row = C::kBK / 16;
  *o = i / per_row;
  *kk = (i % per_row) * 16;
}

// W unit i of a transposed tile: reduction row `j` (a W^T row) and output
// columns 16 * u .. 16 * u + 15; code q goes to Bs[16 * u + q][j].
// Consecutive threads take consecutive j, so their 16 scattered stores hit
// consecutive addresses of one smem row.
template <typename C>
KQ_HD void WItemTransposed(int i, int* j, int* u) {
  *j = i % C::kBK;
  *u = i / C::kBK;
}

// Element offset, within a [rows][stride] tile whose fragment origin is
// (0, 0), of register r of the A fragment (16-bit operands: the pair
// (row, col), (row, col + 1) of m16n8k16; TF32: the single element of
// m16n8k8), for lane `lane`. PTX ISA "Matrix Fragments for mma.m16n8k16 /
// m16n8k8": groupID = lane >> 2, threadID_in_group = lane % 4.
template <typename C>
KQ_HD int FragAOffset(int lane, int r) {
  const int g = lane >> 2, t = lane & 3;
  const int row = g + 8 * (r & 1);
  const int col = C::kTf32 ? t + 4 * (r >> 1) : 2 * t + 8 * (r >> 1);
  return row * C::kStride + col;
}

// Register r (0..1) of the B fragment; Bs is [n][k] (see above).
template <typename C>
KQ_HD int FragBOffset(int lane, int r) {
  const int g = lane >> 2, t = lane & 3;
  const int k = C::kTf32 ? t + 4 * r : 2 * t + 8 * r;
  return g * C::kStride + k;
}

// Accumulator i (0..3) of an m16n8 tile: its row and column.
KQ_HD void FragC(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + 8 * (i >> 1);
  *col = 2 * (lane & 3) + (i & 1);
}

// First and one-past-last item of split `z` (plans make none empty).
KQ_HD void SplitRange(int64_t total, int64_t len, int z, int64_t* begin,
                      int64_t* end) {
  *begin = z * len;
  const int64_t e = *begin + len;
  *end = e < total ? e : total;
}

}  // namespace nf4_cuda
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_CUDA_NF4_CUDA_MATH_H_
