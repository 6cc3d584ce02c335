// Kernel body of the compressed-attention forward (see cmp_attn.h). The warp layout, passes and
// tile primitives are the sparse kernels' (sparse_attn_common.cuh); what differs is the key set:
// the compressed tokens [0, nvis(t)) of the sequence, in the compressed-row layout.
#pragma once

#include "cmp_attn.h"
#include "sparse_attn_common.cuh"
#include "sparse_attn_fwd_kernel.cuh"

namespace nsa {
namespace sparse_detail {

// Compressed tokens visible to position t (DESIGN §1.2: i*d + l - 1 <= t).
__device__ __forceinline__ index_t num_visible(index_t t, int nc, int l, int d) {
  if (t + 1 < l) return 0;
  const index_t v = (t - l + 1) / d + 1;
  return v < nc ? v : nc;
}

template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(FwdConfig<kHeadDim, kHeadDimV>::kThreads)
    cmp_attn_fwd_kernel(const AttnParams p) {
  using Cfg = FwdConfig<kHeadDim, kHeadDimV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw) + warp * Cfg::kSmemElemsPerWarp;
  T* sK = sQ + kRows * Cfg::kLdQK;
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
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;

    load_query_rows_async<T, kHeadDim>(sQ, Cfg::kLdQK, q, p.q_stride, rm, ps, lane);
    mma::cp_async_commit();
    mma::cp_async_wait_all();
    __syncwarp();

    int row_tok[2];
    bool row_on[2];
    index_t row_nvis[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8;
      row_tok[ri] = r / rm.heads;
      row_on[ri] = r < rm.tokens * rm.heads && row_tok[ri] >= ps.p_begin && row_tok[ri] < ps.p_end;
      row_nvis[ri] = row_on[ri] ? num_visible(t0 + row_tok[ri], nc, p.cmp_block, p.cmp_stride) : 0;
    }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o_acc[kHeadDimV / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

    const index_t nvis_last = num_visible(t0 + ps.p_end - 1, nc, p.cmp_block, p.cmp_stride);
    for (index_t s0 = 0; s0 < nvis_last; s0 += kBlockN) {
      load_rows_async<T, kHeadDim, kBlockN>(sK, Cfg::kLdQK, k, p.k_stride.row, kv_begin, s0, nc, lane);
      load_rows_async<T, kHeadDimV, kBlockN>(sV, Cfg::kLdV, v, p.v_stride.row, kv_begin, s0, nc, lane);
      mma::cp_async_commit();
      mma::cp_async_wait_all();
      __syncwarp();

      float s_acc[4][4] = {};
      gemm_16x32_nt<T, kHeadDim>(s_acc, sQ, Cfg::kLdQK, sK, Cfg::kLdQK, gid, tig);
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const index_t s = s0 + n * 8 + 2 * tig + e;
            float& x = s_acc[n][ri * 2 + e];
            x = s < row_nvis[ri] ? x : -INFINITY;
            mx = fmaxf(mx, x);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[ri], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f((m_run[ri] - m_use) * scale_log2);
        m_run[ri] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s_acc[n][ri * 2 + e];
            x = exp2f((x - m_use) * scale_log2);
            rs += x;
          }
        l_run[ri] = l_run[ri] * alpha + rs;
#pragma unroll
        for (int n = 0; n < kHeadDimV / 8; ++n) {
          o_acc[n][ri * 2] *= alpha;
          o_acc[n][ri * 2 + 1] *= alpha;
        }
      }
      gemm_16x32_regs_nn<T, kHeadDimV>(o_acc, s_acc, sV, Cfg::kLdV, gid, tig);
      __syncwarp();
    }

    T* o = static_cast<T*>(p.o) + (packed ? 0 : b * p.o_stride.batch);
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float l = l_run[ri];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      if (!row_on[ri]) continue;
      const int r = gid + ri * 8;
      const index_t t = t0 + row_tok[ri];
      const int hq = rm.head0 + r % rm.heads;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* orow = o + (row_begin + t) * p.o_stride.row + static_cast<index_t>(hq) * p.o_stride.head;
#pragma unroll
      for (int n = 0; n < kHeadDimV / 8; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * tig) =
            mma::pack2<T>(o_acc[n][ri * 2] * inv, o_acc[n][ri * 2 + 1] * inv);
      if (tig == 0)
        p.lse[(packed ? 0 : b * p.lse_batch_stride) + (row_begin + t) * p.lse_row_stride + hq] =
            l > 0.f ? m_run[ri] * p.scale + logf(l) : -INFINITY;
    }
    __syncwarp();
  }
}

}  // namespace sparse_detail
}  // namespace nsa
