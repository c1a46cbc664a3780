// Small-M (GEMV) kernels of the NF4 matmul: every weight byte is read once.
// Forward: each thread decodes rows of W^T and takes dot products with all
// M rows of x (AVX-512: decoding in registers, a 2-row x 8-row register
// tile, K cut into L1-sized blocks). Transpose: each thread decodes column
// tiles of W^T and adds axpys into M accumulator rows. Inline-only.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_H_

#include <algorithm>
#include <cstdint>

#include "nf4_decode.h"

namespace keras_qlora {
namespace nf4_matmul {

constexpr int64_t kGemvColTile = 2048;  // transpose: max columns per task
constexpr int64_t kGemvRowTile = 64;    // fused forward: W^T rows per tile
constexpr int64_t kGemvKBlock = 1024;   // fused forward: K per block (L1)
constexpr int64_t kGemvKBlockMax = 4096;  // group order: K per block, M = 1

// ---------------------------------------------------------------- scalar

inline float DotScalar(const float* a, const float* b, int64_t len) {
  float s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= len; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < len; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

inline void Axpy4Scalar(float* acc, const float* const* w, const float* c,
                        int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    float t = acc[i];
    for (int j = 0; j < 4; ++j) t += c[j] * w[j][i];
    acc[i] = t;
  }
}

// ---------------------------------------------------------------- AVX2

KQ_AVX2 inline float HsumAvx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

KQ_AVX2 inline float DotAvx2(const float* a, const float* b, int64_t len) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8),
                         _mm256_loadu_ps(b + i + 8), s1);
  }
  float tail = 0.0f;
  for (; i < len; ++i) tail += a[i] * b[i];
  return HsumAvx2(_mm256_add_ps(s0, s1)) + tail;
}

KQ_AVX2 inline void Axpy4Avx2(float* acc, const float* const* w,
                              const float* c, int64_t len) {
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]);
  const __m256 c2 = _mm256_set1_ps(c[2]), c3 = _mm256_set1_ps(c[3]);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 t = _mm256_loadu_ps(acc + i);
    t = _mm256_fmadd_ps(c0, _mm256_loadu_ps(w[0] + i), t);
    t = _mm256_fmadd_ps(c1, _mm256_loadu_ps(w[1] + i), t);
    t = _mm256_fmadd_ps(c2, _mm256_loadu_ps(w[2] + i), t);
    t = _mm256_fmadd_ps(c3, _mm256_loadu_ps(w[3] + i), t);
    _mm256_storeu_ps(acc + i, t);
  }
  const float* const rest[4] = {w[0] + i, w[1] + i, w[2] + i, w[3] + i};
  if (i < len) Axpy4Scalar(acc + i, rest, c, len - i);
}

// ---------------------------------------------------------------- AVX-512

KQ_AVX512 inline float DotAvx512(const float* a, const float* b,
                                 int64_t len) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16),
                         _mm512_loadu_ps(b + i + 16), s1);
  }
  float tail = 0.0f;
  for (; i < len; ++i) tail += a[i] * b[i];
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) + tail;
}

KQ_AVX512 inline void Axpy4Avx512(float* acc, const float* const* w,
                                  const float* c, int64_t len) {
  const __m512 c0 = _mm512_set1_ps(c[0]), c1 = _mm512_set1_ps(c[1]);
  const __m512 c2 = _mm512_set1_ps(c[2]), c3 = _mm512_set1_ps(c[3]);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m512 t = _mm512_loadu_ps(acc + i);
    t = _mm512_fmadd_ps(c0, _mm512_loadu_ps(w[0] + i), t);
    t = _mm512_fmadd_ps(c1, _mm512_loadu_ps(w[1] + i), t);
    t = _mm512_fmadd_ps(c2, _mm512_loadu_ps(w[2] + i), t);
    t = _mm512_fmadd_ps(c3, _mm512_loadu_ps(w[3] + i), t);
    _mm512_storeu_ps(acc + i, t);
  }
  const float* const rest[4] = {w[0] + i, w[1] + i, w[2] + i, w[3] + i};
  if (i < len) Axpy4Scalar(acc + i, rest, c, len - i);
}

// y[i * ldy + row + j] (+= when `add`) xc[i, k0:k1] . W^T[row + j, k0:k1]
// for i < MR, j < NR (xc rows of stride k, chunk order). The NR rows of W^T
// are decoded in registers and never stored.
template <int MR, int NR>
KQ_AVX512 void FusedTileAvx512(const Problem& p, int64_t row, int64_t k0,
                               int64_t k1, const float* xc, float* y,
                               int64_t ldy, bool add) {
  const __m512 table = _mm512_load_ps(kNf4Code);
  const int64_t k = p.k;
  __m512 acc[NR][MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[j][i] = _mm512_setzero_ps();
  for (int64_t c = k0; c < k1; c += kChunk) {
    __m512 even[NR], odd[NR];
    for (int j = 0; j < NR; ++j)
      DecodeChunkAvx512(p, (row + j) * k + c, table, &even[j], &odd[j]);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 x0 = _mm512_loadu_ps(xc + i * k + c);
      const __m512 x1 = _mm512_loadu_ps(xc + i * k + c + 16);
      for (int j = 0; j < NR; ++j) {
        acc[j][i] = _mm512_fmadd_ps(x0, even[j], acc[j][i]);
        acc[j][i] = _mm512_fmadd_ps(x1, odd[j], acc[j][i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float v = _mm512_reduce_add_ps(acc[j][i]);
      float& out = y[i * ldy + row + j];
      out = add ? out + v : v;
    }
  }
}

// Floats of a per-row block-scale array for `len` elements: blocks of 32
// or more, the first and last possibly partial.
constexpr int64_t GroupScaleFloats(int64_t len) { return len / 32 + 2; }

// The same tile in group order (K % 128 == 0), x[:, k0 : k1) packed by
// PackGroupX: 64-byte loads decoded by shifts and table permutes (see
// GroupSource); block scales computed once per block. With one row of x the scale is applied once per group to the
// group's partial dot products; with more it scales the decoded weights,
// which every row of x then shares.
template <int MR, int NR>
KQ_AVX512 void GroupTileAvx512(const Problem& p, int64_t row, int64_t k0,
                               int64_t k1, const float* xp, float* y,
                               int64_t ldy, bool add) {
  const __m512 table = _mm512_load_ps(kNf4Code);
  const GroupScaleMap map = MakeGroupScaleMap(p.block_shift);
  const int64_t k = p.k, len = k1 - k0, shift = p.block_shift;
  float s[NR][GroupScaleFloats(kGemvKBlockMax)];
  const uint8_t* src[NR];
  const float* sp[NR];
  int64_t f0[NR];
  for (int j = 0; j < NR; ++j) {
    f0[j] = (row + j) * k + k0;
    sp[j] = BlockScalesAvx512(p, f0[j], f0[j] + len, s[j]);
    src[j] = p.packed + f0[j] / 2;
  }
  // Rows row + NR .. are next (the next tile, same columns).
  const int64_t ahead = NR * k / 2;
  __m512 acc[NR][MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[j][i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < len; d += kGroup) {
    const float* x = xp + d * MR;
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      const uint8_t* g = src[j] + d / 2;
      _mm_prefetch(reinterpret_cast<const char*>(g) + ahead, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(g);
      const __m512 sv = GroupScales(
          sp[j] + (((f0[j] + d) >> shift) - (f0[j] >> shift)), map);
      if constexpr (MR == 1) {
        // Two chains of partial sums hide the FMA latency.
        __m512 t0 = _mm512_mul_ps(_mm512_loadu_ps(x),
                                  _mm512_permutexvar_ps(v, table));
        __m512 t1 = _mm512_mul_ps(
            _mm512_loadu_ps(x + 16),
            _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
#pragma GCC unroll 8
        for (int q = 2; q < 8; q += 2) {
          t0 = _mm512_fmadd_ps(
              _mm512_loadu_ps(x + 16 * q),
              _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * q), table), t0);
          t1 = _mm512_fmadd_ps(
              _mm512_loadu_ps(x + 16 * q + 16),
              _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * q + 4), table),
              t1);
        }
        acc[j][0] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sv, acc[j][0]);
      } else {
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) {
          const __m512 w = _mm512_mul_ps(
              _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * q), table), sv);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i)
            acc[j][i] = _mm512_fmadd_ps(
                _mm512_load_ps(x + 16 * (q * MR + i)), w, acc[j][i]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float v = _mm512_reduce_add_ps(acc[j][i]);
      float& out = y[i * ldy + row + j];
      out = add ? out + v : v;
    }
  }
}

using FusedTileFn = void (*)(const Problem&, int64_t, int64_t, int64_t,
                             const float*, float*, int64_t, bool);

// 8 x 2 tiles (16 accumulators) measured as fast as 6 x 3 and 4 x 4.
constexpr int kGemvMr = 8;  // rows of x per register tile
constexpr int kGemvNr = 2;  // rows of W^T per register tile

// kFusedTiles.fn[mr - 1][nr - 1] = FusedTileAvx512<mr, nr>.
struct FusedTiles {
  FusedTileFn fn[kGemvMr][kGemvNr];
};
template <int I>
constexpr void FillFusedTiles(FusedTiles* t) {
  if constexpr (I < kGemvMr * kGemvNr) {
    t->fn[I / kGemvNr][I % kGemvNr] =
        FusedTileAvx512<I / kGemvNr + 1, I % kGemvNr + 1>;
    FillFusedTiles<I + 1>(t);
  }
}
constexpr FusedTiles MakeFusedTiles() {
  FusedTiles t{};
  FillFusedTiles<0>(&t);
  return t;
}
inline constexpr FusedTiles kFusedTiles = MakeFusedTiles();

// kGroupTiles.fn[mr - 1][nr - 1] = GroupTileAvx512<mr, nr>.
struct GroupTiles {
  FusedTileFn fn[kGemvMr][kGemvNr];
};
template <int I>
constexpr void FillGroupTiles(GroupTiles* t) {
  if constexpr (I < kGemvMr * kGemvNr) {
    t->fn[I / kGemvNr][I % kGemvNr] =
        GroupTileAvx512<I / kGemvNr + 1, I % kGemvNr + 1>;
    FillGroupTiles<I + 1>(t);
  }
}
constexpr GroupTiles MakeGroupTiles() {
  GroupTiles t{};
  FillGroupTiles<0>(&t);
  return t;
}
inline constexpr GroupTiles kGroupTiles = MakeGroupTiles();

// xp = rows [0, mr) x columns [k0, k1) of xg (row stride k), 16 columns
// at a time for all mr rows: element (i, c) at 16 * (mr * (c / 16) + i) +
// c % 16. One pointer then reaches every row, and rows of K floats apart
// (which alias in L1 when K is a multiple of 1024) are never read
// together. At mr = 1 this is xg itself.
KQ_AVX512 inline const float* PackGroupX(const float* xg, int64_t k,
                                         int64_t k0, int64_t k1, int64_t mr,
                                         float* xp) {
  if (mr == 1) return xg + k0;
  for (int64_t c = k0; c < k1; c += 16)
    for (int64_t i = 0; i < mr; ++i)
      _mm512_store_ps(xp + 16 * (mr * ((c - k0) / 16) + i),
                      _mm512_loadu_ps(xg + i * k + c));
  return xp;
}

// Rows [row0, row1) of y (M x N) = xg (M x K, group order) @ W, in tiles
// of kGemvRowTile rows x a K block x up to 8 rows of x. The K block keeps
// the rows of x that a tile reads in L1; it grows when M is small (4096
// at M = 1), so that each row of W^T is read in one long stream.
KQ_AVX512 inline void GroupRowsAvx512(const Problem& p, int64_t row0,
                                      int64_t row1, const float* xg,
                                      int64_t m, float* y, int64_t ldy) {
  const int64_t kblock = std::clamp<int64_t>(
      kGemvKBlockMax / m / kGroup * kGroup, kGemvKBlock, kGemvKBlockMax);
  // Packed x of one tile (at most 2 x 2048 or 8 x 1024 floats).
  alignas(64) float xp[kGemvMr * kGemvKBlock];
  for (int64_t r0 = row0; r0 < row1; r0 += kGemvRowTile) {
    const int64_t r1 = std::min(row1, r0 + kGemvRowTile);
    for (int64_t k0 = 0; k0 < p.k; k0 += kblock) {
      const int64_t k1 = std::min(p.k, k0 + kblock);
      for (int64_t i = 0; i < m; i += kGemvMr) {
        const int64_t mr = std::min<int64_t>(kGemvMr, m - i);
        const float* x = PackGroupX(xg + i * p.k, p.k, k0, k1, mr, xp);
        for (int64_t j = r0; j < r1; j += kGemvNr) {
          const int64_t nr = std::min<int64_t>(kGemvNr, r1 - j);
          kGroupTiles.fn[mr - 1][nr - 1](p, j, k0, k1, x, y + i * ldy, ldy,
                                         k0 > 0);
        }
      }
    }
  }
}

// Rows [row0, row1) of y (M x N) = xc (M x K, chunk order, or group order
// when UseGroupOrder) @ W, in tiles of kGemvRowTile rows x kGemvKBlock
// columns x all rows of x.
KQ_AVX512 inline void FusedRowsAvx512(const Problem& p, int64_t row0,
                                      int64_t row1, const float* xc,
                                      int64_t m, float* y, int64_t ldy) {
  if (UseGroupOrder(p)) return GroupRowsAvx512(p, row0, row1, xc, m, y, ldy);
  for (int64_t r0 = row0; r0 < row1; r0 += kGemvRowTile) {
    const int64_t r1 = std::min(row1, r0 + kGemvRowTile);
    for (int64_t k0 = 0; k0 < p.k; k0 += kGemvKBlock) {
      const int64_t k1 = std::min(p.k, k0 + kGemvKBlock);
      for (int64_t i = 0; i < m; i += kGemvMr) {
        const int64_t mr = std::min<int64_t>(kGemvMr, m - i);
        for (int64_t j = r0; j < r1; j += kGemvNr) {
          const int64_t nr = std::min<int64_t>(kGemvNr, r1 - j);
          kFusedTiles.fn[mr - 1][nr - 1](p, j, k0, k1, xc + i * p.k,
                                         y + i * ldy, ldy, k0 > 0);
        }
      }
    }
  }
}

// Whether GemvForward / GemvTranspose use group order: the AVX-512 kernels
// (the only ones with fused_rows) and K % 128 == 0. Forward x must then be
// permuted with GroupSource instead of ChunkSource.
inline bool GemvGroupOrder(const IsaKernels& isa, const Problem& p) {
  return isa.fused_rows == FusedRowsAvx512 && UseGroupOrder(p);
}

constexpr int64_t kGemvTransposeMaxRows = 32;  // M of the GEMV transpose

// acc += x[:, j .. j + R) @ W^T[j .. j + R, c0 : c0 + len) (x rows of
// stride ldx), where acc holds the m x len sums in group order, 16
// columns at a time for all m rows: element (i, c) at (c - c % 16) * m +
// 16 * i + c % 16. (Rows of K floats apart would alias in L1 when K is a
// multiple of 1024.) Decodes R rows at once so that each pass over acc
// adds R rows; with one row of x the block scale goes into the
// coefficient (once per group) instead of into every weight.
template <int R>
KQ_AVX512 void GroupAxpyRowsAvx512(const Problem& p, int64_t j, int64_t c0,
                                   int64_t len, const float* x, int64_t ldx,
                                   int64_t m, float* acc) {
  const __m512 table = _mm512_load_ps(kNf4Code);
  const GroupScaleMap map = MakeGroupScaleMap(p.block_shift);
  const int64_t k = p.k, shift = p.block_shift;
  float s[R][GroupScaleFloats(kGemvColTile)];
  const uint8_t* src[R];
  const float* sp[R];
  int64_t f0[R];
  for (int r = 0; r < R; ++r) {
    f0[r] = (j + r) * k + c0;
    sp[r] = BlockScalesAvx512(p, f0[r], f0[r] + len, s[r]);
    src[r] = p.packed + f0[r] / 2;
  }
  const int64_t ahead = R * k / 2;  // the next R rows
  // x[i, j + r] at xr[r * m + i] (m <= kGemvTransposeMaxRows), read
  // together instead of from rows of x N floats apart.
  float xr[R * kGemvTransposeMaxRows];
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < m; ++i) xr[r * m + i] = x[i * ldx + j + r];
  for (int64_t d = 0; d < len; d += kGroup) {
    __m512i v[R];
    __m512 sv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* g = src[r] + d / 2;
      _mm_prefetch(reinterpret_cast<const char*>(g) + ahead, _MM_HINT_T0);
      v[r] = _mm512_loadu_si512(g);
      sv[r] = GroupScales(
          sp[r] + (((f0[r] + d) >> shift) - (f0[r] >> shift)), map);
    }
    if (m == 1) {
      __m512 c[R];
      for (int r = 0; r < R; ++r)
        c[r] = _mm512_mul_ps(_mm512_set1_ps(xr[r]), sv[r]);
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) {
        float* a = acc + d + 16 * q;
        __m512 t = _mm512_loadu_ps(a);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          t = _mm512_fmadd_ps(
              _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * q), table),
              c[r], t);
        _mm512_storeu_ps(a, t);
      }
      continue;
    }
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) {
      __m512 w[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        w[r] = _mm512_mul_ps(
            _mm512_permutexvar_ps(_mm512_srli_epi32(v[r], 4 * q), table),
            sv[r]);
      for (int64_t i = 0; i < m; ++i) {
        float* a = acc + (d + 16 * q) * m + 16 * i;
        __m512 t = _mm512_loadu_ps(a);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          t = _mm512_fmadd_ps(w[r], _mm512_set1_ps(xr[r * m + i]), t);
        _mm512_storeu_ps(a, t);
      }
    }
  }
}

constexpr int kGemvTransposeRows = 4;  // rows of W^T per pass over acc

// Rows [r0, r1) of W^T into acc (m x K, group order, laid out as in
// GroupAxpyRowsAvx512): acc += x[:, r0 : r1) @ W^T[r0 : r1, :], R rows at
// a time, each read whole before the next R (column tiles bound the
// per-row scale arrays).
KQ_AVX512 inline void GroupRowRangeAvx512(const Problem& p, int64_t r0,
                                          int64_t r1, const float* x,
                                          int64_t m, int64_t n, float* acc) {
  const int64_t k = p.k;
  int64_t j = r0;
  for (; j + kGemvTransposeRows <= r1; j += kGemvTransposeRows)
    for (int64_t c0 = 0; c0 < k; c0 += kGemvColTile)
      GroupAxpyRowsAvx512<kGemvTransposeRows>(
          p, j, c0, std::min(kGemvColTile, k - c0), x, n, m, acc + c0 * m);
  for (; j < r1; ++j)
    for (int64_t c0 = 0; c0 < k; c0 += kGemvColTile)
      GroupAxpyRowsAvx512<1>(p, j, c0, std::min(kGemvColTile, k - c0), x, n,
                             m, acc + c0 * m);
}

// y (M x K) = x (M x N) @ W^T in group order. W^T is cut into `parts`
// contiguous row ranges, one per thread, so that each thread streams its
// weights front to back as the forward pass does; each range sums into
// its own scratch slice (m x K), and the slices are added in a fixed
// order, so the result does not depend on scheduling.
KQ_AVX512 inline void GroupTransposeAvx512(const Problem& p, Pool* pool,
                                           const Scratch& scratch,
                                           const float* x, int64_t m,
                                           int64_t n, float* y) {
  const int64_t k = p.k;
  const int64_t parts = std::clamp<int64_t>(n / 64, 1, pool->NumThreads());
  ParallelRange(pool, parts, n * k * (m + 2), [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part) {
      float* acc = scratch.For(static_cast<int>(part));
      std::fill(acc, acc + m * k, 0.0f);
      GroupRowRangeAvx512(p, n * part / parts, n * (part + 1) / parts, x, m,
                          n, acc);
    }
  });
  const int64_t groups = k / kGroup;
  ParallelRange(pool, groups, m * kGroup * (parts + 1),
                [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t q = 0; q < kGroup; ++q) {
          const int64_t at = (g * kGroup + (q & ~15)) * m + 16 * i + (q & 15);
          float v = scratch.For(0)[at];
          for (int64_t part = 1; part < parts; ++part)
            v += scratch.For(static_cast<int>(part))[at];
          y[i * k + g * kGroup + GroupSource(q)] = v;
        }
      }
    }
  });
}

// ---------------------------------------------------------------- drivers

// Per-thread scratch floats of GemvForward / GemvTranspose.
inline int64_t GemvForwardScratch(int64_t k) { return ScratchFloats(k); }
inline int64_t GemvTileCols(const Problem& p, Pool* pool) {
  // Long row segments keep the strided reads of W^T prefetch-friendly; one
  // tile per thread when K is small.
  const int64_t threads = std::max(1, pool->NumThreads());
  return std::max<int64_t>(
      kChunk,
      std::min(kGemvColTile,
               nf4::CeilDiv(nf4::CeilDiv(p.k, threads), kChunk) * kChunk));
}
inline int64_t GemvTransposeScratch(const Problem& p, Pool* pool,
                                    int64_t m) {
  // Group order (AVX-512): one m x K partial sum per thread.
  const int64_t tiles = ScratchFloats((m + 4) * GemvTileCols(p, pool));
  return UseGroupOrder(p) ? std::max(tiles, ScratchFloats(m * p.k)) : tiles;
}

// y (M x N) = xc (M x K, chunk order if p.chunk_order) @ W.
inline void GemvForward(const IsaKernels& isa, const Problem& p, Pool* pool,
                        const Scratch& scratch, const float* xc, int64_t m,
                        int64_t n, float* y) {
  const int64_t k = p.k;
  ParallelShards(pool, n, k * (m + 2), scratch,
                 [&](int64_t begin, int64_t end, float* row) {
    if (isa.fused_rows != nullptr && p.chunk_order)
      return isa.fused_rows(p, begin, end, xc, m, y, n);
    for (int64_t j = begin; j < end; ++j) {
      isa.decode(p, j, 0, k, row);
      for (int64_t i = 0; i < m; ++i) y[i * n + j] = isa.dot(xc + i * k, row, k);
    }
  });
}

// y (M x K) = x (M x N) @ W^T, parallel over column tiles of W^T.
inline void GemvTranspose(const IsaKernels& isa, const Problem& p,
                          Pool* pool, const Scratch& scratch, const float* x,
                          int64_t m, int64_t n, float* y) {
  if (GemvGroupOrder(isa, p) && m <= kGemvTransposeMaxRows)
    return GroupTransposeAvx512(p, pool, scratch, x, m, n, y);
  const int64_t k = p.k;
  const int64_t tile = GemvTileCols(p, pool);
  const int64_t tiles = nf4::CeilDiv(k, tile);
  ParallelShards(pool, tiles, tile * n * (m + 2), scratch,
                 [&](int64_t begin, int64_t end, float* buf) {
    float* acc = buf;             // m x tile
    float* rows = buf + m * tile;  // 4 x tile
    const float* w[4];
    for (int r = 0; r < 4; ++r) w[r] = rows + r * tile;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile;
      const int64_t len = std::min(tile, k - c0);
      std::fill(acc, acc + m * tile, 0.0f);
      for (int64_t j = 0; j < n; j += 4) {
        const int64_t count = std::min<int64_t>(4, n - j);
        for (int64_t r = 0; r < count; ++r)
          isa.decode(p, j + r, c0, len, rows + r * tile);
        for (int64_t r = count; r < 4; ++r)  // 0 * stale could be NaN
          std::fill(rows + r * tile, rows + (r + 1) * tile, 0.0f);
        for (int64_t i = 0; i < m; ++i) {
          float c[4] = {0, 0, 0, 0};
          for (int64_t r = 0; r < count; ++r) c[r] = x[i * n + j + r];
          isa.axpy4(acc + i * tile, w, c, len);
        }
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t q = 0; q < len; ++q)
          y[i * k + c0 + (p.chunk_order ? ChunkSource(q) : q)] =
              acc[i * tile + q];
    }
  });
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_H_
