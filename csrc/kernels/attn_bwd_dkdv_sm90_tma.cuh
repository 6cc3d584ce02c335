// sm_90a wide dK / dV tile (attn_bwd_dkdv_sm90.cuh's two warpgroups of 64 keys, 64 query rows
// per step, four-stage ring) fed by a TMA producer: three warpgroups, warp 0 of warpgroup 0
// loads the tile's K / V once and then, per step, one 4-d box (64 columns, G heads, 64 / G
// tokens) per 64 columns of Q and of dO straight into the swizzled K-major step tile, completing
// on the stage's full barrier; its lanes fill the rows' token / lse / delta. Warpgroups 1 and 2
// consume (keys [64 w, 64 w + 64)) and release a stage through its empty barrier once their
// dK / dV products of it are done. No CTA barrier per step and no loader state in the
// consumers: setmaxnreg gives the producer warpgroup 40 registers and each consumer thread 232.
// Measured 1.2-1.3x over the cp.async wide tile on the H200 (session 13); a cp.async producer
// warp was 8-14% slower than it (bench/patches/dkdv-wide-producer-warp.patch): one lane issuing
// a whole step is what pays.
//
// Rows: steps start at a token (G divides 32 and every chunk is cut at multiples of 32 rows).
// Rows past the unit's end are loaded as they are (possibly another sequence's, when packed)
// and carry token -1, so that their P and dS are exact zeros.
#pragma once

#include "attn_bwd_dkdv_sm90.cuh"
#include "tma_sm90.cuh"

namespace nsa {
namespace dkdv {

template <int kHeadDim, int kHeadDimV>
struct TmaCfg {
  using C = WideCfg<kHeadDim, kHeadDimV, 2>;
  static constexpr int kThreads = 384;
  static constexpr int kSmemBytes = C::kSmemBytes + 2 * C::kStages * 8;
};

template <typename T, int kHeadDim, int kHeadDimV>
__device__ __forceinline__ void dkdv_tile_sm90_tma(const AttnBwdParams& p, const TileArgs& a, float* partial,
                                                   unsigned char* smem_raw, const CUtensorMap* tm_q,
                                                   const CUtensorMap* tm_do) {
#ifdef NSA_WGMMA
  using C = typename TmaCfg<kHeadDim, kHeadDimV>::C;
  constexpr int kN = C::kStepRows, kTK = C::kTileKeys, kStages = C::kStages;
  constexpr int kVecQ = kHeadDim / 8, kVecV = kHeadDimV / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool packed = p.cu_seqlens != nullptr;
  const int G = p.heads_q / p.heads_kv;
  const index_t n_steps = (a.r_end - a.r_begin + kN - 1) / kN;
  if (n_steps <= 0 && partial == nullptr) return;  // uniform: nothing attends these keys

  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sK = smem;
  unsigned char* sV = sK + C::kKBytes;
  unsigned char* sRows = sV + C::kVBytes;
  int* sInfo = reinterpret_cast<int*>(sRows + kStages * C::kRowsBytes);
  const uint32_t k_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t v_addr = k_addr + C::kKBytes;
  const uint32_t rows_addr = v_addr + C::kVBytes;
  const uint32_t bar_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sInfo + kStages * C::kInfoInts));
  auto full_bar = [&](index_t j) { return bar_addr + static_cast<uint32_t>(j % kStages) * 8; };
  auto empty_bar = [&](index_t j) { return bar_addr + (kStages + static_cast<uint32_t>(j % kStages)) * 8; };
  auto q_addr = [&](index_t it) { return rows_addr + static_cast<uint32_t>(it % kStages) * C::kRowsBytes; };
  auto do_addr = [&](index_t it) { return q_addr(it) + C::kQBytes; };
  auto info = [&](index_t it) { return sInfo + (it % kStages) * C::kInfoInts; };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      tma::mbar_init(bar_addr + s * 8, 1);                // full: the producer's lane 0 (+ the boxes' bytes)
      tma::mbar_init(bar_addr + (kStages + s) * 8, 256);  // empty: every consumer thread
    }
    tma::fence_barrier_init();
  }
  __syncthreads();

  if (warp < 4) {  // ---- producer warpgroup: warp 0 loads, the others leave
    tma::setmaxnreg_dec<40>();
    if (warp != 0) return;
    const TileQuery<T> tq(p, a);
    index_t qi[2];
    int hh[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const index_t r = a.r_begin + lane + 32 * h;
      qi[h] = r / G;
      hh[h] = static_cast<int>(r - qi[h] * G);
    }
    for (index_t j = 0; j < n_steps; ++j) {
      if (j >= kStages) tma::mbar_wait(empty_bar(j), static_cast<uint32_t>((j / kStages - 1) & 1));
      if (j == 0) {  // K, V of the tile, K-major swizzled; rows past nk read as zero
        const T* k = static_cast<const T*>(p.k) + (packed ? 0 : a.b * p.k_stride.batch) + static_cast<index_t>(a.g) * p.k_stride.head;
        const T* v = static_cast<const T*>(p.v) + (packed ? 0 : a.b * p.v_stride.batch) + static_cast<index_t>(a.g) * p.v_stride.head;
        for (int i = lane; i < kTK * kVecQ; i += 32) {
          const int r = i / kVecQ, c = i % kVecQ;
          const bool on = r < a.nk;
          mma::cp_async_16(sK + wgmma::k_major_offset(r, c, kTK), on ? k + (a.k_row0 + r) * p.k_stride.row + c * 8 : k, on);
        }
        for (int i = lane; i < kTK * kVecV; i += 32) {
          const int r = i / kVecV, c = i % kVecV;
          const bool on = r < a.nk;
          mma::cp_async_16(sV + wgmma::k_major_offset(r, c, kTK), on ? v + (a.k_row0 + r) * p.v_stride.row + c * 8 : v, on);
        }
        mma::cp_async_wait_all();  // landed before step 0 is published (its arrival releases them)
        wgmma::fence_proxy_async();
      }
      int* inf = info(j);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = lane + 32 * h;
        int tok = -1;
        if (a.r_begin + j * kN + rr < a.r_end) tok = static_cast<int>(a.tok_lo + qi[h]);
        const bool on = tok >= 0;
        const index_t at = (a.q_row0 + (on ? tok : 0)) * p.lse_row_stride + hh[h];
        inf[rr] = tok;
        reinterpret_cast<float*>(inf)[kN + rr] = on ? __ldg(tq.lse + at) : 0.f;
        reinterpret_cast<float*>(inf)[2 * kN + rr] = on ? __ldg(tq.delta + at) : 0.f;
        hh[h] += kN;
        const int adv = hh[h] / G;
        qi[h] += adv;
        hh[h] -= adv * G;
      }
      __syncwarp();
      if (lane == 0) {
        const uint32_t full = full_bar(j);
        tma::mbar_arrive_expect_tx(full, C::kRowsBytes);
        // Rows r0 .. r0 + 63 of the step are tokens r0 / G .., heads g G .. g G + G - 1.
        const index_t tok0 = a.tok_lo + (a.r_begin + j * kN) / G;
        const int c2 = static_cast<int>(a.q_row0 + tok0), c3 = packed ? 0 : a.b, c1 = a.g * G;
#pragma unroll
        for (int c = 0; c < kHeadDim / 64; ++c) tma::load_4d(q_addr(j) + c * kN * 128, tm_q, 64 * c, c1, c2, c3, full);
#pragma unroll
        for (int c = 0; c < kHeadDimV / 64; ++c) tma::load_4d(do_addr(j) + c * kN * 128, tm_do, 64 * c, c1, c2, c3, full);
      }
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
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < kHeadDimV / 8; ++n) dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;
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
      wide_step_products<T, kHeadDim, kHeadDimV, kTK, kN>(kb, vb, q_addr(it), do_addr(it), info(it), key_lo, key_hi,
                                                      scale_log2, tig, dk_flat, dv_flat);
      tma::mbar_arrive(empty_bar(it));  // this thread is done with the stage
    }
  }

  store_dkdv_wide<T, kHeadDim, kHeadDimV, C::kCols>(p, a, partial, key_base, dk_acc, dv_acc, gid, tig);
#endif
}

}  // namespace dkdv
}  // namespace nsa
