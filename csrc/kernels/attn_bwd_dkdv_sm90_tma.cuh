// sm_90a wide dK / dV tile (attn_bwd_dkdv_sm90.cuh's two warpgroups of 64 keys, 64 query rows
// per step, four-stage ring) fed by TMA: three warpgroups, and one thread of the first issues
// everything. Step 0 brings the tile's K and V (boxes of 128 keys); every step j brings one 4-d
// box (64 columns, G heads, 64 / G tokens) per 64 columns of Q and of dO straight into the
// swizzled K-major step tile and one box of the rows' lse and of their delta (fp32), all
// completing on the stage's full barrier. Warpgroups 1 and 2 consume (keys [64 w, 64 w + 64)),
// compute each row's token from its index, and release a stage through its empty barrier once
// their dK / dV products of it are done. No CTA barrier per step and no loader state in the
// consumers: setmaxnreg gives the producer warpgroup 40 registers and each consumer thread 232.
// Measured 1.2-1.3x over the cp.async wide tile on the H200 (session 13); a cp.async producer
// warp was 8-14% slower than that tile (bench/patches/dkdv-wide-producer-warp.patch): one lane
// issuing a whole step is what pays.
//
// Rows: steps start at a token (G divides 32 and every chunk is cut at multiples of 32 rows);
// G >= 4, so that a step's lse (G heads x 64 / G tokens, fp32) is one box of 16-byte rows laid
// out like the step's rows (the launcher keeps the cp.async tile for G = 1, 2).
// Rows past the unit's end are loaded as they are (possibly another sequence's, when packed)
// and carry token -1, so that their P and dS are exact zeros.
//
// Every shared-memory write of the producer is a TMA write, so the only generic accesses to a
// stage are the consumers' reads (racecheck then has nothing to pair across the mbarrier hand-
// off, which it does not model: tools/probes/mbarrier_handoff_probe.cu).
#pragma once

#include "attn_bwd_dkdv_sm90.cuh"
#include "tma_sm90.cuh"

namespace nsa {
namespace dkdv {

template <int kHeadDim, int kHeadDimV>
struct TmaCfg {
  using C = WideCfg<kHeadDim, kHeadDimV, 2>;
  static constexpr int kThreads = 384;
  // lse / delta of a stage: boxes of (G heads, 64 / G tokens) fp32, 64 floats each
  static constexpr int kStatFloats = C::kStepRows;
  static constexpr int kStatBytes = 2 * kStatFloats * 4;
  static constexpr int kSmemBytes = C::kFixedBytes + C::kStages * (C::kRowsBytes + kStatBytes) + 2 * C::kStages * 8;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// The maps (range_attn_bwd_dkdv_sm90.cuh): the tile's keys (boxes of 128 keys), the step rows of
// q and dout (64 rows), and the rows' fp32 lse and delta as (HQ, rows, batch) with boxes of
// (G, 64 / G, 1).
struct TmaMaps {
  tma::KvTileMaps kv;
  CUtensorMap q, dout, lse, delta;
};

template <typename T, int kHeadDim, int kHeadDimV>
__device__ __forceinline__ void dkdv_tile_sm90_tma(const AttnBwdParams& p, const TileArgs& a, float* partial,
                                                   unsigned char* smem_raw, const TmaMaps& maps) {
#ifdef NSA_WGMMA
  using TC = TmaCfg<kHeadDim, kHeadDimV>;
  using C = typename TC::C;
  constexpr int kN = C::kStepRows, kTK = C::kTileKeys, kStages = C::kStages;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool packed = p.cu_seqlens != nullptr;
  const int G = p.heads_q / p.heads_kv;
  const index_t n_steps = (a.r_end - a.r_begin + kN - 1) / kN;
  if (n_steps <= 0 && partial == nullptr) return;  // uniform: nothing attends these keys

  // K, V of the tile | kStages x (q rows, dout rows) | kStages x (lse, delta) | barriers
  unsigned char* smem = wgmma::align_smem_1024(smem_raw);
  const float* sStat = reinterpret_cast<const float*>(smem + C::kKBytes + C::kVBytes + kStages * C::kRowsBytes);
  const uint32_t k_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t v_addr = k_addr + C::kKBytes;
  const uint32_t rows_addr = v_addr + C::kVBytes;
  const uint32_t stat_addr = rows_addr + kStages * C::kRowsBytes;
  const uint32_t bar_addr = stat_addr + kStages * TC::kStatBytes;
  auto full_bar = [&](index_t j) { return bar_addr + static_cast<uint32_t>(j % kStages) * 8; };
  auto empty_bar = [&](index_t j) { return bar_addr + (kStages + static_cast<uint32_t>(j % kStages)) * 8; };
  auto q_addr = [&](index_t it) { return rows_addr + static_cast<uint32_t>(it % kStages) * C::kRowsBytes; };
  auto do_addr = [&](index_t it) { return q_addr(it) + C::kQBytes; };
  auto stat = [&](index_t it) { return sStat + (it % kStages) * (2 * TC::kStatFloats); };  // lse, then delta
  const int log2_g = __ffs(G) - 1;  // row r of a step: token r >> log2_g, head r & (G - 1)

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      tma::mbar_init(bar_addr + s * 8, 1);                // full: the producer thread (+ the boxes' bytes)
      tma::mbar_init(bar_addr + (kStages + s) * 8, 256);  // empty: every consumer thread
    }
    tma::fence_barrier_init();
  }
  __syncthreads();

  if (warp < 4) {  // ---- producer warpgroup: thread 0 loads, the others leave
    tma::setmaxnreg_dec<40>();
    if (tid != 0) return;
    for (index_t j = 0; j < n_steps; ++j) {
      if (j >= kStages) tma::mbar_wait(empty_bar(j), static_cast<uint32_t>((j / kStages - 1) & 1));
      const uint32_t full = full_bar(j);
      // Step 0 also brings the tile's K and V (keys past nk are whatever the tensor holds there:
      // their dK / dV rows are never stored).
      tma::mbar_arrive_expect_tx(full, C::kRowsBytes + 2 * TC::kStatFloats * 4 + (j == 0 ? C::kKBytes + C::kVBytes : 0));
      if (j == 0)
        tma::load_kv_boxes<kHeadDim, kHeadDimV, kTK>(k_addr, maps.kv, a.g, a.k_row0, packed ? 0 : a.b, full);
      // Rows r0 .. r0 + 63 of the step are tokens r0 / G .., heads g G .. g G + G - 1.
      const index_t tok0 = a.tok_lo + ((a.r_begin + j * kN) >> log2_g);
      const int c2 = static_cast<int>(a.q_row0 + tok0), c3 = packed ? 0 : a.b, c1 = a.g * G;
#pragma unroll
      for (int c = 0; c < kHeadDim / 64; ++c) tma::load_4d(q_addr(j) + c * kN * 128, &maps.q, 64 * c, c1, c2, c3, full);
#pragma unroll
      for (int c = 0; c < kHeadDimV / 64; ++c) tma::load_4d(do_addr(j) + c * kN * 128, &maps.dout, 64 * c, c1, c2, c3, full);
      const uint32_t st = stat_addr + static_cast<uint32_t>(j % kStages) * TC::kStatBytes;
      tma::load_3d(st, &maps.lse, c1, c2, c3, full);
      tma::load_3d(st + TC::kStatFloats * 4, &maps.delta, c1, c2, c3, full);
    }
    return;
  }

  // ---- consumer warpgroups 1, 2
  tma::setmaxnreg_inc<232>();
  const int cw = warp - 4;
  const int gid = lane >> 2, tig = lane & 3;
  const int wg = cw / 4;
  const int key_base = 64 * wg + 16 * (cw % 4);
  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDimV / 8][4];
  sparse_detail::zero_acc<kHeadDim>(dk_acc);
  sparse_detail::zero_acc<kHeadDimV>(dv_acc);
  float(&dk_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(dk_acc);
  float(&dv_flat)[kHeadDimV / 2] = reinterpret_cast<float(&)[kHeadDimV / 2]>(dv_acc);

  if (n_steps > 0) {
    int key_lo[2], key_hi[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) key_token_window(p, a, key_base + gid + ri * 8, key_lo[ri], key_hi[ri]);
    const float scale_log2 = p.scale * sparse_detail::kLog2e;
    const uint32_t kw_addr = k_addr + 64 * wg * 128, vw_addr = v_addr + 64 * wg * 128;

    for (index_t it = 0; it < n_steps; ++it) {
      tma::mbar_wait(full_bar(it), static_cast<uint32_t>((it / kStages) & 1));
      uint32_t kb = kw_addr, vb = vw_addr;
      asm volatile("" : "+r"(kb), "+r"(vb));
      // Row col is token tok0 + col / G (off past the unit's rows); its lse / delta are element
      // col of the stage's boxes. A key row ri takes the rows of tokens [key_lo, key_hi]: the
      // columns [col_lo[ri], col_hi[ri]) of this step, so no per-column token is formed.
      const index_t r0 = a.r_begin + it * kN;
      const int n_on = a.r_end - r0 < kN ? static_cast<int>(a.r_end - r0) : kN;
      const int tok0 = static_cast<int>(a.tok_lo + (r0 >> log2_g));
      int col_lo[2], col_hi[2];
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const int lo = key_lo[ri] - tok0, hi = key_hi[ri] - tok0 + 1;  // token offsets, clamped below
        col_lo[ri] = (lo < 0 ? 0 : (lo > kN ? kN : lo)) << log2_g;
        const int c = (hi < 0 ? 0 : (hi > kN ? kN : hi)) << log2_g;
        col_hi[ri] = c < n_on ? c : n_on;
      }
      const float* st = stat(it);
      auto row_info = [&](int col, int ri) {
        return RowInfo{col >= col_lo[ri] && col < col_hi[ri], st[col], st[TC::kStatFloats + col]};
      };
      wide_step_products<T, kHeadDim, kHeadDimV, kTK, kN>(kb, vb, q_addr(it), do_addr(it), row_info, scale_log2, tig,
                                                          dk_flat, dv_flat);
      tma::mbar_arrive(empty_bar(it));  // this thread is done with the stage
    }
  }

  store_dkdv_wide<T, kHeadDim, kHeadDimV, C::kCols>(p, a, partial, key_base, dk_acc, dv_acc, gid, tig);
#endif
}

}  // namespace dkdv
}  // namespace nsa
