// Kernel bodies of the compressed-attention backward (see cmp_attn.h). Same math as the sparse
// backward (sparse_attn_bwd_kernel.cuh); the key set of query t is the compressed tokens
// [0, nvis(t)), and the query set of compressed token i is the positions t >= i*d + l - 1 of
// its sequence. dQ: the forward's CTA walk (attn_bwd_dq.cuh). dK/dV: 64-key CTAs over chunks of the query rows
// (attn_bwd_dkdv.cuh); compressed token 0 is seen by all T x G rows, so the early tiles are cut
// into up to dkdv::kMaxSplits chunks whose fp32 partials a second kernel adds in chunk order.
// No atomics: bitwise reproducible.
#pragma once

#include "cmp_attn_fwd_kernel.cuh"
#include "sparse_attn_bwd_kernel.cuh"

namespace nsa {
namespace sparse_detail {

// dQ: the compressed forward's CTA walk over the contiguous key range (attn_bwd_dq.cuh).
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(DqConfig<kHeadDim, kHeadDimV>::kThreads, DqConfig<kHeadDim, kHeadDimV>::kMinCtasPerSm)
    cmp_attn_bwd_dq_kernel(const AttnBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  range_dq<T, kHeadDim, kHeadDimV, /*kCompressed=*/true>(p, smem_raw);
}

// dK_c, dV_c: grid range_slots(p) * H * splits (attn_bwd_dkdv.cuh); splits = 1 writes dk, dv
// directly, else tiles with >= 2 chunks leave fp32 partials in ws for the reduce kernel.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(dkdv::Cfg<kHeadDim, kHeadDimV>::kThreads)
    cmp_attn_bwd_dkdv_kernel(const AttnBwdParams p, int splits, float* ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  dkdv::range_dkdv<T, kHeadDim, kHeadDimV, /*kCompressed=*/true>(p, splits, ws, smem_raw);
}

// Grid range_slots(p) * H: adds each split tile's partials in chunk order.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(dkdv::Cfg<kHeadDim, kHeadDimV>::kThreads)
    cmp_attn_bwd_dkdv_reduce_kernel(const AttnBwdParams p, int splits, const float* ws) {
  dkdv::range_reduce<T, kHeadDim, kHeadDimV, /*kCompressed=*/true>(p, splits, ws);
}

}  // namespace sparse_detail
}  // namespace nsa
