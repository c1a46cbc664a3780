// Decoding rows of W^T for the NF4 matmul kernels, per instruction set, and
// the pieces every matmul driver shares: the problem description, the table
// of one ISA's kernels and per-thread scratch. Inline-only (included by
// nf4_matmul_kernels.cc and the nf4_gemv.h / nf4_gemm.h it includes).
//
// With SIMD and K % 32 == 0, rows of W^T are decoded in "chunk order": in
// every 32-element chunk, the 16 even elements (high nibbles) come first,
// then the 16 odd ones. x (forward) and y (transpose) are permuted to match,
// which avoids interleaving nibbles in registers. Otherwise rows are decoded
// in natural order by the scalar decoder.
//
// The 4-bit formats (nf4, fp4) differ only in their 16-entry code table,
// Problem::code, which every decoder reads. int8 rows (Problem::int8) decode
// in natural order only (nf4_int8.h), never in chunk or group order.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_DECODE_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_DECODE_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "nf4_common.h"
#include "nf4_int8.h"
#include "tensorflow/core/platform/threadpool.h"

namespace keras_qlora {
namespace nf4_matmul {

using Pool = ::tensorflow::thread::ThreadPool;

constexpr int64_t kChunk = 32;       // elements per decoded SIMD chunk
constexpr int64_t kPrefetch = 1024;  // bytes of packed codes read ahead

// Source index (within its 32-aligned chunk) of chunk-order position i.
inline int64_t ChunkSource(int64_t i) {
  const int64_t j = i & (kChunk - 1);
  return (i - j) + (j < 16 ? 2 * j : 2 * (j - 16) + 1);
}

struct Problem {
  const uint8_t* packed;  // 4-bit codes, or int8 bytes when `int8`
  nf4::BlockScales scales;  // int8: one float32 scale per row of W^T
  const float* code;  // 4-bit formats: the 16 values (64-byte aligned)
  int64_t k;          // columns of W^T
  int block_shift;    // log2(block_size); unused for int8
  bool chunk_order;   // rows decode in chunk order (SIMD, k % 32 == 0, 4-bit)
  bool int8;          // one signed byte per element (nf4_int8.h)

  // Whether rows decode in whole 32-element chunks of nibbles (the SIMD
  // packers and GEMV kernels that assume 4-bit codes and k % 32 == 0).
  bool NibbleChunks() const { return !int8 && k % kChunk == 0; }
};

// Per-thread scratch carved out of one buffer that the op allocates up
// front (ctx->allocate_temp), so that no worker thread ever allocates:
// thread id t of ParallelForWithWorkerId owns floats [t * per_thread, ...).
struct Scratch {
  float* base = nullptr;
  int64_t per_thread = 0;  // a multiple of 16 (64-byte aligned slices)
  float* For(int thread_id) const { return base + thread_id * per_thread; }
};

// Floats of a per-thread slice holding `count` floats, 64-byte aligned.
inline int64_t ScratchFloats(int64_t count) {
  return (std::max<int64_t>(count, 1) + 15) / 16 * 16;
}

// fn(begin, end, scratch_of_this_thread) over [0, total).
template <typename Fn>
void ParallelShards(Pool* pool, int64_t total, int64_t cost,
                    const Scratch& scratch, const Fn& fn) {
  pool->ParallelForWithWorkerId(
      total, Pool::SchedulingParams::Adaptive(std::max<int64_t>(cost, 1)),
      [&](int64_t begin, int64_t end, int id) {
        fn(begin, end, scratch.For(id));
      });
}

// fn(begin, end) over [0, total), for work that needs no scratch.
template <typename Fn>
void ParallelRange(Pool* pool, int64_t total, int64_t cost, const Fn& fn) {
  pool->ParallelFor(
      total, Pool::SchedulingParams::Adaptive(std::max<int64_t>(cost, 1)),
      [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// Small-M kernels of one instruction set (the large-M ones are in
// nf4_gemm.h). `decode` writes a row segment in chunk order when
// p.chunk_order.
struct IsaKernels {
  const char* name;
  void (*decode)(const Problem&, int64_t, int64_t, int64_t, float*);
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy4)(float*, const float* const*, const float*, int64_t);
  // Optional, chunk order only: y[i * ldy + j] for i < m and rows j in
  // [row0, row1) of xc (M x K) @ W, decoding W^T in registers (nullptr:
  // decode + dot).
  void (*fused_rows)(const Problem&, int64_t, int64_t, const float*, int64_t,
                     float*, int64_t);
  int64_t gemv_rows;  // M up to this (fused_rows; forward, or transpose
                      // in group order) skips GEMM
};

// ---------------------------------------------------------------- scalar

// Decodes W^T[row, col0 : col0 + len] in natural order (any alignment).
inline void DecodeNatural(const Problem& p, int64_t row, int64_t col0,
                          int64_t len, float* out) {
  if (p.int8)
    return DecodeInt8Scalar(p.packed + row * p.k + col0, p.scales(row), len,
                            out);
  const float* code = p.code;
  int64_t i = row * p.k + col0;
  const int64_t end = i + len;
  while (i < end) {
    const int64_t block = i >> p.block_shift;
    const int64_t stop = std::min(end, (block + 1) << p.block_shift);
    const float scale = p.scales(block);
    for (; i < stop; ++i) *out++ = code[nf4::CodeAt(p.packed, i)] * scale;
  }
}

// ---------------------------------------------------------------- AVX2

// Code-table values of the 4-bit codes in the low bits of `idx` (higher bits of
// each lane other than bit 3 are ignored).
KQ_AVX2 inline __m256 LookupAvx2(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  // blendv picks by the sign bit: move code bit 3 there.
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

KQ_AVX2 inline void DecodeAvx2(const Problem& p, int64_t row, int64_t col0,
                               int64_t len, float* out) {
  if (p.int8)
    return DecodeInt8Avx2(p.packed + row * p.k + col0, p.scales(row), len,
                          out);
  if (!p.chunk_order) return DecodeNatural(p, row, col0, len, out);
  const __m256 lo = _mm256_load_ps(p.code);
  const __m256 hi = _mm256_load_ps(p.code + 8);
  int64_t flat = row * p.k + col0;
  for (int64_t c = 0; c < len; c += kChunk, flat += kChunk) {
    const __m256 s = _mm256_set1_ps(p.scales(flat >> p.block_shift));
    const uint8_t* src = p.packed + flat / 2;
    const __m256i v0 = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
    const __m256i v1 = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8)));
    float* o = out + c;
    _mm256_storeu_ps(o, _mm256_mul_ps(
        LookupAvx2(_mm256_srli_epi32(v0, 4), lo, hi), s));
    _mm256_storeu_ps(o + 8, _mm256_mul_ps(
        LookupAvx2(_mm256_srli_epi32(v1, 4), lo, hi), s));
    _mm256_storeu_ps(o + 16, _mm256_mul_ps(LookupAvx2(v0, lo, hi), s));
    _mm256_storeu_ps(o + 24, _mm256_mul_ps(LookupAvx2(v1, lo, hi), s));
  }
}

// ---------------------------------------------------------------- AVX-512

// The 32 values of the chunk at flat element `flat` (a multiple of 32),
// scaled, in chunk order: *even = elements 0, 2, .., *odd = 1, 3, ...
KQ_AVX512 inline void DecodeChunkAvx512(const Problem& p, int64_t flat,
                                        __m512 table, __m512* even,
                                        __m512* odd) {
  const __m512 s = _mm512_set1_ps(p.scales(flat >> p.block_shift));
  const uint8_t* src = p.packed + flat / 2;
  _mm_prefetch(reinterpret_cast<const char*>(src) + kPrefetch, _MM_HINT_T0);
  // 16 bytes -> 16 lanes; permutexvar only reads the low 4 bits.
  const __m512i v = _mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  // Scaling the 16-entry table first gives the same products in one mul.
  const __m512 scaled = _mm512_mul_ps(table, s);
  *even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), scaled);
  *odd = _mm512_permutexvar_ps(v, scaled);
}

KQ_AVX512 inline void DecodeAvx512(const Problem& p, int64_t row,
                                   int64_t col0, int64_t len, float* out) {
  if (p.int8)
    return DecodeInt8Avx512(p.packed + row * p.k + col0, p.scales(row), len,
                            out);
  if (!p.chunk_order) return DecodeNatural(p, row, col0, len, out);
  const __m512 table = _mm512_load_ps(p.code);
  const int64_t start = row * p.k + col0;
  for (int64_t c = 0; c < len; c += kChunk) {
    __m512 even, odd;
    DecodeChunkAvx512(p, start + c, table, &even, &odd);
    _mm512_storeu_ps(out + c, even);
    _mm512_storeu_ps(out + c + 16, odd);
  }
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_DECODE_H_
