// Per-warp block scores and top-n lists of the selection kernels (DESIGN.md §1.3-1.4), shared
// by the sm_80 kernel (select_kernel.cuh, 32-key tiles) and the sm_90a one
// (select_kernel_sm90.cuh, 64-key tiles). A warp owns the tokens of its 16 query rows; after
// each key tile the kernel leaves the tile's P, summed over each token's heads, in
// sP [tokens][kTileKeys] and calls add_tile():
//   3. each (token, selection block) the tile touches gets sum_i c(i, j) P[i] over the tile's
//      keys, ascending i, added to a per-token ring of open block sums;
//   4. blocks whose overlapping keys are all done are finalised into a running top-n list
//      sorted by (score desc, block asc): an equal score never displaces an earlier (lower)
//      block, so ties go to the lower index. With up to 4 tokens per warp (G >= 4) finished
//      blocks are collected until 32 of a token are done, and the whole warp merges those that
//      beat the list's n-th score by rank (no serial insertion: that chain of shared-memory
//      round trips was a quarter of the kernel's instructions on the H200); with more tokens
//      per warp each token's lane inserts its blocks.
// Scratch is O(n) per token in shared memory; nothing of size [T, Nc] or [T, blocks] exists.
#pragma once

#include "attention.h"
#include "attn_cta_walk.cuh"

namespace nsa {
namespace sparse_detail {

constexpr int kSelectRing = 128;  // open block sums per token (power of two), sm_80 kernel

// The attention kernels' group / pass helpers (group_of, next_pass) only read the batch geometry.
__device__ __forceinline__ AttnParams select_batch_geometry(const SelectParams& sp) {
  AttnParams geo;
  geo.cu_seqlens = sp.cu_seqlens;
  geo.batch = sp.batch;
  geo.seqlen = sp.seqlen;
  geo.total_rows = sp.total_rows;
  return geo;
}

// Selection blocks a token may have open at once: those touched by one tile of `tile_keys`
// compressed keys plus the carry from the previous tile. The launchers refuse (l, d, l')
// beyond the ring.
__host__ __device__ inline int select_open_blocks(int l, int d, int lp, int tile_keys) {
  return ((tile_keys - 1) * d + l - 1) / lp + 2;
}

// Inserts (s, j) into the list sorted by (score desc, block asc); j is larger than every block
// already there, so equal scores keep the earlier (lower) block first.
__device__ __forceinline__ void topn_insert(float* sc, int* id, int& count, int n, float s, int j) {
  if (count == n && !(s > sc[n - 1])) return;
  int pos = count < n ? count : n - 1;
  while (pos > 0 && s > sc[pos - 1]) {
    sc[pos] = sc[pos - 1];
    id[pos] = id[pos - 1];
    --pos;
  }
  sc[pos] = s;
  id[pos] = j;
  if (count < n) ++count;
}

// Shared memory of one warp's lists: head-summed P [tokens][kTileKeys] (f32), ring
// [tokens][kRing] (f32), top scores [tokens][2][n] (f32), top blocks [tokens][2][n]
// (int): two buffers per token, merges write the other one. Offsets from the warp's base.
template <int kTileKeys, int kRing>
struct SelectListLayout {
  size_t p_off, ring_off, sc_off, id_off, end;
  __host__ __device__ SelectListLayout(size_t base, int tokens, int n) {
    p_off = base;
    ring_off = p_off + static_cast<size_t>(tokens) * kTileKeys * 4;
    sc_off = ring_off + static_cast<size_t>(tokens) * kRing * 4;
    id_off = sc_off + static_cast<size_t>(tokens) * 2 * n * 4;
    end = id_off + static_cast<size_t>(tokens) * 2 * n * 4;
  }
};

// kRing: open block sums per token (a power of two); the launcher checks that the blocks one
// tile opens fit (select_open_blocks <= kRing). kPerLaneWork: block-sum pairs dealt to lanes once
// per pass and an unrolled rank merge for rounds with many candidates (the sm_90a kernel's v2);
// on the H200 they cost the sm_80 kernel 5% (25.4 -> 26.7 ms at 64k, more registers around its
// loops) and changed nothing measurable at G = 16 on sm_90a, so the sm_80 kernel keeps the loops.
template <int kTileKeys, int kRing, bool kPerLaneWork>
struct SelectWarpLists {
  const float* sP;
  float* ring;
  float* top_sc;
  int* top_id;
  int tokens, p_begin, p_end, n, init_blocks, local_blocks, a_units, b_units, open_cap, defer, lane;
  int b_shift;  // log2(b_units) when it is a power of two (l' / d = 4 by default), else -1
  // State of token `lane` (lane < tokens), held by that lane.
  int count = 0, next_final = 0, cur = 0;  // cur: which of the token's two list buffers is live
  bool my_on;
  index_t my_nvis;
  int my_nvis_i, my_tblk;
  // Block-sum dealing: 32 / tokens lanes per token; this lane's token and its geometry.
  int pair_lanes, pair_tok, pair_j0, pair_nv, pair_tb;

  // The warp's tokens are t0 + [0, tokens), of which [p_begin, p_end) are real; nc compressed
  // keys in the sequence. Clears the ring (the caller syncs the warp before add_tile).
  __device__ __forceinline__ SelectWarpLists(const SelectParams& sp, unsigned char* warp_base,
                                             const SelectListLayout<kTileKeys, kRing>& lay, int tokens_, int p_begin_,
                                             int p_end_, index_t t0, int nc, int lane_)
      : tokens(tokens_), p_begin(p_begin_), p_end(p_end_), n(sp.top_n), init_blocks(sp.init_blocks),
        local_blocks(sp.local_blocks), lane(lane_) {
    sP = reinterpret_cast<const float*>(warp_base + lay.p_off);
    ring = reinterpret_cast<float*>(warp_base + lay.ring_off);
    top_sc = reinterpret_cast<float*>(warp_base + lay.sc_off);
    top_id = reinterpret_cast<int*>(warp_base + lay.id_off);
    const int l = sp.cmp_block, d = sp.cmp_stride, lp = sp.sel_block;
    a_units = l / d;  // d divides l and l' (checked on the host)
    b_units = lp / d;
    b_shift = (b_units & (b_units - 1)) == 0 ? __ffs(b_units) - 1 : -1;
    open_cap = select_open_blocks(l, d, lp, kTileKeys);
    // Finished blocks a token may keep in the ring: the open ones span at most open_cap + 31.
    defer = open_cap + 40 <= kRing ? 32 : 1;
    for (int i = lane; i < tokens * kRing; i += 32) ring[i] = 0.f;
    my_on = lane >= p_begin && lane < p_end;
    const index_t my_t = t0 + lane;
    my_nvis = my_on ? num_visible(my_t, nc, l, d) : 0;
    my_tblk = my_on ? static_cast<int>(my_t / lp) : -1;
    my_nvis_i = static_cast<int>(my_nvis);  // positions inside one sequence fit in int
    if constexpr (kPerLaneWork) {
      pair_lanes = 32 / tokens;
      pair_tok = lane / pair_lanes;  // >= tokens on the 32 % tokens lanes left over: idle
      pair_j0 = lane % pair_lanes;
      pair_nv = __shfl_sync(0xffffffffu, my_nvis_i, min(pair_tok, tokens - 1));
      pair_tb = __shfl_sync(0xffffffffu, my_tblk, min(pair_tok, tokens - 1));
    }
  }

  // x / b_units for x >= 0: two of these per tile, and a 32-bit division by a runtime value is
  // a chain of ~20 dependent instructions (ncu: 5% of the sm_90a kernel's stall samples).
  __device__ __forceinline__ int div_b(int x) const { return b_shift >= 0 ? x >> b_shift : x / b_units; }

  __device__ __forceinline__ void finalise_until(int j_end) {
    for (; next_final < j_end; ++next_final) {
      const int j = next_final;
      const bool forced = j < init_blocks || j > my_tblk - local_blocks;
      float& slot = ring[lane * kRing + (j & (kRing - 1))];
      const float s = forced ? INFINITY : slot;
      slot = 0.f;
      topn_insert(top_sc + lane * 2 * n, top_id + lane * 2 * n, count, n, s, j);
    }
  }

  // The same for every token of the warp (j_end held by the token's lane; called by the whole
  // warp). With few tokens per warp (G >= 4) one token lane inserting block after block was a
  // serial chain of shared-memory round trips that the rest of the warp waited on. Here a
  // token's finished blocks are left in the ring until 32 of them are done (`defer`; or the
  // walk ends: `last`), then the lanes read 32 at a time and those that can enter the list
  // (list not full, or score above its n-th) are merged by rank: a candidate's new position
  // is the number of listed scores >= its own plus the candidates that beat it (higher score,
  // or equal score and lower block); a listed entry moves down by the candidates scoring
  // strictly higher (its block is lower). The ranks are a permutation, so the merged list is
  // written into the token's other buffer without conflicts. Same list as inserting the
  // blocks one by one in ascending order. NaN scores rank below every real one (-1).
  __device__ __forceinline__ void finalise_warp(int j_end, bool last) {
    if (tokens > 4) {
      if (my_on) finalise_until(j_end);
      __syncwarp();
      return;
    }
    for (int tk = p_begin; tk < p_end; ++tk) {
      const int nf = __shfl_sync(0xffffffffu, next_final, tk);
      const int je = __shfl_sync(0xffffffffu, j_end, tk);
      const int tb = __shfl_sync(0xffffffffu, my_tblk, tk);
      if (je <= nf || (!last && je - nf < defer)) continue;
      int cnt = __shfl_sync(0xffffffffu, count, tk);
      int cb = __shfl_sync(0xffffffffu, cur, tk);
      for (int j0 = nf; j0 < je; j0 += 32) {
        const int j = j0 + lane;
        const bool on = j < je;
        float s = 0.f;
        if (on) {
          const bool forced = j < init_blocks || j > tb - local_blocks;
          float& slot = ring[tk * kRing + (j & (kRing - 1))];
          s = forced ? INFINITY : (slot == slot ? slot : -1.f);
          slot = 0.f;
        }
        const float* old_sc = top_sc + (tk * 2 + cb) * n;
        const int* old_id = top_id + (tk * 2 + cb) * n;
        const float th = cnt == n ? old_sc[n - 1] : 0.f;
        const unsigned cand = __ballot_sync(0xffffffffu, on && (cnt < n || s > th));
        if (cand == 0u) continue;
        float* new_sc = top_sc + (tk * 2 + (cb ^ 1)) * n;
        int* new_id = top_id + (tk * 2 + (cb ^ 1)) * n;
        const bool mine = (cand >> lane) & 1u;
        int rank = 0;  // of this lane's candidate
        for (int a = 0; a < cnt; ++a) rank += old_sc[a] >= s;
        if (kPerLaneWork && n <= 32 && __popc(cand) > 4) {
          // Many candidates (the first rounds, before the list is full): all 32 lanes'
          // scores in one unrolled pass of independent shuffles, instead of a loop over the
          // candidates whose every trip waits on the last one's shuffle.
          const float ys = lane < cnt ? old_sc[lane] : 0.f;
          int down = 0;
#pragma unroll
          for (int x = 0; x < 32; ++x) {
            const float sx = __shfl_sync(0xffffffffu, s, x);
            const bool cx = (cand >> x) & 1u;
            rank += cx && (sx > s || (sx == s && x < lane));
            down += cx && sx > ys;
          }
          if (lane < cnt && lane + down < n) {
            new_sc[lane + down] = ys;
            new_id[lane + down] = old_id[lane];
          }
        } else {
          for (unsigned m = cand; m != 0u; m &= m - 1u) {
            const int x = __ffs(static_cast<int>(m)) - 1;
            const float sx = __shfl_sync(0xffffffffu, s, x);
            rank += sx > s || (sx == s && x < lane);
          }
          for (int a0 = 0; a0 < cnt; a0 += 32) {  // listed entries a = a0 + lane
            const int a = a0 + lane;
            const float ys = a < cnt ? old_sc[a] : 0.f;
            int down = 0;
            for (unsigned m = cand; m != 0u; m &= m - 1u) {
              const int x = __ffs(static_cast<int>(m)) - 1;
              down += __shfl_sync(0xffffffffu, s, x) > ys;
            }
            if (a < cnt && a + down < n) {
              new_sc[a + down] = ys;
              new_id[a + down] = old_id[a];
            }
          }
        }
        if (mine && rank < n) {
          new_sc[rank] = s;
          new_id[rank] = j;
        }
        cnt = min(cnt + __popc(cand), n);
        cb ^= 1;
        __syncwarp();  // the merged list is visible to every lane of the next round
      }
      if (lane == tk) {
        next_final = je;
        count = cnt;
        cur = cb;
      }
    }
    __syncwarp();
  }

  // sum_i c(i, j) P[i] over the tile's keys of block j that token tok sees (nv keys), added to the ring.
  __device__ __forceinline__ void block_sum(int tok, int j, index_t s0, int nv) {
    const int i_lo = max(max(j * b_units - a_units + 1, 0), static_cast<int>(s0));
    const int i_hi = min(min((j + 1) * b_units - 1, static_cast<int>(s0) + kTileKeys - 1), nv - 1);
    float sum = 0.f;
    for (int i = i_lo; i <= i_hi; ++i) {
      const int overlap = min(i + a_units, (j + 1) * b_units) - max(i, j * b_units);
      sum += sP[tok * kTileKeys + (i - static_cast<int>(s0))] * static_cast<float>(overlap);
    }
    if (i_lo <= i_hi) ring[tok * kRing + (j & (kRing - 1))] += sum;
  }

  // Steps 3 and 4 for the tile of keys [s0, s0 + kTileKeys), whose head-summed P is in sP
  // (visible to the whole warp). Called by the whole warp.
  __device__ __forceinline__ void add_tile(index_t s0) {
    // Block sums: (token, block) pairs, ascending keys inside each. In units of the stride d
    // (which divides l and l'), key i covers [i, i + a) and block j covers [j b, (j + 1) b):
    // overlaps are integer differences, no division per key.
    const int jlo = div_b(static_cast<int>(s0));
    if constexpr (kPerLaneWork) {
      // Lane `lane` serves token pair_tok, blocks jlo + pair_j0 + r * pair_lanes (fixed per pass).
      const bool pair_live = pair_tok >= p_begin && pair_tok < p_end && s0 < pair_nv;
      for (int jj = pair_j0; jj < open_cap; jj += pair_lanes) {
        const int j = jlo + jj;
        if (!pair_live || j > pair_tb) continue;
        block_sum(pair_tok, j, s0, pair_nv);
      }
    } else {
      // The pairs are dealt in warp-uniform rounds so the token's lane can broadcast its geometry.
      const int pairs = tokens * open_cap;
      for (int w0 = 0; w0 < pairs; w0 += 32) {
        const int w = w0 + lane;
        const int tok = tokens == 1 ? 0 : min(w / open_cap, tokens - 1);
        const int j = jlo + (tokens == 1 ? w : w % open_cap);
        const int nv = __shfl_sync(0xffffffffu, my_nvis_i, tok);
        const int tb = __shfl_sync(0xffffffffu, my_tblk, tok);
        if (w >= pairs || tok < p_begin || tok >= p_end) continue;
        if (s0 >= nv || j > tb) continue;
        block_sum(tok, j, s0, nv);
      }
    }
    __syncwarp();
    // Finalise the blocks whose keys are all done.
    int j_end = next_final;
    if (my_on && s0 < my_nvis) {  // 32-bit: positions inside one sequence fit in int
      const int i_end = static_cast<int>(s0) + kTileKeys;
      j_end = i_end >= my_nvis_i ? my_tblk + 1 : min(div_b(i_end), my_tblk + 1);
    }
    finalise_warp(j_end, false);
  }

  // After the last tile: finalises every block and writes each token's row in ascending block
  // order (the lane holding listed block a writes it at its rank among the listed blocks, which
  // are distinct); the rest of the row is -1. `out`: block_idx of the batch item and KV head,
  // whose row `row0` + tok belongs to the warp's token tok.
  __device__ __forceinline__ void finish(int* out, index_t row0, index_t row_stride) {
    finalise_warp(my_on ? my_tblk + 1 : next_final, true);
    for (int tok = p_begin; tok < p_end; ++tok) {
      const int cnt = __shfl_sync(0xffffffffu, count, tok);
      const int* ids = top_id + (tok * 2 + __shfl_sync(0xffffffffu, cur, tok)) * n;
      int* row = out + (row0 + tok) * row_stride;
      for (int a = lane; a < n; a += 32) {
        if (a < cnt) {
          const int x = ids[a];
          int r = 0;
          for (int c = 0; c < cnt; ++c) r += ids[c] < x;
          row[r] = x;
        } else {
          row[a] = -1;
        }
      }
    }
    __syncwarp();
  }
};

// The default geometry (l = 2d, l' = 4d) with one token per warp (G = 16) and n <= 32, kept in
// registers instead (select_blocks_sm90_kernel's kRegList). A 64-key tile then covers exactly
// blocks 16 it .. 16 it + 15 (keys 4j .. 4j + 3 of block j weigh 2, 2, 2, 1 and key 4j - 1 weighs
// 1: in units of d, token i covers [i, i + 2) and block j covers [4j, 4j + 4)), and after the
// head reduce-scatter (select_sum_heads) lane (gid, tig) holds the head-summed P of keys
// 8 off + 2 tig, + 1 with off = bitrev3(gid): an even-tig lane and its odd neighbour hold one
// block's four keys, so a block score is one pair shuffle plus the previous block's last key
// (one more shuffle; the tile's first block takes it from the previous tile, `carry`). The running
// top-n list lives in lanes 0 .. n - 1 (score, block), sorted by (score desc, block asc); a tile's
// 16 candidates are first tested against the list's last entry by one ballot (late in a long
// sequence none passes), those that pass are inserted one at a time by a warp-wide rank (a ballot
// and a popc) and a shift (shfl_up). Same list as SelectWarpLists: the order is the same total
// order and a block is only compared with blocks of higher or lower index by that order.
struct SelectWarpRegList {
  float ls = -INFINITY;  // this lane's list entry (lane < count)
  int li = -1;
  int count = 0;
  float carry = 0.f;     // head-summed P of the last key of the last tile (weight 1 in the next block)
  int next_block = 0;    // blocks below it are done
  int n, init_blocks, local_blocks, tblk, lane;
  bool on;

  __device__ __forceinline__ SelectWarpRegList(const SelectParams& sp, bool on_, index_t t, int lane_)
      : n(sp.top_n), init_blocks(sp.init_blocks), local_blocks(sp.local_blocks), lane(lane_), on(on_) {
    tblk = on ? static_cast<int>(t / sp.sel_block) : -1;  // positions inside one sequence fit in int
  }

  __device__ __forceinline__ static int bitrev3(int x) { return ((x & 1) << 2) | (x & 2) | ((x >> 2) & 1); }

  // Whether (s, j) comes before the list's last entry (score desc, block asc); the list is full.
  __device__ __forceinline__ bool beats_last(float s, int j) const {
    const float th = __shfl_sync(0xffffffffu, ls, n - 1);
    const int ti = __shfl_sync(0xffffffffu, li, n - 1);
    return s > th || (s == th && j < ti);
  }

  // This lane's candidate (s, j) if cv; forced blocks score +inf, NaN ranks below every real score.
  __device__ __forceinline__ void insert(float s, int j, bool cv) {
    if (cv) s = (j < init_blocks || j > tblk - local_blocks) ? INFINITY : (s == s ? s : -1.f);
    // (the shuffles run in every lane: no short-circuit around beats_last)
    const bool beats = beats_last(s, j);
    const bool pass = cv && (count < n || beats);
    for (unsigned m = __ballot_sync(0xffffffffu, pass); m != 0u; m &= m - 1u) {
      const int c = __ffs(static_cast<int>(m)) - 1;
      const float cs = __shfl_sync(0xffffffffu, s, c);
      const int cj = __shfl_sync(0xffffffffu, j, c);
      const bool still = beats_last(cs, cj);
      if (count == n && !still) continue;  // an earlier candidate raised the bar (count is warp-uniform)
      const bool before = lane < count && (ls > cs || (ls == cs && li < cj));
      const int pos = __popc(__ballot_sync(0xffffffffu, before));
      const float us = __shfl_up_sync(0xffffffffu, ls, 1);
      const int ui = __shfl_up_sync(0xffffffffu, li, 1);
      if (lane > pos && lane <= count && lane < n) {
        ls = us;
        li = ui;
      }
      if (lane == pos) {
        ls = cs;
        li = cj;
      }
      count = count < n ? count + 1 : n;
    }
  }

  // Tile it of keys [64 it, 64 it + 64): x the lane's two head-summed P (keys 8 off + 2 tig, + 1).
  __device__ __forceinline__ void add_tile(const float (&x)[2], int off, int tig, int it) {
    const bool odd = tig & 1;
    const float self = odd ? fmaf(2.f, x[0], x[1]) : 2.f * (x[0] + x[1]);
    const float tail = odd ? x[1] : 0.f;  // key 4j + 3: weight 1 here and in block j + 1
    const float pair = __shfl_xor_sync(0xffffffffu, self, 1);
    // The previous block's last key: lane (off, 1) for tig 2, lane (off - 1, 3) for tig 0; lane 0
    // (block 0 of the tile) reads lane 31, the tile's last key, which is the next tile's carry.
    const int src = tig == 2 ? lane - 1 : (off > 0 ? bitrev3(off - 1) * 4 + 3 : 31);
    const float prev = __shfl_sync(0xffffffffu, tail, src);
    const float s = self + pair + (lane == 0 ? carry : prev);
    carry = __shfl_sync(0xffffffffu, prev, 0);
    const int j = 16 * it + 2 * off + (tig >> 1);
    insert(s, j, on && !odd && j <= tblk);
    next_block = 16 * (it + 1);
  }

  // Blocks next_block .. tblk (beyond the visible keys but for the carry), then the row: the
  // listed blocks ascending (each lane writes its block at its rank), -1 after them.
  // `out`: block_idx of the batch item and KV head; the token's row is row0 (row stride row_stride).
  __device__ __forceinline__ void finish(int* out, index_t row0, index_t row_stride) {
    if (!on) return;  // warp-uniform
    for (int j0 = next_block; j0 <= tblk; j0 += 32) {
      const int j = j0 + lane;
      insert(j == next_block ? carry : 0.f, j, j <= tblk);
    }
    int* row = out + row0 * row_stride;
    int below = 0;  // listed blocks (distinct) below this lane's
    for (int a = 0; a < count; ++a) below += __shfl_sync(0xffffffffu, li, a) < li;
    if (lane < count)
      row[below] = li;
    else if (lane < n)
      row[lane] = -1;
  }
};

}  // namespace sparse_detail
}  // namespace nsa
