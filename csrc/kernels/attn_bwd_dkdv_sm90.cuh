// sm_90a dK / dV tile on warpgroup MMAs, used by the range branches' kernels
// (range_attn_bwd_dkdv_sm90.cuh, two warpgroups) and the selected branch's (sparse_attn_bwd_kernel.cuh,
// one warpgroup).
// With two warpgroups a CTA owns 128 keys of one KV head (warpgroup w the keys [64 w, 64 w + 64))
// and streams the query rows [r_begin, r_end) of their row list through shared memory 64 rows
// per step, so every Q / dO tile feeds 128 keys and every S^T product has N = 64.
//
// Why not one warpgroup on a 64-key tile with 32 rows per step (session 9's dkdv_tile_sm90,
// removed in session 12, see git history): on the compressed branch it was slower than sm_80's
// mma.sync tile (35.9 vs 31.8 ms at 64k). At N = 32 the SS products S^T = K Q^T and dP^T = V dO^T
// read as many operand bytes from shared memory per FLOP as the tensor cores can use, each
// 2.1 MFLOP step paid a CTA barrier and the loader's share of the rows, and carrying S^T of the
// next step in flight took 255 registers with spills. Here a step is 2 x 4.2 MFLOP, each loaded
// row feeds twice the keys, and a warpgroup holds one step's S^T / dP^T at a time: the overlap
// of softmax and tensor work comes from the two warpgroups, whose wgmmas queue on the same
// tensor cores. Finer overlap inside a warpgroup measured slower (bench/NOTES.md, session 12:
// the extra live registers spill).
//
// Per step and warpgroup:
//   S^T = K_w Q^T, dP^T = V_w dO^T                (SS, m64n64, K / V and the step's rows K-major)
//   P^T = exp2(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - delta)   (per key and row masks)
//   dV_w += P^T dO, dK_w += dS^T Q                (RS, m64nD, dO / Q read MN-major from the
//                                                  K-major step tile: LBO 64 rows x 128 B)
// Sums run over the steps in order; the partials (64 keys per warpgroup) and their reduction are
// attn_bwd_dkdv.cuh's with kTileKeys = 64 x warpgroups: bitwise reproducible.
#pragma once

#include <cstdlib>

#include "attn_bwd_dkdv.cuh"
#include "wgmma_sm90.cuh"

namespace nsa {
namespace dkdv {

// kWarpGroups = 2: the tile above, one CTA per SM. kWarpGroups = 1: 64 keys on one warpgroup,
// two CTAs per SM (fewer stages), for work whose rows differ per 64 keys (the selected branch's
// per-block token lists) and as the range branches' A/B (NSA_DKDV_SM90_WGS=1).
template <int kHeadDim, int kHeadDimV, int kWarpGroups_ = 2>
struct WideCfg {
  static constexpr int kWarpGroups = kWarpGroups_;
  static constexpr int kCtasPerSm = kWarpGroups == 1 ? 2 : 1;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kTileKeys = 64 * kWarpGroups;
  static constexpr int kStepRows = 64;  // query rows per step (the N of S^T)
  static constexpr int kKBytes = kTileKeys * kHeadDim * 2, kVBytes = kTileKeys * kHeadDimV * 2;
  static constexpr int kQBytes = kStepRows * kHeadDim * 2, kOBytes = kStepRows * kHeadDimV * 2;
  static constexpr int kRowsBytes = kQBytes + kOBytes;  // one stage of Q / dO rows (1024-aligned)
  static constexpr int kInfoInts = 3 * kStepRows;       // token, lse, delta per row of a stage
  static constexpr int kFixedBytes = kKBytes + kVBytes + 1024;
  static constexpr int kStageBytes = kRowsBytes + kInfoInts * 4;
  static constexpr int kStages = (kFixedBytes + 4 * kStageBytes) * kCtasPerSm <= 227 * 1024   ? 4
                                 : (kFixedBytes + 3 * kStageBytes) * kCtasPerSm <= 227 * 1024 ? 3
                                                                                               : 2;
  static constexpr int kSmemBytes = kFixedBytes + kStages * kStageBytes;
  static constexpr int kParts = kThreads / kStepRows;  // loader threads per row
  static constexpr int kCols = kHeadDim + kHeadDimV;
  static_assert(kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDim <= 128 && kHeadDimV <= 128,
                "wide wgmma dK/dV: D, Dv in {64, 128}");
  static_assert(kSmemBytes * kCtasPerSm <= 227 * 1024, "shared memory");
};

// NSA_DKDV_WIDE=0 runs sm_80's 64-key tile instead (read per launch, so one process can time both).
inline bool wide_dkdv_enabled() {
  const char* e = getenv("NSA_DKDV_WIDE");
  return e == nullptr || e[0] == '\0' || e[0] != '0';
}

// The end of a wide-tile unit: this thread's rows of dK / dV (dK scaled) into dk / dv, or unscaled
// into the unit's fp32 partial ([keys][kCols]: dK columns, then dV) when it is one chunk of many.
template <typename T, int kHeadDim, int kHeadDimV, int kCols>
__device__ __forceinline__ void store_dkdv_wide(const AttnBwdParams& p, const TileArgs& a, float* partial, int key_base,
                                                const float (&dk_acc)[kHeadDim / 8][4],
                                                const float (&dv_acc)[kHeadDimV / 8][4], int gid, int tig) {
  const bool packed = p.cu_seqlens != nullptr;
  if (key_base >= a.nk) return;
  if (partial != nullptr) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float* row = partial + (key_base + gid + ri * 8) * kCols;
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
    const int kk = key_base + gid + ri * 8;
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
}

// One step of a warpgroup of the wide tile (its 64 keys against the step's kN query rows), every
// wgmma waited for inside: S^T = K Q^T and dP^T = V dO^T (SS), then P^T and dS^T under the rows'
// lse / delta / key masks straight into A fragments, then dV += P^T dO and dK += dS^T Q (RS, dO
// and Q read MN-major from their K-major step tiles). row_info(col, ri) -> RowInfo: the step's
// row col for this thread's key row ri (gid + 8 ri of the warp's 16). k_base / v_base: this
// warpgroup's keys (the callers hide them from hoisting).
struct RowInfo {
  bool take;  // the key row attends this query row
  float lse, delta;
};

template <typename T, int kHeadDim, int kHeadDimV, int kTK, int kN, class RowInfoFn>
__device__ __forceinline__ void wide_step_products(uint32_t k_base, uint32_t v_base, uint32_t q_addr, uint32_t do_addr,
                                                   RowInfoFn&& row_info, float scale_log2, int tig,
                                                   float (&dk_flat)[kHeadDim / 2], float (&dv_flat)[kHeadDimV / 2]) {
#ifdef NSA_WGMMA
  float s[kN / 2], dp[kN / 2];
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk)
    wgmma::Wgmma<T, kN>::ss(s, wgmma::make_desc(k_base + (kk / 4) * kTK * 128 + (kk % 4) * 32, 16, 1024),
                            wgmma::make_desc(q_addr + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
#pragma unroll
  for (int kk = 0; kk < kHeadDimV / 16; ++kk)
    wgmma::Wgmma<T, kN>::ss(dp, wgmma::make_desc(v_base + (kk / 4) * kTK * 128 + (kk % 4) * 32, 16, 1024),
                            wgmma::make_desc(do_addr + (kk / 4) * kN * 128 + (kk % 4) * 32, 16, 1024), kk > 0);
  wgmma::commit();
  wgmma::wait<0>();
  wgmma::fence_operands(s);
  wgmma::fence_operands(dp);

  // P^T and dS^T, packed straight into the A fragments of the RS products.
  uint32_t pa[kN / 16][4], da[kN / 16][4];
  {
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
      float pr2[2][2], ds2[2][2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n * 8 + 2 * tig + e;
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const RowInfo r = row_info(col, ri);
          const float lse_l2 = r.lse == -INFINITY ? INFINITY : r.lse * sparse_detail::kLog2e;  // no key: P = 0
          const float pr = exp2f(fmaf(s[4 * n + 2 * ri + e], scale_log2, -lse_l2));
          const float d = pr * (dp[4 * n + 2 * ri + e] - r.delta);
          pr2[ri][e] = r.take ? pr : 0.f;
          ds2[ri][e] = r.take ? d : 0.f;
        }
      }
      // C tile n (columns 8n ..) is half of A fragment n / 2: x = 2 (n % 2) + ri
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        pa[n / 2][2 * (n % 2) + ri] = mma::pack2<T>(pr2[ri][0], pr2[ri][1]);
        da[n / 2][2 * (n % 2) + ri] = mma::pack2<T>(ds2[ri][0], ds2[ri][1]);
      }
    }
  }

  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    wgmma::Wgmma<T, kHeadDimV>::rs_mn(dv_flat, pa[kk], wgmma::make_desc(do_addr + kk * 2 * 1024, kN * 128, 1024));
    wgmma::Wgmma<T, kHeadDim>::rs_mn(dk_flat, da[kk], wgmma::make_desc(q_addr + kk * 2 * 1024, kN * 128, 1024));
  }
  wgmma::commit();
  wgmma::wait<0>();  // the stage may be overwritten after the next barrier
  wgmma::fence_operands(dk_flat);
  wgmma::fence_operands(dv_flat);
#endif
}

// partial == nullptr: write dK (scaled) and dV of the valid keys in T; else the fp32 tile
// [64 x kWarpGroups][Dk + Dv] (rows of keys >= nk: whatever; the reduction skips them).
template <typename T, int kHeadDim, int kHeadDimV, int kWarpGroups = 2>
__device__ __forceinline__ void dkdv_tile_sm90_wide(const AttnBwdParams& p, const TileArgs& a, float* partial,
                                                    unsigned char* smem_raw) {
#ifdef NSA_WGMMA
  using C = WideCfg<kHeadDim, kHeadDimV, kWarpGroups>;
  constexpr int kN = C::kStepRows, kTK = C::kTileKeys, kStages = C::kStages;
  constexpr int kVecQ = kHeadDim / 8, kVecV = kHeadDimV / 8;
  static_assert(kVecQ % C::kParts == 0 && kVecV % C::kParts == 0, "row pieces must split evenly over the loader");
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int wg = warp / 4;
  const int key_base = 64 * wg + 16 * (warp % 4);  // this warp's 16 accumulator rows (keys)
  const bool packed = p.cu_seqlens != nullptr;
  const int G = p.heads_q / p.heads_kv;
  const index_t n_steps = (a.r_end - a.r_begin + kN - 1) / kN;
  if (n_steps <= 0 && partial == nullptr) return;  // nothing attends these keys: dk, dv stay zero

  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sK = smem;
  unsigned char* sV = sK + C::kKBytes;
  unsigned char* sRows = sV + C::kVBytes;
  int* sInfo = reinterpret_cast<int*>(sRows + kStages * C::kRowsBytes);
  const uint32_t k_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t v_addr = k_addr + C::kKBytes;
  const uint32_t rows_addr = v_addr + C::kVBytes;
  auto q_addr = [&](index_t it) { return rows_addr + static_cast<uint32_t>(it % kStages) * C::kRowsBytes; };
  auto do_addr = [&](index_t it) { return q_addr(it) + C::kQBytes; };
  auto info = [&](index_t it) { return sInfo + (it % kStages) * C::kInfoInts; };  // tok[64], lse[64], delta[64]

  const TileQuery<T> tq(p, a);
  const T *q = tq.q, *dout = tq.dout;
  const float *lse = tq.lse, *delta = tq.delta;

  float dk_acc[kHeadDim / 8][4], dv_acc[kHeadDimV / 8][4];
  sparse_detail::zero_acc<kHeadDim>(dk_acc);
  sparse_detail::zero_acc<kHeadDimV>(dv_acc);
  float(&dk_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(dk_acc);
  float(&dv_flat)[kHeadDimV / 2] = reinterpret_cast<float(&)[kHeadDimV / 2]>(dv_acc);

  if (n_steps > 0) {
    {  // K, V of the tile, K-major swizzled; rows past nk read as zero.
      const T* k = static_cast<const T*>(p.k) + (packed ? 0 : a.b * p.k_stride.batch) + static_cast<index_t>(a.g) * p.k_stride.head;
      const T* v = static_cast<const T*>(p.v) + (packed ? 0 : a.b * p.v_stride.batch) + static_cast<index_t>(a.g) * p.v_stride.head;
      for (int i = tid; i < kTK * kVecQ; i += C::kThreads) {
        const int r = i / kVecQ, c = i % kVecQ;
        const bool on = r < a.nk;
        mma::cp_async_16(sK + wgmma::k_major_offset(r, c, kTK), on ? k + (a.k_row0 + r) * p.k_stride.row + c * 8 : k, on);
      }
      for (int i = tid; i < kTK * kVecV; i += C::kThreads) {
        const int r = i / kVecV, c = i % kVecV;
        const bool on = r < a.nk;
        mma::cp_async_16(sV + wgmma::k_major_offset(r, c, kTK), on ? v + (a.k_row0 + r) * p.v_stride.row + c * 8 : v, on);
      }
    }

    // Query-token window of this thread's two keys (accumulator rows gid, gid + 8 of the warp).
    int key_lo[2], key_hi[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) key_token_window(p, a, key_base + gid + ri * 8, key_lo[ri], key_hi[ri]);

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
      unsigned char* q_dst = sRows + (it % kStages) * C::kRowsBytes;
      unsigned char* do_dst = q_dst + C::kQBytes;
#pragma unroll
      for (int j = 0; j < kVecQ / C::kParts; ++j) {
        const int c = part + C::kParts * j;
        mma::cp_async_16(q_dst + wgmma::k_major_offset(rr, c, kN), on ? qs + c * 8 : q, on);
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
    const uint32_t kw_addr = k_addr + 64 * wg * 128, vw_addr = v_addr + 64 * wg * 128;  // this warpgroup's 64 keys

    // Prologue: K, V and steps 0 .. kStages - 2, one cp.async group per step (empty past the end).
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n_steps) issue_next();
      mma::cp_async_commit();
    }

    for (index_t it = 0; it < n_steps; ++it) {
      mma::cp_async_wait<kStages - 2>();  // this thread's pieces of step it
      wgmma::fence_proxy_async();
      __syncthreads();  // ... everyone's are visible, and both warpgroups are done with step it - 1's stage
      if (next_issue < n_steps) issue_next();  // step it + kStages - 1 into step it - 1's stage
      mma::cp_async_commit();

      // Loop-invariant K / V descriptors would be hoisted out of the loop, 2 registers each (32
      // in all): hide the base from the optimizer so each is rebuilt next to its wgmma.
      uint32_t kb = kw_addr, vb = vw_addr;
      asm volatile("" : "+r"(kb), "+r"(vb));
      const int* inf = info(it);  // [kN] tokens, [kN] lse, [kN] delta
      auto row_info = [&](int col, int ri) {
        const int tok = inf[col];
        return RowInfo{tok >= key_lo[ri] && tok <= key_hi[ri], reinterpret_cast<const float*>(inf)[kN + col],
                       reinterpret_cast<const float*>(inf)[2 * kN + col]};
      };
      wide_step_products<T, kHeadDim, kHeadDimV, kTK, kN>(kb, vb, q_addr(it), do_addr(it), row_info, scale_log2, tig,
                                                          dk_flat, dv_flat);
    }
    mma::cp_async_wait_all();
  }

  store_dkdv_wide<T, kHeadDim, kHeadDimV, C::kCols>(p, a, partial, key_base, dk_acc, dv_acc, gid, tig);
#endif
}

}  // namespace dkdv
}  // namespace nsa
