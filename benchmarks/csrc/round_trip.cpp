// The time a cache line takes to go from one CPU to another and back: two threads, pinned to two CPUs, pass a
// counter back and forth through one atomic, each waiting (spinning) for the other's increment. On a VM the host may
// place the vCPUs on near or distant cores and move them; a kernel whose threads share data slows with the distance
// while one whose threads do not (bare matrix products) does not, so benchmarks/bench_loss.py prints this beside
// its ratios. Built by benchmarks/round_trip.py through torch.utils.cpp_extension.
#include <torch/extension.h>

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace {

bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
}

// Mean nanoseconds per round trip between CPUs `cpu_a` and `cpu_b` over `trips` round trips; the calling thread's CPU
// affinity is restored afterwards.
double round_trip_ns(int64_t trips, int64_t cpu_a, int64_t cpu_b) {
  TORCH_CHECK(trips > 0, "round_trip_ns: trips must be positive");
  cpu_set_t saved;
  TORCH_CHECK(pthread_getaffinity_np(pthread_self(), sizeof saved, &saved) == 0, "round_trip_ns: no affinity");
  alignas(64) std::atomic<int64_t> counter{0};
  std::atomic<bool> pinned{true};
  std::thread other([&] {
    pinned = pin(static_cast<int>(cpu_b));
    for (int64_t i = 0; i < trips; ++i) {
      while (counter.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      counter.store(2 * i + 2, std::memory_order_release);
    }
  });
  const bool here = pin(static_cast<int>(cpu_a));
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < trips; ++i) {
    counter.store(2 * i + 1, std::memory_order_release);
    while (counter.load(std::memory_order_acquire) != 2 * i + 2) {
    }
  }
  const auto stop = std::chrono::steady_clock::now();
  other.join();
  pthread_setaffinity_np(pthread_self(), sizeof saved, &saved);
  TORCH_CHECK(here && pinned, "round_trip_ns: could not pin the threads to CPUs ", cpu_a, " and ", cpu_b);
  return std::chrono::duration<double, std::nano>(stop - start).count() / static_cast<double>(trips);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("round_trip_ns", &round_trip_ns, "Mean ns per cache-line round trip between two CPUs",
        py::arg("trips"), py::arg("cpu_a"), py::arg("cpu_b"), py::call_guard<py::gil_scoped_release>());
}
