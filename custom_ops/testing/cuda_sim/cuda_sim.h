// A CPU stand-in for the parts of CUDA that the NF4 kernels use, so that the
// kernel sources themselves (custom_ops/cuda/*.cu, unchanged) compile with
// g++ and run on the host. Built with -DKQ_CUDA_SIM; nf4_cuda_device.cuh and
// the other CUDA sources include this header instead of the CUDA headers.
//
// Execution model (cuda_sim.cc, engine.h): the blocks of a grid run one
// after another, in forward or reverse order; the threads of a block are
// fibers switched at barriers (default) or OS threads (-DKQ_SIM_THREADS,
// for the sanitizer builds). __syncthreads is a barrier of the block's
// threads; warp operations (shuffles, mma.sync) are barriers of the warp's
// 32 lanes that also check that all lanes take part with the same
// arguments. A barrier that some thread never reaches aborts the process
// with a message (at once with fibers, after KQ_SIM_TIMEOUT_S with OS
// threads): a divergent __syncthreads or warp operation is a deadlock or
// undefined behaviour on a GPU. Built with -fsanitize=thread, the
// barriers are the only synchronization, so ThreadSanitizer reports every
// shared-memory access pair that __syncthreads does not order; with
// -fsanitize=address, out-of-bounds reads of global or shared arrays.
//
// What it cannot show: timing, memory coalescing, bank conflicts, and the
// PTX itself (the inline PTX of nf4_cuda_device.cuh is replaced by
// kqsim::CvtRnaTf32 and kqsim::Mma, written from the PTX ISA's fragment
// tables, independently of the kernels' own fragment index helpers).

#ifndef KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_SIM_CUDA_SIM_H_
#define KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_SIM_CUDA_SIM_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

// ------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One static per kernel instantiation: blocks run one at a time, so the
// block's threads share it exactly as they would share shared memory.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// ------------------------------------------------------------ vector types

struct __attribute__((aligned(16))) uint4 {
  uint32_t x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
  uint32_t x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  return uint4{x, y, z, w};
}
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }

// ------------------------------------------------------------ 16-bit floats

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

namespace kqsim {

inline uint32_t FloatBits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

inline float BitsFloat(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

// float32 -> float16 bits, round to nearest even (what __float2half_rn
// does), including subnormals, overflow to inf and NaN.
uint16_t FloatToHalfBits(float v);
float HalfBitsToFloat(uint16_t h);

}  // namespace kqsim

inline float __uint_as_float(uint32_t b) { return kqsim::BitsFloat(b); }

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t b = kqsim::FloatBits(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return {uint16_t(0x7FFF)};  // NaN
  b += 0x7FFFu + ((b >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(b >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 v) {
  return kqsim::BitsFloat(uint32_t{v.bits} << 16);
}
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t b) { return {b}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }

inline __half __float2half_rn(float v) { return {kqsim::FloatToHalfBits(v)}; }
inline float __half2float(__half v) { return kqsim::HalfBitsToFloat(v.bits); }
inline __half __ushort_as_half(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(__half v) { return v.bits; }

// ------------------------------------------------------------ thread state

namespace kqsim {

struct ThreadState {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
  void* block = nullptr;  // the block's barriers (cuda_sim.cc)
  uint64_t warp_ops = 0;  // warp operations of this lane in this block
};

ThreadState& Self();

void SyncThreads();
float ShuffleXor(unsigned mask, float v, int lane_mask);

// The mma.sync shapes the kernels use; Mma is warp-collective.
enum class MmaShape { kM16N8K8Tf32, kM16N8K16Bf16, kM16N8K16F16 };
void Mma(MmaShape shape, float c[4], const uint32_t a[4], const uint32_t b[2]);

// cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero.
uint32_t CvtRnaTf32(float v);

// Runs `body` as every thread of every block of the grid; returns
// cudaSuccess (0) or cudaErrorInvalidConfiguration (9).
int RunGrid(dim3 grid, dim3 block, const std::function<void()>& body);

}  // namespace kqsim

#define threadIdx (::kqsim::Self().thread_idx)
#define blockIdx (::kqsim::Self().block_idx)
#define blockDim (::kqsim::Self().block_dim)
#define gridDim (::kqsim::Self().grid_dim)

inline void __syncthreads() { kqsim::SyncThreads(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return kqsim::ShuffleXor(mask, v, lane_mask);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------ runtime API

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorInvalidDevice = 101;
typedef struct KqSimStream* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
cudaError_t cudaStreamGetDevice(cudaStream_t stream, int* device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr,
                                   int device);
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);

namespace kqsim {

void SetLastError(cudaError_t error);

// kernel<<<grid, block, 0, stream>>>(args...) becomes
// KQ_LAUNCH(grid, block, stream, kernel)(args...): every thread calls the
// kernel function with its own copy of the arguments, as on a GPU.
template <typename... P>
struct Launcher {
  dim3 grid, block;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A... args) const {
    auto fn = kernel;
    SetLastError(RunGrid(grid, block, [&] { fn(args...); }));
  }
};

template <typename... P>
Launcher<P...> MakeLauncher(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return Launcher<P...>{grid, block, kernel};
}

}  // namespace kqsim

#define KQ_LAUNCH(grid, block, stream, ...) \
  ::kqsim::MakeLauncher((grid), (block), &__VA_ARGS__)

#endif  // KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_SIM_CUDA_SIM_H_
