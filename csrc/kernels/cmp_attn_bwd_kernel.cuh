// Kernel bodies of the compressed-attention backward (see cmp_attn.h). Same math
// and warp layouts as the sparse backward (sparse_attn_bwd_kernel.cuh); the key set of query t
// is the compressed tokens [0, nvis(t)), and the query set of compressed token i is the
// positions t >= i*d + l - 1 of its sequence. No atomics: dK/dV accumulate in one warp each.
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

// dK_c, dV_c: a warp owns 16 consecutive rows of the compressed key tensor (one pass per
// sequence; gap rows stay zero) and walks the query rows (token, head) that see them:
// positions t >= i0*d + l - 1, 32 rows per step.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(BwdConfig<kHeadDim, kHeadDimV>::kThreads)
    cmp_attn_bwd_dkdv_kernel(const AttnBwdParams p) {
  using Cfg = BwdConfig<kHeadDim, kHeadDimV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tig = lane & 3;
  unsigned char* base = smem_raw + warp * Cfg::kDkvBytesPerWarp;
  T* sK = reinterpret_cast<T*>(base);
  T* sV = sK + kRows * Cfg::kLdQK;
  T* sQ = sV + kRows * Cfg::kLdV;
  T* sdO = sQ + kBlockN * Cfg::kLdQK;
  float* s_lse = reinterpret_cast<float*>(base + Cfg::kDkvElemsPerWarp * 2);
  float* s_delta = s_lse + kBlockN;
  int* s_tok = reinterpret_cast<int*>(s_delta + kBlockN);

  const int g = blockIdx.y;
  const int G = p.heads_q / p.heads_kv;
  const int l = p.cmp_block, d = p.cmp_stride;
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;
  const index_t item = static_cast<index_t>(blockIdx.x) * Cfg::kWarps + warp;

  // Compressed rows [r0, r0 + 16) of this warp.
  index_t r0;
  int b_pad = 0;
  if (!packed) {
    const int nc = num_compressed(p.seqlen, l, d);
    if (nc <= 0) return;
    const index_t groups = (nc + kRows - 1) / kRows;
    if (item >= groups * p.batch) return;
    b_pad = static_cast<int>(item / groups);
    r0 = (item % groups) * kRows;
  } else {
    r0 = item * kRows;
    if (r0 >= p.total_rows / d) return;
  }

  int pb = 0;
  while (pb < kRows) {
    // The sequence owning compressed row r0 + pb (largest b whose rows start at or before it).
    int b;
    index_t i_first;  // compressed token index of slot pb inside its sequence
    int seq_len;
    index_t row_begin, kv_begin;
    if (!packed) {
      b = b_pad;
      seq_len = p.seqlen;
      row_begin = 0;
      kv_begin = 0;
      i_first = r0 + pb;
    } else {
      int lo = 0, hi = p.batch - 1;
      b = -1;
      while (lo <= hi) {
        const int mid = (lo + hi) >> 1;
        if (compressed_row_begin(p.cu_seqlens, mid, p.total_rows, d) <= r0 + pb) { b = mid; lo = mid + 1; } else { hi = mid - 1; }
      }
      if (b < 0) break;
      const SeqGeom sg = seq_geom(p.cu_seqlens, b, 0, p.total_rows);
      seq_len = sg.len;
      row_begin = sg.row_begin;
      kv_begin = compressed_row_begin(p.cu_seqlens, b, p.total_rows, d);
      i_first = r0 + pb - kv_begin;
    }
    const int nc = num_compressed(seq_len, l, d);
    // Slots [pb, pe) hold tokens i_first .. of this sequence; past nc they are gap rows.
    const index_t i0 = i_first - pb;  // token index of slot 0
    int pe = kRows;
    if (i0 + pe > nc) pe = static_cast<int>(nc - i0);
    if (pe <= pb) {  // a gap row: skip to the next sequence's rows (or the next slot)
      if (!packed) break;
      index_t next = r0 + pb + 1;
      if (b + 1 < p.batch) {
        const index_t nb = compressed_row_begin(p.cu_seqlens, b + 1, p.total_rows, d);
        if (nb > next) next = nb;
      }
      pb = static_cast<int>(next - r0);
      continue;
    }
    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : b * p.dout_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(g) * p.v_stride.head;
    const index_t lse_b = packed ? 0 : b * p.lse_batch_stride;

    load_rows_async<T, kHeadDim, kRows>(sK, Cfg::kLdQK, k, p.k_stride.row, kv_begin, i0, nc, lane);
    load_rows_async<T, kHeadDimV, kRows>(sV, Cfg::kLdV, v, p.v_stride.row, kv_begin, i0, nc, lane);
    mma::cp_async_commit();
    mma::cp_async_wait_all();
    __syncwarp();
    bool key_on[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) key_on[ri] = gid + ri * 8 >= pb && gid + ri * 8 < pe;

    // Query tokens that see the pass's first key: t >= (i0 + pb)*d + l - 1.
    const index_t tok_lo = (i0 + pb) * d + l - 1;
    const index_t n_tok = seq_len - tok_lo;
    const index_t n_rows = n_tok > 0 ? n_tok * G : 0;

    float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDimV / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;

    for (index_t q0 = 0; q0 < n_rows; q0 += kBlockN) {
      {
        const index_t r = q0 + lane;
        int tok = -1;
        float lse_v = INFINITY, delta_v = 0.f;
        if (r < n_rows) {
          tok = static_cast<int>(tok_lo + r / G);
          const index_t at = lse_b + (row_begin + tok) * p.lse_row_stride + static_cast<index_t>(g) * G + r % G;
          const float lv = p.lse[at];
          lse_v = lv == -INFINITY ? INFINITY : lv * kLog2e;
          delta_v = p.delta[at];
        }
        s_tok[lane] = tok;
        s_lse[lane] = lse_v;
        s_delta[lane] = delta_v;
      }
      __syncwarp();
      constexpr int kVecQ = kHeadDim / 8, kVecV = kHeadDimV / 8;
#pragma unroll
      for (int i = lane; i < kBlockN * kVecQ; i += 32) {
        const int rr = i / kVecQ, c = (i % kVecQ) * 8;
        const int tok = s_tok[rr];
        const int hq = g * G + static_cast<int>((q0 + rr) % G);
        const T* src = tok >= 0 ? q + (row_begin + tok) * p.q_stride.row + static_cast<index_t>(hq) * p.q_stride.head + c : q;
        mma::cp_async_16(sQ + rr * Cfg::kLdQK + c, src, tok >= 0);
      }
#pragma unroll
      for (int i = lane; i < kBlockN * kVecV; i += 32) {
        const int rr = i / kVecV, c = (i % kVecV) * 8;
        const int tok = s_tok[rr];
        const int hq = g * G + static_cast<int>((q0 + rr) % G);
        const T* src = tok >= 0 ? dout + (row_begin + tok) * p.dout_stride.row + static_cast<index_t>(hq) * p.dout_stride.head + c
                                : dout;
        mma::cp_async_16(sdO + rr * Cfg::kLdV + c, src, tok >= 0);
      }
      mma::cp_async_commit();
      mma::cp_async_wait_all();
      __syncwarp();

      float st[4][4] = {};
      gemm_16x32_nt<T, kHeadDim>(st, sK, Cfg::kLdQK, sQ, Cfg::kLdQK, gid, tig);
      float dpt[4][4] = {};
      gemm_16x32_nt<T, kHeadDimV>(dpt, sV, Cfg::kLdV, sdO, Cfg::kLdV, gid, tig);
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const index_t first_t = (i0 + gid + ri * 8) * d + l - 1;  // first position that sees this key
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n * 8 + 2 * tig + e;
            const int tok = s_tok[col];
            const bool ok = key_on[ri] && tok >= 0 && tok >= first_t;
            const float pr = ok ? exp2f(st[n][ri * 2 + e] * scale_log2 - s_lse[col]) : 0.f;
            st[n][ri * 2 + e] = pr;
            dpt[n][ri * 2 + e] = pr * (dpt[n][ri * 2 + e] - s_delta[col]);
          }
      }
      gemm_16x32_regs_nn<T, kHeadDimV>(dv_acc, st, sdO, Cfg::kLdV, gid, tig);
      gemm_16x32_regs_nn<T, kHeadDim>(dk_acc, dpt, sQ, Cfg::kLdQK, gid, tig);
      __syncwarp();
    }

    T* dk = static_cast<T*>(p.dk) + (packed ? 0 : b * p.dk_stride.batch) + static_cast<index_t>(g) * p.dk_stride.head;
    T* dv = static_cast<T*>(p.dv) + (packed ? 0 : b * p.dv_stride.batch) + static_cast<index_t>(g) * p.dv_stride.head;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      if (!key_on[ri]) continue;
      const index_t i = i0 + gid + ri * 8;
      T* krow = dk + (kv_begin + i) * p.dk_stride.row;
      T* vrow = dv + (kv_begin + i) * p.dv_stride.row;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n)
        *reinterpret_cast<uint32_t*>(krow + n * 8 + 2 * tig) =
            mma::pack2<T>(dk_acc[n][ri * 2] * p.scale, dk_acc[n][ri * 2 + 1] * p.scale);
#pragma unroll
      for (int n = 0; n < kHeadDimV / 8; ++n)
        *reinterpret_cast<uint32_t*>(vrow + n * 8 + 2 * tig) = mma::pack2<T>(dv_acc[n][ri * 2], dv_acc[n][ri * 2 + 1]);
    }
    __syncwarp();
    pb = pe;
  }
}

}  // namespace sparse_detail
}  // namespace nsa
