// Small-M (GEMV) kernels of the NF4 matmul: every weight byte is read once.
// Forward: each thread decodes rows of W^T and takes dot products with all
// M rows of x (AVX-512: decoding in registers, a 2-row x 8-row register
// tile, K cut into L1-sized blocks). Transpose: each thread decodes column
// tiles of W^T and adds axpys into M accumulator rows. On AVX-512 with
// K % 128 == 0 both use the group-order kernels of nf4_gemv_group.h.
// Inline-only.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_GEMV_H_

#include <algorithm>
#include <cstdint>

#include "nf4_decode.h"
#include "nf4_gemv_group.h"

namespace keras_qlora {
namespace nf4_matmul {

constexpr int64_t kGemvColTile = 2048;  // transpose: max columns per task
constexpr int64_t kGemvRowTile = 64;    // fused forward: W^T rows per tile
constexpr int64_t kGemvKBlock = 1024;   // fused forward: K per block (L1)

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
  const __m512 table = _mm512_load_ps(p.code);
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
  const int64_t tiles = ScratchFloats((m + 4) * GemvTileCols(p, pool));
  if (!UseGroupOrder(p)) return tiles;
  // Group order (AVX-512): the m x K partial sums of all row ranges, in
  // the NumThreads() + 1 slices (one buffer) that the op allocates.
  const int64_t most = GroupTransposeParts(p, pool, m, int64_t{1} << 62);
  return std::max(tiles, ScratchFloats(nf4::CeilDiv(
                             most * m * p.k, pool->NumThreads() + 1)));
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
  if (GemvGroupOrder(isa, p) && m <= kGroupTransposeMaxRows)
    return GroupTransposeAvx512(p, pool, scratch.base, x, m, n, y);
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
