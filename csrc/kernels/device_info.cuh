// Host-side facts about the current CUDA device, for sizing launches (persistent grids, work
// splits). Cached per device: a launcher asks on every call.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace nsa {

// Multiprocessors of the current device (132, an H100's count, if the query fails).
inline int current_sm_count() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev >= 0 && dev < 64 && cache[dev].load() > 0) return cache[dev].load();
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
  if (dev >= 0 && dev < 64) cache[dev].store(n);
  return n;
}

}  // namespace nsa
