// How the simulator runs the threads of a block (cuda_sim.h): two engines
// with one interface, chosen when the library is built.
// - engine_fibers.cc (default): all threads of a block are fibers of the
//   calling OS thread, switched only at barriers, in a fixed order (forward
//   or reverse); fast and deterministic, and a barrier that some thread
//   never reaches is reported at once.
// - engine_threads.cc (-DKQ_SIM_THREADS, the sanitizer builds): every CUDA
//   thread is an OS thread and barriers are mutex + condition variable, so
//   ThreadSanitizer sees exactly the ordering __syncthreads gives.

#ifndef KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_SIM_ENGINE_H_
#define KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_SIM_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "cuda_sim.h"

namespace kqsim {

// A reusable barrier of `count` threads of the running block.
class Barrier {
 public:
  Barrier(int count, std::string what);
  ~Barrier();
  Barrier(const Barrier&) = delete;
  Barrier& operator=(const Barrier&) = delete;
  // `where` names the call site in a deadlock report.
  void Wait(const char* where);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs body(thread) for every thread 0 .. threads - 1 of every block 0 ..
// blocks - 1 (`reverse`: blocks, and for fibers the threads too, in reverse
// order), one block at a time; Self() is the running thread's state.
void RunBlocks(int threads, int64_t blocks, bool reverse,
               const std::function<void(int thread, int64_t block)>& body);

// Reports a fatal simulator error (a deadlock, divergent warp operation)
// on stderr and aborts.
[[noreturn]] void Die(const std::string& message);

int EnvInt(const char* name, int fallback);

}  // namespace kqsim

#endif  // KERAS_QLORA_CUSTOM_OPS_TESTING_CUDA_SIM_ENGINE_H_
