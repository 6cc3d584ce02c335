// sm_90a dK / dV tile on warpgroup MMAs: the same work unit as dkdv_tile (attn_bwd_dkdv.cuh:
// 64 keys of one KV head against query rows [r_begin, r_end) of its row list, 32 rows per step),
// whose CTA of 4 warps x 16 keys is exactly one m64 warpgroup. Per step:
//
//   S^T = K Q^T and dP^T = V dO^T     (SS: K, V tiles and the step's Q / dO rows K-major, N = 32)
//   P^T = exp2(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - delta)   (masks per key and row)
//   dV += P^T dO,  dK += dS^T Q       (RS: P^T / dS^T from the accumulators; dO / Q read MN-major
//                                      from the same K-major step tile: LBO 32 rows x 128 B, SBO 1024)
//
// Pipelined as the dQ kernel (range_attn_bwd_dq_sm90.cuh): the tensor cores run S^T, dP^T of step
// it + 1 and then dK / dV of step it while the softmax part of step it + 1 runs; four stages of
// Q / dO rows; every wgmma is waited for inside its step and issued outside branches. Sums run
// over the steps in order and the partials / reduction are dkdv_tile's: bitwise reproducible.
//
// Measured on the H200 (64k, headline shape; bench/NOTES.md session 9): window dK/dV 9.0 -> 8.2 ms,
// so the window launcher uses it; compressed dK/dV 31.8 -> 35.9 ms, so that one stays on sm_80.
// Likely costs: N = 32 rows per step (the SS products are shared-memory bound at N = 32, and each
// step pays a CTA barrier), 255 registers with ~120 B of spill in the loop, and one warpgroup
// per CTA. Next: 64-row steps with the two accumulators of a second warpgroup (128 keys per CTA).
#pragma once

#include "attn_bwd_dkdv.cuh"
#include "wgmma_sm90.cuh"

namespace nsa {
namespace dkdv {

template <int kHeadDim, int kHeadDimV>
struct SmCfg {
  static constexpr int kThreads = 128;  // one warpgroup: warp w owns keys [16 w, 16 w + 16)
  static constexpr int kStepRows = 32;  // query rows per step (the N of S^T)
  static constexpr int kStages = 4;
  static constexpr int kKBytes = kKeys * kHeadDim * 2, kVBytes = kKeys * kHeadDimV * 2;
  static constexpr int kQBytes = kStepRows * kHeadDim * 2, kOBytes = kStepRows * kHeadDimV * 2;
  static constexpr int kRowsBytes = kQBytes + kOBytes;  // one stage of Q / dO rows (1024-aligned)
  static constexpr int kInfoInts = 3 * kStepRows;       // token, lse, delta per row of a stage
  static constexpr int kSmemBytes = kKBytes + kVBytes + kStages * kRowsBytes + kStages * kInfoInts * 4 + 1024;
  static constexpr int kParts = kThreads / kStepRows;  // loader threads per row
  static_assert(kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDim <= 128 && kHeadDimV <= 128,
                "wgmma dK/dV: D, Dv in {64, 128}");
};

template <typename T, int kHeadDim, int kHeadDimV>
__device__ __forceinline__ void dkdv_tile_sm90(const AttnBwdParams& p, const TileArgs& a, float* partial,
                                               unsigned char* smem_raw) {
#ifdef NSA_WGMMA
  using C = SmCfg<kHeadDim, kHeadDimV>;
  using SC = Cfg<kHeadDim, kHeadDimV>;  // the partial layout of the sm_80 tile
  constexpr int kN = C::kStepRows;
  constexpr int kVecQ = kHeadDim / 8, kVecV = kHeadDimV / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const bool packed = p.cu_seqlens != nullptr;
  const int G = p.heads_q / p.heads_kv;
  const index_t n_steps = (a.r_end - a.r_begin + kN - 1) / kN;
  if (n_steps <= 0 && partial == nullptr) return;  // nothing attends these keys: dk, dv stay zero

  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sK = smem;
  unsigned char* sV = sK + C::kKBytes;
  unsigned char* sRows = sV + C::kVBytes;
  int* sInfo = reinterpret_cast<int*>(sRows + C::kStages * C::kRowsBytes);
  const uint32_t k_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t v_addr = k_addr + C::kKBytes;
  const uint32_t rows_addr = v_addr + C::kVBytes;
  auto q_addr = [&](index_t it) { return rows_addr + static_cast<uint32_t>(it % C::kStages) * C::kRowsBytes; };
  auto do_addr = [&](index_t it) { return q_addr(it) + C::kQBytes; };
  auto info = [&](index_t it) { return sInfo + (it % C::kStages) * C::kInfoInts; };  // tok[32], lse[32], delta[32]

  const T* q = static_cast<const T*>(p.q) + (packed ? 0 : a.b * p.q_stride.batch) +
               static_cast<index_t>(a.g) * G * p.q_stride.head;
  const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : a.b * p.dout_stride.batch) +
                  static_cast<index_t>(a.g) * G * p.dout_stride.head;
  const index_t lse_off = (packed ? 0 : a.b * p.lse_batch_stride) + static_cast<index_t>(a.g) * G;
  const float* lse = p.lse + lse_off;
  const float* delta = p.delta + lse_off;

  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDimV / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < kHeadDimV / 8; ++n) dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;
  float(&dk_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(dk_acc);
  float(&dv_flat)[kHeadDimV / 2] = reinterpret_cast<float(&)[kHeadDimV / 2]>(dv_acc);

  if (n_steps > 0) {
    {  // K, V of the tile, K-major swizzled; rows past nk read as zero.
      const T* k = static_cast<const T*>(p.k) + (packed ? 0 : a.b * p.k_stride.batch) + static_cast<index_t>(a.g) * p.k_stride.head;
      const T* v = static_cast<const T*>(p.v) + (packed ? 0 : a.b * p.v_stride.batch) + static_cast<index_t>(a.g) * p.v_stride.head;
      for (int i = tid; i < kKeys * kVecQ; i += C::kThreads) {
        const int r = i / kVecQ, c = i % kVecQ;
        const bool on = r < a.nk;
        mma::cp_async_16(sK + wgmma::k_major_offset(r, c, kKeys), on ? k + (a.k_row0 + r) * p.k_stride.row + c * 8 : k, on);
      }
      for (int i = tid; i < kKeys * kVecV; i += C::kThreads) {
        const int r = i / kVecV, c = i % kVecV;
        const bool on = r < a.nk;
        mma::cp_async_16(sV + wgmma::k_major_offset(r, c, kKeys), on ? v + (a.k_row0 + r) * p.v_stride.row + c * 8 : v, on);
      }
    }

    // Query-row window per key of this thread (accumulator rows gid, gid + 8 of the warp's 16 keys).
    int key_lo[2], key_hi[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) key_token_window(p, a, warp * 16 + gid + ri * 8, key_lo[ri], key_hi[ri]);

    // Loader: kParts threads per row (row tid / kParts), each every kParts-th 16-byte piece, into
    // the stage's swizzled Q / dO tiles; (qi, hh) = (token index, head) of this thread's row in the
    // next step to issue, advanced kN rows per issue.
    const int rr = tid / C::kParts, part = tid % C::kParts;
    index_t qi;
    int hh;
    {
      const index_t r = a.r_begin + rr;
      qi = r / G;
      hh = static_cast<int>(r - qi * G);
    }
    index_t next_issue = 0;
    auto issue_next = [&]() {  // the next step's rows into its stage, then advance
      const index_t it = next_issue++;
      int tok = -1;
      if (a.r_begin + it * kN + rr < a.r_end) tok = a.list ? __ldg(a.list + qi) : static_cast<int>(a.tok_lo + qi);
      const bool on = tok >= 0;
      const index_t row = a.q_row0 + (on ? tok : 0);
      const T* qs = q + row * p.q_stride.row + static_cast<index_t>(hh) * p.q_stride.head;
      const T* ds = dout + row * p.dout_stride.row + static_cast<index_t>(hh) * p.dout_stride.head;
      unsigned char* dq_dst = sRows + (it % C::kStages) * C::kRowsBytes;
      unsigned char* do_dst = dq_dst + C::kQBytes;
#pragma unroll
      for (int j = 0; j < kVecQ / C::kParts; ++j) {
        const int c = part + C::kParts * j;
        mma::cp_async_16(dq_dst + wgmma::k_major_offset(rr, c, kN), on ? qs + c * 8 : q, on);
      }
#pragma unroll
      for (int j = 0; j < kVecV / C::kParts; ++j) {
        const int c = part + C::kParts * j;
        mma::cp_async_16(do_dst + wgmma::k_major_offset(rr, c, kN), on ? ds + c * 8 : dout, on);
      }
      if (part == 0) {
        int* inf = info(it);
        inf[rr] = tok;
        const index_t at = row * p.lse_row_stride + hh;
        cp_async_4(inf + kN + rr, on ? lse + at : p.lse, on);
        cp_async_4(inf + 2 * kN + rr, on ? delta + at : p.delta, on);
      }
      hh += kN;
      const int adv = hh / G;
      qi += adv;
      hh -= adv * G;
    };

    const float scale_log2 = p.scale * sparse_detail::kLog2e;
    // S^T and dP^T of step it (stale stage on the last step: never used), one wgmma group.
    auto issue_st_dpt = [&](index_t it, float(&s)[kN / 2], float(&dp)[kN / 2]) {
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)
        wgmma::Wgmma<T, kN>::ss(s, wgmma::make_desc(k_addr + (kk / 4) * kKeys * 128 + (kk % 4) * 32, 16, 1024),
                                wgmma::make_desc(q_addr(it) + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
#pragma unroll
      for (int kk = 0; kk < kHeadDimV / 16; ++kk)
        wgmma::Wgmma<T, kN>::ss(dp, wgmma::make_desc(v_addr + (kk / 4) * kKeys * 128 + (kk % 4) * 32, 16, 1024),
                                wgmma::make_desc(do_addr(it) + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
      wgmma::commit();
    };
    // s := P^T, dp := dS^T of step it (selects, not products: masked entries may hold anything).
    auto make_p_ds = [&](index_t it, float(&s)[kN / 2], float(&dp)[kN / 2]) {
      const int* inf = info(it);
      const float* s_lse = reinterpret_cast<const float*>(inf + kN);
      const float* s_delta = reinterpret_cast<const float*>(inf + 2 * kN);
#pragma unroll
      for (int n = 0; n < kN / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n * 8 + 2 * tig + e;
          const int tok = inf[col];
          const float l = s_lse[col];
          const float lse_l2 = l == -INFINITY ? INFINITY : l * sparse_detail::kLog2e;  // no key: P = 0
          const float dl = s_delta[col];
#pragma unroll
          for (int ri = 0; ri < 2; ++ri) {
            const bool ok = tok >= key_lo[ri] && tok <= key_hi[ri];
            const float pr = exp2f(fmaf(s[4 * n + 2 * ri + e], scale_log2, -lse_l2));
            const float ds = pr * (dp[4 * n + 2 * ri + e] - dl);
            s[4 * n + 2 * ri + e] = ok ? pr : 0.f;
            dp[4 * n + 2 * ri + e] = ok ? ds : 0.f;
          }
        }
    };

    issue_next();
    mma::cp_async_commit();  // group: K, V + step 0
    if (n_steps > 1) issue_next();
    mma::cp_async_commit();
    if (n_steps > 2) issue_next();
    mma::cp_async_commit();

    float s[kN / 2], dp[kN / 2];
    mma::cp_async_wait<2>();
    wgmma::fence_proxy_async();
    __syncthreads();
    issue_st_dpt(0, s, dp);
    wgmma::wait<0>();
    wgmma::fence_operands(s);
    wgmma::fence_operands(dp);
    make_p_ds(0, s, dp);

    for (index_t it = 0; it < n_steps; ++it) {
      mma::cp_async_wait<1>();  // step it + 1's rows
      wgmma::fence_proxy_async();
      __syncthreads();  // ... visible to all; every warp is done with step it - 1's stage
      if (it + 3 < n_steps) issue_next();
      mma::cp_async_commit();
      uint32_t pa[kN / 16][4], da[kN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          pa[kk][x] = mma::pack2<T>(s[8 * kk + 2 * x], s[8 * kk + 2 * x + 1]);
          da[kk][x] = mma::pack2<T>(dp[8 * kk + 2 * x], dp[8 * kk + 2 * x + 1]);
        }
      }
      issue_st_dpt(it + 1, s, dp);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kN / 16; ++kk) {
        wgmma::Wgmma<T, kHeadDimV>::rs_mn(dv_flat, pa[kk], wgmma::make_desc(do_addr(it) + kk * 2 * 1024, kN * 128, 1024));
        wgmma::Wgmma<T, kHeadDim>::rs_mn(dk_flat, da[kk], wgmma::make_desc(q_addr(it) + kk * 2 * 1024, kN * 128, 1024));
      }
      wgmma::commit();
      wgmma::wait<1>();  // S^T, dP^T of step it + 1
      wgmma::fence_operands(s);
      wgmma::fence_operands(dp);
      make_p_ds(it + 1, s, dp);
      wgmma::wait<0>();  // dK, dV of step it
      wgmma::fence_operands(dk_flat);
      wgmma::fence_operands(dv_flat);
    }
    mma::cp_async_wait_all();
  }

  const int kg = warp;
  if (kg * 16 >= a.nk) return;
  if (partial != nullptr) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float* row = partial + (kg * 16 + gid + ri * 8) * SC::kCols;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n)
        *reinterpret_cast<float2*>(row + n * 8 + 2 * tig) = make_float2(dk_acc[n][ri * 2], dk_acc[n][ri * 2 + 1]);
#pragma unroll
      for (int n = 0; n < kHeadDimV / 8; ++n)
        *reinterpret_cast<float2*>(row + kHeadDim + n * 8 + 2 * tig) = make_float2(dv_acc[n][ri * 2], dv_acc[n][ri * 2 + 1]);
    }
    return;
  }
  T* dk = static_cast<T*>(p.dk) + (packed ? 0 : a.b * p.dk_stride.batch) + static_cast<index_t>(a.g) * p.dk_stride.head;
  T* dv = static_cast<T*>(p.dv) + (packed ? 0 : a.b * p.dv_stride.batch) + static_cast<index_t>(a.g) * p.dv_stride.head;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int kk = kg * 16 + gid + ri * 8;
    if (kk >= a.nk) continue;
    T* krow = dk + (a.k_row0 + kk) * p.dk_stride.row;
    T* vrow = dv + (a.k_row0 + kk) * p.dv_stride.row;
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n)
      *reinterpret_cast<uint32_t*>(krow + n * 8 + 2 * tig) =
          mma::pack2<T>(dk_acc[n][ri * 2] * p.scale, dk_acc[n][ri * 2 + 1] * p.scale);
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n)
      *reinterpret_cast<uint32_t*>(vrow + n * 8 + 2 * tig) = mma::pack2<T>(dv_acc[n][ri * 2], dv_acc[n][ri * 2 + 1]);
  }
#endif
}

}  // namespace dkdv
}  // namespace nsa
