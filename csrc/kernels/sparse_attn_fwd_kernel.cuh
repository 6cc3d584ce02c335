// Kernel body of the grouped sparse attention forward (see sparse_attn.h).
//
// One warp owns 16 rows = (token, query head) pairs of one KV head g: the G heads of one token
// (16 of them per warp when G >= 16), or the heads of P = 16/G consecutive tokens when G < 16,
// so small groups still fill the m16 tensor-core tile. The warp walks key tiles of 32 keys:
// the union of its tokens' selected blocks (each token keeps only its own blocks via a row
// mask), or the union of its tokens' windows (consecutive tokens: barely more keys than one
// window). Per tile: K, V -> shared memory, S = Q K^T (mma.sync), mask, online softmax,
// O += P V with P kept in registers. Tile loads are cp.async with all copies of a tile in
// flight together; no double buffering yet (latency is hidden by the other warps of the SM).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>

#include "mma_sm80.cuh"
#include "sparse_attn.h"

namespace nsa {
namespace sparse_detail {

constexpr int kBlockN = 32;  // keys per step
constexpr int kRows = 16;    // rows per warp (one m16 tile)

template <int kHeadDim, int kHeadDimV>
struct FwdConfig {
  static constexpr int kWarps = kHeadDim <= 128 ? 4 : 2;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded smem rows: conflict-free fragment loads
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kSmemElemsPerWarp = kRows * kLdQK + kBlockN * kLdQK + kBlockN * kLdV;
  static constexpr int kSmemBytes = kWarps * kSmemElemsPerWarp * 2;
};

// Rows of one warp: which token and which query head each of the 16 rows is.
struct RowMap {
  int tokens;         // P: consecutive tokens per warp
  int heads;          // query heads per token in this warp (min(G, 16), or fewer in the last chunk)
  int head0;          // first query head (absolute, g*G + chunk*16)
};

template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(FwdConfig<kHeadDim, kHeadDimV>::kThreads)
    sparse_attn_fwd_kernel(const AttnParams p) {
  using Cfg = FwdConfig<kHeadDim, kHeadDimV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw) + warp * Cfg::kSmemElemsPerWarp;
  T* sK = sQ + kRows * Cfg::kLdQK;
  T* sV = sK + kBlockN * Cfg::kLdQK;

  const int G = p.heads_q / p.heads_kv;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  const int g = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  RowMap rm;
  rm.tokens = G >= kRows ? 1 : kRows / G;
  rm.head0 = g * G + chunk * kRows;
  rm.heads = G >= kRows ? min(kRows, G - chunk * kRows) : G;

  // Token group of this warp.
  const index_t item = static_cast<index_t>(blockIdx.x) * Cfg::kWarps + warp;
  const bool packed = p.cu_seqlens != nullptr;
  index_t group_row0;  // first token's row in the row space (packed) or position (padded)
  int b_padded = 0;
  if (!packed) {
    if (p.seqlen <= 0) return;
    const index_t groups = (p.seqlen + rm.tokens - 1) / rm.tokens;
    if (item >= groups * p.batch) return;
    b_padded = static_cast<int>(item / groups);
    group_row0 = (item % groups) * rm.tokens;
  } else {
    group_row0 = item * rm.tokens;
    if (group_row0 >= p.total_rows) return;
  }
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const bool selected = p.mode == AttnMode::kSelected;

  // A packed group can straddle sequences: one pass per sequence it touches.
  int p_begin = 0;
  while (p_begin < rm.tokens) {
    int b;
    index_t row_begin;  // row of position 0 of this sequence
    int seq_len;
    if (!packed) {
      b = b_padded;
      row_begin = 0;
      seq_len = p.seqlen;
    } else {
      b = find_sequence(p.cu_seqlens, p.batch, group_row0 + p_begin);
      if (b < 0) break;  // past the last sequence (malformed cu_seqlens are clamped)
      const SeqGeom sg = seq_geom(p.cu_seqlens, b, 0, p.total_rows);
      row_begin = sg.row_begin;
      seq_len = sg.len;
    }
    // Tokens p in [p_begin, p_end) of this pass, at positions t = t0 + p.
    const index_t t0 = group_row0 - row_begin;  // position of token 0 of the group (may be < 0 for p_begin > 0)
    int p_end = rm.tokens;
    if (t0 + p_end > seq_len) p_end = static_cast<int>(seq_len - t0);
    if (p_end <= p_begin) break;

    const index_t bq = packed ? 0 : b * p.q_stride.batch, bk = packed ? 0 : b * p.k_stride.batch;
    const index_t bv = packed ? 0 : b * p.v_stride.batch, bo = packed ? 0 : b * p.o_stride.batch;
    const T* q = static_cast<const T*>(p.q) + bq;
    const T* k = static_cast<const T*>(p.k) + bk + static_cast<index_t>(g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + bv + static_cast<index_t>(g) * p.v_stride.head;

    // ---- Q tile (16 rows x Dk) -> shared memory; inactive rows are zero ----
    constexpr int kVecQ = kHeadDim / 8;
#pragma unroll
    for (int i = lane; i < kRows * kVecQ; i += 32) {
      const int r = i / kVecQ, c = (i % kVecQ) * 8;
      const int tok = r / rm.heads, hh = r % rm.heads;
      const bool on = tok >= p_begin && tok < p_end && r < rm.tokens * rm.heads;
      const T* src = on ? q + (row_begin + t0 + tok) * p.q_stride.row + static_cast<index_t>(rm.head0 + hh) * p.q_stride.head + c
                        : q;
      mma::cp_async_16(sQ + r * Cfg::kLdQK + c, src, on);
    }
    mma::cp_async_commit();
    mma::cp_async_wait_all();
    __syncwarp();

    // Per-thread row state: rows gid and gid+8.
    int row_tok[2];
    bool row_on[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8;
      row_tok[ri] = r / rm.heads;
      row_on[ri] = r < rm.tokens * rm.heads && row_tok[ri] >= p_begin && row_tok[ri] < p_end;
    }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o_acc[kHeadDimV / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

    const index_t t_first = t0 + p_begin, t_last = t0 + p_end - 1;

    // One step over keys [s0, s0 + 32) with token mask `tokmask` (bit per token of the group).
    auto step = [&](index_t s0, unsigned tokmask) {
      // K, V tiles -> shared memory, every 16-byte copy of the tile in flight at once (rows past
      // the sequence are zero-filled without being read).
      constexpr int kVecK = kHeadDim / 8, kVecV = kHeadDimV / 8;
#pragma unroll
      for (int i = lane; i < kBlockN * kVecK; i += 32) {
        const int r = i / kVecK, c = (i % kVecK) * 8;
        const index_t s = s0 + r;
        const bool on = s < seq_len;
        mma::cp_async_16(sK + r * Cfg::kLdQK + c, on ? k + (row_begin + s) * p.k_stride.row + c : k, on);
      }
#pragma unroll
      for (int i = lane; i < kBlockN * kVecV; i += 32) {
        const int r = i / kVecV, c = (i % kVecV) * 8;
        const index_t s = s0 + r;
        const bool on = s < seq_len;
        mma::cp_async_16(sV + r * Cfg::kLdV + c, on ? v + (row_begin + s) * p.v_stride.row + c : v, on);
      }
      mma::cp_async_commit();
      mma::cp_async_wait_all();
      __syncwarp();

      // S = Q K^T over the 32 keys: 4 n-tiles of 8 keys.
      float s_acc[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) s_acc[n][0] = s_acc[n][1] = s_acc[n][2] = s_acc[n][3] = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < kHeadDim; k0 += 16) {
        uint32_t a[4];
        a[0] = *reinterpret_cast<const uint32_t*>(sQ + gid * Cfg::kLdQK + k0 + 2 * tig);
        a[1] = *reinterpret_cast<const uint32_t*>(sQ + (gid + 8) * Cfg::kLdQK + k0 + 2 * tig);
        a[2] = *reinterpret_cast<const uint32_t*>(sQ + gid * Cfg::kLdQK + k0 + 8 + 2 * tig);
        a[3] = *reinterpret_cast<const uint32_t*>(sQ + (gid + 8) * Cfg::kLdQK + k0 + 8 + 2 * tig);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          uint32_t bb[2];
          bb[0] = *reinterpret_cast<const uint32_t*>(sK + (n * 8 + gid) * Cfg::kLdQK + k0 + 2 * tig);
          bb[1] = *reinterpret_cast<const uint32_t*>(sK + (n * 8 + gid) * Cfg::kLdQK + k0 + 8 + 2 * tig);
          mma::m16n8k16<T>(s_acc[n], a, bb);
        }
      }

      // Mask, online softmax (scores stay unscaled; scale folded into the exponent).
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const index_t t = t0 + row_tok[ri];
        const bool tok_on = row_on[ri] && ((tokmask >> row_tok[ri]) & 1u);
        const index_t lo = selected ? 0 : t - p.window + 1;
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const index_t s = s0 + n * 8 + 2 * tig + e;
            const bool ok = tok_on && s <= t && s >= lo && s < seq_len;
            float& x = s_acc[n][ri * 2 + e];
            x = ok ? x : -INFINITY;
            mx = fmaxf(mx, x);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[ri], mx);
        // All keys so far masked: keep everything at zero (no inf - inf).
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

      // O += P V: P (16 x 32) from the S registers, two k-steps of 16 keys.
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t a[4];
        a[0] = mma::pack2<T>(s_acc[2 * kk][0], s_acc[2 * kk][1]);
        a[1] = mma::pack2<T>(s_acc[2 * kk][2], s_acc[2 * kk][3]);
        a[2] = mma::pack2<T>(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]);
        a[3] = mma::pack2<T>(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3]);
        const T* v0 = sV + (kk * 16 + 2 * tig) * Cfg::kLdV + gid;
#pragma unroll
        for (int n = 0; n < kHeadDimV / 8; ++n) {
          uint32_t bb[2];
          bb[0] = mma::pack2<T>(v0[n * 8], v0[Cfg::kLdV + n * 8]);
          bb[1] = mma::pack2<T>(v0[8 * Cfg::kLdV + n * 8], v0[9 * Cfg::kLdV + n * 8]);
          mma::m16n8k16<T>(o_acc[n], a, bb);
        }
      }
      __syncwarp();  // the next step overwrites sK / sV
    };

    if (selected) {
      // Walk the union of the active tokens' block lists in ascending order. Lane `tok` scans its
      // token's list for the smallest block above the last one taken (lists need not be sorted;
      // duplicates and negative entries are ignored), the warp takes the minimum.
      const int* list = nullptr;
      const bool lane_tok = lane >= p_begin && lane < p_end;
      if (lane_tok)
        list = p.block_idx + (packed ? 0 : b * p.block_idx_stride.batch) +
               (row_begin + t0 + lane) * p.block_idx_stride.row + static_cast<index_t>(g) * p.block_idx_stride.head;
      const int n_blocks_seq = (seq_len + p.sel_block - 1) / p.sel_block;
      int last = -1;
      while (true) {
        int next = INT_MAX;
        if (lane_tok)
          for (int i = 0; i < p.top_n; ++i) {
            const int j = __ldg(list + i);
            if (j > last && j < next && j < n_blocks_seq) next = j;
          }
        int j = next;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) j = min(j, __shfl_xor_sync(0xffffffffu, j, off));
        if (j == INT_MAX) break;
        const unsigned tokmask = __ballot_sync(0xffffffffu, lane_tok && next == j);
        const index_t blk0 = static_cast<index_t>(j) * p.sel_block;
        for (int sub = 0; sub < p.sel_block; sub += kBlockN) {
          const index_t s0 = blk0 + sub;
          if (s0 > t_last || s0 >= seq_len) break;
          step(s0, tokmask);
        }
        last = j;
      }
    } else {
      index_t lo = t_first - p.window + 1;
      lo = lo < 0 ? 0 : (lo / kBlockN) * kBlockN;
      for (index_t s0 = lo; s0 <= t_last; s0 += kBlockN) step(s0, 0xffffffffu);
    }

    // ---- epilogue: normalise, write o and lse ----
    T* o = static_cast<T*>(p.o) + bo;
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
    p_begin = p_end;
  }
}

}  // namespace sparse_detail
}  // namespace nsa
