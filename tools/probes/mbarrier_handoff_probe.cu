// Probe: the producer / consumer hand-off of the TMA dK/dV tile (attn_bwd_dkdv_sm90_tma.cuh)
// reduced to its shared-memory bones. Warp 0 writes a stage of a four-stage ring with plain
// stores, __syncwarp, and its lane 0 arrives on the stage's "full" mbarrier (release); warp 1
// waits on it (acquire), reads the stage and every lane arrives on the "empty" mbarrier, which
// warp 0 waits on before it rewrites the stage. Prints PASS when warp 1 saw every value.
// Its second use: `compute-sanitizer --tool racecheck` on it tells whether racecheck models the
// mbarrier ordering (hazards reported here are reported on a hand-off that is correct by the PTX
// memory model, i.e. racecheck does not see mbarrier synchronisation).
#include <cstdio>
#include <cstdint>

constexpr int kStages = 4, kRounds = 64, kWidth = 64;

__device__ __forceinline__ void bar_init(uint32_t a, int n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t a) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(a) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t a, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(a), "r"(parity)
                 : "memory");
  } while (!done);
}

__global__ void handoff(long long* out) {
  __shared__ int ring[kStages][kWidth];
  __shared__ __align__(8) unsigned long long bars[2 * kStages];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t b0 = static_cast<uint32_t>(__cvta_generic_to_shared(bars));
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      bar_init(b0 + 8 * s, 1);                   // full
      bar_init(b0 + 8 * (kStages + s), 32);      // empty
    }
  }
  __syncthreads();
  if (warp == 0) {
    for (int j = 0; j < kRounds; ++j) {
      if (j >= kStages) bar_wait(b0 + 8 * (kStages + j % kStages), (j / kStages - 1) & 1);
      for (int c = lane; c < kWidth; c += 32) ring[j % kStages][c] = j * kWidth + c;
      __syncwarp();
      if (lane == 0) bar_arrive(b0 + 8 * (j % kStages));
    }
  } else {
    long long sum = 0;
    for (int j = 0; j < kRounds; ++j) {
      bar_wait(b0 + 8 * (j % kStages), (j / kStages) & 1);
      for (int c = lane; c < kWidth; c += 32) sum += ring[j % kStages][c];
      bar_arrive(b0 + 8 * (kStages + j % kStages));
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) *out = sum;
  }
}

int main() {
  long long* d = nullptr;
  long long h = -1;
  cudaMalloc(&d, sizeof(long long));
  handoff<<<1, 64>>>(d);
  cudaError_t e = cudaMemcpy(&h, d, sizeof(long long), cudaMemcpyDeviceToHost);
  const long long n = static_cast<long long>(kRounds) * kWidth, want = n * (n - 1) / 2;
  std::printf("mbarrier hand-off: sum %lld, expected %lld (%s): %s\n", h, want, cudaGetErrorString(e),
              h == want && e == cudaSuccess ? "PASS" : "FAIL");
  cudaFree(d);
  return h == want && e == cudaSuccess ? 0 : 1;
}
