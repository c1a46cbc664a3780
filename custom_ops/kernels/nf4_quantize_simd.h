// Shared pieces and SIMD paths of the 4-bit quantize kernels
// (nf4_quantize_kernels.cc): the search grid, the formats (nf4, fp4: sorted
// values, midpoints, stored codes), the block layout, and the scale search
// over 16 (AVX-512F) or 8 (AVX2) blocks at a time, in the lanes of one
// register, plus the vectorized encoders. Bit-identical to the scalar path
// in the .cc (see there for what that pins down). Inline-only; x86 only.

#ifndef KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_QUANTIZE_SIMD_H_
#define KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_QUANTIZE_SIMD_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KERAS_QLORA_X86 1
#endif

#include "nf4_common.h"

namespace keras_qlora {
namespace nf4_quantize {

// np.linspace(1.0, 0.80, 11, dtype=float32): fractions of the absmax.
constexpr int kGridSize = 11;
constexpr float kGrid[kGridSize] = {
    0x1.000000p+0f,  0x1.f5c290p-1f, 0x1.eb851ep-1f, 0x1.e147aep-1f,
    0x1.d70a3ep-1f,  0x1.ccccccp-1f, 0x1.c28f5cp-1f, 0x1.b851ecp-1f,
    0x1.ae147ap-1f,  0x1.a3d70ap-1f, 0x1.99999ap-1f};
// np.float32(1e-38), a denormal: bitsandbytes' clamp of a zero absmax.
constexpr float kTiny = 0x1.b38fb8p-127f;
constexpr int kMaxBlock = nf4::kMaxBlockSize;

// Nearest-code lookup in 8 instructions (AVX-512). [-1, 1) is cut into 32
// buckets of width 1/16; a bucket holds at most two midpoints (nf4: one;
// fp4: 0 and 1/384 share a bucket), so
//   position = #{midpoints below the bucket}
//            + (the bucket's first midpoint < v) + (its second < v).
// The bucket number fma(v, 16, 16) may round up to the next bucket only for
// v within 2^-23 below its lower edge; no midpoint lies below an edge that
// closely (one may lie on it: then it is one of the bucket's own and is
// compared with v itself), so the count is still exact.
struct BucketTables {
  float bound[32];   // the first midpoint inside bucket b, or +inf
  float bound2[32];  // the second one, or +inf
  int32_t base[32];
  bool two;          // some bucket has a second midpoint
  void Build(const float* mids) {
    two = false;
    for (int b = 0; b < 32; ++b) {
      const float lo = -1.0f + b / 16.0f, hi = lo + 1.0f / 16.0f;
      base[b] = 0;
      bound[b] = bound2[b] = INFINITY;
      for (int i = 0; i < 15; ++i) {
        base[b] += mids[i] < lo;
        if (!(mids[i] >= lo && mids[i] < hi)) continue;
        if (bound[b] == INFINITY) {
          bound[b] = mids[i];
        } else {
          bound2[b] = mids[i];
          two = true;
        }
      }
    }
  }
};

// A 4-bit format as the quantizer sees it. A value is rounded to the
// nearest of `sorted` (searchsorted over `mids`, a tie to the lower one);
// its position p is stored as code[p] (nf4: p itself; fp4:
// nf4::kFp4SortedCodes[p]). Zero blocks and padding nibbles get `zero`.
struct Format {
  alignas(64) float sorted[16];  // the code values, increasing
  alignas(64) int32_t code[16];  // the code of sorted position p
  // (sorted[i] + sorted[i + 1]) / 2 in float32 (codes.NF4_MIDPOINTS for
  // nf4); the 16th entry (+inf) only pads the table for 16-lane permutes.
  float mids[16];
  uint8_t zero, zero_byte;  // the code of 0.0, twice in one byte
  BucketTables buckets;

  explicit Format(nf4::QuantType type) {
    const bool fp4 = type == nf4::QuantType::kFp4;
    const float* table = nf4::CodeTable(type);
    for (int i = 0; i < 16; ++i) {
      code[i] = fp4 ? nf4::kFp4SortedCodes[i] : i;
      sorted[i] = table[code[i]];
    }
    for (int i = 0; i < 15; ++i) mids[i] = (sorted[i] + sorted[i + 1]) / 2.0f;
    mids[15] = INFINITY;
    zero = static_cast<uint8_t>(nf4::ZeroIndex(type));
    zero_byte = static_cast<uint8_t>((zero << 4) | zero);
    buckets.Build(mids);
  }
};

// The quantizer's tables of a 4-bit format (built once).
inline const Format& GetFormat(nf4::QuantType type) {
  static const Format nf4_format(nf4::QuantType::kNf4);
  static const Format fp4_format(nf4::QuantType::kFp4);
  return type == nf4::QuantType::kFp4 ? fp4_format : nf4_format;
}

// An empty asm the compiler cannot see through: keeps the product in `v`
// rounded to float32 before a following add even if fp contraction were
// enabled (the builder passes -ffp-contract=off too).
#ifdef KERAS_QLORA_X86
#define KQ_ROUNDED(v) asm("" : "+v"(v))
#else
#define KQ_ROUNDED(v) ((void)0)
#endif

// Where the blocks of a flat [N * K] array live.
struct Layout {
  const Format* fmt;
  const float* w;
  int64_t size;    // N * K
  int64_t blocks;  // ceil(size / bs)
  int bs;
  int64_t BlockLen(int64_t b) const {
    return std::min<int64_t>(bs, size - b * bs);
  }
};

// Copies `lanes` blocks from `first` into tr[j * lanes + lane], zero padded.
inline void TransposeScalar(const Layout& L, int64_t first, int lanes, float* tr) {
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t b = first + lane;
    const int64_t len = b < L.blocks ? L.BlockLen(b) : 0;
    for (int j = 0; j < L.bs; ++j)
      tr[j * lanes + lane] = j < len ? L.w[b * L.bs + j] : 0.0f;
  }
}

// bitsandbytes clamps a zero absmax of a partial last block to 1e-38.
inline void ClampTail(const Layout& L, int64_t first, int lanes, float* absmax) {
  const int64_t last = L.blocks - 1;
  if (L.size % L.bs == 0 || last < first || last >= first + lanes) return;
  float& a = absmax[last - first];
  if (a == 0.0f) a = kTiny;
}

#ifdef KERAS_QLORA_X86
// ---------------------------------------------------------------- AVX-512

#define KQ_Q_AVX512 __attribute__((target("avx512f")))
#define KQ_Q_AVX2 __attribute__((target("avx2,fma")))

// The bucket tables of a format (BucketTables) in registers.
struct Tables16 {
  __m512 bound_lo, bound_hi, bound2_lo, bound2_hi;
  __m512i base_lo, base_hi;
  bool two;
};

KQ_Q_AVX512 inline Tables16 LoadTables16(const Format& f) {
  const BucketTables& t = f.buckets;
  return Tables16{_mm512_loadu_ps(t.bound),  _mm512_loadu_ps(t.bound + 16),
                  _mm512_loadu_ps(t.bound2), _mm512_loadu_ps(t.bound2 + 16),
                  _mm512_loadu_si512(t.base), _mm512_loadu_si512(t.base + 16),
                  t.two};
}

// Sorted positions of 16 values (see BucketTables).
KQ_Q_AVX512 inline __m512i Index16(__m512 v, const Tables16& t) {
  const __m512 sixteen = _mm512_set1_ps(16.0f);
  __m512 u = _mm512_fmadd_ps(v, sixteen, sixteen);
  u = _mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()),
                    _mm512_set1_ps(31.0f));
  const __m512i bucket = _mm512_cvttps_epi32(u);
  const __m512 bound = _mm512_permutex2var_ps(t.bound_lo, bucket, t.bound_hi);
  const __m512i base = _mm512_permutex2var_epi32(t.base_lo, bucket, t.base_hi);
  const __mmask16 above = _mm512_cmp_ps_mask(bound, v, _CMP_LT_OQ);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i idx = _mm512_mask_add_epi32(base, above, base, one);
  if (!t.two) return idx;  // nf4: one midpoint per bucket
  const __m512 bound2 =
      _mm512_permutex2var_ps(t.bound2_lo, bucket, t.bound2_hi);
  const __mmask16 above2 = _mm512_cmp_ps_mask(bound2, v, _CMP_LT_OQ);
  return _mm512_mask_add_epi32(idx, above2, idx, one);
}

// tr[(j0 + c) * 16 + r] = src[r * stride + j0 + c] for r, c < 16.
KQ_Q_AVX512 inline void Transpose16x16(const float* src, int64_t stride,
                                     float* tr) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_store_ps(tr + i * 16, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    _mm512_store_ps(tr + (i + 8) * 16,
                    _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
  }
}

KQ_Q_AVX512 inline void ScalesAvx512(const Layout& L, int64_t g0, int64_t g1,
                            bool search, float* out) {
  constexpr int kLanes = 16;
  alignas(64) float tr[kMaxBlock * kLanes];
  alignas(64) float am_buf[kLanes];
  alignas(64) float best_buf[kLanes];
  const Tables16 tables = LoadTables16(*L.fmt);
  const __m512 codes = _mm512_load_ps(L.fmt->sorted);
  const __m512 tiny = _mm512_set1_ps(kTiny);
  const __m512 one = _mm512_set1_ps(1.0f);
  const int bs = L.bs;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t first = g * kLanes;
    if ((first + kLanes) * bs <= L.size) {
      for (int j = 0; j < bs; j += 16)
        Transpose16x16(L.w + first * bs + j, bs, tr + j * kLanes);
    } else {
      TransposeScalar(L, first, kLanes, tr);
    }
    __m512 am = _mm512_setzero_ps();
    for (int j = 0; j < bs; ++j)
      am = _mm512_max_ps(am, _mm512_abs_ps(_mm512_load_ps(tr + j * kLanes)));
    _mm512_store_ps(am_buf, am);
    ClampTail(L, first, kLanes, am_buf);
    am = _mm512_load_ps(am_buf);
    __m512 best = am;
    if (search) {
      __m512d best_lo = _mm512_set1_pd(INFINITY);
      __m512d best_hi = best_lo;
      for (int c = 0; c < kGridSize; ++c) {
        const __m512 s = _mm512_mul_ps(am, _mm512_set1_ps(kGrid[c]));
        const __mmask16 positive = _mm512_cmp_ps_mask(
            s, _mm512_setzero_ps(), _CMP_GT_OQ);
        // inv = 0 where s <= 0: every w * 0 lands on code 0, d = w.
        const __m512 inv = _mm512_maskz_div_ps(positive, one,
                                               _mm512_max_ps(s, tiny));
        __m512d acc_lo = _mm512_setzero_pd();
        __m512d acc_hi = _mm512_setzero_pd();
        for (int j = 0; j < bs; ++j) {
          const __m512 w = _mm512_load_ps(tr + j * kLanes);
          const __m512i idx = Index16(_mm512_mul_ps(w, inv), tables);
          __m512 q = _mm512_mul_ps(_mm512_permutexvar_ps(idx, codes), s);
          KQ_ROUNDED(q);
          const __m512 d = _mm512_sub_ps(w, q);
          const __m512d d_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
          const __m512d d_hi = _mm512_cvtps_pd(_mm256_castpd_ps(
              _mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
          // d * d is exact in float64, so the fused add rounds once, as
          // the reference's separate add does.
          acc_lo = _mm512_fmadd_pd(d_lo, d_lo, acc_lo);
          acc_hi = _mm512_fmadd_pd(d_hi, d_hi, acc_hi);
        }
        const __mmask8 b_lo = _mm512_cmp_pd_mask(acc_lo, best_lo, _CMP_LT_OQ);
        const __mmask8 b_hi = _mm512_cmp_pd_mask(acc_hi, best_hi, _CMP_LT_OQ);
        best_lo = _mm512_mask_mov_pd(best_lo, b_lo, acc_lo);
        best_hi = _mm512_mask_mov_pd(best_hi, b_hi, acc_hi);
        const __mmask16 better =
            static_cast<__mmask16>(b_lo | (static_cast<unsigned>(b_hi) << 8));
        best = _mm512_mask_mov_ps(best, better, s);
      }
    }
    _mm512_store_ps(best_buf, best);
    const int64_t count = std::min<int64_t>(kLanes, L.blocks - first);
    std::memcpy(out + first, best_buf, count * sizeof(float));
  }
}

// Codes of one full block (bs a multiple of 16, s > 0) into bs / 2 bytes.
KQ_Q_AVX512 inline void EncodeBlockAvx512(const Format& f, const float* w,
                                          int bs, float s, uint8_t* dst) {
  const Tables16 tables = LoadTables16(f);
  const __m512i code = _mm512_load_si512(f.code);
  const __m512 inv = _mm512_set1_ps(1.0f / std::max(s, kTiny));
  for (int j = 0; j < bs; j += 16) {
    const __m512i idx = _mm512_permutexvar_epi32(
        Index16(_mm512_mul_ps(_mm512_loadu_ps(w + j), inv), tables), code);
    // 64-bit lane = (odd << 32) | even; low byte -> (even << 4) | odd.
    const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(idx, 4),
                                         _mm512_srli_epi64(idx, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + j / 2),
                     _mm512_cvtepi64_epi8(pair));
  }
}

// ------------------------------------------------------------------- AVX2

KQ_Q_AVX2 inline __m256i Index8(__m256 v, const float* mids) {
  __m256i idx = _mm256_setzero_si256();
  for (int i = 0; i < 15; ++i) {
    const __m256 lt = _mm256_cmp_ps(_mm256_set1_ps(mids[i]), v, _CMP_LT_OQ);
    idx = _mm256_sub_epi32(idx, _mm256_castps_si256(lt));  // -(-1) = +1
  }
  return idx;
}

KQ_Q_AVX2 inline __m256 Code8(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 from_hi = _mm256_permutevar8x32_ps(hi, idx);
  // Bit 3 of the index, moved to the sign bit, picks the upper table.
  return _mm256_blendv_ps(from_lo, from_hi,
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

KQ_Q_AVX2 inline void ScalesAvx2(const Layout& L, int64_t g0, int64_t g1,
                        bool search, float* out) {
  constexpr int kLanes = 8;
  alignas(32) float tr[kMaxBlock * kLanes];
  alignas(32) float am_buf[kLanes];
  alignas(32) float best_buf[kLanes];
  const float* mids = L.fmt->mids;
  const __m256 code_lo = _mm256_load_ps(L.fmt->sorted);
  const __m256 code_hi = _mm256_load_ps(L.fmt->sorted + 8);
  const __m256 tiny = _mm256_set1_ps(kTiny);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int bs = L.bs;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t first = g * kLanes;
    TransposeScalar(L, first, kLanes, tr);
    __m256 am = zero;
    for (int j = 0; j < bs; ++j)
      am = _mm256_max_ps(
          am, _mm256_and_ps(_mm256_load_ps(tr + j * kLanes), abs_mask));
    _mm256_store_ps(am_buf, am);
    ClampTail(L, first, kLanes, am_buf);
    am = _mm256_load_ps(am_buf);
    __m256 best = am;
    if (search) {
      __m256d best_lo = _mm256_set1_pd(INFINITY);
      __m256d best_hi = best_lo;
      for (int c = 0; c < kGridSize; ++c) {
        const __m256 s = _mm256_mul_ps(am, _mm256_set1_ps(kGrid[c]));
        const __m256 positive = _mm256_cmp_ps(s, zero, _CMP_GT_OQ);
        const __m256 inv = _mm256_and_ps(
            positive, _mm256_div_ps(one, _mm256_max_ps(s, tiny)));
        __m256d acc_lo = _mm256_setzero_pd();
        __m256d acc_hi = _mm256_setzero_pd();
        for (int j = 0; j < bs; ++j) {
          const __m256 w = _mm256_load_ps(tr + j * kLanes);
          const __m256i idx = Index8(_mm256_mul_ps(w, inv), mids);
          __m256 q = _mm256_mul_ps(Code8(idx, code_lo, code_hi), s);
          KQ_ROUNDED(q);
          const __m256 d = _mm256_sub_ps(w, q);
          const __m256d d_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(d));
          const __m256d d_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
          acc_lo = _mm256_fmadd_pd(d_lo, d_lo, acc_lo);  // d * d exact
          acc_hi = _mm256_fmadd_pd(d_hi, d_hi, acc_hi);
        }
        const __m256d b_lo = _mm256_cmp_pd(acc_lo, best_lo, _CMP_LT_OQ);
        const __m256d b_hi = _mm256_cmp_pd(acc_hi, best_hi, _CMP_LT_OQ);
        best_lo = _mm256_blendv_pd(best_lo, acc_lo, b_lo);
        best_hi = _mm256_blendv_pd(best_hi, acc_hi, b_hi);
        // Two 4 x 64-bit masks -> one 8 x 32-bit mask, lanes in order.
        const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        const __m256i m_lo = _mm256_permutevar8x32_epi32(
            _mm256_castpd_si256(b_lo), perm);
        const __m256i m_hi = _mm256_permutevar8x32_epi32(
            _mm256_castpd_si256(b_hi), perm);
        const __m256 better =
            _mm256_castsi256_ps(_mm256_blend_epi32(m_lo, m_hi, 0xF0));
        best = _mm256_blendv_ps(best, s, better);
      }
    }
    _mm256_store_ps(best_buf, best);
    const int64_t count = std::min<int64_t>(kLanes, L.blocks - first);
    std::memcpy(out + first, best_buf, count * sizeof(float));
  }
}

KQ_Q_AVX2 inline void EncodeBlockAvx2(const Format& f, const float* w, int bs,
                                      float s, uint8_t* dst) {
  const float* mids = f.mids;
  const __m256 inv = _mm256_set1_ps(1.0f / std::max(s, kTiny));
  alignas(32) int32_t idx[8];
  for (int j = 0; j < bs; j += 8) {
    _mm256_store_si256(
        reinterpret_cast<__m256i*>(idx),
        Index8(_mm256_mul_ps(_mm256_loadu_ps(w + j), inv), mids));
    for (int i = 0; i < 8; i += 2)
      dst[(j + i) / 2] =
          static_cast<uint8_t>((f.code[idx[i]] << 4) | f.code[idx[i + 1]]);
  }
}
#endif  // KERAS_QLORA_X86

}  // namespace nf4_quantize
}  // namespace keras_qlora

#endif  // KERAS_QLORA_CUSTOM_OPS_KERNELS_NF4_QUANTIZE_SIMD_H_
