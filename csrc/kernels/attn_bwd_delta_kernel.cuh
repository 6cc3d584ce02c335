// Kernel body of the backward's row constant delta = rowsum(dout * out) - dlse (attention.h,
// BwdDeltaParams). Memory-bound: each lane reads 16 bytes of dout and of out per step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention.h"
#include "half_convert.cuh"

namespace nsa {
namespace delta_detail {

union Vec8 {
  uint4 u;
  unsigned short s[8];
};

template <typename T>
__device__ __forceinline__ float elem(const Vec8& v, int i) {
  return to_f<T>(*reinterpret_cast<const T*>(&v.s[i]));
}

// kLanes lanes per (token, head) vector (dim / 8 chunks rounded up to a power of two, at most
// 32), 32 / kLanes vectors per warp; partial sums reduced by a fixed butterfly inside the lane
// group, so every run produces the same bits.
// kDense: dout and out both contiguous [vectors, dim], a vector's offset is vec * dim (the general
// path's 64-bit divisions by heads and rows, in every lane, were most of the kernel's instructions).
template <typename T, int kLanes, bool kDense>
__global__ void attn_bwd_delta_kernel(const BwdDeltaParams p) {
  constexpr int kVecsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x % 32, sub = lane % kLanes;
  const int chunks = p.dim / 8;
  const index_t vectors = p.batch * p.rows * p.heads;
  const index_t warps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  for (index_t w = static_cast<index_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
       w * kVecsPerWarp < vectors; w += warps) {
    const index_t vec = w * kVecsPerWarp + lane / kLanes;
    const bool on = vec < vectors;
    float dot = 0.f;
    if (on) {
      const T* d;
      const T* o;
      if constexpr (kDense) {
        d = static_cast<const T*>(p.dout) + vec * p.dim;
        o = static_cast<const T*>(p.out) + vec * p.dim;
      } else {
        const index_t h = vec % p.heads, bt = vec / p.heads;
        const index_t t = bt % p.rows, b = bt / p.rows;
        d = static_cast<const T*>(p.dout) + b * p.dout_stride.batch + t * p.dout_stride.row + h * p.dout_stride.head;
        o = static_cast<const T*>(p.out) + b * p.out_stride.batch + t * p.out_stride.row + h * p.out_stride.head;
      }
      for (int c = sub; c < chunks; c += kLanes) {
        Vec8 dv, ov;
        dv.u = reinterpret_cast<const uint4*>(d)[c];
        ov.u = reinterpret_cast<const uint4*>(o)[c];
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(elem<T>(dv, e), elem<T>(ov, e), dot);
      }
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (on && sub == 0) p.delta[vec] = p.dlse != nullptr ? dot - p.dlse[vec] : dot;
  }
}

}  // namespace delta_detail
}  // namespace nsa
