// Small helpers shared by the C++ benchmarks: CUDA error checks, event timing (median),
// random bf16/fp16 buffers, the device's name.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#define BENCH_CHECK(expr)                                                                     \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #expr, __FILE__, __LINE__,         \
                   cudaGetErrorString(err_));                                                 \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

#define BENCH_STATUS(expr)                                                                    \
  do {                                                                                        \
    ::nsa::Status s_ = (expr);                                                                \
    if (!s_.ok()) {                                                                           \
      std::fprintf(stderr, "nsa error %d at %s:%d: %s\n", s_.code, __FILE__, __LINE__, s_.message); \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

namespace bench {

inline std::string device_name() {
  cudaDeviceProp prop{};
  int dev = 0;
  BENCH_CHECK(cudaGetDevice(&dev));
  BENCH_CHECK(cudaGetDeviceProperties(&prop, dev));
  return prop.name;
}

// Median over `iters` samples of the mean time of `batch` back-to-back runs of fn() (so launch
// latency overlaps as it does inside a model's stream), after `warmup` untimed runs.
template <class F>
float median_ms(F&& fn, int warmup = 5, int iters = 30, int batch = 20) {
  for (int i = 0; i < warmup; ++i) fn();
  cudaEvent_t a, b;
  BENCH_CHECK(cudaEventCreate(&a));
  BENCH_CHECK(cudaEventCreate(&b));
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) {
    BENCH_CHECK(cudaEventRecord(a));
    for (int r = 0; r < batch; ++r) fn();
    BENCH_CHECK(cudaEventRecord(b));
    BENCH_CHECK(cudaEventSynchronize(b));
    BENCH_CHECK(cudaEventElapsedTime(&ms[i], a, b));
    ms[i] /= batch;
  }
  BENCH_CHECK(cudaEventDestroy(a));
  BENCH_CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[iters / 2];
}

// Random bf16 values (host copy kept in float for the CPU reference).
struct Bf16Buffer {
  std::vector<float> host;
  __nv_bfloat16* dev = nullptr;
  size_t n = 0;
  Bf16Buffer(size_t count, float scale, uint32_t seed) : host(count), n(count) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.f, scale);
    std::vector<__nv_bfloat16> tmp(count);
    for (size_t i = 0; i < count; ++i) {
      tmp[i] = __float2bfloat16(dist(gen));
      host[i] = __bfloat162float(tmp[i]);  // the reference sees exactly what the GPU sees
    }
    BENCH_CHECK(cudaMalloc(&dev, count * sizeof(__nv_bfloat16) + 16));
    BENCH_CHECK(cudaMemcpy(dev, tmp.data(), count * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  }
  Bf16Buffer(const Bf16Buffer&) = delete;
  ~Bf16Buffer() { cudaFree(dev); }
};

inline std::vector<float> to_host_float(const __nv_bfloat16* dev, size_t n) {
  std::vector<__nv_bfloat16> tmp(n);
  BENCH_CHECK(cudaMemcpy(tmp.data(), dev, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = __bfloat162float(tmp[i]);
  return out;
}

// Sequence lengths from the command line (`bench_x 8192 65536`), or `defaults` without arguments.
inline std::vector<int> lengths_from_args(int argc, char** argv, std::vector<int> defaults) {
  if (argc <= 1) return defaults;
  std::vector<int> out;
  for (int i = 1; i < argc; ++i) out.push_back(std::atoi(argv[i]));
  return out;
}

// Device-to-device copy bandwidth (bytes read + written per second), the memory ceiling.
inline double copy_bandwidth_gbs(size_t bytes = size_t(1) << 30) {
  void *a, *b;
  BENCH_CHECK(cudaMalloc(&a, bytes));
  BENCH_CHECK(cudaMalloc(&b, bytes));
  BENCH_CHECK(cudaMemset(a, 1, bytes));
  const float ms = median_ms([&] { BENCH_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 3, 10, 1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e6);
}

}  // namespace bench
