// The fiber engine of the simulator (engine.h, the default): the threads of
// a block are ucontext fibers of the calling OS thread. A fiber runs until
// it waits at a barrier; the scheduler then resumes the next runnable fiber
// in thread order (or reverse order), so between two barriers each thread
// runs alone, and a missing barrier shows as a result that depends on the
// order. When no fiber can run but some have not finished, the threads
// wait at barriers that the others will never reach: reported at once.

#if !defined(KQ_SIM_THREADS)

#include <ucontext.h>

#include <vector>

#include "engine.h"

namespace kqsim {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;

struct Fiber {
  ucontext_t context;
  ThreadState state;
  bool done = false;
  bool waiting = false;
  const char* where = "";
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const std::function<void(int, int64_t)>* body = nullptr;
  int64_t block = 0;
};

thread_local Scheduler* t_scheduler = nullptr;
thread_local ThreadState t_outside;  // Self() outside any kernel

void FiberMain() {
  Scheduler& s = *t_scheduler;
  Fiber& f = *s.current;
  (*s.body)(static_cast<int>(&f - s.fibers.data()), s.block);
  f.done = true;  // returns to s.main through uc_link
}

}  // namespace

struct Barrier::Impl {
  int count;
  std::string what;
  std::vector<Fiber*> waiting;
};

Barrier::Barrier(int count, std::string what) : impl_(new Impl) {
  impl_->count = count;
  impl_->what = std::move(what);
}

Barrier::~Barrier() = default;

void Barrier::Wait(const char* where) {
  Impl& b = *impl_;
  Scheduler* s = t_scheduler;
  if (s == nullptr || s->current == nullptr)
    Die(std::string("a barrier (") + where + ") outside a kernel");
  if (static_cast<int>(b.waiting.size()) + 1 == b.count) {
    for (Fiber* f : b.waiting) f->waiting = false;
    b.waiting.clear();
    return;
  }
  Fiber* self = s->current;
  self->waiting = true;
  self->where = where;
  b.waiting.push_back(self);
  swapcontext(&self->context, &s->main);
}

ThreadState& Self() {
  Scheduler* s = t_scheduler;
  return s != nullptr && s->current != nullptr ? s->current->state
                                               : t_outside;
}

void RunBlocks(int threads, int64_t blocks, bool reverse,
               const std::function<void(int, int64_t)>& body) {
  if (t_scheduler != nullptr) Die("a kernel launched from inside a kernel");
  Scheduler s;
  s.body = &body;
  s.fibers.resize(threads);
  std::vector<char> stacks(kStackBytes * threads);
  t_scheduler = &s;
  for (int64_t i = 0; i < blocks; ++i) {
    s.block = reverse ? blocks - 1 - i : i;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = s.fibers[t];
      f.done = f.waiting = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stacks.data() + kStackBytes * t;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &s.main;
      makecontext(&f.context, FiberMain, 0);
    }
    for (int left = threads; left > 0;) {
      bool ran = false;
      for (int j = 0; j < threads; ++j) {
        Fiber& f = s.fibers[reverse ? threads - 1 - j : j];
        if (f.done || f.waiting) continue;
        s.current = &f;
        swapcontext(&s.main, &f.context);
        s.current = nullptr;
        ran = true;
        if (f.done) --left;
      }
      if (!ran && left > 0) {
        std::string report;
        for (int t = 0, shown = 0; t < threads && shown < 4; ++t) {
          if (s.fibers[t].done) continue;
          report += "; thread " + std::to_string(t) + " at " +
                    s.fibers[t].where;
          ++shown;
        }
        t_scheduler = nullptr;
        Die("deadlock in block " + std::to_string(s.block) + ": " +
            std::to_string(left) + " threads wait at barriers that the " +
            "others never reach (a divergent barrier?)" + report);
      }
    }
  }
  t_scheduler = nullptr;
}

}  // namespace kqsim

#endif  // !KQ_SIM_THREADS
