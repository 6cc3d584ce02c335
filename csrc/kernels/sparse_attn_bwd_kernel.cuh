// Kernel bodies of the grouped sparse attention backward (see sparse_attn.h).
//
//   delta = rowsum(dO * O) - dlse           (computed by the caller)
//   P = exp(scale * Q K^T - lse),  dP = dO V^T,  dS = P * (dP - delta)
//   dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO
//
// dQ: the forward's CTA layout and key walks (attn_bwd_dq.cuh), accumulating dQ in registers.
// dK/dV: CTAs of 64 keys sharing each Q / dO tile, the rows of a key tile split into
// chunks over several CTAs (attn_bwd_dkdv.cuh). Window: the tokens [s, s + w - 1] of each key,
// one chunk per tile (every tile has about (64 + w) * G rows: no long tail). Selected: the
// tokens that chose the keys' block, from per-(sequence, KV head, block) lists built on the GPU
// by a stable radix sort of (block, token) pairs (tokens ascending inside each list); long
// lists are cut into chunks whose fp32 partials a second kernel adds in chunk order. No
// atomics anywhere: bitwise reproducible.
#pragma once

#include "attn_bwd_dkdv.cuh"
#include "attn_bwd_dkdv_sm90.cuh"
#include "attn_bwd_dq.cuh"

namespace nsa {
namespace sparse_detail {

// ---------------------------------------------------------------------------------------------
// dQ (attn_bwd_dq.cuh): the forward's CTA walks. Selected blocks here; the window's contiguous
// key ranges in the kernel after it.
template <typename T, int kHeadDim, int kHeadDimV, int kRowGroups>
__global__ void __launch_bounds__(DqConfig<kHeadDim, kHeadDimV, kRowGroups>::kThreads,
                                  DqConfig<kHeadDim, kHeadDimV, kRowGroups>::kMinCtasPerSm)
    sparse_attn_bwd_dq_kernel(const AttnBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  sel_dq<T, kHeadDim, kHeadDimV, kRowGroups>(p, smem_raw);
}

template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(DqConfig<kHeadDim, kHeadDimV>::kThreads, DqConfig<kHeadDim, kHeadDimV>::kMinCtasPerSm)
    sparse_attn_bwd_dq_window_kernel(const AttnBwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  range_dq<T, kHeadDim, kHeadDimV, /*kCompressed=*/false>(p, smem_raw);
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

// Selected: unit w -> (k-th longest list, chunk, sub-tile) through arr.map (dkdv::SelPlan);
// tile(args, partial) runs a 64-key tile (dkdv_tile, or the one-warpgroup dkdv_tile_sm90_wide:
// the same partial layout).
template <class Tile>
__device__ __forceinline__ void sel_dkdv_unit(const AttnBwdParams& p, const int* sorted_tokens, const dkdv::SelArrays& arr,
                                              index_t chunk_rows, int tpb, index_t max_partials, float* ws,
                                              int partial_floats, Tile&& tile) {
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
    partial = ws + w * partial_floats;
  }
  tile(a, partial);
}

template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(dkdv::Cfg<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_bwd_dkdv_kernel(const AttnBwdParams p, const int* sorted_tokens, const dkdv::SelArrays arr,
                                index_t chunk_rows, int tpb, index_t max_partials, float* ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  sel_dkdv_unit(p, sorted_tokens, arr, chunk_rows, tpb, max_partials, ws, dkdv::Cfg<kHeadDim, kHeadDimV>::kPartialFloats,
                [&](const dkdv::TileArgs& a, float* partial) { dkdv::dkdv_tile<T, kHeadDim, kHeadDimV>(p, a, partial, smem_raw); });
}

// The same units on the one-warpgroup wgmma tile, two CTAs per SM (the sm_90a default;
// NSA_SEL_DKDV_SM90=0 keeps sm_80's).
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(128, 2)
    sparse_attn_bwd_dkdv_sm90_kernel(const AttnBwdParams p, const int* sorted_tokens, const dkdv::SelArrays arr,
                                     index_t chunk_rows, int tpb, index_t max_partials, float* ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  sel_dkdv_unit(p, sorted_tokens, arr, chunk_rows, tpb, max_partials, ws, dkdv::Cfg<kHeadDim, kHeadDimV>::kPartialFloats,
                [&](const dkdv::TileArgs& a, float* partial) {
                  dkdv::dkdv_tile_sm90_wide<T, kHeadDim, kHeadDimV, 1>(p, a, partial, smem_raw);
                });
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
