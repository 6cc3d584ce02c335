// Forward kernel of the selected-block branch (see sparse_attn.h); the window branch and the
// compressed branch run the contiguous-range kernel (range_attn_fwd_kernel.cuh).
//
// The warps of a CTA own consecutive tokens of one KV head (16 rows each: the G heads of 16/G
// tokens, or 16 heads of one token per chunk when G >= 16, so small groups still fill the m16
// tensor-core tile). Neighbouring tokens select mostly the same blocks, so the CTA walks the
// union of its tokens' blocks in ascending order, loads each block's K/V tiles once for all its
// warps, and prefetches the next block's first tiles while the current ones are multiplied
// (two buffer sets of two 32-key tiles). A warp multiplies a tile only if one of its tokens
// selected the block; rows of tokens that did not are masked. The walk (SelBlockWalk,
// attn_cta_walk.cuh) is shared with the dQ kernel.
#pragma once

#include "attn_fwd_tile.cuh"

namespace nsa {
namespace sparse_detail {

// kWarps = 1 (G >= 16, "solo"): a CTA is one token, so no warp waits at a CTA barrier for
// blocks only its neighbours selected (with independent selections the union of 4 tokens'
// lists is ~3x one list); one-tile sets keep five such CTAs per SM. By default
// (sparse_attn_fwd_cuda) groups whose neighbouring tokens share their blocks run 4-warp CTAs and
// the others 2-warp CTAs (measured on the H200, 64k, G = 16: shared lists 15.0 ms at width 4 vs
// 18.1 at 2, independent lists 39.5 vs 29.9).
template <int kHeadDim, int kHeadDimV, int kWarps_ = 4>
struct SelFwdConfig {
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded smem rows: conflict-free fragment loads
  static constexpr int kLdV = kHeadDimV + 8;
  // 64 keys = one block of l' = 64; one tile for one- and two-warp CTAs (five per SM)
  static constexpr int kTilesPerSet = kHeadDim <= 192 && kWarps > 2 ? 2 : 1;
  static constexpr int kTileElems = kBlockN * kLdQK + kBlockN * kLdV;
  static constexpr int kSmemBytes =
      (kWarps * kRows * kLdQK + 2 * kTilesPerSet * kTileElems) * 2 + 2 * kWarps * static_cast<int>(sizeof(int));
};

template <typename T, int kHeadDim, int kHeadDimV, int kWarps>
__global__ void __launch_bounds__(SelFwdConfig<kHeadDim, kHeadDimV, kWarps>::kThreads)
    sparse_attn_fwd_kernel(const AttnParams p) {
  using Cfg = SelFwdConfig<kHeadDim, kHeadDimV, kWarps>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw) + warp * kRows * Cfg::kLdQK;
  T* sSets = reinterpret_cast<T*>(smem_raw) + Cfg::kWarps * kRows * Cfg::kLdQK;
  int* s_next = reinterpret_cast<int*>(sSets + 2 * Cfg::kTilesPerSet * Cfg::kTileElems);  // [2][kWarps]

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kWarps;
  Group gr;
  if (!group_of(p, cta_tokens, blockIdx.x, gr)) return;  // uniform over the CTA
  // Adaptive width: this launch handles the groups whose flag it wants (uniform over the CTA).
  if (p.sel_group_want >= 0 && p.sel_group_flags != nullptr &&
      p.sel_group_flags[sel_flag_group(p, cta_tokens, blockIdx.x) * p.heads_kv + rm.g] != p.sel_group_want)
    return;
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;

  Pass ps;
  for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const index_t row_begin = ps.row_begin;
    const int seq_len = ps.seq_len;
    const Pass wps = warp_pass(ps, warp, P);
    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;
    SelBlockWalk<Cfg::kWarps, Cfg::kTilesPerSet> walk(p, ps, wps, rm.g, s_next, warp, lane);

    load_query_rows_async<T, kHeadDim>(sQ, Cfg::kLdQK, q, p.q_stride, rm, wps, lane);
    mma::cp_async_commit();

    int row_tok[2];
    bool row_on[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8;
      row_tok[ri] = r / rm.heads;
      row_on[ri] = r < P * rm.heads && row_tok[ri] >= wps.p_begin && row_tok[ri] < wps.p_end;
    }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o_acc[kHeadDimV / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

    walk.run(
        [&](int slot, index_t s0) {
          T* sK = sSets + slot * Cfg::kTileElems;
          T* sV = sK + kBlockN * Cfg::kLdQK;
          load_rows_cta<T, kHeadDim, kBlockN, Cfg::kThreads>(sK, Cfg::kLdQK, k, p.k_stride.row, row_begin, s0, seq_len, tid);
          load_rows_cta<T, kHeadDimV, kBlockN, Cfg::kThreads>(sV, Cfg::kLdV, v, p.v_stride.row, row_begin, s0, seq_len, tid);
        },
        [&](int slot, index_t s0, unsigned mask) {
          const T* sK = sSets + slot * Cfg::kTileElems;
          const T* sV = sK + kBlockN * Cfg::kLdQK;
          // keys [s0, min(t + 1, seq_len)) of a row whose token selected the block
          int hi_rel[2];
#pragma unroll
          for (int ri = 0; ri < 2; ++ri) {
            const index_t t = wps.t0 + row_tok[ri];
            const bool sel = row_on[ri] && ((mask >> row_tok[ri]) & 1u);
            hi_rel[ri] = sel ? tile_offset(min(t + 1, static_cast<index_t>(seq_len)), s0) : 0;
          }
          fwd_tile<T, kHeadDim, kHeadDimV>(sQ, Cfg::kLdQK, sK, sV, Cfg::kLdV, scale_log2, m_run, l_run, o_acc, gid, tig,
                                           [&](int ri, int kk) { return kk < hi_rel[ri]; });
        });
    __syncwarp();

    fwd_epilogue<T, kHeadDimV>(p, rm, wps, row_tok, row_on, m_run, l_run, o_acc, gid, tig);
    __syncthreads();  // sQ and the buffer sets are reused by the next pass
  }
}

}  // namespace sparse_detail
}  // namespace nsa
