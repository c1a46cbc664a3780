// The OS-thread engine of the simulator (engine.h), built with
// -DKQ_SIM_THREADS for the ThreadSanitizer / AddressSanitizer runs.

#if defined(KQ_SIM_THREADS)

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "engine.h"

namespace kqsim {

struct Barrier::Impl {
  std::mutex mu;
  std::condition_variable cv;
  int count;
  int arrived = 0;
  uint64_t generation = 0;
  std::string what;
};

Barrier::Barrier(int count, std::string what) : impl_(new Impl) {
  impl_->count = count;
  impl_->what = std::move(what);
}

Barrier::~Barrier() = default;

void Barrier::Wait(const char* where) {
  Impl& b = *impl_;
  std::unique_lock<std::mutex> lock(b.mu);
  const uint64_t gen = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    b.cv.notify_all();
    return;
  }
  const auto timeout = std::chrono::seconds(EnvInt("KQ_SIM_TIMEOUT_S", 300));
  if (!b.cv.wait_for(lock, timeout, [&] { return b.generation != gen; }))
    Die("deadlock: " + std::to_string(b.arrived) + " of " +
        std::to_string(b.count) + " threads of " + b.what + " waited at " +
        where + " and the others never came (a divergent barrier?)");
}

namespace {
thread_local ThreadState t_state;
}  // namespace

ThreadState& Self() { return t_state; }

void RunBlocks(int threads, int64_t blocks, bool reverse,
               const std::function<void(int, int64_t)>& body) {
  // A pool of `threads` OS threads walks the blocks; the end barrier keeps
  // a block's shared memory from being reused while a thread still runs.
  Barrier end(threads, "a block (its end)");
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int64_t i = 0; i < blocks; ++i) {
        body(t, reverse ? blocks - 1 - i : i);
        end.Wait("the end of the block");
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace kqsim

#endif  // KQ_SIM_THREADS
