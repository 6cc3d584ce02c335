// dQ of the attention backward (compressed, selected and window branches), shared by
// sparse_attn_bwd_kernel.cuh and cmp_attn_bwd_kernel.cuh.
//
//   P = exp(scale * Q K^T - lse),  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale * dS K
//
// The forward's CTA layout and key walks (attn_cta_walk.cuh): a CTA owns the consecutive tokens
// of 4 row groups of one KV head (each group the 16 rows of sparse_attn_common.cuh's layout)
// and walks the union of their key tiles once, each 32-key K/V tile loaded cooperatively into a
// two-stage cp.async pipeline and multiplied by every row group that needs it: the contiguous
// range (compressed tokens [0, nvis(t)), window [t - w + 1, t]) or the union of the selected
// blocks with next-block prefetch. The first version gave each warp private K/V tiles loaded
// and waited for synchronously per tile: every tile was fetched once per warp and its latency
// was exposed. Each row group accumulates its 16 x D dQ in registers over the walk and writes
// it once: no atomics, every sum in a fixed order (bitwise reproducible).
#pragma once

#include "attn_cta_walk.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV, int kRowGroups_ = 4>
struct DqConfig {
  static constexpr int kDimQK = kHeadDim, kDimV = kHeadDimV;
  // 16-row groups per CTA: the forward's 4 warps, or 2 for the selected walk's groups of tokens
  // that do not share blocks (AttnParams::sel_group_flags, as the forward).
  static constexpr int kRowGroups = kRowGroups_;
  // D = 256: a 16 x 256 fp32 accumulator is 128 registers per thread on top of S, dP and the
  // fragments; ptxas spilled the first version's. Two warps per row group instead, each
  // accumulating half of the dQ columns (as D = 128); both compute the group's S and dP
  // (5/3 of the tensor-core work of one warp per group, cheaper than the spills).
  static constexpr int kColSplit = kHeadDim > 192 ? 2 : 1;
  static constexpr int kWarps = kRowGroups * kColSplit;  // warp w: row group w % 4, half w / 4
  static constexpr int kThreads = kWarps * 32;
  // Occupancy floor for ptxas. D = 64: 3 CTAs (<= 168 registers, no spill in the tile loop;
  // with a floor of 1 ptxas takes 214-226 and only 2 CTAs fit). Else 1: up to 255 registers,
  // 2 CTAs = 8 warps per SM at D <= 192. To A/B on the GPU: 3 at D = 128 also fits 168
  // registers with no spill for the window and selected kernels (the compressed one spills
  // 44-148 B), and three 68 KB CTAs fit an sm_90 SM: 12 warps instead of 8.
  static constexpr int kMinCtasPerSm = kHeadDim <= 64 ? 3 : 1;
  static constexpr int kDqCols = kHeadDim / kColSplit;  // dQ columns per warp
  static constexpr int kLdQK = kHeadDim + 8;            // padded rows: conflict-free ldmatrix
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kRowElems = kRowGroups * kRows * (kLdQK + kLdV);  // Q, dO of all groups
  static constexpr int kTileElems = kBlockN * (kLdQK + kLdV);            // one K + V tile
  // Range walk: two stages of one tile (68 KB at D = 128: two CTAs per sm_80 SM).
  static constexpr int kRangeSmemBytes = (kRowElems + 2 * kTileElems) * 2;
  // Selected walk: two buffer sets, of two tiles where two CTAs still fit an sm_80 SM (D = 64),
  // else of one (D = 128: 68 KB instead of 102 KB).
  static constexpr int kSelSmemBytesTwoTiles = (kRowElems + 4 * kTileElems) * 2 + 2 * kWarps * 4;
  static constexpr int kSelTilesPerSet = kSelSmemBytesTwoTiles <= 80 * 1024 ? 2 : 1;
  static constexpr int kSelSmemBytes = (kRowElems + 2 * kSelTilesPerSet * kTileElems) * 2 + 2 * kWarps * 4;
  static_assert(kDqCols % 16 == 0, "gemm_16x32_regs_nn takes pairs of 8-column tiles");
};

// Per-thread state of its two rows (gid, gid + 8) of the warp's 16.
struct DqRows {
  int tok[2];       // token slot in the warp's pass
  bool on[2];       // row holds a (token, head) of the pass
  float lse_l2[2];  // lse * log2(e); +inf for a row with no key, so that P = exp2(x - lse) = 0
  float delta[2];
};

__device__ __forceinline__ DqRows dq_rows(const AttnBwdParams& p, const RowMap& rm, const Pass& wps, int gid) {
  const index_t lse_b = p.cu_seqlens != nullptr ? 0 : wps.b * p.lse_batch_stride;
  DqRows rw;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = gid + ri * 8;
    rw.tok[ri] = r / rm.heads;
    rw.on[ri] = r < rm.tokens * rm.heads && rw.tok[ri] >= wps.p_begin && rw.tok[ri] < wps.p_end;
    rw.lse_l2[ri] = INFINITY;
    rw.delta[ri] = 0.f;
    if (rw.on[ri]) {
      const index_t at = lse_b + (wps.row_begin + wps.t0 + rw.tok[ri]) * p.lse_row_stride + rm.head0 + r % rm.heads;
      const float l = p.lse[at];
      rw.lse_l2[ri] = l == -INFINITY ? INFINITY : l * kLog2e;
      rw.delta[ri] = p.delta[at];
    }
  }
  return rw;
}

// cp.async of the row group's Q and dO rows by the kColSplit warps that share them (thread t of
// kColSplit * 32), so that no shared-memory byte is written twice.
template <typename T, class Cfg>
__device__ __forceinline__ void load_dq_rows(T* sQ, T* sdO, const AttnBwdParams& p, const RowMap& rm, const Pass& wps,
                                             int t) {
  constexpr int kN = Cfg::kColSplit * 32;
  const bool packed = p.cu_seqlens != nullptr;
  const T* q = static_cast<const T*>(p.q) + (packed ? 0 : wps.b * p.q_stride.batch);
  const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : wps.b * p.dout_stride.batch);
  load_query_rows_async<T, Cfg::kDimQK, kN>(sQ, Cfg::kLdQK, q, p.q_stride, rm, wps, t);
  load_query_rows_async<T, Cfg::kDimV, kN>(sdO, Cfg::kLdV, dout, p.dout_stride, rm, wps, t);
}

// One tile of kKeys keys (32, or 16 for the split walk): S = Q K^T, P = exp2(S * scale_log2 -
// lse_l2) on the keys keep(ri, kk) allows (kk: key offset in the tile), dP = dO V^T,
// dS = P (dP - delta), dQ[:, col0 + ..] += dS K.
template <typename T, int kHeadDim, int kHeadDimV, int kDqCols, int kKeys = 32, class Keep>
__device__ __forceinline__ void dq_tile(const T* sQ, const T* sdO, const T* sK, const T* sV, int col0, float scale_log2,
                                        const DqRows& rw, float (&dq_acc)[kDqCols / 8][4], int gid, int tig,
                                        Keep&& keep) {
  constexpr int kLdQK = kHeadDim + 8, kLdV = kHeadDimV + 8, kN = kKeys / 8;
  float s_acc[kN][4] = {};
  gemm_16x32_nt<T, kHeadDim, kKeys>(s_acc, sQ, kLdQK, sK, kLdQK, gid, tig);
  float dp_acc[kN][4] = {};
  gemm_16x32_nt<T, kHeadDimV, kKeys>(dp_acc, sdO, kLdV, sV, kLdV, gid, tig);
#pragma unroll
  for (int ri = 0; ri < 2; ++ri)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s_acc[n][ri * 2 + e];
        const float pr = keep(ri, n * 8 + 2 * tig + e) ? exp2f(x * scale_log2 - rw.lse_l2[ri]) : 0.f;
        x = pr * (dp_acc[n][ri * 2 + e] - rw.delta[ri]);  // dS
      }
  // K as the B operand with k over the tile's keys (ldmatrix.trans of its rows).
  gemm_16x32_regs_nn<T, kDqCols, kKeys>(dq_acc, s_acc, sK + col0, kLdQK, gid, tig);
}

// dq (scaled) of the rows that are on, columns [col0, col0 + kDqCols); plus p.dq_acc's values
// when given (added in fp32, one rounding).
template <typename T, int kDqCols>
__device__ __forceinline__ void dq_epilogue(const AttnBwdParams& p, const RowMap& rm, const Pass& wps, const DqRows& rw,
                                            int col0, const float (&dq_acc)[kDqCols / 8][4], int gid, int tig) {
  T* dq = static_cast<T*>(p.dq) + (p.cu_seqlens != nullptr ? 0 : wps.b * p.dq_stride.batch) + col0;
  const T* prev = p.dq_acc == nullptr ? nullptr
                                      : static_cast<const T*>(p.dq_acc) +
                                            (p.cu_seqlens != nullptr ? 0 : wps.b * p.dq_acc_stride.batch) + col0;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    if (!rw.on[ri]) continue;
    const int r = gid + ri * 8;
    const index_t tok = wps.row_begin + wps.t0 + rw.tok[ri];
    const index_t head = rm.head0 + r % rm.heads;
    T* row = dq + tok * p.dq_stride.row + head * p.dq_stride.head;
    if (prev != nullptr) {
      const T* prow = prev + tok * p.dq_acc_stride.row + head * p.dq_acc_stride.head;
      uint32_t old[kDqCols / 8];  // every load issued before the first add
#pragma unroll
      for (int n = 0; n < kDqCols / 8; ++n) old[n] = *reinterpret_cast<const uint32_t*>(prow + n * 8 + 2 * tig);
#pragma unroll
      for (int n = 0; n < kDqCols / 8; ++n) {
        const float2 x = mma::unpack2<T>(old[n]);
        *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * tig) =
            mma::pack2<T>(fmaf(dq_acc[n][ri * 2], p.scale, x.x), fmaf(dq_acc[n][ri * 2 + 1], p.scale, x.y));
      }
      continue;
    }
#pragma unroll
    for (int n = 0; n < kDqCols / 8; ++n)
      *reinterpret_cast<uint32_t*>(row + n * 8 + 2 * tig) =
          mma::pack2<T>(dq_acc[n][ri * 2] * p.scale, dq_acc[n][ri * 2 + 1] * p.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Contiguous ranges (compressed keys, window keys): range_attn_fwd_kernel.cuh's walk.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
__device__ __forceinline__ void range_dq(const AttnBwdParams& p, unsigned char* smem_raw) {
  using Cfg = DqConfig<kHeadDim, kHeadDimV>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int rgrp = warp % Cfg::kRowGroups, half = warp / Cfg::kRowGroups;
  const int col0 = half * Cfg::kDqCols;
  T* sQ = reinterpret_cast<T*>(smem_raw) + rgrp * kRows * Cfg::kLdQK;
  T* sdO = reinterpret_cast<T*>(smem_raw) + Cfg::kRowGroups * kRows * Cfg::kLdQK + rgrp * kRows * Cfg::kLdV;
  T* sStage = reinterpret_cast<T*>(smem_raw) + Cfg::kRowElems;

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kRowGroups;
  Group gr;
  if (!group_of(p, cta_tokens, blockIdx.x, gr)) return;  // uniform over the CTA
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;

  Pass ps;
  for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const Pass wps = warp_pass(ps, rgrp, P);
    const bool warp_on = wps.p_begin < wps.p_end;
    const RangeKeys<kCompressed> rk(p, ps);
    index_t lo, hi, w_lo = 0, w_hi = 0;  // keys [lo, hi) of the CTA, [w_lo, w_hi) of the row group
    rk.tiles_of(p, ps.t0 + ps.p_begin, ps.t0 + ps.p_end - 1, lo, hi);
    if (warp_on) rk.tiles_of(p, wps.t0 + wps.p_begin, wps.t0 + wps.p_end - 1, w_lo, w_hi);
    const int n_tiles = hi > lo ? static_cast<int>((hi - lo + kBlockN - 1) / kBlockN) : 0;

    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;
    auto load_tile = [&](int it) {
      T* sK = sStage + (it & 1) * Cfg::kTileElems;
      T* sV = sK + kBlockN * Cfg::kLdQK;
      const index_t s0 = lo + static_cast<index_t>(it) * kBlockN;
      load_rows_cta<T, kHeadDim, kBlockN, Cfg::kThreads>(sK, Cfg::kLdQK, k, p.k_stride.row, rk.kv_row_begin, s0, rk.n_keys, tid);
      load_rows_cta<T, kHeadDimV, kBlockN, Cfg::kThreads>(sV, Cfg::kLdV, v, p.v_stride.row, rk.kv_row_begin, s0, rk.n_keys, tid);
    };

    load_dq_rows<T, Cfg>(sQ, sdO, p, rm, wps, half * 32 + lane);
    if (n_tiles > 0) load_tile(0);
    mma::cp_async_commit();

    const DqRows rw = dq_rows(p, rm, wps, gid);
    index_t row_lo[2], row_hi[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) rk.row_keys(p, wps.t0 + rw.tok[ri], rw.on[ri], row_lo[ri], row_hi[ri]);
    float dq_acc[Cfg::kDqCols / 8][4];
    zero_acc<Cfg::kDqCols>(dq_acc);

    range_tile_loop(n_tiles, load_tile, [&](int it) {
      const index_t s0 = lo + static_cast<index_t>(it) * kBlockN;
      if (warp_on && s0 < w_hi && s0 + kBlockN > w_lo) {
        const T* sK = sStage + (it & 1) * Cfg::kTileElems;
        const T* sV = sK + kBlockN * Cfg::kLdQK;
        const int lo0 = tile_offset(row_lo[0], s0), hi0 = tile_offset(row_hi[0], s0);
        const int lo1 = tile_offset(row_lo[1], s0), hi1 = tile_offset(row_hi[1], s0);
        dq_tile<T, kHeadDim, kHeadDimV, Cfg::kDqCols>(sQ, sdO, sK, sV, col0, scale_log2, rw, dq_acc, gid, tig,
                                                      [&](int ri, int kk) {
                                                        return ri == 0 ? kk >= lo0 && kk < hi0 : kk >= lo1 && kk < hi1;
                                                      });
      }
    });

    dq_epilogue<T, Cfg::kDqCols>(p, rm, wps, rw, col0, dq_acc, gid, tig);
    __syncthreads();  // sQ, sdO and the stages are reused by the next pass
  }
}

// ---------------------------------------------------------------------------------------------
// Selected blocks: sparse_attn_fwd_kernel.cuh's union-of-blocks walk.
template <typename T, int kHeadDim, int kHeadDimV, int kRowGroups>
__device__ __forceinline__ void sel_dq(const AttnBwdParams& p, unsigned char* smem_raw) {
  using Cfg = DqConfig<kHeadDim, kHeadDimV, kRowGroups>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int rgrp = warp % Cfg::kRowGroups, half = warp / Cfg::kRowGroups;
  const int col0 = half * Cfg::kDqCols;
  T* sQ = reinterpret_cast<T*>(smem_raw) + rgrp * kRows * Cfg::kLdQK;
  T* sdO = reinterpret_cast<T*>(smem_raw) + Cfg::kRowGroups * kRows * Cfg::kLdQK + rgrp * kRows * Cfg::kLdV;
  T* sSets = reinterpret_cast<T*>(smem_raw) + Cfg::kRowElems;
  int* s_next = reinterpret_cast<int*>(sSets + 2 * Cfg::kSelTilesPerSet * Cfg::kTileElems);  // [2][kWarps]

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kRowGroups;
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
    const Pass wps = warp_pass(ps, rgrp, P);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;
    SelBlockWalk<Cfg::kWarps, Cfg::kSelTilesPerSet> walk(p, ps, wps, rm.g, s_next, warp, lane);

    load_dq_rows<T, Cfg>(sQ, sdO, p, rm, wps, half * 32 + lane);
    mma::cp_async_commit();

    const DqRows rw = dq_rows(p, rm, wps, gid);
    float dq_acc[Cfg::kDqCols / 8][4];
    zero_acc<Cfg::kDqCols>(dq_acc);

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
            const index_t t = wps.t0 + rw.tok[ri];
            const bool sel = rw.on[ri] && ((mask >> rw.tok[ri]) & 1u);
            hi_rel[ri] = sel ? tile_offset(min(t + 1, static_cast<index_t>(seq_len)), s0) : 0;
          }
          dq_tile<T, kHeadDim, kHeadDimV, Cfg::kDqCols>(sQ, sdO, sK, sV, col0, scale_log2, rw, dq_acc, gid, tig,
                                                        [&](int ri, int kk) { return kk < hi_rel[ri]; });
        });

    dq_epilogue<T, Cfg::kDqCols>(p, rm, wps, rw, col0, dq_acc, gid, tig);
    __syncthreads();  // sQ, sdO and the buffer sets are reused by the next pass
  }
}

// ---------------------------------------------------------------------------------------------
// Launch: grid x = CTA groups of kRowGroups * P consecutive tokens, y = (KV head, head chunk).

template <int kRowGroups>
inline index_t dq_ctas(const AttnParams& p) {
  const int G = p.heads_q / p.heads_kv;
  const int tokens = (G >= kRows ? 1 : kRows / G) * kRowGroups;
  return cta_groups(p, tokens);
}

// Enqueues kernel(p, extra...) over `ctas` x (heads_kv * head chunks); the caller checks cudaGetLastError
// after its remaining launches.
template <class Kernel, class... Extra>
inline Status launch_dq(Kernel kernel, int threads, int smem_bytes, index_t ctas, const AttnBwdParams& p,
                        cudaStream_t stream, const Extra&... extra) {
  const int G = p.heads_q / p.heads_kv;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  if (ctas > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  kernel<<<dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(p.heads_kv * chunks)), threads, smem_bytes, stream>>>(p, extra...);
  return Status{};
}

}  // namespace sparse_detail
}  // namespace nsa
