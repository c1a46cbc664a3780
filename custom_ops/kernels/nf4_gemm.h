// Large-M (GEMM) path of the NF4 matmul: x is packed into panels of mp
// rows; each task decodes a tile of W^T block by block along the reduction
// axis into per-thread scratch and runs a register-blocked micro-kernel
// (mr outputs x mp rows of x) over the panels. Inline-only.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_H_

#include <algorithm>
#include <cstdint>

#include "nf4_decode.h"

namespace keras_qlora {
namespace nf4_matmul {

constexpr int64_t kGemmOutTile = 96;    // outputs per tile (12 | 32, 6 | 16)
constexpr int64_t kGemmRedBlock = 512;  // reduction block (W tile in L2)
constexpr int64_t kGemmRowChunk = 512;  // rows of x per task

// ---------------------------------------------------------------- micro

inline void MicroScalar(const float* a, int64_t ld, bool a_rows, const float* xp,
                 int64_t len, float* ct, int64_t ldc) {
  constexpr int kMr = 4, kMp = 8;
  float c[kMr][kMp];
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < kMp; ++j) c[i][j] = ct[i * ldc + j];
  for (int64_t q = 0; q < len; ++q) {
    for (int i = 0; i < kMr; ++i) {
      const float av = a_rows ? a[i * ld + q] : a[q * ld + i];
      for (int j = 0; j < kMp; ++j) c[i][j] += av * xp[q * kMp + j];
    }
  }
  for (int i = 0; i < kMr; ++i)
    for (int j = 0; j < kMp; ++j) ct[i * ldc + j] = c[i][j];
}

// ---------------------------------------------------------------- AVX2

template <bool kARows>
KQ_AVX2 inline void MicroAvx2T(const float* a, int64_t ld, const float* xp,
                               int64_t len, float* ct, int64_t ldc) {
  constexpr int kMr = 6;
  __m256 c0[kMr], c1[kMr];
#pragma GCC unroll 6
  for (int i = 0; i < kMr; ++i) {
    c0[i] = _mm256_loadu_ps(ct + i * ldc);
    c1[i] = _mm256_loadu_ps(ct + i * ldc + 8);
  }
  for (int64_t q = 0; q < len; ++q) {
    const __m256 x0 = _mm256_load_ps(xp + q * 16);
    const __m256 x1 = _mm256_load_ps(xp + q * 16 + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kMr; ++i) {
      const __m256 av =
          _mm256_broadcast_ss(kARows ? a + i * ld + q : a + q * ld + i);
      c0[i] = _mm256_fmadd_ps(av, x0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, x1, c1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < kMr; ++i) {
    _mm256_storeu_ps(ct + i * ldc, c0[i]);
    _mm256_storeu_ps(ct + i * ldc + 8, c1[i]);
  }
}

KQ_AVX2 inline void MicroAvx2(const float* a, int64_t ld, bool a_rows,
                       const float* xp, int64_t len, float* ct, int64_t ldc) {
  if (a_rows) return MicroAvx2T<true>(a, ld, xp, len, ct, ldc);
  MicroAvx2T<false>(a, ld, xp, len, ct, ldc);
}

// ---------------------------------------------------------------- AVX-512

template <bool kARows>
KQ_AVX512 inline void MicroAvx512T(const float* a, int64_t ld, const float* xp,
                                   int64_t len, float* ct, int64_t ldc) {
  constexpr int kMr = 12;
  __m512 c0[kMr], c1[kMr];
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) {
    c0[i] = _mm512_loadu_ps(ct + i * ldc);
    c1[i] = _mm512_loadu_ps(ct + i * ldc + 16);
  }
  for (int64_t q = 0; q < len; ++q) {
    const __m512 x0 = _mm512_load_ps(xp + q * 32);
    const __m512 x1 = _mm512_load_ps(xp + q * 32 + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMr; ++i) {
      const __m512 av = _mm512_set1_ps(kARows ? a[i * ld + q] : a[q * ld + i]);
      c0[i] = _mm512_fmadd_ps(av, x0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, x1, c1[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < kMr; ++i) {
    _mm512_storeu_ps(ct + i * ldc, c0[i]);
    _mm512_storeu_ps(ct + i * ldc + 16, c1[i]);
  }
}

KQ_AVX512 inline void MicroAvx512(const float* a, int64_t ld, bool a_rows,
                           const float* xp, int64_t len, float* ct,
                           int64_t ldc) {
  if (a_rows) return MicroAvx512T<true>(a, ld, xp, len, ct, ldc);
  MicroAvx512T<false>(a, ld, xp, len, ct, ldc);
}

// ---------------------------------------------------------------- drivers

// Packs x (M x R) into panels of mp rows: xp[(panel * R + r) * mp + j]
// = x[panel * mp + j, src(r)], zero past M; src is chunk order if asked.
// Parallel over panels; every store is sequential.
template <typename T>
void PackPanels(Pool* pool, const T* x, int64_t m, int64_t r_dim, int64_t mp,
                bool chunk_order, float* xp) {
  const int64_t panels = nf4::CeilDiv(m, mp);
  ParallelRange(pool, panels, 4 * r_dim * mp, [&](int64_t b, int64_t e) {
    for (int64_t pan = b; pan < e; ++pan) {
      const int64_t rows = std::min(mp, m - pan * mp);
      const T* src = x + pan * mp * r_dim;
      float* dst = xp + pan * r_dim * mp;
      for (int64_t r = 0; r < r_dim; ++r, dst += mp) {
        const int64_t col = chunk_order ? ChunkSource(r) : r;
        int64_t j = 0;
        for (; j < rows; ++j) dst[j] = static_cast<float>(src[j * r_dim + col]);
        for (; j < mp; ++j) dst[j] = 0.0f;
      }
    }
  });
}

// Per-thread scratch floats of Gemm.
inline int64_t GemmScratch(const IsaKernels& isa) {
  const int64_t ldc = std::max<int64_t>(1, kGemmRowChunk / isa.mp) * isa.mp;
  return ScratchFloats(kGemmOutTile * ldc) +
         ScratchFloats(kGemmOutTile * kGemmRedBlock);
}

// y (M x O) from packed x panels; O = N (forward) or K (transpose). Tasks
// are (output tile, row chunk) pairs; each decodes its tile of W^T block by
// block along the reduction axis R into its thread's scratch.
inline void Gemm(const IsaKernels& isa, const Problem& p, Pool* pool,
                 const Scratch& scratch, const float* xp, int64_t m,
                 int64_t o_dim, int64_t r_dim, bool transpose, float* y) {
  const int64_t mp = isa.mp, mr = isa.mr;
  const int64_t panels = nf4::CeilDiv(m, mp);
  const int64_t chunk_panels = std::max<int64_t>(1, kGemmRowChunk / mp);
  const int64_t row_chunks = nf4::CeilDiv(panels, chunk_panels);
  const int64_t o_tiles = nf4::CeilDiv(o_dim, kGemmOutTile);
  const int64_t ldc = chunk_panels * mp;
  const int64_t cost = kGemmOutTile * r_dim * chunk_panels * mp * 2;
  ParallelShards(pool, o_tiles * row_chunks, cost, scratch,
                 [&](int64_t begin, int64_t end, float* buf) {
    float* ct = buf;  // kGemmOutTile x ldc
    float* wt = buf + ScratchFloats(kGemmOutTile * ldc);
    // Padding rows / columns of wt only feed unused rows of ct; zero them
    // once so that they hold no stale NaNs or denormals.
    std::fill(wt, wt + kGemmOutTile * kGemmRedBlock, 0.0f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = (task / row_chunks) * kGemmOutTile;
      const int64_t p0 = (task % row_chunks) * chunk_panels;
      const int64_t p1 = std::min(panels, p0 + chunk_panels);
      const int64_t olen = std::min(kGemmOutTile, o_dim - o0);
      const int64_t opad = nf4::CeilDiv(olen, mr) * mr;
      const int64_t cols = (p1 - p0) * mp;
      for (int64_t o = 0; o < opad; ++o)
        std::fill(ct + o * ldc, ct + o * ldc + cols, 0.0f);
      for (int64_t r0 = 0; r0 < r_dim; r0 += kGemmRedBlock) {
        const int64_t rlen = std::min(kGemmRedBlock, r_dim - r0);
        // Forward: wt[o][r] = W^T[o0 + o, r0 + r] (ld kGemmRedBlock).
        // Transpose: wt[r][o] = W^T[r0 + r, o0 + o] (ld opad).
        const int64_t ld = transpose ? opad : kGemmRedBlock;
        if (transpose) {
          for (int64_t r = 0; r < rlen; ++r)
            isa.decode(p, r0 + r, o0, olen, wt + r * ld);
        } else {
          for (int64_t o = 0; o < olen; ++o)
            isa.decode(p, o0 + o, r0, rlen, wt + o * ld);
        }
        for (int64_t pan = p0; pan < p1; ++pan) {
          const float* xpan = xp + (pan * r_dim + r0) * mp;
          for (int64_t g = 0; g < opad; g += mr) {
            const float* a = wt + (transpose ? g : g * ld);
            isa.micro(a, ld, !transpose, xpan, rlen,
                      ct + g * ldc + (pan - p0) * mp, ldc);
          }
        }
      }
      // Row by row, so that the stores into y are sequential.
      const int64_t m0 = p0 * mp, m1 = std::min(m, p1 * mp);
      const bool permute = transpose && p.chunk_order;
      for (int64_t i = m0; i < m1; ++i) {
        float* yi = y + i * o_dim + o0;
        const float* ci = ct + (i - m0);
        for (int64_t o = 0; o < olen; ++o)
          yi[permute ? ChunkSource(o) : o] = ci[o * ldc];
      }
    }
  });
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMM_H_
