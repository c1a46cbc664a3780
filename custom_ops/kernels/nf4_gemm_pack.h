// Decoding weights into the B panels of the large-M matmul (nf4_gemm.h):
// the 4-bit formats (code table Problem::code) and, for the bf16
// micro-kernel, int8 (float32 int8 panels come from PackGeneric).
//
// A block of B covers reduction rows [r0, r0 + kc) and `cols` outputs from
// o0, stored as panels of nr columns: panel p holds B[r0 + q][o0 + p*nr + j]
// at bp[p * kc * nr + q * nr + j], zero past the valid columns. With W^T
// ([N, K]) stored:
// - forward (y = x @ W):    B[r][o] = W^T[o][r] (rows of W^T, transposed);
// - transpose (y = x @ W^T): B[r][o] = W^T[r][o] (rows of W^T as they are).
// The generic code decodes one element at a time; with AVX-512 and K % 32
// == 0 whole 32-element chunks are decoded in registers, and the forward
// case transposes 16 x 16 tiles in registers too. The bf16 panels hold
// (B[2p][j], B[2p + 1][j]) pairs as one uint32 for vdpbf16ps; they are
// only built in the aligned AVX-512 case. Inline-only.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_PACK_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_PACK_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "nf4_decode.h"
#include "nf4_gemm_micro.h"
#include "nf4_int8.h"

namespace keras_qlora {
namespace nf4_matmul {

// The weight block to decode: reduction rows [r0, r0 + kc), outputs
// [o0, o0 + cols), panels of nr columns.
struct PanelBlock {
  int64_t r0, kc, o0, cols, nr;
  bool transpose;
};

// ---------------------------------------------------------------- generic

// Any ISA, any alignment. `tmp` holds nr x kc floats (forward only).
inline void PackGeneric(const Problem& p, const PanelBlock& blk, float* tmp,
                        float* bp) {
  const int64_t nr = blk.nr, kc = blk.kc;
  for (int64_t o = 0; o < blk.cols; o += nr, bp += kc * nr) {
    const int64_t olen = std::min(nr, blk.cols - o);
    if (blk.transpose) {
      for (int64_t q = 0; q < kc; ++q) {
        float* row = bp + q * nr;
        DecodeNatural(p, blk.r0 + q, blk.o0 + o, olen, row);
        std::fill(row + olen, row + nr, 0.0f);
      }
      continue;
    }
    for (int64_t j = 0; j < olen; ++j)
      DecodeNatural(p, blk.o0 + o + j, blk.r0, kc, tmp + j * kc);
    for (int64_t q = 0; q < kc; ++q) {
      float* row = bp + q * nr;
      for (int64_t j = 0; j < olen; ++j) row[j] = tmp[j * kc + q];
      std::fill(row + olen, row + nr, 0.0f);
    }
  }
}

// ---------------------------------------------------------------- AVX-512

// Transposes the 16 x 16 matrix held in v[0..15] (row i in v[i]).
KQ_AVX512 inline void Transpose16(__m512 v[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // v[4g + c] lane L: column 4L + c of rows 4g .. 4g + 3.
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    v[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    v[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    v[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    v[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    t[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// The 32 chunk values of flat element `flat` in natural order (lo: 0..15).
KQ_AVX512 inline void DecodeChunkNatural(const Problem& p, int64_t flat,
                                         __m512 table, __m512* lo,
                                         __m512* hi) {
  __m512 even, odd;
  DecodeChunkAvx512(p, flat, table, &even, &odd);
  const __m512i ilo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18,
                                       2, 17, 1, 16, 0);
  const __m512i ihi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11,
                                       26, 10, 25, 9, 24, 8);
  *lo = _mm512_permutex2var_ps(even, ilo, odd);
  *hi = _mm512_permutex2var_ps(even, ihi, odd);
}

// One uint32 per lane: bf16(a) in the low half, bf16(b) in the high half
// (round to nearest even, as vcvtneps2bf16).
KQ_AVX512BF16 inline __m512i PackPairsBf16(__m512 a, __m512 b) {
  const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
  const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(b));
  return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

// Forward, 16 outputs from `row` (rows past `rows` are zero), one 32-wide
// reduction chunk at column `col` of W^T: even/odd elements per output.
KQ_AVX512 inline void DecodeRows16(const Problem& p, int64_t row,
                                   int64_t rows, int64_t col, __m512 table,
                                   __m512 even[16], __m512 odd[16]) {
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    if (j < rows) {
      DecodeChunkAvx512(p, (row + j) * p.k + col, table, &even[j], &odd[j]);
    } else {
      even[j] = odd[j] = _mm512_setzero_ps();
    }
  }
}

// float32 panels (nr = 32), K % 32 == 0.
KQ_AVX512 inline void PackAvx512(const Problem& p, const PanelBlock& blk,
                                 float* bp) {
  const __m512 table = _mm512_load_ps(p.code);
  const int64_t kc = blk.kc;
  for (int64_t o = 0; o < blk.cols; o += kNrAvx512, bp += kc * kNrAvx512) {
    const int64_t olen = std::min<int64_t>(kNrAvx512, blk.cols - o);
    if (blk.transpose) {
      for (int64_t q = 0; q < kc; ++q) {
        __m512 lo, hi;
        DecodeChunkNatural(p, (blk.r0 + q) * p.k + blk.o0 + o, table, &lo,
                           &hi);
        _mm512_store_ps(bp + q * kNrAvx512, lo);
        _mm512_store_ps(bp + q * kNrAvx512 + 16, hi);
      }
      continue;
    }
    for (int64_t g = 0; g < 32 && g < olen; g += 16) {
      for (int64_t c = 0; c < kc; c += kChunk) {
        __m512 even[16], odd[16];
        DecodeRows16(p, blk.o0 + o + g, olen - g, blk.r0 + c, table, even,
                     odd);
        Transpose16(even);
        Transpose16(odd);
        float* dst = bp + c * kNrAvx512 + g;
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
          _mm512_store_ps(dst + (2 * t) * kNrAvx512, even[t]);
          _mm512_store_ps(dst + (2 * t + 1) * kNrAvx512, odd[t]);
        }
      }
    }
    if (olen <= 16) {  // the second half of the panel is padding
      for (int64_t q = 0; q < kc; ++q)
        _mm512_store_ps(bp + q * kNrAvx512 + 16, _mm512_setzero_ps());
    }
  }
}

// bf16 pair panels (nr = 32, kc even, counted in elements), K % 32 == 0.
KQ_AVX512BF16 inline void PackBf16(const Problem& p, const PanelBlock& blk,
                                   int64_t r_dim, uint32_t* bp) {
  const __m512 table = _mm512_load_ps(p.code);
  const int64_t pairs = (blk.kc + 1) / 2;  // an odd tail pairs with zero
  for (int64_t o = 0; o < blk.cols; o += kNrAvx512, bp += pairs * kNrAvx512) {
    const int64_t olen = std::min<int64_t>(kNrAvx512, blk.cols - o);
    if (blk.transpose) {
      for (int64_t q = 0; q < pairs; ++q) {
        const int64_t r = blk.r0 + 2 * q;
        __m512 alo, ahi, blo = _mm512_setzero_ps(), bhi = blo;
        DecodeChunkNatural(p, r * p.k + blk.o0 + o, table, &alo, &ahi);
        if (r + 1 < r_dim)
          DecodeChunkNatural(p, (r + 1) * p.k + blk.o0 + o, table, &blo, &bhi);
        uint32_t* dst = bp + q * kNrAvx512;
        _mm512_store_si512(dst, PackPairsBf16(alo, blo));
        _mm512_store_si512(dst + 16, PackPairsBf16(ahi, bhi));
      }
      continue;
    }
    for (int64_t g = 0; g < 32; g += 16) {
      for (int64_t c = 0; c < blk.kc; c += kChunk) {
        __m512 even[16], odd[16];
        if (g < olen) {
          DecodeRows16(p, blk.o0 + o + g, olen - g, blk.r0 + c, table, even,
                       odd);
        } else {
          for (int j = 0; j < 16; ++j) even[j] = odd[j] = _mm512_setzero_ps();
        }
        // Lane t of row j: the pair (W^T[j][c + 2t], W^T[j][c + 2t + 1]).
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j)
          even[j] = _mm512_castsi512_ps(PackPairsBf16(even[j], odd[j]));
        Transpose16(even);
        uint32_t* dst = bp + (c / 2) * kNrAvx512 + g;
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t)
          _mm512_store_si512(dst + t * kNrAvx512,
                             _mm512_castps_si512(even[t]));
      }
    }
  }
}

// ---------------------------------------------------------------- int8

// bf16 pair panels of an int8 weight (nr = 32, any K, kc counted in
// elements): each element is Int8Value rounded to bf16 as PackBf16 rounds
// (vcvtneps2bf16). `tmp` holds nr x kc floats (forward only).
KQ_AVX512BF16 inline void PackInt8Bf16(const Problem& p, const PanelBlock& blk,
                                       int64_t r_dim, float* tmp,
                                       uint32_t* bp) {
  const int64_t kc = blk.kc, pairs = (kc + 1) / 2;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t o = 0; o < blk.cols; o += kNrAvx512, bp += pairs * kNrAvx512) {
    const int64_t olen = std::min<int64_t>(kNrAvx512, blk.cols - o);
    if (blk.transpose) {  // B[r][o] = W^T[r][o]: rows r, r + 1 of W^T
      for (int64_t q = 0; q < pairs; ++q) {
        const int64_t r = blk.r0 + 2 * q;
        const bool second = r + 1 < r_dim;
        const __m512 sa = _mm512_set1_ps(p.scales(r));
        const __m512 sb = _mm512_set1_ps(second ? p.scales(r + 1) : 0.0f);
        const uint8_t* ra = p.packed + r * p.k + blk.o0 + o;
        for (int64_t g = 0; g < kNrAvx512; g += 16) {
          const int64_t count = std::clamp<int64_t>(olen - g, 0, 16);
          const __m512 a = Int8ValuesAvx512(ra + g, count, sa);
          const __m512 b =
              second ? Int8ValuesAvx512(ra + p.k + g, count, sb) : zero;
          _mm512_store_si512(bp + q * kNrAvx512 + g, PackPairsBf16(a, b));
        }
      }
      continue;
    }
    // B[r][o] = W^T[o][r]: decode the panel's rows of W^T, then gather
    // each pair of reduction rows across 16 of them.
    for (int64_t j = 0; j < olen; ++j) {
      const int64_t row = blk.o0 + o + j;
      DecodeInt8Avx512(p.packed + row * p.k + blk.r0, p.scales(row), kc,
                       tmp + j * kc);
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                          5, 4, 3, 2, 1, 0);
    for (int64_t g = 0; g < kNrAvx512; g += 16) {
      const int64_t count = std::clamp<int64_t>(olen - g, 0, 16);
      const __mmask16 live =
          static_cast<__mmask16>(count == 16 ? 0xFFFFu : (1u << count) - 1);
      // Lane l reads row g + l of tmp.
      const __m512i rows = _mm512_mullo_epi32(
          _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(g))),
          _mm512_set1_epi32(static_cast<int>(kc)));
      for (int64_t q = 0; q < pairs; ++q) {
        const __m512i at = _mm512_add_epi32(
            rows, _mm512_set1_epi32(static_cast<int>(2 * q)));
        const __m512 a = _mm512_mask_i32gather_ps(zero, live, at, tmp, 4);
        const __m512 b =
            2 * q + 1 < kc
                ? _mm512_mask_i32gather_ps(
                      zero, live, _mm512_add_epi32(at, _mm512_set1_epi32(1)),
                      tmp, 4)
                : zero;
        _mm512_store_si512(bp + q * kNrAvx512 + g, PackPairsBf16(a, b));
      }
    }
  }
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_PACK_H_
