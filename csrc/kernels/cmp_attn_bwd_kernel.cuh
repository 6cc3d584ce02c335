// Kernel bodies of the compressed-attention backward (see cmp_attn.h). Same math as the sparse
// backward (sparse_attn_bwd_kernel.cuh); the key set of query t is the compressed tokens
// [0, nvis(t)), and the query set of compressed token i is the positions t >= i*d + l - 1 of
// its sequence. dQ: the forward's warp layout. dK/dV: 64-key CTAs over chunks of the query rows
// (attn_bwd_dkdv.cuh); compressed token 0 is seen by all T x G rows, so the early tiles are cut
// into up to dkdv::kMaxSplits chunks whose fp32 partials a second kernel adds in chunk order.
// No atomics: bitwise reproducible.
#pragma once

#include "cmp_attn_fwd_kernel.cuh"
#include "sparse_attn_bwd_kernel.cuh"

namespace nsa {
namespace sparse_detail {

// dQ: the forward's layout; P recomputed from lse, dS = P (dP - delta), dQ += dS K_c.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(BwdConfig<kHeadDim, kHeadDimV>::kThreads)
    cmp_attn_bwd_dq_kernel(const AttnBwdParams p) {
  using Cfg = BwdConfig<kHeadDim, kHeadDimV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw) + warp * Cfg::kDqElemsPerWarp;
  T* sdO = sQ + kRows * Cfg::kLdQK;
  T* sK = sdO + kRows * Cfg::kLdV;
  T* sV = sK + kBlockN * Cfg::kLdQK;

  const RowMap rm = query_row_map(p);
  Group gr;
  if (!group_of(p, rm.tokens, static_cast<index_t>(blockIdx.x) * Cfg::kWarps + warp, gr)) return;
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;

  Pass ps;
  for (int pb = 0; next_pass(p, rm.tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const index_t row_begin = ps.row_begin, t0 = ps.t0;
    const int nc = num_compressed(ps.seq_len, p.cmp_block, p.cmp_stride);
    const index_t kv_begin = packed ? compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.cmp_stride) : 0;
    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : b * p.dout_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;

    load_query_rows_async<T, kHeadDim>(sQ, Cfg::kLdQK, q, p.q_stride, rm, ps, lane);
    load_query_rows_async<T, kHeadDimV>(sdO, Cfg::kLdV, dout, p.dout_stride, rm, ps, lane);
    mma::cp_async_commit();

    int row_tok[2];
    bool row_on[2];
    index_t row_nvis[2];
    float lse_l2[2], delta[2];
    const index_t lse_b = packed ? 0 : b * p.lse_batch_stride;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8;
      row_tok[ri] = r / rm.heads;
      row_on[ri] = r < rm.tokens * rm.heads && row_tok[ri] >= ps.p_begin && row_tok[ri] < ps.p_end;
      row_nvis[ri] = row_on[ri] ? num_visible(t0 + row_tok[ri], nc, p.cmp_block, p.cmp_stride) : 0;
      lse_l2[ri] = INFINITY;
      delta[ri] = 0.f;
      if (row_on[ri]) {
        const index_t at = lse_b + (row_begin + t0 + row_tok[ri]) * p.lse_row_stride + rm.head0 + r % rm.heads;
        const float l = p.lse[at];
        lse_l2[ri] = l == -INFINITY ? INFINITY : l * kLog2e;
        delta[ri] = p.delta[at];
      }
    }
    float dq_acc[kHeadDim / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.f;
    mma::cp_async_wait_all();
    __syncwarp();

    const index_t nvis_last = num_visible(t0 + ps.p_end - 1, nc, p.cmp_block, p.cmp_stride);
    for (index_t s0 = 0; s0 < nvis_last; s0 += kBlockN) {
      load_rows_async<T, kHeadDim, kBlockN>(sK, Cfg::kLdQK, k, p.k_stride.row, kv_begin, s0, nc, lane);
      load_rows_async<T, kHeadDimV, kBlockN>(sV, Cfg::kLdV, v, p.v_stride.row, kv_begin, s0, nc, lane);
      mma::cp_async_commit();
      mma::cp_async_wait_all();
      __syncwarp();
      float s_acc[4][4] = {};
      gemm_16x32_nt<T, kHeadDim>(s_acc, sQ, Cfg::kLdQK, sK, Cfg::kLdQK, gid, tig);
      float dp_acc[4][4] = {};
      gemm_16x32_nt<T, kHeadDimV>(dp_acc, sdO, Cfg::kLdV, sV, Cfg::kLdV, gid, tig);
#pragma unroll
      for (int ri = 0; ri < 2; ++ri)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const index_t s = s0 + n * 8 + 2 * tig + e;
            const float pr = s < row_nvis[ri] ? exp2f(s_acc[n][ri * 2 + e] * scale_log2 - lse_l2[ri]) : 0.f;
            s_acc[n][ri * 2 + e] = pr * (dp_acc[n][ri * 2 + e] - delta[ri]);
          }
      gemm_16x32_regs_nn<T, kHeadDim>(dq_acc, s_acc, sK, Cfg::kLdQK, gid, tig);
      __syncwarp();
    }

    T* dq = static_cast<T*>(p.dq) + (packed ? 0 : b * p.dq_stride.batch);
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      if (!row_on[ri]) continue;
      const int r = gid + ri * 8;
      T* row = dq + (row_begin + t0 + row_tok[ri]) * p.dq_stride.row +
               static_cast<index_t>(rm.head0 + r % rm.heads) * p.dq_stride.head;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n)
        *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * tig) =
            mma::pack2<T>(dq_acc[n][ri * 2] * p.scale, dq_acc[n][ri * 2 + 1] * p.scale);
    }
    __syncwarp();
  }
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
