// Forward kernel of the selected-block branch (see sparse_attn.h); the window branch and the
// compressed branch run the contiguous-range kernel (range_attn_fwd_kernel.cuh).
//
// The warps of a CTA own consecutive tokens of one KV head (16 rows each: the G heads of 16/G
// tokens, or 16 heads of one token per chunk when G >= 16, so small groups still fill the m16
// tensor-core tile). Neighbouring tokens select mostly the same blocks, so the CTA walks the
// union of its tokens' blocks in ascending order, loads each block's K/V tiles once for all its
// warps, and prefetches the next block's first tiles while the current ones are multiplied
// (two buffer sets of two 32-key tiles). A warp multiplies a tile only if one of its tokens
// selected the block; rows of tokens that did not are masked.
#pragma once

#include <climits>

#include "attn_fwd_tile.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV>
struct SelFwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded smem rows: conflict-free fragment loads
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kTilesPerSet = kHeadDim <= 192 ? 2 : 1;  // 64 keys = one block of l' = 64
  static constexpr int kTileElems = kBlockN * kLdQK + kBlockN * kLdV;
  static constexpr int kSmemBytes =
      (kWarps * kRows * kLdQK + 2 * kTilesPerSet * kTileElems) * 2 + 2 * kWarps * static_cast<int>(sizeof(int));
};

template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(SelFwdConfig<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_fwd_kernel(const AttnParams p) {
  using Cfg = SelFwdConfig<kHeadDim, kHeadDimV>;
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
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;
  const int lp = p.sel_block;
  const int tiles_per_block = lp / kBlockN;

  Pass ps;
  for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const index_t row_begin = ps.row_begin;
    const int seq_len = ps.seq_len;
    const Pass wps = warp_pass(ps, warp, P);
    const index_t t_last_cta = ps.t0 + ps.p_end - 1;
    const int n_blocks_seq = (seq_len + lp - 1) / lp;
    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;

    // Lane i < P holds token slot i of this warp: its block list.
    const bool lane_tok = lane >= wps.p_begin && lane < wps.p_end;
    const int* list = nullptr;
    if (lane_tok)
      list = p.block_idx + (packed ? 0 : b * p.block_idx_stride.batch) + (row_begin + wps.t0 + lane) * p.block_idx_stride.row +
             static_cast<index_t>(rm.g) * p.block_idx_stride.head;
    // The next block of the CTA's union after `last`, and this warp's token mask for it. Lists
    // need not be sorted; duplicates, negative and out-of-range entries are ignored. Called by
    // every thread (one barrier); `parity` alternates the exchange slots between calls.
    int parity = 0;
    auto cta_next = [&](int last, unsigned& tokmask) {
      int mine = INT_MAX;
      if (lane_tok)
        for (int i = 0; i < p.top_n; ++i) {
          const int j = __ldg(list + i);
          if (j > last && j < mine && j < n_blocks_seq) mine = j;
        }
      int jw = mine;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) jw = min(jw, __shfl_xor_sync(0xffffffffu, jw, off));
      if (lane == 0) s_next[parity * Cfg::kWarps + warp] = jw;
      __syncwarp();
      __syncthreads();
      int j = INT_MAX;
#pragma unroll
      for (int w = 0; w < Cfg::kWarps; ++w) j = min(j, s_next[parity * Cfg::kWarps + w]);
      parity ^= 1;  // the other slots are free: every thread read them before this call's barrier
      tokmask = __ballot_sync(0xffffffffu, lane_tok && mine == j);
      return j;
    };
    // Work item = (block, first tile of a set of kTilesPerSet tiles); tiles past the CTA's last
    // token or the sequence are never loaded.
    auto set_tiles = [&](int j, int sub) {
      const index_t s0 = static_cast<index_t>(j) * lp + static_cast<index_t>(sub) * kBlockN;
      int n = min(Cfg::kTilesPerSet, tiles_per_block - sub);
      const index_t end = min(static_cast<index_t>(seq_len), t_last_cta + 1);
      while (n > 0 && s0 + static_cast<index_t>(n - 1) * kBlockN >= end) --n;
      return n;
    };
    auto load_set = [&](int set, int j, int sub, int n) {
      for (int x = 0; x < n; ++x) {
        T* sK = sSets + (set * Cfg::kTilesPerSet + x) * Cfg::kTileElems;
        T* sV = sK + kBlockN * Cfg::kLdQK;
        const index_t s0 = static_cast<index_t>(j) * lp + static_cast<index_t>(sub + x) * kBlockN;
        load_rows_cta<T, kHeadDim, kBlockN, Cfg::kThreads>(sK, Cfg::kLdQK, k, p.k_stride.row, row_begin, s0, seq_len, tid);
        load_rows_cta<T, kHeadDimV, kBlockN, Cfg::kThreads>(sV, Cfg::kLdV, v, p.v_stride.row, row_begin, s0, seq_len, tid);
      }
    };

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

    // The walk: current item (j, sub, n tiles, mask) in buffer set `set`; the next item is
    // found and its loads issued before the current one is multiplied.
    unsigned mask = 0;
    int j = cta_next(-1, mask), sub = 0, set = 0;
    int n = j == INT_MAX ? 0 : set_tiles(j, 0);
    while (j != INT_MAX && n == 0) {  // blocks wholly after the CTA's tokens hold no key
      j = cta_next(j, mask);
      n = j == INT_MAX ? 0 : set_tiles(j, 0);
    }
    if (n > 0) load_set(set, j, sub, n);
    mma::cp_async_commit();
    while (n > 0) {
      int nj = j, nsub = sub + Cfg::kTilesPerSet, nn = 0;
      unsigned nmask = mask;
      if (nsub < tiles_per_block) nn = set_tiles(nj, nsub);
      while (nn == 0) {
        nj = cta_next(nj, nmask);
        if (nj == INT_MAX) break;
        nsub = 0;
        nn = set_tiles(nj, 0);
      }
      if (nn > 0) {
        load_set(set ^ 1, nj, nsub, nn);
        mma::cp_async_commit();
        cp_async_wait_one();
      } else {
        mma::cp_async_wait_all();
      }
      __syncthreads();
      if (mask != 0) {
        for (int x = 0; x < n; ++x) {
          const T* sK = sSets + (set * Cfg::kTilesPerSet + x) * Cfg::kTileElems;
          const T* sV = sK + kBlockN * Cfg::kLdQK;
          const index_t s0 = static_cast<index_t>(j) * lp + static_cast<index_t>(sub + x) * kBlockN;
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
        }
      }
      __syncthreads();  // the next iteration's loads overwrite this set
      j = nj;
      sub = nsub;
      n = nn;
      mask = nmask;
      set ^= 1;
    }
    mma::cp_async_wait_all();  // no blocks: the q rows are still in flight
    __syncwarp();

    fwd_epilogue<T, kHeadDimV>(p, rm, wps, row_tok, row_on, m_run, l_run, o_acc, gid, tig);
    __syncthreads();  // sQ and the buffer sets are reused by the next pass
  }
}

}  // namespace sparse_detail
}  // namespace nsa
