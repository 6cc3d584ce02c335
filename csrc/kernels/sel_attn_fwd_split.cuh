// Selected-block forward on the split walk (sel_split_walk.cuh): each warp runs the online
// softmax over its share of the token's tiles, then the CTA merges the kSplit partial results.
#pragma once

#include "attn_fwd_tile.cuh"
#include "sel_split_walk.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV, int kSplit_, int kStages_>
struct SelFwdSplitConfig : SelSplitLayout<kHeadDim, kHeadDimV, kSplit_, kStages_> {
  using Base = SelSplitLayout<kHeadDim, kHeadDimV, kSplit_, kStages_>;
  static constexpr int kLdO = kHeadDimV + 8;  // fp32 merge rows
  static constexpr int kQElems = kRows * Base::kLdQK;
  static constexpr int kWalkBytes = (kQElems + Base::kSplit * Base::kStages * Base::kStageElems) * 2;
  // The merge reuses the walk's memory: row max and sum per warp, partial O of warps 1..kSplit-1.
  static constexpr int kMergeBytes = (2 * Base::kSplit * kRows + (Base::kSplit - 1) * kRows * kLdO) * 4;
  static constexpr int kSmemBytes = Base::kListBytes + (kWalkBytes > kMergeBytes ? kWalkBytes : kMergeBytes);
  static constexpr int kMinBlocks = kHeadDim <= 128 ? 3 : 2;  // D = 128: 3 x 74.5 KB, <= 168 registers
};

template <typename T, int kHeadDim, int kHeadDimV, int kSplit, int kStages>
__global__ void __launch_bounds__(kSplit * 32, (SelFwdSplitConfig<kHeadDim, kHeadDimV, kSplit, kStages>::kMinBlocks))
    sel_attn_fwd_split_kernel(const AttnParams p) {
  using Cfg = SelFwdSplitConfig<kHeadDim, kHeadDimV, kSplit, kStages>;
  constexpr int kTileKeys = kSplitTileKeys;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw + Cfg::kListBytes);
  T* sBufs = sQ + Cfg::kQElems + warp * kStages * Cfg::kStageElems;
  float* s_m = reinterpret_cast<float*>(smem_raw + Cfg::kListBytes);  // [kSplit][16], after the walk
  float* s_l = s_m + kSplit * kRows;                                    // [kSplit][16]
  float* s_o = s_l + kSplit * kRows;                                    // [kSplit - 1][16][kLdO]

  const RowMap rm = query_row_map(p);  // G >= 16: one token, up to 16 heads
  Pass ps;
  int entry;
  if (!split_token(p, rm, lane, ps, entry)) return;  // uniform over the CTA
  const float scale_log2 = p.scale * kLog2e;
  const T* q = static_cast<const T*>(p.q) + (p.cu_seqlens != nullptr ? 0 : ps.b * p.q_stride.batch);
  const SplitKV<T, Cfg, kHeadDim, kHeadDimV> kv(p, ps, rm.g);

  load_query_rows_async<T, kHeadDim, Cfg::kThreads>(sQ, Cfg::kLdQK, q, p.q_stride, rm, ps, tid);
  mma::cp_async_commit();
  SelSplitWalk<kSplit, kStages> walk(p, ps, entry, reinterpret_cast<int*>(smem_raw) + warp * 32, warp, lane);

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float o_acc[kHeadDimV / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDimV / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

  walk.run(
      [&](index_t s0, int buf) { kv.load(sBufs + buf * Cfg::kStageElems, s0, lane); },
      [&](index_t, int buf, int hi) {
        const T* sK = sBufs + buf * Cfg::kStageElems;
        fwd_tile<T, kHeadDim, kHeadDimV, kTileKeys>(sQ, Cfg::kLdQK, sK, sK + kTileKeys * Cfg::kLdQK, Cfg::kLdV,
                                                    scale_log2, m_run, l_run, o_acc, gid, tig,
                                                    [&](int, int kk) { return kk < hi; });
      });

  // Merge: O = sum_w 2^((m_w - m) scale_log2) O_w over the warps, m the largest row max.
  __syncthreads();  // every warp is done with its buffers and the query rows: the merge reuses them
  publish_row_stats(s_m, s_l, warp, m_run, l_run, gid, tig);
  __syncthreads();
  float m_all[2], a_own[2];
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = gid + ri * 8;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kSplit; ++w) m = fmaxf(m, s_m[w * kRows + r]);
    m_all[ri] = m;
    a_own[ri] = m_run[ri] == -INFINITY ? 0.f : exp2f((m_run[ri] - m) * scale_log2);
  }
  if (warp > 0) {
    float* dst = s_o + (warp - 1) * kRows * Cfg::kLdO;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri)
#pragma unroll
      for (int n = 0; n < kHeadDimV / 8; ++n)
        *reinterpret_cast<float2*>(dst + (gid + ri * 8) * Cfg::kLdO + n * 8 + 2 * tig) =
            make_float2(o_acc[n][ri * 2] * a_own[ri], o_acc[n][ri * 2 + 1] * a_own[ri]);
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = gid + ri * 8;
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kSplit; ++w) {
      const float mw = s_m[w * kRows + r];
      l += mw == -INFINITY ? 0.f : s_l[w * kRows + r] * exp2f((mw - m_all[ri]) * scale_log2);
    }
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) {
      float o0 = o_acc[n][ri * 2] * a_own[ri], o1 = o_acc[n][ri * 2 + 1] * a_own[ri];
#pragma unroll
      for (int w = 1; w < kSplit; ++w) {
        const float2 x = *reinterpret_cast<const float2*>(s_o + ((w - 1) * kRows + r) * Cfg::kLdO + n * 8 + 2 * tig);
        o0 += x.x;
        o1 += x.y;
      }
      o_acc[n][ri * 2] = o0;
      o_acc[n][ri * 2 + 1] = o1;
    }
    m_run[ri] = m_all[ri];
    l_run[ri] = tig == 0 ? l : 0.f;  // fwd_epilogue sums the quad
  }
  const int row_tok[2] = {0, 0};
  const bool row_on[2] = {gid < rm.heads, gid + 8 < rm.heads};
  fwd_epilogue<T, kHeadDimV>(p, rm, ps, row_tok, row_on, m_run, l_run, o_acc, gid, tig);
}

}  // namespace sparse_detail
}  // namespace nsa
