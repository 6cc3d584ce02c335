// Kernel bodies of the grouped sparse attention backward (see sparse_attn.h).
//
//   delta = rowsum(dO * O) - dlse           (computed by the caller)
//   P = exp(scale * Q K^T - lse),  dP = dO V^T,  dS = P * (dP - delta)
//   dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO
//
// dQ: the forward's warp layout (16 query rows walking their key tiles), accumulating dQ in
// registers. dK/dV: a warp owns 16 consecutive keys and walks the query rows that attend them:
// for the window branch the tokens [s, s + w - 1]; for the selected branch the tokens that
// selected the keys' block, read from per-(sequence, KV head, block) lists built on the GPU by
// a stable radix sort of (block, token) pairs (tokens ascending inside each list). Both
// accumulate in registers in a fixed order: no atomics, bitwise reproducible.
#pragma once

#include "sparse_attn_common.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV>
struct BwdConfig {
  static constexpr int kWarps = kHeadDim <= 128 ? 4 : 2;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;
  static constexpr int kLdV = kHeadDimV + 8;
  // dQ: Q, dO (16 rows) + K, V (32 keys)
  static constexpr int kDqElemsPerWarp = kRows * kLdQK + kRows * kLdV + kBlockN * kLdQK + kBlockN * kLdV;
  static constexpr int kDqSmemBytes = kWarps * kDqElemsPerWarp * 2;
  // dK/dV: K, V (16 keys) + Q, dO (32 query rows) + lse, delta, token of the 32 rows
  static constexpr int kDkvElemsPerWarp = kRows * kLdQK + kRows * kLdV + kBlockN * kLdQK + kBlockN * kLdV;
  static constexpr int kDkvBytesPerWarp = kDkvElemsPerWarp * 2 + 3 * kBlockN * 4;
  static constexpr int kDkvSmemBytes = kWarps * kDkvBytesPerWarp;
};

// ---------------------------------------------------------------------------------------------
// dQ
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(BwdConfig<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_bwd_dq_kernel(const AttnBwdParams p) {
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
  const bool selected = p.mode == AttnMode::kSelected;

  Pass ps;
  for (int pb = 0; next_pass(p, rm.tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const index_t row_begin = ps.row_begin, t0 = ps.t0;
    const int seq_len = ps.seq_len;
    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : b * p.dout_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;

    load_query_rows_async<T, kHeadDim>(sQ, Cfg::kLdQK, q, p.q_stride, rm, ps, lane);
    load_query_rows_async<T, kHeadDimV>(sdO, Cfg::kLdV, dout, p.dout_stride, rm, ps, lane);
    mma::cp_async_commit();

    int row_tok[2];
    bool row_on[2];
    float lse_l2[2], delta[2];
    const index_t lse_b = packed ? 0 : b * p.lse_batch_stride;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8;
      row_tok[ri] = r / rm.heads;
      row_on[ri] = r < rm.tokens * rm.heads && row_tok[ri] >= ps.p_begin && row_tok[ri] < ps.p_end;
      lse_l2[ri] = INFINITY;
      delta[ri] = 0.f;
      if (row_on[ri]) {
        const index_t at = lse_b + (row_begin + t0 + row_tok[ri]) * p.lse_row_stride + rm.head0 + r % rm.heads;
        const float l = p.lse[at];
        // A row with no key (lse = -inf) has P = 0 everywhere: make exp2(x - lse) vanish.
        lse_l2[ri] = l == -INFINITY ? INFINITY : l * kLog2e;
        delta[ri] = p.delta[at];
      }
    }
    float dq_acc[kHeadDim / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.f;
    mma::cp_async_wait_all();
    __syncwarp();

    walk_key_tiles(p, ps, rm.g, lane, [&](index_t s0, unsigned tokmask) {
      load_rows_async<T, kHeadDim, kBlockN>(sK, Cfg::kLdQK, k, p.k_stride.row, row_begin, s0, seq_len, lane);
      load_rows_async<T, kHeadDimV, kBlockN>(sV, Cfg::kLdV, v, p.v_stride.row, row_begin, s0, seq_len, lane);
      mma::cp_async_commit();
      mma::cp_async_wait_all();
      __syncwarp();

      float s_acc[4][4] = {};
      gemm_16x32_nt<T, kHeadDim>(s_acc, sQ, Cfg::kLdQK, sK, Cfg::kLdQK, gid, tig);   // S = Q K^T
      float dp_acc[4][4] = {};
      gemm_16x32_nt<T, kHeadDimV>(dp_acc, sdO, Cfg::kLdV, sV, Cfg::kLdV, gid, tig);  // dP = dO V^T
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const index_t t = t0 + row_tok[ri];
        const bool tok_on = row_on[ri] && ((tokmask >> row_tok[ri]) & 1u);
        const index_t lo = selected ? 0 : t - p.window + 1;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const index_t s = s0 + n * 8 + 2 * tig + e;
            const bool ok = tok_on && s <= t && s >= lo && s < seq_len;
            const float pr = ok ? exp2f(s_acc[n][ri * 2 + e] * scale_log2 - lse_l2[ri]) : 0.f;
            s_acc[n][ri * 2 + e] = pr * (dp_acc[n][ri * 2 + e] - delta[ri]);  // dS
          }
      }
      gemm_16x32_regs_nn<T, kHeadDim>(dq_acc, s_acc, sK, Cfg::kLdQK, gid, tig);  // dQ += dS K
      __syncwarp();
    });

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

// ---------------------------------------------------------------------------------------------
// Selected branch: (block, token) lists. Entry e = (row, g, i) of block_idx becomes the pair
// (bucket(sequence, g, block), token position); invalid, duplicate or non-causal entries get
// the sentinel bucket. Entries are enumerated in (row, g, i) order, so a stable sort by bucket
// leaves every bucket's tokens ascending.
__device__ __forceinline__ index_t bucket_of(const AttnParams& p, int b, int g, int j) {
  if (p.cu_seqlens == nullptr) {
    const index_t nb = (p.seqlen + p.sel_block - 1) / p.sel_block;
    return (static_cast<index_t>(b) * p.heads_kv + g) * nb + j;
  }
  // Packed: sequence b's blocks are cu[b]/l' + b + j, disjoint across sequences
  // (floor(a/l') + ceil(T/l') <= floor((a+T)/l') + 1).
  const index_t per_g = p.total_rows / p.sel_block + p.batch + 1;
  return static_cast<index_t>(g) * per_g + compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.sel_block) + b + j;
}

__host__ __device__ inline index_t num_buckets(const AttnParams& p) {
  if (p.cu_seqlens == nullptr)
    return static_cast<index_t>(p.batch) * p.heads_kv * ((p.seqlen + p.sel_block - 1) / p.sel_block);
  return static_cast<index_t>(p.heads_kv) * (p.total_rows / p.sel_block + p.batch + 1);
}

__device__ __forceinline__ index_t lower_bound(const int* a, index_t n, int x) {
  index_t lo = 0, hi = n;
  while (lo < hi) {
    const index_t mid = (lo + hi) >> 1;
    if (a[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------------------------
// dK, dV: a warp owns 16 consecutive key positions (one pass per sequence and, for the selected
// branch, per block) and walks the query rows (token, head of KV head g) that attend them, 32
// rows per step: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(BwdConfig<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_bwd_dkdv_kernel(const AttnBwdParams p, const int* sorted_keys, const int* sorted_tokens,
                                index_t num_pairs) {
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
  Group gr;
  if (!group_of(p, kRows, static_cast<index_t>(blockIdx.x) * Cfg::kWarps + warp, gr)) return;
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;
  const bool selected = p.mode == AttnMode::kSelected;

  Pass ps;
  for (int pb = 0; next_pass(p, kRows, gr, pb, selected ? p.sel_block : 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const index_t row_begin = ps.row_begin, t0 = ps.t0;
    const int seq_len = ps.seq_len;
    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : b * p.dout_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(g) * p.v_stride.head;
    const index_t lse_b = packed ? 0 : b * p.lse_batch_stride;
    const index_t s_first = t0 + ps.p_begin, s_last = t0 + ps.p_end - 1;

    // The 16 keys: rows outside [p_begin, p_end) of the group read as zero.
    load_rows_async<T, kHeadDim, kRows>(sK, Cfg::kLdQK, k, p.k_stride.row, row_begin, t0, seq_len, lane);
    load_rows_async<T, kHeadDimV, kRows>(sV, Cfg::kLdV, v, p.v_stride.row, row_begin, t0, seq_len, lane);
    mma::cp_async_commit();
    mma::cp_async_wait_all();
    __syncwarp();
    bool key_on[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) key_on[ri] = gid + ri * 8 >= ps.p_begin && gid + ri * 8 < ps.p_end;

    // Query tokens: a contiguous range (window) or a sorted list (selected).
    index_t tok_lo = 0, n_tok = 0;
    const int* list = nullptr;
    if (selected) {
      const int bucket = static_cast<int>(bucket_of(p, b, g, static_cast<int>(s_first / p.sel_block)));
      tok_lo = lower_bound(sorted_keys, num_pairs, bucket);
      n_tok = lower_bound(sorted_keys, num_pairs, bucket + 1) - tok_lo;
      list = sorted_tokens + tok_lo;
    } else {
      tok_lo = s_first;
      index_t hi = s_last + p.window - 1;
      if (hi > seq_len - 1) hi = seq_len - 1;
      n_tok = hi - tok_lo + 1;
    }
    const index_t n_rows = n_tok * G;

    float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDimV / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;

    for (index_t r0 = 0; r0 < n_rows; r0 += kBlockN) {
      // Rows r0 .. r0+31: token index r / G, head r % G.
      {
        const index_t r = r0 + lane;
        int tok = -1;
        float lse_v = INFINITY, delta_v = 0.f;
        if (r < n_rows) {
          tok = selected ? __ldg(list + r / G) : static_cast<int>(tok_lo + r / G);
          const index_t at = lse_b + (row_begin + tok) * p.lse_row_stride + static_cast<index_t>(g) * G + r % G;
          const float l = p.lse[at];
          lse_v = l == -INFINITY ? INFINITY : l * kLog2e;
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
        const int hq = g * G + static_cast<int>((r0 + rr) % G);
        const T* src = tok >= 0 ? q + (row_begin + tok) * p.q_stride.row + static_cast<index_t>(hq) * p.q_stride.head + c : q;
        mma::cp_async_16(sQ + rr * Cfg::kLdQK + c, src, tok >= 0);
      }
#pragma unroll
      for (int i = lane; i < kBlockN * kVecV; i += 32) {
        const int rr = i / kVecV, c = (i % kVecV) * 8;
        const int tok = s_tok[rr];
        const int hq = g * G + static_cast<int>((r0 + rr) % G);
        const T* src = tok >= 0 ? dout + (row_begin + tok) * p.dout_stride.row + static_cast<index_t>(hq) * p.dout_stride.head + c
                                : dout;
        mma::cp_async_16(sdO + rr * Cfg::kLdV + c, src, tok >= 0);
      }
      mma::cp_async_commit();
      mma::cp_async_wait_all();
      __syncwarp();

      float st[4][4] = {};
      gemm_16x32_nt<T, kHeadDim>(st, sK, Cfg::kLdQK, sQ, Cfg::kLdQK, gid, tig);   // S^T = K Q^T
      float dpt[4][4] = {};
      gemm_16x32_nt<T, kHeadDimV>(dpt, sV, Cfg::kLdV, sdO, Cfg::kLdV, gid, tig);  // dP^T = V dO^T
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const index_t s = t0 + gid + ri * 8;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n * 8 + 2 * tig + e;
            const int tok = s_tok[col];
            const bool ok = key_on[ri] && tok >= 0 && s <= tok && (selected || tok <= s + p.window - 1);
            const float pr = ok ? exp2f(st[n][ri * 2 + e] * scale_log2 - s_lse[col]) : 0.f;
            st[n][ri * 2 + e] = pr;                                       // P^T
            dpt[n][ri * 2 + e] = pr * (dpt[n][ri * 2 + e] - s_delta[col]);  // dS^T
          }
      }
      gemm_16x32_regs_nn<T, kHeadDimV>(dv_acc, st, sdO, Cfg::kLdV, gid, tig);   // dV += P^T dO
      gemm_16x32_regs_nn<T, kHeadDim>(dk_acc, dpt, sQ, Cfg::kLdQK, gid, tig);   // dK += dS^T Q
      __syncwarp();
    }

    T* dk = static_cast<T*>(p.dk) + (packed ? 0 : b * p.dk_stride.batch) + static_cast<index_t>(g) * p.dk_stride.head;
    T* dv = static_cast<T*>(p.dv) + (packed ? 0 : b * p.dv_stride.batch) + static_cast<index_t>(g) * p.dv_stride.head;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      if (!key_on[ri]) continue;
      const index_t s = t0 + gid + ri * 8;
      T* krow = dk + (row_begin + s) * p.dk_stride.row;
      T* vrow = dv + (row_begin + s) * p.dv_stride.row;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n)
        *reinterpret_cast<uint32_t*>(krow + n * 8 + 2 * tig) =
            mma::pack2<T>(dk_acc[n][ri * 2] * p.scale, dk_acc[n][ri * 2 + 1] * p.scale);
#pragma unroll
      for (int n = 0; n < kHeadDimV / 8; ++n)
        *reinterpret_cast<uint32_t*>(vrow + n * 8 + 2 * tig) = mma::pack2<T>(dv_acc[n][ri * 2], dv_acc[n][ri * 2 + 1]);
    }
    __syncwarp();
  }
}

}  // namespace sparse_detail
}  // namespace nsa
