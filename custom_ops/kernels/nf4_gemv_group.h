// Group order, the small-M (GEMV) kernels of the NF4 matmul on AVX-512
// when K % 128 == 0: a 64-byte load holds 128 codes of a row of W^T and is
// decoded by whole-register shifts and table permutes; block scales are
// decoded once per block. Forward: register tiles of up to 8 rows of x x 2
// rows of W^T over packed x. Transpose: each thread streams a row range of
// W^T into its own partial sum. Inline-only (included by nf4_gemv.h).

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_GROUP_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_GROUP_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "nf4_decode.h"

namespace keras_qlora {
namespace nf4_matmul {

constexpr int64_t kGroupRowTile = 64;     // forward: W^T rows per tile
constexpr int64_t kGroupKBlock = 1024;    // forward: K per block, M >= 4
constexpr int64_t kGroupKBlockMax = 4096;  // forward: K per block, M = 1
constexpr int kGroupMr = 8;  // forward: rows of x per register tile
constexpr int kGroupNr = 2;  // forward: rows of W^T per register tile
constexpr int64_t kGroupColTile = 2048;  // transpose: columns per pass

// ---------------------------------------------------------------- decoding

// "Group order", used by the AVX-512 GEMV kernels when K % 128 == 0: one
// 64-byte load holds a 128-element group of a row of W^T, i.e. 16 dwords
// of 8 codes each. Shifting the whole register right by 4q bits puts code
// q of every dword in the low 4 bits of its lane, which is all that
// _mm512_permutexvar_ps reads: 8 shifts and 8 table permutes decode the
// group with no unpacking. Decoded register q holds, in lane i, element
// 8i + (q ^ 1) of the group (the low nibble of a byte is its second,
// odd element); x (forward) and y (transpose) are permuted to match.
constexpr int64_t kGroup = 128;

// Source index (within its 128-aligned group) of group-order position i.
inline int64_t GroupSource(int64_t i) {
  const int64_t j = i & (kGroup - 1);
  return (i - j) + 8 * (j & 15) + ((j >> 4) ^ 1);
}

// Whether the GEMV kernels use group order for this problem.
inline bool UseGroupOrder(const Problem& p) {
  return p.chunk_order && p.k % kGroup == 0;
}

// kDynamicMap[codes] for 16 lanes of codes < 256: eight 32-entry table
// permutes, selected by code bits 5, 6 and 7 (much faster than a gather
// on Zen 4).
KQ_AVX512 inline __m512 DynamicMapAvx512(__m512i codes) {
  const float* t = nf4::kDynamicMap;
  const __mmask16 b5 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(codes, _mm512_set1_epi32(128));
  __m512 quarter[4];
  for (int h = 0; h < 4; ++h) {
    const float* q = t + 64 * h;
    const __m512 lo = _mm512_permutex2var_ps(_mm512_load_ps(q), codes,
                                             _mm512_load_ps(q + 16));
    const __m512 hi = _mm512_permutex2var_ps(_mm512_load_ps(q + 32), codes,
                                             _mm512_load_ps(q + 48));
    quarter[h] = _mm512_mask_blend_ps(b5, lo, hi);
  }
  return _mm512_mask_blend_ps(
      b7, _mm512_mask_blend_ps(b6, quarter[0], quarter[1]),
      _mm512_mask_blend_ps(b6, quarter[2], quarter[3]));
}

// Block scales of the flat elements [f0, f1), computed once per block (not
// per chunk): returns s with s[b - (f0 >> shift)] the scale of block b for
// every block the range touches. Plain float32 absmax is returned in place;
// double-quantized scales are decoded into buf ((f1 - f0) / 32 + 1 floats),
// 16 at a time: a lookup in the 256-entry dynamic map, the nested scale
// (at most two per 16 blocks) by a permute; multiply, then add, as
// DoubleQuantScale does.
KQ_AVX512 inline const float* BlockScalesAvx512(const Problem& p, int64_t f0,
                                                int64_t f1, float* buf) {
  const int64_t first = f0 >> p.block_shift;
  if (p.scales.absmax_u8 == nullptr) return p.scales.absmax_f32 + first;
  const int64_t count = ((f1 - 1) >> p.block_shift) - first + 1;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                        5, 4, 3, 2, 1, 0);
  const __m512 offset = _mm512_set1_ps(p.scales.offset);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const int64_t b = first + i;
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p.scales.absmax_u8 + b)));
    const __m512 dyn = DynamicMapAvx512(codes);
    // Lane l uses nested[(b + l) >> 8]: entry 0 or 1 from b >> 8.
    const int64_t in = b & (nf4::kNestedBlockSize - 1);
    const __m512i which = _mm512_srli_epi32(
        _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(in))),
        nf4::kNestedBlockShift);
    const __mmask16 two = in + 15 >= nf4::kNestedBlockSize ? 0x3 : 0x1;
    const __m512 nested = _mm512_permutexvar_ps(
        which, _mm512_maskz_loadu_ps(
                   two, p.scales.nested_scale + (b >> nf4::kNestedBlockShift)));
    _mm512_storeu_ps(buf + i,
                     _mm512_add_ps(_mm512_mul_ps(dyn, nested), offset));
  }
  for (; i < count; ++i) buf[i] = p.scales(first + i);
  return buf;
}

// Where a group's 16 lane scales come from: lane i (elements 8i .. 8i + 7
// of a 128-aligned group) lies in block (group start >> shift) +
// ((8i) >> shift), i.e. one of the first `blocks` = max(1, 128 >> shift)
// blocks from the group's first.
struct GroupScaleMap {
  __m512i lanes;
  __mmask16 mask;  // the `blocks` scales to load
};

KQ_AVX512 inline GroupScaleMap MakeGroupScaleMap(int block_shift) {
  const __m512i lane8 = _mm512_set_epi32(120, 112, 104, 96, 88, 80, 72, 64,
                                         56, 48, 40, 32, 24, 16, 8, 0);
  const int blocks = std::max(1, static_cast<int>(kGroup >> block_shift));
  return {_mm512_srl_epi32(lane8, _mm_cvtsi32_si128(block_shift)),
          static_cast<__mmask16>((1u << blocks) - 1)};
}

// The 16 lane scales of the group whose first block's scale is s[0]. The
// masked load reads only the blocks the group touches.
KQ_AVX512 inline __m512 GroupScales(const float* s, const GroupScaleMap& m) {
  return _mm512_permutexvar_ps(m.lanes, _mm512_maskz_loadu_ps(m.mask, s));
}

// ---------------------------------------------------------------- forward

// Floats of a per-row block-scale array for `len` elements: blocks of 32
// or more, the first and last possibly partial.
constexpr int64_t GroupScaleFloats(int64_t len) { return len / 32 + 2; }

// y[i * ldy + row + j] (+= when `add`) x[i, k0:k1] . W^T[row + j, k0:k1]
// for i < MR, j < NR, with x[:, k0 : k1) packed by PackGroupX. The NR rows
// of W^T are decoded in registers, 128 codes per 64-byte load, and never
// stored. With one row of x the block scale is applied once per group to
// the group's partial dot products; with more it scales the decoded
// weights, which every row of x then shares.
template <int MR, int NR>
KQ_AVX512 void GroupTileAvx512(const Problem& p, int64_t row, int64_t k0,
                               int64_t k1, const float* xp, float* y,
                               int64_t ldy, bool add) {
  const __m512 table = _mm512_load_ps(p.code);
  const GroupScaleMap map = MakeGroupScaleMap(p.block_shift);
  const int64_t k = p.k, len = k1 - k0, shift = p.block_shift;
  float s[NR][GroupScaleFloats(kGroupKBlockMax)];
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

using GroupTileFn = void (*)(const Problem&, int64_t, int64_t, int64_t,
                             const float*, float*, int64_t, bool);

// kGroupTiles.fn[mr - 1][nr - 1] = GroupTileAvx512<mr, nr>.
struct GroupTiles {
  GroupTileFn fn[kGroupMr][kGroupNr];
};
template <int I>
constexpr void FillGroupTiles(GroupTiles* t) {
  if constexpr (I < kGroupMr * kGroupNr) {
    t->fn[I / kGroupNr][I % kGroupNr] =
        GroupTileAvx512<I / kGroupNr + 1, I % kGroupNr + 1>;
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
// of kGroupRowTile rows x a K block x up to 8 rows of x. The K block keeps
// the rows of x that a tile reads in L1; it grows when M is small (4096
// at M = 1), so that each row of W^T is read in one long stream.
KQ_AVX512 inline void GroupRowsAvx512(const Problem& p, int64_t row0,
                                      int64_t row1, const float* xg,
                                      int64_t m, float* y, int64_t ldy) {
  const int64_t kblock = std::clamp<int64_t>(
      kGroupKBlockMax / m / kGroup * kGroup, kGroupKBlock, kGroupKBlockMax);
  // Packed x of one tile (at most 2 x 2048 or 8 x 1024 floats).
  alignas(64) float xp[kGroupMr * kGroupKBlock];
  for (int64_t r0 = row0; r0 < row1; r0 += kGroupRowTile) {
    const int64_t r1 = std::min(row1, r0 + kGroupRowTile);
    for (int64_t k0 = 0; k0 < p.k; k0 += kblock) {
      const int64_t k1 = std::min(p.k, k0 + kblock);
      for (int64_t i = 0; i < m; i += kGroupMr) {
        const int64_t mr = std::min<int64_t>(kGroupMr, m - i);
        const float* x = PackGroupX(xg + i * p.k, p.k, k0, k1, mr, xp);
        for (int64_t j = r0; j < r1; j += kGroupNr) {
          const int64_t nr = std::min<int64_t>(kGroupNr, r1 - j);
          kGroupTiles.fn[mr - 1][nr - 1](p, j, k0, k1, x, y + i * ldy, ldy,
                                         k0 > 0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- transpose

constexpr int64_t kGroupTransposeMaxRows = 32;  // M of the GEMV transpose

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
  const __m512 table = _mm512_load_ps(p.code);
  const GroupScaleMap map = MakeGroupScaleMap(p.block_shift);
  const int64_t k = p.k, shift = p.block_shift;
  float s[R][GroupScaleFloats(kGroupColTile)];
  const uint8_t* src[R];
  const float* sp[R];
  int64_t f0[R];
  for (int r = 0; r < R; ++r) {
    f0[r] = (j + r) * k + c0;
    sp[r] = BlockScalesAvx512(p, f0[r], f0[r] + len, s[r]);
    src[r] = p.packed + f0[r] / 2;
  }
  const int64_t ahead = R * k / 2;  // the next R rows
  // x[i, j + r] at xr[r * m + i] (m <= kGroupTransposeMaxRows), read
  // together instead of from rows of x N floats apart.
  float xr[R * kGroupTransposeMaxRows];
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

constexpr int kGroupTransposeRows = 4;  // rows of W^T per pass over acc

// Rows [r0, r1) of W^T into acc (m x K, group order, laid out as in
// GroupAxpyRowsAvx512): acc += x[:, r0 : r1) @ W^T[r0 : r1, :], R rows at
// a time, each read whole before the next R (column tiles bound the
// per-row scale arrays).
KQ_AVX512 inline void GroupRowRangeAvx512(const Problem& p, int64_t r0,
                                          int64_t r1, const float* x,
                                          int64_t m, int64_t n, float* acc) {
  const int64_t k = p.k;
  int64_t j = r0;
  for (; j + kGroupTransposeRows <= r1; j += kGroupTransposeRows)
    for (int64_t c0 = 0; c0 < k; c0 += kGroupColTile)
      GroupAxpyRowsAvx512<kGroupTransposeRows>(
          p, j, c0, std::min(kGroupColTile, k - c0), x, n, m, acc + c0 * m);
  for (; j < r1; ++j)
    for (int64_t c0 = 0; c0 < k; c0 += kGroupColTile)
      GroupAxpyRowsAvx512<1>(p, j, c0, std::min(kGroupColTile, k - c0), x, n,
                             m, acc + c0 * m);
}

// Row ranges of W^T the transpose is cut into: several per thread, so that
// a thread that falls behind (a busy machine) leaves its share to the
// others, while each range stays a long contiguous stream; bounded by
// n / 64 and by the memory of their m x K partial sums.
constexpr int64_t kGroupPartsPerThread = 4;
constexpr int64_t kGroupPartialFloats = int64_t{1} << 21;  // 8 MB
inline int64_t GroupTransposeParts(const Problem& p, Pool* pool, int64_t m,
                                   int64_t n) {
  const int64_t threads = std::max(1, pool->NumThreads());
  const int64_t most = std::clamp<int64_t>(
      kGroupPartialFloats / (m * p.k), threads,
      kGroupPartsPerThread * threads);
  return std::clamp<int64_t>(n / 64, 1, most);
}

// y (M x K) = x (M x N) @ W^T in group order. W^T is cut into `parts`
// contiguous row ranges (GroupTransposeParts), which threads take as they
// come; each range sums into its own m x K partial sum in `partial`, and
// the partial sums are added in a fixed order, so the result does not
// depend on scheduling.
KQ_AVX512 inline void GroupTransposeAvx512(const Problem& p, Pool* pool,
                                           float* partial, const float* x,
                                           int64_t m, int64_t n, float* y) {
  const int64_t k = p.k;
  const int64_t parts = GroupTransposeParts(p, pool, m, n);
  const int64_t size = m * k;
  pool->ParallelFor(
      parts,
      Pool::SchedulingParams(Pool::SchedulingStrategy::kFixedBlockSize,
                             std::nullopt, 1),
      [&](int64_t b, int64_t e) {
        for (int64_t part = b; part < e; ++part) {
          float* acc = partial + part * size;
          std::fill(acc, acc + size, 0.0f);
          GroupRowRangeAvx512(p, n * part / parts, n * (part + 1) / parts, x,
                              m, n, acc);
        }
      });
  const int64_t groups = k / kGroup;
  ParallelRange(pool, groups, m * kGroup * (parts + 1),
                [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t q = 0; q < kGroup; ++q) {
          const int64_t at = (g * kGroup + (q & ~15)) * m + 16 * i + (q & 15);
          float v = partial[at];
          for (int64_t part = 1; part < parts; ++part)
            v += partial[part * size + at];
          y[i * k + g * kGroup + GroupSource(q)] = v;
        }
      }
    }
  });
}

}  // namespace nf4_matmul
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_GROUP_H_
