// Pieces shared by the grouped sparse attention kernels (forward, dQ, dK/dV): how a warp's 16
// rows map to (token, head) pairs, how a group of consecutive positions splits into passes that
// stay inside one sequence, query-row loads and the ldmatrix-fed 16 x 32 products. The CTA
// walks over key tiles are in attn_cta_walk.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>

#include "mma_sm80.cuh"
#include "sparse_attn.h"

namespace nsa {
namespace sparse_detail {

constexpr int kBlockN = 32;  // keys (or query rows) per step
constexpr int kRows = 16;    // rows per warp (one m16 tile)
constexpr float kLog2e = 1.4426950408889634f;

// Query-side rows of one warp: the G heads of one token (16 per warp when G >= 16, blockIdx.y
// picks the chunk), or the heads of P = 16/G consecutive tokens when G < 16.
struct RowMap {
  int g;       // KV head
  int tokens;  // P: consecutive tokens per warp
  int heads;   // query heads per token in this warp
  int head0;   // first query head (absolute)
};

__device__ __forceinline__ int head_chunks(const AttnParams& p) {
  const int G = p.heads_q / p.heads_kv;
  return G >= kRows ? (G + kRows - 1) / kRows : 1;
}

__device__ __forceinline__ RowMap query_row_map(const AttnParams& p) {
  const int G = p.heads_q / p.heads_kv;
  const int chunks = head_chunks(p);
  const int chunk = blockIdx.y % chunks;
  RowMap rm;
  rm.g = blockIdx.y / chunks;
  rm.tokens = G >= kRows ? 1 : kRows / G;
  rm.head0 = rm.g * G + chunk * kRows;
  rm.heads = G >= kRows ? min(kRows, G - chunk * kRows) : G;
  return rm;
}

// A group of `tokens` consecutive positions handled by one warp.
struct Group {
  index_t row0;  // packed: first row of the group; padded: first position
  int b;         // padded: batch index
};

__device__ __forceinline__ bool group_of(const AttnParams& p, int tokens, index_t item, Group& gr) {
  if (p.cu_seqlens == nullptr) {
    if (p.seqlen <= 0) return false;
    const index_t groups = (p.seqlen + tokens - 1) / tokens;
    if (item >= groups * p.batch) return false;
    gr.b = static_cast<int>(item / groups);
    gr.row0 = (item % groups) * tokens;
    return true;
  }
  gr.b = 0;
  gr.row0 = item * tokens;
  return gr.row0 < p.total_rows;
}

// CTA groups of `tokens` consecutive tokens: the grid x of the attention kernels.
__host__ __device__ inline index_t cta_groups(const AttnParams& p, int tokens) {
  return p.cu_seqlens ? (p.total_rows + tokens - 1) / tokens
                      : static_cast<index_t>(p.batch) * ((p.seqlen + tokens - 1) / tokens);
}

// Tokens of one group of AttnParams::sel_group_flags: a CTA of the selected forward's 4-warp walk.
__host__ __device__ inline int sel_flag_group_tokens(const AttnParams& p) {
  const int G = p.heads_q / p.heads_kv;
  return (G >= kRows ? 1 : kRows / G) * 4;
}

// The flag group of CTA `item` of a grid of `tokens`-token CTAs (tokens divides the group's).
__device__ __forceinline__ index_t sel_flag_group(const AttnParams& p, int tokens, index_t item) {
  const int group_tokens = sel_flag_group_tokens(p);
  if (p.cu_seqlens != nullptr) return item * tokens / group_tokens;
  const index_t per_b = (p.seqlen + tokens - 1) / tokens, per_b_group = (p.seqlen + group_tokens - 1) / group_tokens;
  return item / per_b * per_b_group + item % per_b * tokens / group_tokens;
}

// The positions [t0 + p_begin, t0 + p_end) of a group that lie in one sequence (a packed group
// can straddle sequences) and, when split > 0, in one aligned span of `split` positions.
struct Pass {
  int b;
  index_t row_begin;  // row of position 0 of the sequence (0 when padded)
  int seq_len;
  index_t t0;         // position of the group's first slot (may be negative on later passes)
  int p_begin, p_end;
};

__device__ __forceinline__ bool next_pass(const AttnParams& p, int tokens, const Group& gr, int p_begin, int split,
                                          Pass& ps) {
  if (p_begin >= tokens) return false;
  if (p.cu_seqlens == nullptr) {
    ps.b = gr.b;
    ps.row_begin = 0;
    ps.seq_len = p.seqlen;
  } else {
    ps.b = find_sequence(p.cu_seqlens, p.batch, gr.row0 + p_begin);
    if (ps.b < 0) return false;  // past the last sequence (malformed cu_seqlens are clamped)
    const SeqGeom sg = seq_geom(p.cu_seqlens, ps.b, 0, p.total_rows);
    ps.row_begin = sg.row_begin;
    ps.seq_len = sg.len;
  }
  ps.t0 = gr.row0 - ps.row_begin;
  int p_end = tokens;
  if (ps.t0 + p_end > ps.seq_len) p_end = static_cast<int>(ps.seq_len - ps.t0);
  if (split > 0) {
    const index_t span_end = ((ps.t0 + p_begin) / split + 1) * split;
    if (ps.t0 + p_end > span_end) p_end = static_cast<int>(span_end - ps.t0);
  }
  ps.p_begin = p_begin;
  ps.p_end = p_end;
  return p_end > p_begin;
}

// cp.async of the warp's 16 query-side rows (token of the group, head) of a [.., HQ, D] tensor,
// by kThreads threads (thread index t): one warp, or the warps that share the rows.
template <typename T, int kDim, int kThreads = 32>
__device__ __forceinline__ void load_query_rows_async(T* dst, int ld, const T* base, const Strides3& st,
                                                      const RowMap& rm, const Pass& ps, int t) {
  constexpr int kVec = kDim / 8;
#pragma unroll
  for (int i = t; i < kRows * kVec; i += kThreads) {
    const int r = i / kVec, c = (i % kVec) * 8;
    const int tok = r / rm.heads, hh = r % rm.heads;
    const bool on = tok >= ps.p_begin && tok < ps.p_end && r < rm.tokens * rm.heads;
    const T* src = on ? base + (ps.row_begin + ps.t0 + tok) * st.row + static_cast<index_t>(rm.head0 + hh) * st.head + c
                      : base;
    mma::cp_async_16(dst + r * ld + c, src, on);
  }
}

// 16 x kKeys product of a 16 x kDim A tile and a kKeys x kDim B tile (both row-major in shared
// memory, B read as "col": acc[n] += A * B[n*8 .. n*8+7]^T). Fragments come from ldmatrix, so
// both tiles need 16-byte aligned rows (ld a multiple of 8 elements). Lane l addresses row
// l % 8 of matrix l / 8.
template <typename T, int kDim, int kKeys = 32>
__device__ __forceinline__ void gemm_16x32_nt(float (&acc)[kKeys / 8][4], const T* sA, int lda, const T* sB, int ldb,
                                              int gid, int tig) {
  static_assert(kKeys % 16 == 0, "pairs of 8-key tiles");
  const int lane = gid * 4 + tig, mat = lane >> 3, row8 = lane & 7;
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  const T* a_row = sA + ((mat & 1) * 8 + row8) * lda + (mat >> 1) * 8;
  // B, per pair of 8-key tiles: (tile 0, k 0-7), (tile 0, k 8-15), (tile 1, k 0-7), (tile 1, k 8-15).
  const T* b_row = sB + ((mat >> 1) * 8 + row8) * ldb + (mat & 1) * 8;
#pragma unroll
  for (int k0 = 0; k0 < kDim; k0 += 16) {
    uint32_t a[4];
    mma::ldmatrix_x4(a, a_row + k0);
#pragma unroll
    for (int np = 0; np < kKeys / 16; ++np) {
      uint32_t bq[4];
      mma::ldmatrix_x4(bq, b_row + np * 16 * ldb + k0);
      const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
      mma::m16n8k16<T>(acc[2 * np], a, b0);
      mma::m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// acc[16 x kDimOut] += P (16 x kKeys, in the C-fragment registers of a 16 x kKeys product) * B,
// B a kKeys x kDimOut row-major shared tile (the k dimension runs over B's rows; 16-byte aligned
// rows). B fragments come from ldmatrix.trans: per pair of 8-column tiles, matrices (k 0-7,
// tile 0), (k 8-15, tile 0), (k 0-7, tile 1), (k 8-15, tile 1).
template <typename T, int kDimOut, int kKeys = 32>
__device__ __forceinline__ void gemm_16x32_regs_nn(float (&acc)[kDimOut / 8][4], const float (&pf)[kKeys / 8][4],
                                                   const T* sB, int ldb, int gid, int tig) {
  static_assert(kDimOut % 16 == 0 && kKeys % 16 == 0, "pairs of 8-column tiles, k16 steps");
  const int lane = gid * 4 + tig, mat = lane >> 3, row8 = lane & 7;
  const T* b_row = sB + ((mat & 1) * 8 + row8) * ldb + (mat >> 1) * 8;
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    uint32_t a[4];
    a[0] = mma::pack2<T>(pf[2 * kk][0], pf[2 * kk][1]);
    a[1] = mma::pack2<T>(pf[2 * kk][2], pf[2 * kk][3]);
    a[2] = mma::pack2<T>(pf[2 * kk + 1][0], pf[2 * kk + 1][1]);
    a[3] = mma::pack2<T>(pf[2 * kk + 1][2], pf[2 * kk + 1][3]);
#pragma unroll
    for (int np = 0; np < kDimOut / 16; ++np) {
      uint32_t bq[4];
      mma::ldmatrix_x4_trans(bq, b_row + kk * 16 * ldb + np * 16);
      const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
      mma::m16n8k16<T>(acc[2 * np], a, b0);
      mma::m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// Zeroes an m16n8 accumulator tile of kCols columns (dQ, dK, dV, O).
template <int kCols>
__device__ __forceinline__ void zero_acc(float (&acc)[kCols / 8][4]) {
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

}  // namespace sparse_detail
}  // namespace nsa
