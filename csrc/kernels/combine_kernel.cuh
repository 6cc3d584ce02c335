// Kernel bodies of the gated branch sum and its backward (see combine.h). Memory-bound: each
// thread moves 16-byte vectors; fp32 arithmetic, one rounding per output.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half_convert.cuh"

#include "combine.h"

namespace nsa {
namespace combine_detail {

union Vec8 {
  uint4 u;
  unsigned short s[8];
};

template <typename T>
__device__ __forceinline__ float elem(const Vec8& v, int i) {
  return to_f<T>(*reinterpret_cast<const T*>(&v.s[i]));
}

// One thread per 8 elements: out = g_cmp o_cmp + g_slc o_slc + g_win o_win.
template <typename T>
__global__ void combine_fwd_kernel(const CombineParams p) {
  const int chunks = p.dim / 8;
  const index_t n = p.vectors * chunks;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t vec = i / chunks;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int b = 0; b < 3; ++b) {
      const float g = to_f<T>(static_cast<const T*>(p.g[b])[vec]);
      Vec8 v;
      v.u = reinterpret_cast<const uint4*>(p.o[b])[i];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = fmaf(g, elem<T>(v, e), acc[e]);
    }
    Vec8 out;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const T x = from_f<T>(acc[e]);
      out.s[e] = *reinterpret_cast<const unsigned short*>(&x);
    }
    reinterpret_cast<uint4*>(p.out)[i] = out.u;
  }
}

// kLanes lanes per vector (dim / 8 chunks rounded up to a power of two, at most 32), 32 / kLanes
// vectors per warp (one vector per warp left half the lanes idle at dim = 128: 2.66 ms for 7 GB
// at 64k on the H200): d_o[b] = g_b * dout; d_g[b] = sum dout * o_b, the lanes' partial sums
// reduced by a fixed butterfly inside the lane group (the same bits every run).
template <typename T, int kLanes>
__global__ void combine_bwd_kernel(const CombineParams p) {
  constexpr int kVecsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x % 32, sub = lane % kLanes;
  const int chunks = p.dim / 8;
  const index_t warps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  for (index_t w = static_cast<index_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; w * kVecsPerWarp < p.vectors;
       w += warps) {
    const index_t vec = w * kVecsPerWarp + lane / kLanes;
    const bool on = vec < p.vectors;
    float dot[3] = {0.f, 0.f, 0.f};
    if (on) {
      float g[3];
#pragma unroll
      for (int b = 0; b < 3; ++b) g[b] = to_f<T>(static_cast<const T*>(p.g[b])[vec]);
      for (int c = sub; c < chunks; c += kLanes) {
        const index_t i = vec * chunks + c;
        Vec8 dv;
        dv.u = reinterpret_cast<const uint4*>(p.dout)[i];
#pragma unroll
        for (int b = 0; b < 3; ++b) {
          Vec8 ov, outv;
          ov.u = reinterpret_cast<const uint4*>(p.o[b])[i];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float d = elem<T>(dv, e);
            dot[b] = fmaf(d, elem<T>(ov, e), dot[b]);
            const T x = from_f<T>(g[b] * d);
            outv.s[e] = *reinterpret_cast<const unsigned short*>(&x);
          }
          reinterpret_cast<uint4*>(p.d_o[b])[i] = outv.u;
        }
      }
    }
#pragma unroll
    for (int b = 0; b < 3; ++b)
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) dot[b] += __shfl_xor_sync(0xffffffffu, dot[b], off);
    if (on && sub == 0)
#pragma unroll
      for (int b = 0; b < 3; ++b) {
        if (p.dg_fp32) static_cast<float*>(p.d_g[b])[vec] = dot[b];
        else static_cast<T*>(p.d_g[b])[vec] = from_f<T>(dot[b]);
      }
  }
}

}  // namespace combine_detail
}  // namespace nsa
