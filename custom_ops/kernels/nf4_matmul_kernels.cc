// CPU kernel of KerasQLoRA>NF4Matmul: y = x @ W, or x @ W^T with
// `transpose`, where W^T ([N, K]) is stored as NF4 (see nf4_common.h).
//
// Two paths, both accumulating in float32 and never materializing W:
// - small M (GEMV): each thread decodes rows of W^T into an L1-sized buffer
//   and takes dot products (forward) or axpys (transpose) for all M rows, so
//   every weight byte is read once;
// - large M (GEMM): each thread decodes tiles of W^T into a thread-local
//   buffer and runs a register-blocked micro-kernel over packed panels of x.
// The SIMD paths (AVX2, AVX-512) are chosen at run time; KERAS_QLORA_CPU_ISA
// = auto|scalar|avx2|avx512 forces one (read once per process).
//
// With SIMD and K % 32 == 0, rows of W^T are decoded in "chunk order": in
// every 32-element chunk, the 16 even elements (high nibbles) come first,
// then the 16 odd ones. x (forward) and y (transpose) are permuted to match,
// which avoids interleaving nibbles in registers. Otherwise rows are decoded
// in natural order by the scalar decoder.

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>

#include "nf4_common.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/logging.h"

namespace keras_qlora {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
using nf4::kNf4Code;

constexpr int64_t kChunk = 32;          // elements per decoded SIMD chunk
constexpr int64_t kMaxGemvRows = 12;    // M up to this uses the GEMV path
constexpr int64_t kGemvColTile = 2048;  // transpose GEMV: max columns/task
constexpr int64_t kGemmOutTile = 96;    // GEMM: outputs per tile (12 | 32)
constexpr int64_t kGemmRedBlock = 256;  // GEMM: reduction block (L1/L2)
constexpr int64_t kGemmRowChunk = 512;  // GEMM: rows of x per task
constexpr int64_t kPrefetch = 1024;     // bytes of packed codes read ahead

// ---------------------------------------------------------------- buffers

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

// A 64-byte aligned float buffer, zero-filled.
FloatBuffer ZeroBuffer(int64_t count) {
  const size_t bytes = ((std::max<int64_t>(count, 1) * 4 + 63) / 64) * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return FloatBuffer(p);
}

// Source index (within its 32-aligned chunk) of chunk-order position i.
inline int64_t ChunkSource(int64_t i) {
  const int64_t j = i & (kChunk - 1);
  return (i - j) + (j < 16 ? 2 * j : 2 * (j - 16) + 1);
}

// ---------------------------------------------------------------- problem

struct Problem {
  const uint8_t* packed;
  nf4::BlockScales scales;
  int64_t k;         // columns of W^T
  int block_shift;   // log2(block_size)
  bool chunk_order;  // rows decode in chunk order (SIMD and k % 32 == 0)
};

// Decodes W^T[row, col0 : col0 + len] in natural order (any alignment).
void DecodeNatural(const Problem& p, int64_t row, int64_t col0, int64_t len,
                   float* out) {
  int64_t i = row * p.k + col0;
  const int64_t end = i + len;
  while (i < end) {
    const int64_t block = i >> p.block_shift;
    const int64_t stop = std::min(end, (block + 1) << p.block_shift);
    const float scale = p.scales(block);
    for (; i < stop; ++i) *out++ = kNf4Code[nf4::CodeAt(p.packed, i)] * scale;
  }
}

// Kernels of one instruction set. `decode` writes a row segment in chunk
// order when p.chunk_order; `micro` adds a (mr x mp) tile of
// A (mr x len) @ Xp (len x mp) into ct (row stride ldc), where A(i, q) is
// a[i * ld + q] (a_rows) or a[q * ld + i].
struct IsaKernels {
  const char* name;
  void (*decode)(const Problem&, int64_t, int64_t, int64_t, float*);
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy4)(float*, const float* const*, const float*, int64_t);
  void (*micro)(const float*, int64_t, bool, const float*, int64_t, float*,
                int64_t);
  // Optional, chunk order only: y[i * ldy] = xc[i] . W^T[row] for i < m,
  // decoding in registers (nullptr: decode + dot).
  void (*fused_rows)(const Problem&, int64_t, const float*, int64_t, float*,
                     int64_t);
  int64_t mr;  // output rows per micro tile
  int64_t mp;  // x rows per packed panel
};

// ---------------------------------------------------------------- scalar

float DotScalar(const float* a, const float* b, int64_t len) {
  float s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= len; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < len; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void Axpy4Scalar(float* acc, const float* const* w, const float* c,
                 int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    float t = acc[i];
    for (int j = 0; j < 4; ++j) t += c[j] * w[j][i];
    acc[i] = t;
  }
}

void MicroScalar(const float* a, int64_t ld, bool a_rows, const float* xp,
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

constexpr IsaKernels kScalarKernels = {
    "scalar", DecodeNatural, DotScalar, Axpy4Scalar, MicroScalar, nullptr,
    4, 8};

// ---------------------------------------------------------------- AVX2

#define KQ_AVX2 __attribute__((target("avx2,fma")))

// NF4 values of the 4-bit codes in the low bits of `idx` (higher bits of
// each lane other than bit 3 are ignored).
KQ_AVX2 inline __m256 LookupAvx2(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  // blendv picks by the sign bit: move code bit 3 there.
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

KQ_AVX2 void DecodeAvx2(const Problem& p, int64_t row, int64_t col0,
                        int64_t len, float* out) {
  if (!p.chunk_order) return DecodeNatural(p, row, col0, len, out);
  const __m256 lo = _mm256_load_ps(kNf4Code);
  const __m256 hi = _mm256_load_ps(kNf4Code + 8);
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

KQ_AVX2 inline float HsumAvx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

KQ_AVX2 float DotAvx2(const float* a, const float* b, int64_t len) {
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

KQ_AVX2 void Axpy4Avx2(float* acc, const float* const* w, const float* c,
                       int64_t len) {
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

KQ_AVX2 void MicroAvx2(const float* a, int64_t ld, bool a_rows,
                       const float* xp, int64_t len, float* ct, int64_t ldc) {
  if (a_rows) return MicroAvx2T<true>(a, ld, xp, len, ct, ldc);
  MicroAvx2T<false>(a, ld, xp, len, ct, ldc);
}

constexpr IsaKernels kAvx2Kernels = {
    "avx2", DecodeAvx2, DotAvx2, Axpy4Avx2, MicroAvx2, nullptr, 6, 16};

// ---------------------------------------------------------------- AVX-512

#define KQ_AVX512 __attribute__((target("avx512f,avx2,fma")))

KQ_AVX512 void DecodeAvx512(const Problem& p, int64_t row, int64_t col0,
                            int64_t len, float* out) {
  if (!p.chunk_order) return DecodeNatural(p, row, col0, len, out);
  const __m512 table = _mm512_load_ps(kNf4Code);
  const int64_t start = row * p.k + col0;
  const uint8_t* bytes = p.packed + start / 2;
  const nf4::BlockScales scales = p.scales;
  const int shift = p.block_shift;
  for (int64_t c = 0; c < len; c += kChunk) {
    const __m512 s = _mm512_set1_ps(scales((start + c) >> shift));
    _mm_prefetch(reinterpret_cast<const char*>(bytes + c / 2) + kPrefetch,
                 _MM_HINT_T0);
    // 16 bytes -> 16 lanes; permutexvar only reads the low 4 bits.
    const __m512i v = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2)));
    const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    const __m512 odd = _mm512_permutexvar_ps(v, table);
    _mm512_storeu_ps(out + c, _mm512_mul_ps(even, s));
    _mm512_storeu_ps(out + c + 16, _mm512_mul_ps(odd, s));
  }
}

KQ_AVX512 float DotAvx512(const float* a, const float* b, int64_t len) {
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

KQ_AVX512 void Axpy4Avx512(float* acc, const float* const* w, const float* c,
                           int64_t len) {
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

KQ_AVX512 void MicroAvx512(const float* a, int64_t ld, bool a_rows,
                           const float* xp, int64_t len, float* ct,
                           int64_t ldc) {
  if (a_rows) return MicroAvx512T<true>(a, ld, xp, len, ct, ldc);
  MicroAvx512T<false>(a, ld, xp, len, ct, ldc);
}

// Dot products of MR rows of xc (row stride k) with row `row` of W^T,
// decoded in registers and never stored.
template <int MR>
KQ_AVX512 inline void FusedRowsAvx512T(const Problem& p, int64_t row,
                                       const float* xc, float* out) {
  const __m512 table = _mm512_load_ps(kNf4Code);
  const int64_t k = p.k, start = row * k;
  const uint8_t* bytes = p.packed + start / 2;
  const nf4::BlockScales scales = p.scales;
  const int shift = p.block_shift;
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += kChunk) {
    const __m512 s = _mm512_set1_ps(scales((start + c) >> shift));
    _mm_prefetch(reinterpret_cast<const char*>(bytes + c / 2) + kPrefetch,
                 _MM_HINT_T0);
    const __m512i v = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + c / 2)));
    const __m512 even = _mm512_mul_ps(
        _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), s);
    const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(v, table), s);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xc + i * k + c), even,
                                  acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xc + i * k + c + 16), odd,
                                  acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i)
    out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

KQ_AVX512 void FusedRowsAvx512(const Problem& p, int64_t row, const float* xc,
                               int64_t m, float* y, int64_t ldy) {
  float r[8];
  for (int64_t i = 0; i < m; i += 8) {
    const int64_t count = std::min<int64_t>(8, m - i);
    const float* xi = xc + i * p.k;
    switch (count) {
      case 8: FusedRowsAvx512T<8>(p, row, xi, r); break;
      case 7: FusedRowsAvx512T<7>(p, row, xi, r); break;
      case 6: FusedRowsAvx512T<6>(p, row, xi, r); break;
      case 5: FusedRowsAvx512T<5>(p, row, xi, r); break;
      case 4: FusedRowsAvx512T<4>(p, row, xi, r); break;
      case 3: FusedRowsAvx512T<3>(p, row, xi, r); break;
      case 2: FusedRowsAvx512T<2>(p, row, xi, r); break;
      default: FusedRowsAvx512T<1>(p, row, xi, r); break;
    }
    for (int64_t j = 0; j < count; ++j) y[(i + j) * ldy] = r[j];
  }
}

constexpr IsaKernels kAvx512Kernels = {
    "avx512", DecodeAvx512, DotAvx512, Axpy4Avx512, MicroAvx512,
    FusedRowsAvx512, 12, 32};

// ---------------------------------------------------------------- dispatch

struct IsaChoice {
  const IsaKernels* kernels = nullptr;
  std::string error;  // non-empty: KERAS_QLORA_CPU_ISA is invalid
};

IsaChoice ResolveIsa() {
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  const IsaKernels* best =
      avx512 ? &kAvx512Kernels : (avx2 ? &kAvx2Kernels : &kScalarKernels);
  const char* env = std::getenv("KERAS_QLORA_CPU_ISA");
  const std::string want = env == nullptr ? "" : env;
  IsaChoice choice;
  if (want.empty() || want == "auto") {
    choice.kernels = best;
  } else if (want == "scalar") {
    choice.kernels = &kScalarKernels;
  } else if (want == "avx2") {
    choice.kernels = avx2 ? &kAvx2Kernels : &kScalarKernels;
  } else if (want == "avx512") {
    choice.kernels = best;
  } else {
    choice.error = "KERAS_QLORA_CPU_ISA must be one of auto, scalar, avx2, "
                   "avx512. Received: KERAS_QLORA_CPU_ISA=" + want;
    return choice;
  }
  if (!want.empty() && want != "auto" && want != choice.kernels->name) {
    LOG(WARNING) << "KERAS_QLORA_CPU_ISA=" << want << " is not supported by "
                 << "this CPU; using " << choice.kernels->name;
  }
  VLOG(1) << "KerasQLoRA>NF4Matmul CPU kernels: " << choice.kernels->name;
  return choice;
}

const IsaChoice& GetIsa() {
  static const IsaChoice choice = ResolveIsa();
  return choice;
}

// ---------------------------------------------------------------- drivers

using Pool = ::tensorflow::thread::ThreadPool;

// y (M x N) = xc (M x K, chunk order if p.chunk_order) @ W.
void GemvForward(const IsaKernels& isa, const Problem& p, Pool* pool,
                 const float* xc, int64_t m, int64_t n, float* y) {
  const int64_t k = p.k;
  pool->ParallelFor(n, k * (m + 2), [&](int64_t begin, int64_t end) {
    if (isa.fused_rows != nullptr && p.chunk_order) {
      for (int64_t j = begin; j < end; ++j) isa.fused_rows(p, j, xc, m, y + j, n);
      return;
    }
    FloatBuffer row = ZeroBuffer(k);
    for (int64_t j = begin; j < end; ++j) {
      isa.decode(p, j, 0, k, row.get());
      for (int64_t i = 0; i < m; ++i) y[i * n + j] = isa.dot(xc + i * k, row.get(), k);
    }
  });
}

// y (M x K) = x (M x N) @ W^T, parallel over column tiles of W^T.
void GemvTranspose(const IsaKernels& isa, const Problem& p, Pool* pool,
                   const float* x, int64_t m, int64_t n, float* y) {
  const int64_t k = p.k;
  // Long row segments keep the strided reads of W^T prefetch-friendly; one
  // tile per thread when K is small.
  const int64_t threads = std::max(1, pool->NumThreads());
  const int64_t tile = std::max<int64_t>(
      kChunk, std::min(kGemvColTile,
                       nf4::CeilDiv(nf4::CeilDiv(k, threads), kChunk) * kChunk));
  const int64_t tiles = nf4::CeilDiv(k, tile);
  pool->ParallelFor(tiles, tile * n * (m + 2), [&](int64_t begin,
                                                   int64_t end) {
    FloatBuffer acc = ZeroBuffer(m * tile);
    FloatBuffer rows = ZeroBuffer(4 * tile);
    const float* w[4];
    for (int r = 0; r < 4; ++r) w[r] = rows.get() + r * tile;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile;
      const int64_t len = std::min(tile, k - c0);
      std::fill(acc.get(), acc.get() + m * tile, 0.0f);
      for (int64_t j = 0; j < n; j += 4) {
        const int64_t count = std::min<int64_t>(4, n - j);
        for (int64_t r = 0; r < count; ++r)
          isa.decode(p, j + r, c0, len, rows.get() + r * tile);
        for (int64_t r = count; r < 4; ++r)  // 0 * stale could be NaN
          std::fill(rows.get() + r * tile,
                    rows.get() + (r + 1) * tile, 0.0f);
        for (int64_t i = 0; i < m; ++i) {
          float c[4] = {0, 0, 0, 0};
          for (int64_t r = 0; r < count; ++r) c[r] = x[i * n + j + r];
          isa.axpy4(acc.get() + i * tile, w, c, len);
        }
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t q = 0; q < len; ++q)
          y[i * k + c0 + (p.chunk_order ? ChunkSource(q) : q)] =
              acc[i * tile + q];
    }
  });
}

// Packs x (M x R) into panels of isa.mp rows: xp[(panel * R + r) * mp + j]
// = x[panel * mp + j, src(r)], zero past M; src is chunk order if asked.
template <typename T>
void PackPanels(const T* x, int64_t m, int64_t r_dim, int64_t mp,
                bool chunk_order, float* xp) {
  const int64_t panels = nf4::CeilDiv(m, mp);
  for (int64_t pan = 0; pan < panels; ++pan) {
    const int64_t rows = std::min(mp, m - pan * mp);
    float* dst = xp + pan * r_dim * mp;
    for (int64_t j = 0; j < rows; ++j) {
      const T* src = x + (pan * mp + j) * r_dim;
      for (int64_t r = 0; r < r_dim; ++r)
        dst[r * mp + j] =
            static_cast<float>(src[chunk_order ? ChunkSource(r) : r]);
    }
  }
}

// y (M x O) from packed x panels; O = N (forward) or K (transpose). Tasks
// are (output tile, row chunk) pairs; each decodes its tile of W^T block by
// block along the reduction axis R into a thread-local buffer.
void Gemm(const IsaKernels& isa, const Problem& p, Pool* pool,
          const float* xp, int64_t m, int64_t o_dim, int64_t r_dim,
          bool transpose, float* y) {
  const int64_t mp = isa.mp, mr = isa.mr;
  const int64_t panels = nf4::CeilDiv(m, mp);
  const int64_t chunk_panels = std::max<int64_t>(1, kGemmRowChunk / mp);
  const int64_t row_chunks = nf4::CeilDiv(panels, chunk_panels);
  const int64_t o_tiles = nf4::CeilDiv(o_dim, kGemmOutTile);
  const int64_t cost = kGemmOutTile * r_dim * chunk_panels * mp * 2;
  pool->ParallelFor(o_tiles * row_chunks, cost, [&](int64_t begin,
                                                    int64_t end) {
    const int64_t ldc = chunk_panels * mp;
    FloatBuffer ct = ZeroBuffer(kGemmOutTile * ldc);
    FloatBuffer wt = ZeroBuffer(kGemmOutTile * kGemmRedBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = (task / row_chunks) * kGemmOutTile;
      const int64_t p0 = (task % row_chunks) * chunk_panels;
      const int64_t p1 = std::min(panels, p0 + chunk_panels);
      const int64_t olen = std::min(kGemmOutTile, o_dim - o0);
      const int64_t opad = nf4::CeilDiv(olen, mr) * mr;
      std::fill(ct.get(), ct.get() + kGemmOutTile * ldc, 0.0f);
      std::fill(wt.get(), wt.get() + kGemmOutTile * kGemmRedBlock, 0.0f);
      for (int64_t r0 = 0; r0 < r_dim; r0 += kGemmRedBlock) {
        const int64_t rlen = std::min(kGemmRedBlock, r_dim - r0);
        // Forward: wt[o][r] = W^T[o0 + o, r0 + r] (ld kGemmRedBlock).
        // Transpose: wt[r][o] = W^T[r0 + r, o0 + o] (ld opad).
        const int64_t ld = transpose ? opad : kGemmRedBlock;
        if (transpose) {
          for (int64_t r = 0; r < rlen; ++r)
            isa.decode(p, r0 + r, o0, olen, wt.get() + r * ld);
        } else {
          for (int64_t o = 0; o < olen; ++o)
            isa.decode(p, o0 + o, r0, rlen, wt.get() + o * ld);
        }
        for (int64_t pan = p0; pan < p1; ++pan) {
          const float* xpan = xp + (pan * r_dim + r0) * mp;
          for (int64_t g = 0; g < opad; g += mr) {
            const float* a = wt.get() + (transpose ? g : g * ld);
            isa.micro(a, ld, !transpose, xpan, rlen,
                      ct.get() + g * ldc + (pan - p0) * mp, ldc);
          }
        }
      }
      const int64_t m0 = p0 * mp, m1 = std::min(m, p1 * mp);
      for (int64_t o = 0; o < olen; ++o) {
        const int64_t col =
            o0 + (transpose && p.chunk_order ? ChunkSource(o) : o);
        for (int64_t i = m0; i < m1; ++i)
          y[i * o_dim + col] = ct[o * ldc + (i - m0)];
      }
    }
  });
}

// ---------------------------------------------------------------- op

template <typename T>
void ToFloat(const T* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T, typename AbsT>
class Nf4MatmulOp : public OpKernel {
 public:
  explicit Nf4MatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("k", &k_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("n", &n_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose", &transpose_));
    OP_REQUIRES(ctx, k_ >= 1 && n_ >= 1,
                InvalidArgument("NF4Matmul: k and n must be >= 1. Received: "
                                "k=", k_, ", n=", n_));
    OP_REQUIRES(ctx, nf4::IsAllowedBlockSize(block_size_),
                InvalidArgument("NF4Matmul: block_size must be one of (32, "
                                "64, 128, 256). Received: block_size=",
                                block_size_));
    OP_REQUIRES(ctx, nf4::CheckedMul(k_, n_, &count_),
                InvalidArgument("NF4Matmul: k * n overflows int64. Received: "
                                "k=", k_, ", n=", n_));
    const IsaChoice& isa = GetIsa();
    OP_REQUIRES(ctx, isa.error.empty(), InvalidArgument(isa.error));
    isa_ = isa.kernels;
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const int64_t in_dim = transpose_ ? n_ : k_;
    const int64_t out_dim = transpose_ ? k_ : n_;
    OP_REQUIRES(ctx, x.dims() >= 2,
                InvalidArgument("NF4Matmul: x must have rank >= 2. Received "
                                "shape ", x.shape().DebugString()));
    OP_REQUIRES(ctx, x.dim_size(x.dims() - 1) == in_dim,
                InvalidArgument("NF4Matmul: the last axis of x must be ",
                                transpose_ ? "n" : "k", "=", in_dim,
                                ". Received shape ", x.shape().DebugString()));
    OP_REQUIRES_OK(ctx, ValidateState(ctx));
    TensorShape out_shape = x.shape();
    out_shape.set_dim(x.dims() - 1, out_dim);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &y));
    const int64_t m = x.NumElements() / in_dim;
    if (m == 0) return;

    Problem p = MakeProblem(ctx);
    p.chunk_order = isa_ != &kScalarKernels && k_ % kChunk == 0;
    Pool* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const T* xd = x.flat<T>().data();
    const bool float_out = std::is_same<T, float>::value;
    Tensor y32;
    if (!float_out) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({m * out_dim}), &y32));
    }
    float* yf = float_out ? reinterpret_cast<float*>(y->flat<T>().data())
                          : y32.flat<float>().data();
    Tensor tmp;
    if (m <= kMaxGemvRows) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({m * in_dim}), &tmp));
      float* xf = tmp.flat<float>().data();
      if (transpose_) {
        ToFloat(xd, m * in_dim, xf);
        GemvTranspose(*isa_, p, pool, xf, m, n_, yf);
      } else {
        for (int64_t i = 0; i < m * k_; ++i)
          xf[i] = static_cast<float>(
              xd[p.chunk_order ? (i - i % k_) + ChunkSource(i % k_) : i]);
        GemvForward(*isa_, p, pool, xf, m, n_, yf);
      }
    } else {
      const int64_t mpad = nf4::CeilDiv(m, isa_->mp) * isa_->mp;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                              tensorflow::DT_FLOAT,
                              TensorShape({mpad * in_dim}), &tmp));
      float* xp = tmp.flat<float>().data();
      std::fill(xp, xp + mpad * in_dim, 0.0f);
      PackPanels(xd, m, in_dim, isa_->mp, p.chunk_order && !transpose_, xp);
      Gemm(*isa_, p, pool, xp, m, out_dim, in_dim, transpose_, yf);
    }
    if (!float_out) {
      T* yd = y->flat<T>().data();
      for (int64_t i = 0; i < m * out_dim; ++i) yd[i] = static_cast<T>(yf[i]);
    }
  }

 private:
  // Every buffer must have exactly the size the attributes imply, so that
  // no kernel can read past its end.
  ::tensorflow::Status ValidateState(OpKernelContext* ctx) const {
    const Tensor& packed = ctx->input(1);
    const Tensor& absmax = ctx->input(2);
    const int64_t blocks = nf4::NumBlocks(count_, block_size_);
    if (packed.dims() != 1 || packed.NumElements() != nf4::PackedBytes(count_))
      return InvalidArgument(
          "NF4Matmul: packed must be 1-D with ceil(k * n / 2) = ",
          nf4::PackedBytes(count_), " bytes for k=", k_, ", n=", n_,
          ". Received shape ", packed.shape().DebugString());
    if (absmax.dims() != 1 || absmax.NumElements() != blocks)
      return InvalidArgument(
          "NF4Matmul: absmax must be 1-D with ceil(k * n / block_size) = ",
          blocks, " entries for k=", k_, ", n=", n_, ", block_size=",
          block_size_, ". Received shape ", absmax.shape().DebugString());
    if (!std::is_same<AbsT, uint8_t>::value) return ::tensorflow::Status();
    const Tensor& scale = ctx->input(3);
    const Tensor& offset = ctx->input(4);
    const int64_t nested = nf4::NumNestedBlocks(blocks);
    if (scale.dims() != 1 || scale.NumElements() != nested)
      return InvalidArgument(
          "NF4Matmul: with uint8 absmax (double quantization), absmax_scale "
          "must be 1-D with ceil(blocks / 256) = ", nested, " entries. "
          "Received shape ", scale.shape().DebugString());
    if (offset.dims() != 0)
      return InvalidArgument(
          "NF4Matmul: absmax_offset must be a scalar. Received shape ",
          offset.shape().DebugString());
    return ::tensorflow::Status();
  }

  Problem MakeProblem(OpKernelContext* ctx) const {
    Problem p;
    p.packed = ctx->input(1).flat<uint8_t>().data();
    p.k = k_;
    p.block_shift = __builtin_ctzll(static_cast<uint64_t>(block_size_));
    p.chunk_order = false;
    const AbsT* absmax = ctx->input(2).flat<AbsT>().data();
    if (std::is_same<AbsT, uint8_t>::value) {
      p.scales.absmax_u8 = reinterpret_cast<const uint8_t*>(absmax);
      p.scales.nested_scale = ctx->input(3).flat<float>().data();
      p.scales.offset = ctx->input(4).scalar<float>()();
    } else {
      p.scales.absmax_f32 = reinterpret_cast<const float*>(absmax);
    }
    return p;
  }

  int64_t k_ = 0, n_ = 0, block_size_ = 0, count_ = 0;
  bool transpose_ = false;
  const IsaKernels* isa_ = nullptr;
};

#define KQ_REGISTER(T, AbsT)                                       \
  REGISTER_KERNEL_BUILDER(Name("KerasQLoRA>NF4Matmul")             \
                              .Device(::tensorflow::DEVICE_CPU)    \
                              .TypeConstraint<T>("T")              \
                              .TypeConstraint<AbsT>("absmax_type"), \
                          Nf4MatmulOp<T, AbsT>)

KQ_REGISTER(float, float);
KQ_REGISTER(float, uint8_t);
KQ_REGISTER(::tensorflow::bfloat16, float);
KQ_REGISTER(::tensorflow::bfloat16, uint8_t);
KQ_REGISTER(Eigen::half, float);
KQ_REGISTER(Eigen::half, uint8_t);

}  // namespace
}  // namespace keras_qlora
