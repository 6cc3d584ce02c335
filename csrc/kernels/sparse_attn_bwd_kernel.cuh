// Kernel bodies of the grouped sparse attention backward (see sparse_attn.h).
//
//   delta = rowsum(dO * O) - dlse           (computed by the caller)
//   P = exp(scale * Q K^T - lse),  dP = dO V^T,  dS = P * (dP - delta)
//   dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO
//
// dQ: the forward's warp layout (16 query rows walking their key tiles), accumulating dQ in
// registers. dK/dV: CTAs of 64 keys sharing each Q / dO tile, the rows of a key tile split into
// chunks over several CTAs (attn_bwd_dkdv.cuh). Window: the tokens [s, s + w - 1] of each key,
// one chunk per tile (every tile has about (64 + w) * G rows: no long tail). Selected: the
// tokens that chose the keys' block, from per-(sequence, KV head, block) lists built on the GPU
// by a stable radix sort of (block, token) pairs (tokens ascending inside each list); long
// lists are cut into chunks whose fp32 partials a second kernel adds in chunk order. No
// atomics anywhere: bitwise reproducible.
#pragma once

#include "attn_bwd_dkdv.cuh"
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
// dK, dV (attn_bwd_dkdv.cuh).

// Window: one CTA per (64-key tile, KV head), the tile's tokens [s0, s_last + w - 1] in one chunk.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(dkdv::Cfg<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_bwd_dkdv_window_kernel(const AttnBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  dkdv::range_dkdv<T, kHeadDim, kHeadDimV, /*kCompressed=*/false>(p, 1, nullptr, smem_raw);
}

// Selected: bucket u (bucket_of's numbering) and 64-key sub-tile `sub` of its block -> keys;
// false if u is no block of a sequence or the sub-tile lies past the sequence's end.
__device__ __forceinline__ bool sel_tile_of(const AttnParams& p, index_t u, int sub, dkdv::RangeTile& t, int& g) {
  index_t j;
  if (p.cu_seqlens == nullptr) {
    const index_t nb = (p.seqlen + p.sel_block - 1) / p.sel_block;
    if (nb <= 0) return false;
    j = u % nb;
    const index_t bg = u / nb;
    g = static_cast<int>(bg % p.heads_kv);
    t.b = static_cast<int>(bg / p.heads_kv);
    if (t.b >= p.batch) return false;
  } else {
    const index_t per_g = p.total_rows / p.sel_block + p.batch + 1;
    g = static_cast<int>(u / per_g);
    if (g >= p.heads_kv) return false;
    const index_t slot = u % per_g;
    int lo = 0, hi = p.batch - 1, b = -1;
    while (lo <= hi) {
      const int mid = (lo + hi) >> 1;
      if (compressed_row_begin(p.cu_seqlens, mid, p.total_rows, p.sel_block) + mid <= slot) {
        b = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    if (b < 0) return false;
    t.b = b;
    j = slot - (compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.sel_block) + b);
  }
  const SeqGeom sg = seq_geom(p.cu_seqlens, t.b, p.seqlen, p.total_rows);
  t.seq_len = sg.len;
  t.q_row0 = sg.row_begin;
  const index_t blk0 = j * p.sel_block;
  t.key0 = blk0 + static_cast<index_t>(sub) * dkdv::kKeys;
  index_t end = t.key0 + dkdv::kKeys;
  if (end > blk0 + p.sel_block) end = blk0 + p.sel_block;
  if (end > sg.len) end = sg.len;
  if (end <= t.key0) return false;
  t.nk = static_cast<int>(end - t.key0);
  t.k_row0 = sg.row_begin + t.key0;
  return true;
}

// Selected: unit w -> (k-th longest list, chunk, sub-tile) through arr.map (dkdv::SelPlan).
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(dkdv::Cfg<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_bwd_dkdv_kernel(const AttnBwdParams p, const int* sorted_tokens, const dkdv::SelArrays arr,
                                index_t chunk_rows, int tpb, index_t max_partials, float* ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const index_t w = blockIdx.x;
  const int k = arr.map[w];
  if (k < 0) return;
  const int u = arr.order[k];
  const index_t rel = w - arr.base[k];
  const int nch = arr.units[k] / tpb;
  const index_t chunk = rel / tpb;
  dkdv::RangeTile t;
  int g;
  if (!sel_tile_of(p, u, static_cast<int>(rel % tpb), t, g)) return;
  const int start = arr.start[u];
  const index_t rows = static_cast<index_t>(arr.start[u + 1] - start) * (p.heads_q / p.heads_kv);
  dkdv::TileArgs a;
  a.b = t.b;
  a.g = g;
  a.q_row0 = t.q_row0;
  a.k_row0 = t.k_row0;
  a.nk = t.nk;
  a.key0 = t.key0;
  a.list = sorted_tokens + start;
  a.r_begin = chunk * chunk_rows;
  a.r_end = a.r_begin + chunk_rows < rows ? a.r_begin + chunk_rows : rows;
  float* partial = nullptr;
  if (nch > 1) {
    if (w >= max_partials) return;  // cannot happen: multi-chunk lists sort first (SelPlan)
    partial = ws + w * dkdv::Cfg<kHeadDim, kHeadDimV>::kPartialFloats;
  }
  dkdv::dkdv_tile<T, kHeadDim, kHeadDimV>(p, a, partial, smem_raw);
}

// Selected: one CTA per (k-th longest list, sub-tile) of the lists with >= 2 chunks; adds the
// partials of chunks 0, 1, ... in that order.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(dkdv::Cfg<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_bwd_dkdv_reduce_kernel(const AttnBwdParams p, const dkdv::SelArrays arr, index_t num_buckets, int tpb,
                                       index_t max_partials, const float* ws) {
  const index_t x = blockIdx.x;
  const index_t k = x / tpb;
  if (k >= num_buckets) return;
  const int units = arr.units[k];
  const int nch = units / tpb;
  if (nch <= 1) return;
  const index_t base = arr.base[k];
  if (base + units > max_partials) return;  // cannot happen (SelPlan)
  dkdv::RangeTile t;
  int g;
  const int sub = static_cast<int>(x % tpb);
  if (!sel_tile_of(p, arr.order[k], sub, t, g)) return;
  dkdv::reduce_tile<T, kHeadDim, kHeadDimV>(p, ws, base + sub, tpb, nch, t.b, g, t.k_row0, t.nk);
}

}  // namespace sparse_detail
}  // namespace nsa
