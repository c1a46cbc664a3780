// The CPU stand-in for CUDA declared in cuda_sim.h: grids of OS threads,
// block and warp barriers with deadlock detection, warp shuffles, mma.sync
// and the few runtime calls the launcher makes.
//
// Settings (environment):
//   KQ_SIM_SM_COUNT   multiprocessors reported to the planner (4; read once)
//   KQ_SIM_REVERSE    1: run the blocks of a grid (and, with fibers, the
//                     threads of a block) in reverse order (read per launch)
//   KQ_SIM_TIMEOUT_S  OS-thread engine: seconds a barrier waits before it
//                     reports a deadlock and aborts (300)

#include "cuda_sim.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"

namespace kqsim {

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

void Die(const std::string& message) {
  std::fprintf(stderr, "kqsim: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

namespace {

// The exchange slots of one warp-collective operation.
struct WarpSlots {
  int op[32];
  unsigned mask[32];
  int arg[32];
  float f[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};

// Two sets of slots, used by alternate operations: a lane can write the
// slots of operation i + 2 only after every lane has reached operation
// i + 1, that is after every lane has read those of operation i, so one
// barrier per operation suffices.
struct Warp {
  explicit Warp(const std::string& what) : barrier(32, what) {}
  Barrier barrier;
  WarpSlots slots[2];
};

struct Block {
  explicit Block(int threads) : sync(threads, "a block") {
    for (int w = 0; w < threads / 32; ++w)
      warps.push_back(
          std::make_unique<Warp>("warp " + std::to_string(w) + " of a block"));
  }
  Barrier sync;  // __syncthreads
  std::vector<std::unique_ptr<Warp>> warps;
};

thread_local cudaError_t t_last_error = cudaSuccess;

Block& CurrentBlock() {
  if (Self().block == nullptr) Die("a device function ran outside a kernel");
  return *static_cast<Block*>(Self().block);
}

int Lane() { return static_cast<int>(Self().thread_idx.x & 31u); }

Warp& CurrentWarp() { return *CurrentBlock().warps[Self().thread_idx.x >> 5]; }

enum Op { kShuffle = 1, kMmaTf32, kMmaBf16, kMmaF16 };

// This lane's slots for its next warp operation (filled by the caller).
WarpSlots& WarpBegin(Warp& w, int op, unsigned mask, int arg) {
  WarpSlots& s = w.slots[Self().warp_ops++ & 1];
  const int lane = Lane();
  s.op[lane] = op;
  s.mask[lane] = mask;
  s.arg[lane] = arg;
  return s;
}

// Waits for the 32 lanes, then checks that all did the same operation with
// the same mask and argument.
void WarpExchange(Warp& w, const WarpSlots& s, const char* what) {
  w.barrier.Wait(what);
  const int lane = Lane();
  for (int l = 0; l < 32; ++l) {
    if (s.op[l] != s.op[lane] || s.mask[l] != s.mask[lane] ||
        s.arg[l] != s.arg[lane])
      Die(std::string("lanes of a warp disagree at ") + what + " (lane " +
          std::to_string(l) + ": op " + std::to_string(s.op[l]) + ", mask " +
          std::to_string(s.mask[l]) + ", arg " + std::to_string(s.arg[l]) +
          "; lane " + std::to_string(lane) + ": op " +
          std::to_string(s.op[lane]) + ")");
  }
}

// ---------------------------------------------------------------- mma

// The value of one operand element (tensor cores read TF32 as the top 19
// bits of a float32 register).
float Element(MmaShape shape, uint32_t reg, int half) {
  if (shape == MmaShape::kM16N8K8Tf32) return BitsFloat(reg & 0xFFFFE000u);
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg);
  if (shape == MmaShape::kM16N8K16Bf16) return BitsFloat(uint32_t{bits} << 16);
  return HalfBitsToFloat(bits);
}

// A[16][K] and B[K][8] of the warp from its lanes' fragments, following the
// PTX ISA tables "Matrix Fragments for mma.m16n8k16 with floating point
// type" and "... for mma.m16n8k8 with .tf32": groupID = lane / 4,
// threadID_in_group = lane % 4.
void Gather(MmaShape shape, const WarpSlots& s, double a[16][16],
            double b[16][8]) {
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane / 4, tig = lane % 4;
    if (shape == MmaShape::kM16N8K8Tf32) {
      // a0: (g, t), a1: (g + 8, t), a2: (g, t + 4), a3: (g + 8, t + 4);
      // b0: (k = t, n = g), b1: (k = t + 4, n = g).
      a[group][tig] = Element(shape, s.a[lane][0], 0);
      a[group + 8][tig] = Element(shape, s.a[lane][1], 0);
      a[group][tig + 4] = Element(shape, s.a[lane][2], 0);
      a[group + 8][tig + 4] = Element(shape, s.a[lane][3], 0);
      b[tig][group] = Element(shape, s.b[lane][0], 0);
      b[tig + 4][group] = Element(shape, s.b[lane][1], 0);
      continue;
    }
    // Elements a0..a7 in four registers (two per register, the lower index
    // in the low half): rows g for a0, a1, a4, a5 and g + 8 for the rest;
    // columns 2t + (i & 1), plus 8 for a4..a7. b0..b3: k = 2t + (i & 1),
    // plus 8 for b2, b3; n = g.
    for (int i = 0; i < 8; ++i) {
      const int row = group + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
      const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = Element(shape, s.a[lane][i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {
      const int k = 2 * tig + (i & 1) + (i >= 2 ? 8 : 0);
      b[k][group] = Element(shape, s.b[lane][i / 2], i & 1);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- public

void SetLastError(cudaError_t error) { t_last_error = error; }

uint16_t FloatToHalfBits(float v) {
  const uint32_t b = FloatBits(v);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t mag = b & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return sign | 0x7FFFu;  // NaN
  if (mag >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65536: inf
  const int exp = static_cast<int>(mag >> 23) - 127;
  if (exp >= -14) {  // normal half
    uint32_t m = mag & 0x7FFFFFu;
    uint32_t h = (static_cast<uint32_t>(exp + 15) << 10) | (m >> 13);
    const uint32_t rest = m & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  // Subnormal half: the value in units of 2^-24, rounded to nearest even.
  if (exp < -25) return sign;
  const uint32_t m = (mag & 0x7FFFFFu) | 0x800000u;  // 24-bit significand
  const int shift = -exp - 1;  // 2^exp * m / 2^23 in units of 2^-24
  const uint32_t q = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t half_ulp = 1u << (shift - 1);
  uint32_t h = q;
  if (rest > half_ulp || (rest == half_ulp && (q & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const int exp = (h >> 10) & 31;
  const uint32_t m = h & 0x3FFu;
  if (exp == 31) return BitsFloat(sign | 0x7F800000u | (m << 13));
  if (exp == 0) {  // zero or subnormal: m * 2^-24, exact in float32
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  return BitsFloat(sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) |
                   (m << 13));
}

uint32_t CvtRnaTf32(float v) {
  const uint32_t b = FloatBits(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFFFFFu;  // NaN
  // Adding half an ulp of the 10-bit mantissa to the magnitude rounds ties
  // away from zero; a carry into the exponent is the correct result.
  return (b + 0x1000u) & 0xFFFFE000u;
}

void SyncThreads() { CurrentBlock().sync.Wait("__syncthreads"); }

float ShuffleXor(unsigned mask, float v, int lane_mask) {
  if (mask != 0xFFFFFFFFu)
    Die("__shfl_xor_sync with a partial mask is not simulated");
  Warp& w = CurrentWarp();
  WarpSlots& s = WarpBegin(w, kShuffle, mask, lane_mask);
  s.f[Lane()] = v;
  WarpExchange(w, s, "__shfl_xor_sync");
  return s.f[(Lane() ^ lane_mask) & 31];
}

void Mma(MmaShape shape, float c[4], const uint32_t a[4], const uint32_t b[2]) {
  Warp& w = CurrentWarp();
  const int op = shape == MmaShape::kM16N8K8Tf32    ? kMmaTf32
                 : shape == MmaShape::kM16N8K16Bf16 ? kMmaBf16
                                                    : kMmaF16;
  WarpSlots& s = WarpBegin(w, op, 0xFFFFFFFFu, 0);
  const int lane = Lane();
  for (int r = 0; r < 4; ++r) s.a[lane][r] = a[r];
  for (int r = 0; r < 2; ++r) s.b[lane][r] = b[r];
  WarpExchange(w, s, "mma.sync");
  double fa[16][16] = {}, fb[16][8] = {};
  Gather(shape, s, fa, fb);
  const int kdim = shape == MmaShape::kM16N8K8Tf32 ? 8 : 16;
  // D = A B + C with exact products, summed in double, rounded once.
  // c0, c1: row g, columns 2t, 2t + 1; c2, c3: row g + 8.
  const int group = lane / 4, tig = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = group + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
    double sum = c[i];
    for (int k = 0; k < kdim; ++k) sum += fa[row][k] * fb[k][col];
    c[i] = static_cast<float>(sum);
  }
}

int RunGrid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  const int threads = static_cast<int>(block.x);
  if (blocks < 1 || grid.x > 0x7FFFFFFFu || grid.y > 65535u ||
      grid.z > 65535u || block.y != 1 || block.z != 1 || threads < 32 ||
      threads > 1024 || threads % 32 != 0)
    return cudaErrorInvalidConfiguration;
  Block shared(threads);
  RunBlocks(threads, blocks, EnvInt("KQ_SIM_REVERSE", 0) != 0,
            [&](int thread, int64_t id) {
              ThreadState& self = Self();
              self.thread_idx = uint3{static_cast<unsigned>(thread), 0, 0};
              self.block_idx =
                  uint3{static_cast<unsigned>(id % grid.x),
                        static_cast<unsigned>(id / grid.x % grid.y),
                        static_cast<unsigned>(id / grid.x / grid.y)};
              self.block_dim = block;
              self.grid_dim = grid;
              self.block = &shared;
              self.warp_ops = 0;
              body();
              self.block = nullptr;
            });
  return cudaSuccess;
}

}  // namespace kqsim

// ---------------------------------------------------------------- runtime

cudaError_t cudaGetLastError() {
  const cudaError_t e = kqsim::t_last_error;
  kqsim::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaStreamGetDevice(cudaStream_t, int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr,
                                   int device) {
  if (device != 0 || attr != cudaDevAttrMultiProcessorCount)
    return cudaErrorInvalidValue;
  *value = kqsim::EnvInt("KQ_SIM_SM_COUNT", 4);
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    default:
      return "invalid argument";
  }
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    default:
      return "cudaErrorInvalidValue";
  }
}
