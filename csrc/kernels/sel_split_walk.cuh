// The split walk of the selected branch, for tokens whose block lists their neighbours do not
// share (the groups sel_group_flags_kernel marks 0: random inputs, early training): one CTA per
// (token, chunk of 16 query heads); its kSplit warps deal the token's 16-key tiles round-robin,
// each warp with its own cp.async buffers, so no warp waits for another during the walk. Used by
// the forward (sel_attn_fwd_split.cuh) and dQ (sel_attn_dq_split.cuh), which merge the warps'
// partial results at the end.
//
// Why not the union walks of attn_cta_walk.cuh on such lists: a CTA of several tokens walks the
// union of their blocks (~2x its tokens' own at two tokens) and every warp meets the CTA barrier
// of every tile, also of the tiles it skips. ncu of the 2-warp forward walk (16k tokens, G = 16,
// H200): 236 registers -> 8 warps per SM, 17% of the stall samples at the per-tile barriers,
// issue slots 47% busy, L2 42% busy. The split walk: 16-key tiles (8.5 KB of K + V per buffer at
// D = 128), 160 registers in the forward, 12 warps per SM.
#pragma once

#include "attn_cta_walk.cuh"

#include <cstdlib>

namespace nsa {
namespace sparse_detail {

constexpr int kSplitTileKeys = 16;
constexpr int kSplitMaxTopN = 32;  // block lists of up to 32 entries: one per lane

// Whether the split walk can take a call: whole tokens per 16-row warp (G >= 16), lists of up to
// 32 entries, l' a multiple of the tile.
__host__ __device__ inline bool sel_split_fits(const AttnParams& p) {
  return p.heads_q / p.heads_kv >= kRows && p.top_n <= kSplitMaxTopN && p.sel_block % kSplitTileKeys == 0;
}

// Warps per token: NSA_SEL_SPLIT_WARPS = 2 or 4 (an A/B switch read per launch), else `dflt`.
inline int split_warps_env(int dflt) {
  const char* e = getenv("NSA_SEL_SPLIT_WARPS");
  const int w = e != nullptr && e[0] != '\0' ? atoi(e) : dflt;
  return w == 2 || w == 4 ? w : dflt;
}

// cp.async of rows [s0, s0 + 16) of a [.., kDim] tensor by one warp; rows at or past n_rows are
// zero-filled without being read. Where 32 lanes cover whole rows, a lane keeps one column chunk
// and steps its source pointer: precomputed per-row addresses cost ptxas 32 registers and spills.
template <typename T, int kDim>
__device__ __forceinline__ void load_rows16_warp(T* dst, int ld, const T* base, index_t row_stride, index_t row_begin,
                                                 index_t s0, index_t n_rows, int lane) {
  constexpr int kVec = kDim / 8;  // 16-byte chunks per row
  if constexpr (32 % kVec != 0) {
    load_rows_cta<T, kDim, kSplitTileKeys, 32>(dst, ld, base, row_stride, row_begin, s0, n_rows, lane);
  } else {
    constexpr int kRowsPerPass = 32 / kVec;
    const int r0 = lane / kVec, c = (lane % kVec) * 8;
    const T* src = base + (row_begin + s0 + r0) * row_stride + c;
    const index_t step = kRowsPerPass * row_stride;
#pragma unroll
    for (int r = r0; r < kSplitTileKeys; r += kRowsPerPass, src += step) {
      const bool on = s0 + r < n_rows;
      mma::cp_async_16(dst + r * ld + c, on ? src : base, on);
    }
  }
}

// Shared-memory layout common to the split kernels: per-warp block lists (32 ints each) first,
// then the kernel's query-side rows, then kStages K + V buffers per warp.
template <int kHeadDim, int kHeadDimV, int kSplit_, int kStages_>
struct SelSplitLayout {
  static constexpr int kSplit = kSplit_;    // warps per token
  static constexpr int kStages = kStages_;  // cp.async buffers per warp
  static constexpr int kThreads = kSplit * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded rows: conflict-free ldmatrix
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kStageElems = kSplitTileKeys * (kLdQK + kLdV);
  static constexpr int kListBytes = kSplit * 32 * static_cast<int>(sizeof(int));
};

// The CTA's token (blockIdx.x, one per CTA), whether this launch takes it (the adaptive
// launches' flags; uniform over the CTA) and `entry`, the lane's block-list entry (-1 past
// top_n; SelSplitWalk's input), loaded before the flag is read so that the two loads overlap.
// 32-bit index arithmetic (blockIdx.x < 2^31, seqlen an int): ncu put ~20% of the forward's
// stall samples before its first tile, group_of's 64-bit divisions among them.
__device__ __forceinline__ bool split_token(const AttnParams& p, const RowMap& rm, int lane, Pass& ps, int& entry) {
  const unsigned item = blockIdx.x;
  Group gr;
  unsigned flag_group;  // sel_flag_group(p, 1, item)
  const unsigned group_tokens = static_cast<unsigned>(sel_flag_group_tokens(p));
  if (p.cu_seqlens == nullptr) {
    if (p.seqlen <= 0) return false;
    const unsigned len = static_cast<unsigned>(p.seqlen);
    if (item >= static_cast<index_t>(len) * p.batch) return false;
    const unsigned b = item / len, t = item - b * len;
    gr.b = static_cast<int>(b);
    gr.row0 = t;
    flag_group = b * ((len + group_tokens - 1) / group_tokens) + t / group_tokens;
  } else {
    gr.b = 0;
    gr.row0 = item;
    if (gr.row0 >= p.total_rows) return false;
    flag_group = item / group_tokens;
  }
  if (!next_pass(p, 1, gr, 0, 0, ps)) return false;
  entry = -1;
  if (lane < p.top_n)
    entry = __ldg(p.block_idx + (p.cu_seqlens != nullptr ? 0 : ps.b * p.block_idx_stride.batch) +
                  (ps.row_begin + ps.t0) * p.block_idx_stride.row + static_cast<index_t>(rm.g) * p.block_idx_stride.head +
                  lane);
  return !(p.sel_group_want >= 0 && p.sel_group_flags != nullptr &&
           p.sel_group_flags[static_cast<index_t>(flag_group) * p.heads_kv + rm.g] != p.sel_group_want);
}

// K and V rows of the token's KV head; load() fills one warp buffer (16 K rows, then 16 V rows).
template <typename T, class Layout, int kHeadDim, int kHeadDimV>
struct SplitKV {
  const T* k;
  const T* v;
  index_t k_row, v_row, row_begin, seq_len;
  __device__ __forceinline__ SplitKV(const AttnParams& p, const Pass& ps, int g)
      : k_row(p.k_stride.row), v_row(p.v_stride.row), row_begin(ps.row_begin), seq_len(ps.seq_len) {
    const bool packed = p.cu_seqlens != nullptr;
    k = static_cast<const T*>(p.k) + (packed ? 0 : ps.b * p.k_stride.batch) + static_cast<index_t>(g) * p.k_stride.head;
    v = static_cast<const T*>(p.v) + (packed ? 0 : ps.b * p.v_stride.batch) + static_cast<index_t>(g) * p.v_stride.head;
  }
  __device__ __forceinline__ void load(T* buf, index_t s0, int lane) const {
    load_rows16_warp<T, kHeadDim>(buf, Layout::kLdQK, k, k_row, row_begin, s0, seq_len, lane);
    load_rows16_warp<T, kHeadDimV>(buf + kSplitTileKeys * Layout::kLdQK, Layout::kLdV, v, v_row, row_begin, s0, seq_len,
                                   lane);
  }
};

// One warp's share of a token's tiles. Construct from every warp of the CTA (each builds the
// same list in its own 32 ints of shared memory, s_list: no barrier), then call run() once from
// every thread. Item i of the token = tile i % tiles_per_block of list entry i / tiles_per_block;
// warp w takes items w, w + kSplit, ... through a cursor (ncu of the first version: the runtime
// divisions of item -> (entry, tile) were ~20% of the issued instructions).
template <int kSplit, int kStages>
struct SelSplitWalk {
  const int* s_list;
  index_t t;  // the token's position in its sequence
  int lp, tiles_per_block, n_blocks, warp;

  struct Cursor {
    int e, sub;  // list entry, tile of its block
    index_t s0;  // first key of the tile (valid while e < n_blocks)
  };

  // The token's blocks that hold keys <= t, first occurrences only, in list order. j: the lane's
  // entry of the list (split_token; p.top_n <= 32).
  __device__ __forceinline__ SelSplitWalk(const AttnParams& p, const Pass& ps, int j, int* s_list_warp, int warp_,
                                          int lane)
      : s_list(s_list_warp), t(ps.t0), lp(p.sel_block), warp(warp_) {
    tiles_per_block = lp / kSplitTileKeys;
    const index_t n_blocks_seq = (static_cast<index_t>(ps.seq_len) + lp - 1) / lp;
    bool ok = lane < p.top_n && j >= 0 && j < n_blocks_seq && static_cast<index_t>(j) * lp <= t;
    const unsigned same = __match_any_sync(0xffffffffu, j);
    ok = ok && __ffs(same) - 1 == lane;
    const unsigned valid = __ballot_sync(0xffffffffu, ok);
    if (ok) s_list_warp[__popc(valid & ((1u << lane) - 1u))] = j;
    __syncwarp();
    n_blocks = __popc(valid);
  }

  // Moves c to its next tile that holds a key <= t (tiles past t are skipped), or past the list.
  __device__ __forceinline__ void skip_past_t(Cursor& c) const {
    while (c.e < n_blocks) {
      c.s0 = static_cast<index_t>(s_list[c.e]) * lp + c.sub * kSplitTileKeys;
      if (c.s0 <= t) return;
      advance_raw(c);
    }
  }
  __device__ __forceinline__ void advance_raw(Cursor& c) const {
    c.sub += kSplit;
    while (c.sub >= tiles_per_block) {
      c.sub -= tiles_per_block;
      ++c.e;
    }
  }
  __device__ __forceinline__ void advance(Cursor& c) const {
    advance_raw(c);
    skip_past_t(c);
  }

  // issue(s0, buffer): cp.async of the tile at key s0 into the warp's buffer (no commit).
  // on_tile(s0, buffer, hi): the tile is visible to the warp; keys [s0, s0 + hi) are <= t.
  // The caller's cp.async groups committed before run() (query rows) are visible to the whole
  // CTA once the first on_tile runs. Returns with every group waited for.
  template <class Issue, class OnTile>
  __device__ __forceinline__ void run(Issue&& issue, OnTile&& on_tile) {
    Cursor ci{warp / tiles_per_block, warp % tiles_per_block, 0};
    skip_past_t(ci);
    Cursor cc = ci;  // the tile to multiply; ci: the next one to issue
    // Prologue: kStages - 1 tiles in flight, one commit group each, empty or not, so that the
    // wait counts below hold.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (ci.e < n_blocks) {
        issue(ci.s0, s);
        advance(ci);
      }
      mma::cp_async_commit();
    }
    mma::cp_async_wait<kStages - 1>();
    __syncthreads();
    int buf = 0;
    for (; cc.e < n_blocks; advance(cc)) {
      if (ci.e < n_blocks) {  // into the buffer the previous step read (the warp synced after it)
        issue(ci.s0, (buf + kStages - 1) % kStages);
        advance(ci);
      }
      mma::cp_async_commit();
      mma::cp_async_wait<kStages - 1>();
      __syncwarp();
      on_tile(cc.s0, buf, tile_offset(t + 1, cc.s0));
      __syncwarp();
      buf = buf + 1 == kStages ? 0 : buf + 1;
    }
    mma::cp_async_wait_all();
  }
};

}  // namespace sparse_detail
}  // namespace nsa
