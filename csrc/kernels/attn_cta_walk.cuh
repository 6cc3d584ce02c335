// The CTA-level walks over K/V tiles shared by the forwards (range_attn_fwd_kernel.cuh,
// sparse_attn_fwd_kernel.cuh) and the dQ kernels (attn_bwd_dq.cuh).
//
// The warps of a CTA own consecutive tokens of one KV head (each warp, or each pair of warps
// splitting the columns of a wide accumulator, the 16-row layout of sparse_attn_common.cuh), so
// their key sets nearly coincide: the CTA walks the union once, loading every 32-key tile
// cooperatively into a two-stage cp.async pipeline (the next tile streams in while the current
// one is multiplied), and each warp multiplies only the tiles its own tokens need. The walks
// own the pipeline (issue / commit / wait / barriers); the caller says what a tile is (issue)
// and what to do with it (on_tile), so forward and dQ cannot drift apart.
#pragma once

#include <climits>

#include "sparse_attn_common.cuh"

namespace nsa {
namespace sparse_detail {

// This warp's slice [warp * P, (warp + 1) * P) of a CTA-level pass, as a pass over its own P
// token slots (empty when the CTA's pass does not reach the warp's slots).
__device__ __forceinline__ Pass warp_pass(const Pass& cps, int warp, int P) {
  Pass wps = cps;
  wps.t0 = cps.t0 + static_cast<index_t>(warp) * P;
  wps.p_begin = max(cps.p_begin - warp * P, 0);
  wps.p_end = min(cps.p_end - warp * P, P);
  if (wps.p_begin >= wps.p_end) wps.p_begin = wps.p_end = 0;
  return wps;
}

// cp.async of rows [s0, s0 + kTileRows) of a [.., D] tensor by all kThreads threads of the CTA;
// rows outside [0, n_rows) are zero-filled without being read.
template <typename T, int kDim, int kTileRows, int kThreads>
__device__ __forceinline__ void load_rows_cta(T* dst, int ld, const T* base, index_t row_stride, index_t row_begin,
                                              index_t s0, index_t n_rows, int tid) {
  constexpr int kVec = kDim / 8;
#pragma unroll
  for (int i = tid; i < kTileRows * kVec; i += kThreads) {
    const int r = i / kVec, c = (i % kVec) * 8;
    const index_t s = s0 + r;
    const bool on = s >= 0 && s < n_rows;
    mma::cp_async_16(dst + r * ld + c, on ? base + (row_begin + s) * row_stride + c : base, on);
  }
}

// Offset of key x relative to a tile starting at s0, clamped to [-1, kBlockN + 1] so that
// in-tile compares can be 32-bit.
__device__ __forceinline__ int tile_offset(index_t x, index_t s0) {
  const index_t r = x - s0;
  return r < -1 ? -1 : (r > kBlockN + 1 ? kBlockN + 1 : static_cast<int>(r));
}

// ---------------------------------------------------------------------------------------------
// Contiguous key ranges: the compressed branch (compressed tokens [0, nvis(t))) and the sliding
// window (keys [t - w + 1, t]).

// Compressed tokens visible to position t (DESIGN §1.2: i*d + l - 1 <= t).
__device__ __forceinline__ index_t num_visible(index_t t, int nc, int l, int d) {
  if (t + 1 < l) return 0;
  const index_t v = (t - l + 1) / d + 1;
  return v < nc ? v : nc;
}

// Where the keys of one pass live, and which of them a token or a run of tokens attends.
template <bool kCompressed>
struct RangeKeys {
  int nc = 0;            // compressed tokens of the sequence (kCompressed)
  index_t kv_row_begin;  // row of key 0 in k / v
  index_t n_keys;        // keys of the sequence; rows past it are zero-filled, never read

  __device__ __forceinline__ RangeKeys(const AttnParams& p, const Pass& ps) {
    kv_row_begin = ps.row_begin;
    n_keys = ps.seq_len;
    if (kCompressed) {
      const int d = p.cmp_stride;
      nc = num_compressed(ps.seq_len, p.cmp_block, d);
      kv_row_begin = p.cu_seqlens != nullptr ? compressed_row_begin(p.cu_seqlens, ps.b, p.total_rows, d) : 0;
      n_keys = nc;
    }
  }
  // Keys [lo, hi) of the tokens [t_first, t_last]; the window's lo is rounded down to a tile
  // boundary so that the tiles of neighbouring CTAs and warps line up.
  __device__ __forceinline__ void tiles_of(const AttnParams& p, index_t t_first, index_t t_last, index_t& lo,
                                           index_t& hi) const {
    if (kCompressed) {
      lo = 0;
      hi = num_visible(t_last, nc, p.cmp_block, p.cmp_stride);
    } else {
      lo = t_first - p.window + 1;
      lo = lo < 0 ? 0 : (lo / kBlockN) * kBlockN;
      hi = t_last + 1;
    }
  }
  // The first key lo of a pass's range and its number of kTileN-key tiles (tiles_of over the pass's tokens).
  template <int kTileN>
  __device__ __forceinline__ int pass_tiles(const AttnParams& p, const Pass& ps, index_t& lo) const {
    index_t hi;
    tiles_of(p, ps.t0 + ps.p_begin, ps.t0 + ps.p_end - 1, lo, hi);
    return hi > lo ? static_cast<int>((hi - lo + kTileN - 1) / kTileN) : 0;
  }
  // Keys [lo, hi) of token t (hi = 0 for a row that is off).
  __device__ __forceinline__ void row_keys(const AttnParams& p, index_t t, bool on, index_t& lo, index_t& hi) const {
    lo = kCompressed ? 0 : t - p.window + 1;
    hi = !on ? 0 : kCompressed ? num_visible(t, nc, p.cmp_block, p.cmp_stride) : t + 1;
  }
};

// The two-stage pipeline over n_tiles consecutive tiles. Tile 0 was issued and committed by
// the caller (in one group with whatever else it needed first, e.g. the query rows);
// issue(it) issues tile it into stage it & 1 without committing. on_tile(it) runs when tile it
// is visible to every thread, and no thread issues into its stage before all have returned.
template <class Issue, class OnTile>
__device__ __forceinline__ void range_tile_loop(int n_tiles, Issue&& issue, OnTile&& on_tile) {
  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      issue(it + 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait_all();
    }
    __syncthreads();
    on_tile(it);
    __syncthreads();  // the next iteration's load overwrites this stage
  }
  mma::cp_async_wait_all();  // no tiles: the caller's first group is still in flight
}

// ---------------------------------------------------------------------------------------------
// Selected blocks: the union of the CTA's tokens' blocks in ascending order. Neighbouring
// tokens select mostly the same blocks, so each block's tiles are loaded once for all warps;
// the next block's first tiles are prefetched while the current ones are multiplied (two
// buffer sets of kTilesPerSet 32-key tiles: slots set * kTilesPerSet + x). Lists need not be
// sorted; duplicates, negative and out-of-range entries are ignored; tiles past the CTA's last
// token or the sequence are never loaded.
//
// Construct where the pass starts (the block lists' addresses are computed there, as the
// forward always did), then call run() once, from every thread of the CTA. warp: threadIdx.x /
// 32. wps: this warp's pass (warp_pass of ps); warps with equal wps (column halves of one row
// group) get equal masks. s_next: 2 * kWarps ints of shared memory. issue(slot, s0): cp.async
// of the tile at key s0 into buffer slot `slot`, no commit. on_tile(slot, s0, mask): for every
// loaded tile of a block that one of this warp's tokens selected, once the tile is visible to
// every thread and before any thread issues into its set again; mask: the warp's token slots
// that selected the block. No barrier may be inside on_tile (warps skip it independently).
// run() returns with every cp.async group of the thread waited for.
template <int kWarps, int kTilesPerSet>
struct SelBlockWalk {
  const AttnParams& p;
  const Pass& ps;
  int* s_next;
  int lp, tiles_per_block, seq_len, n_blocks_seq;
  index_t t_last_cta;
  int warp, lane;
  bool lane_tok;  // lane i < P holds token slot i of this warp
  const int* list;

  __device__ __forceinline__ SelBlockWalk(const AttnParams& p_, const Pass& ps_, const Pass& wps, int g, int* s_next_,
                                          int warp_, int lane_)
      : p(p_), ps(ps_), s_next(s_next_), warp(warp_), lane(lane_) {
    const bool packed = p.cu_seqlens != nullptr;
    lp = p.sel_block;
    tiles_per_block = lp / kBlockN;
    seq_len = ps.seq_len;
    t_last_cta = ps.t0 + ps.p_end - 1;
    n_blocks_seq = (seq_len + lp - 1) / lp;
    lane_tok = lane >= wps.p_begin && lane < wps.p_end;
    list = nullptr;
    if (lane_tok)
      list = p.block_idx + (packed ? 0 : ps.b * p.block_idx_stride.batch) +
             (ps.row_begin + wps.t0 + lane) * p.block_idx_stride.row + static_cast<index_t>(g) * p.block_idx_stride.head;
  }

  template <class Issue, class OnTile>
  __device__ __forceinline__ void run(Issue&& issue, OnTile&& on_tile) {
    // The next block of the CTA's union after `last`, and this warp's token mask for it. Called
    // by every thread (one barrier); `parity` alternates the exchange slots between calls.
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
      if (lane == 0) s_next[parity * kWarps + warp] = jw;
      __syncwarp();
      __syncthreads();
      int j = INT_MAX;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) j = min(j, s_next[parity * kWarps + w]);
      parity ^= 1;  // the other slots are free: every thread read them before this call's barrier
      tokmask = __ballot_sync(0xffffffffu, lane_tok && mine == j);
      return j;
    };
    // Work item = (block, first tile of a set of kTilesPerSet tiles); tiles past the CTA's last
    // token or the sequence are never loaded.
    auto set_tiles = [&](int j, int sub) {
      const index_t s0 = static_cast<index_t>(j) * lp + static_cast<index_t>(sub) * kBlockN;
      int n = min(kTilesPerSet, tiles_per_block - sub);
      const index_t end = min(static_cast<index_t>(seq_len), t_last_cta + 1);
      while (n > 0 && s0 + static_cast<index_t>(n - 1) * kBlockN >= end) --n;
      return n;
    };
    auto load_set = [&](int set, int j, int sub, int n) {
      for (int x = 0; x < n; ++x) {
        const index_t s0 = static_cast<index_t>(j) * lp + static_cast<index_t>(sub + x) * kBlockN;
        issue(set * kTilesPerSet + x, s0);
      }
    };

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
      int nj = j, nsub = sub + kTilesPerSet, nn = 0;
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
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait_all();
      }
      __syncthreads();
      if (mask != 0) {
        for (int x = 0; x < n; ++x) {
          const index_t s0 = static_cast<index_t>(j) * lp + static_cast<index_t>(sub + x) * kBlockN;
          on_tile(set * kTilesPerSet + x, s0, mask);
        }
      }
      __syncthreads();  // the next iteration's loads overwrite this set
      j = nj;
      sub = nsub;
      n = nn;
      mask = nmask;
      set ^= 1;
    }
    mma::cp_async_wait_all();  // no blocks: the caller's groups (query rows) are still in flight
  }
};

}  // namespace sparse_detail
}  // namespace nsa
