// Micro-kernels of the large-M NF4 matmul (nf4_gemm.h): one register tile
// C (rows x cols, rows <= MR, cols <= NR) = A (rows x kc) @ B (kc x NR),
// stored into C or added to it. A is rows of x (row stride lda, a copy
// whose stride avoids cache-set aliasing); B is a decoded weight panel,
// row-major with NR columns (zero past the valid ones). Inline-only.
//
// float32: C[i][j] += a[i][q] * b[q][j], one FMA per product.
// bfloat16 (AVX512_BF16): A and B hold bf16 pairs along the reduction axis
// (a[i][2p], a[i][2p + 1]) and (b[2p][j], b[2p + 1][j]); vdpbf16ps adds both
// products of a pair into a float32 accumulator.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_MICRO_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_MICRO_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "nf4_decode.h"

#define KQ_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

namespace keras_qlora {
namespace nf4_matmul {

// rows, a, lda, b, kc, c, ldc, cols, add. `a` is float or uint32 bf16 pairs
// (lda then counts pairs; kc counts pairs too).
using MicroFn = void (*)(int64_t, const void*, int64_t, const void*, int64_t,
                         float*, int64_t, int64_t, bool);

// Writes (or adds, when `add`) the first `cols` columns of the `rows` x nr
// tile `t` (row stride nr) into c.
inline void StoreTile(const float* t, int64_t rows, int64_t nr, float* c,
                      int64_t ldc, int64_t cols, bool add) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c[i * ldc + j] = add ? c[i * ldc + j] + t[i * nr + j] : t[i * nr + j];
}

// ---------------------------------------------------------------- scalar

constexpr int kMrScalar = 4, kNrScalar = 8;

inline void MicroScalar(int64_t rows, const void* av, int64_t lda,
                        const void* bv, int64_t kc, float* c, int64_t ldc,
                        int64_t cols, bool add) {
  const float* a = static_cast<const float*>(av);
  const float* b = static_cast<const float*>(bv);
  float t[kMrScalar * kNrScalar] = {};
  for (int64_t q = 0; q < kc; ++q)
    for (int64_t i = 0; i < rows; ++i) {
      const float x = a[i * lda + q];
      for (int j = 0; j < kNrScalar; ++j)
        t[i * kNrScalar + j] += x * b[q * kNrScalar + j];
    }
  StoreTile(t, rows, kNrScalar, c, ldc, cols, add);
}

// ---------------------------------------------------------------- AVX2

constexpr int kMrAvx2 = 6, kNrAvx2 = 16;

template <int MR>
KQ_AVX2 void MicroAvx2(const float* a, int64_t lda, const float* b,
                       int64_t kc, float* c, int64_t ldc, int64_t cols,
                       bool add) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t q = 0; q < kc; ++q) {
    const __m256 b0 = _mm256_load_ps(b + q * kNrAvx2);
    const __m256 b1 = _mm256_load_ps(b + q * kNrAvx2 + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 x = _mm256_broadcast_ss(a + i * lda + q);
      c0[i] = _mm256_fmadd_ps(x, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(x, b1, c1[i]);
    }
  }
  if (cols == kNrAvx2) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* ci = c + i * ldc;
      if (add) {
        c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(ci));
        c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(ci + 8));
      }
      _mm256_storeu_ps(ci, c0[i]);
      _mm256_storeu_ps(ci + 8, c1[i]);
    }
    return;
  }
  alignas(32) float t[MR * kNrAvx2];
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(t + i * kNrAvx2, c0[i]);
    _mm256_store_ps(t + i * kNrAvx2 + 8, c1[i]);
  }
  StoreTile(t, MR, kNrAvx2, c, ldc, cols, add);
}

// ---------------------------------------------------------------- AVX-512

constexpr int kMrAvx512 = 12, kNrAvx512 = 32;

KQ_AVX512 inline __mmask16 ColumnMask(int64_t cols) {
  if (cols >= 16) return static_cast<__mmask16>(0xFFFF);
  if (cols <= 0) return 0;
  return static_cast<__mmask16>((1u << cols) - 1);
}

// Stores (or adds into) the two 16-column halves of an accumulator row.
KQ_AVX512 inline void StoreRowAvx512(float* ci, __m512 v0, __m512 v1,
                                     __mmask16 m0, __mmask16 m1, bool add) {
  if (add) {
    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ci));
    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ci + 16));
  }
  _mm512_mask_storeu_ps(ci, m0, v0);
  _mm512_mask_storeu_ps(ci + 16, m1, v1);
}

template <int MR>
KQ_AVX512 void MicroAvx512(const float* a, int64_t lda, const float* b,
                           int64_t kc, float* c, int64_t ldc, int64_t cols,
                           bool add) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t q = 0; q < kc; ++q) {
    const __m512 b0 = _mm512_load_ps(b + q * kNrAvx512);
    const __m512 b1 = _mm512_load_ps(b + q * kNrAvx512 + 16);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i * lda + q]);
      c0[i] = _mm512_fmadd_ps(x, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(x, b1, c1[i]);
    }
  }
  const __mmask16 m0 = ColumnMask(cols), m1 = ColumnMask(cols - 16);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
    StoreRowAvx512(c + i * ldc, c0[i], c1[i], m0, m1, add);
}

// a: uint32 bf16 pairs (lda pairs per row); b: kc pairs x 32 columns, each
// (b[2p][j], b[2p + 1][j]) one uint32; kc counts pairs.
template <int MR>
KQ_AVX512BF16 void MicroBf16(const uint32_t* a, int64_t lda,
                             const uint32_t* b, int64_t kc, float* c,
                             int64_t ldc, int64_t cols, bool add) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t q = 0; q < kc; ++q) {
    const __m512bh b0 =
        (__m512bh)_mm512_load_si512(b + q * kNrAvx512);  // NOLINT
    const __m512bh b1 =
        (__m512bh)_mm512_load_si512(b + q * kNrAvx512 + 16);  // NOLINT
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(  // NOLINT
          static_cast<int>(a[i * lda + q]));
      c0[i] = _mm512_dpbf16_ps(c0[i], x, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], x, b1);
    }
  }
  const __mmask16 m0 = ColumnMask(cols), m1 = ColumnMask(cols - 16);
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
    StoreRowAvx512(c + i * ldc, c0[i], c1[i], m0, m1, add);
}

// ---------------------------------------------------------------- tables

// kTable.fn[rows - 1] = Kernel<rows>, for rows in [1, MR].
template <int MR, template <int> class Entry>
struct MicroTable {
  MicroFn fn[MR];
  constexpr MicroTable() : fn{} { Fill<1>(); }
  template <int R>
  constexpr void Fill() {
    if constexpr (R <= MR) {
      fn[R - 1] = &Entry<R>::Run;
      Fill<R + 1>();
    }
  }
};

template <int R>
struct Avx2Entry {
  static void Run(int64_t, const void* a, int64_t lda, const void* b,
                  int64_t kc, float* c, int64_t ldc, int64_t cols, bool add) {
    MicroAvx2<R>(static_cast<const float*>(a), lda,
                 static_cast<const float*>(b), kc, c, ldc, cols, add);
  }
};
template <int R>
struct Avx512Entry {
  static void Run(int64_t, const void* a, int64_t lda, const void* b,
                  int64_t kc, float* c, int64_t ldc, int64_t cols, bool add) {
    MicroAvx512<R>(static_cast<const float*>(a), lda,
                   static_cast<const float*>(b), kc, c, ldc, cols, add);
  }
};
template <int R>
struct Bf16Entry {
  static void Run(int64_t, const void* a, int64_t lda, const void* b,
                  int64_t kc, float* c, int64_t ldc, int64_t cols, bool add) {
    MicroBf16<R>(static_cast<const uint32_t*>(a), lda,
                 static_cast<const uint32_t*>(b), kc, c, ldc, cols, add);
  }
};
template <int R>
struct ScalarEntry {
  static void Run(int64_t rows, const void* a, int64_t lda, const void* b,
                  int64_t kc, float* c, int64_t ldc, int64_t cols, bool add) {
    MicroScalar(rows, a, lda, b, kc, c, ldc, cols, add);
  }
};

inline constexpr MicroTable<kMrScalar, ScalarEntry> kMicroScalar{};
inline constexpr MicroTable<kMrAvx2, Avx2Entry> kMicroAvx2{};
inline constexpr MicroTable<kMrAvx512, Avx512Entry> kMicroAvx512{};
inline constexpr MicroTable<kMrAvx512, Bf16Entry> kMicroBf16{};

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_MICRO_H_
