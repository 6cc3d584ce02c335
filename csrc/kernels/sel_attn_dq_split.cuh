// dQ of the selected branch on the split walk (sel_split_walk.cuh): each warp accumulates the
// token's dQ over its share of the tiles; the partial sums are added in warp order at the end
// (fixed order: bitwise reproducible).
#pragma once

#include "attn_bwd_dq.cuh"
#include "sel_split_walk.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV, int kSplit_, int kStages_>
struct SelDqSplitConfig : SelSplitLayout<kHeadDim, kHeadDimV, kSplit_, kStages_> {
  using Base = SelSplitLayout<kHeadDim, kHeadDimV, kSplit_, kStages_>;
  static constexpr int kLdDq = kHeadDim + 8;                              // fp32 merge rows
  static constexpr int kRowElems = kRows * (Base::kLdQK + Base::kLdV);  // Q and dO of the token
  static constexpr int kWalkBytes = (kRowElems + Base::kSplit * Base::kStages * Base::kStageElems) * 2;
  static constexpr int kMergeBytes = (Base::kSplit - 1) * kRows * kLdDq * 4;  // partial dQ of warps 1..kSplit-1
  static constexpr int kSmemBytes = Base::kListBytes + (kWalkBytes > kMergeBytes ? kWalkBytes : kMergeBytes);
  // CTAs per SM that shared memory allows (1 KB reserved per CTA), capped where the register
  // budget would drop under 160 per thread (at 128, D = 64 spilled 12 B).
  static constexpr int kSmemCtas = 228 * 1024 / (kSmemBytes + 1024);
  static constexpr int kRegCtas = 65536 / (Base::kThreads * 160);
  static constexpr int kMinBlocks = kSmemCtas < kRegCtas ? (kSmemCtas > 0 ? kSmemCtas : 1) : kRegCtas;
};

template <typename T, int kHeadDim, int kHeadDimV, int kSplit, int kStages>
__global__ void __launch_bounds__(kSplit * 32, (SelDqSplitConfig<kHeadDim, kHeadDimV, kSplit, kStages>::kMinBlocks))
    sel_attn_dq_split_kernel(const AttnBwdParams p) {
  using Cfg = SelDqSplitConfig<kHeadDim, kHeadDimV, kSplit, kStages>;
  constexpr int kTileKeys = kSplitTileKeys;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw + Cfg::kListBytes);
  T* sdO = sQ + kRows * Cfg::kLdQK;
  T* sBufs = sQ + Cfg::kRowElems + warp * kStages * Cfg::kStageElems;
  float* s_dq = reinterpret_cast<float*>(smem_raw + Cfg::kListBytes);  // [kSplit - 1][16][kLdDq], after the walk

  const RowMap rm = query_row_map(p);  // G >= 16: one token, up to 16 heads
  Pass ps;
  int entry;
  if (!split_token(p, rm, lane, ps, entry)) return;  // uniform over the CTA
  const bool packed = p.cu_seqlens != nullptr;
  const float scale_log2 = p.scale * kLog2e;
  const T* q = static_cast<const T*>(p.q) + (packed ? 0 : ps.b * p.q_stride.batch);
  const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : ps.b * p.dout_stride.batch);
  const SplitKV<T, Cfg, kHeadDim, kHeadDimV> kv(p, ps, rm.g);

  load_query_rows_async<T, kHeadDim, Cfg::kThreads>(sQ, Cfg::kLdQK, q, p.q_stride, rm, ps, tid);
  load_query_rows_async<T, kHeadDimV, Cfg::kThreads>(sdO, Cfg::kLdV, dout, p.dout_stride, rm, ps, tid);
  mma::cp_async_commit();
  SelSplitWalk<kSplit, kStages> walk(p, ps, entry, reinterpret_cast<int*>(smem_raw) + warp * 32, warp, lane);
  const DqRows rw = dq_rows(p, rm, ps, gid);
  float dq_acc[kHeadDim / 8][4];
  zero_acc<kHeadDim>(dq_acc);

  walk.run(
      [&](index_t s0, int buf) { kv.load(sBufs + buf * Cfg::kStageElems, s0, lane); },
      [&](index_t, int buf, int hi) {
        const T* sK = sBufs + buf * Cfg::kStageElems;
        dq_tile<T, kHeadDim, kHeadDimV, kHeadDim, kTileKeys>(sQ, sdO, sK, sK + kTileKeys * Cfg::kLdQK, 0, scale_log2,
                                                             rw, dq_acc, gid, tig,
                                                             [&](int, int kk) { return kk < hi; });
      });

  __syncthreads();  // every warp is done with its buffers and the rows: the merge reuses them
  if (warp > 0) {
    float* dst = s_dq + (warp - 1) * kRows * Cfg::kLdDq;
#pragma unroll
    for (int ri = 0; ri < 2; ++ri)
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n)
        *reinterpret_cast<float2*>(dst + (gid + ri * 8) * Cfg::kLdDq + n * 8 + 2 * tig) =
            make_float2(dq_acc[n][ri * 2], dq_acc[n][ri * 2 + 1]);
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int w = 1; w < kSplit; ++w)
#pragma unroll
    for (int ri = 0; ri < 2; ++ri)
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        const float2 x =
            *reinterpret_cast<const float2*>(s_dq + ((w - 1) * kRows + gid + ri * 8) * Cfg::kLdDq + n * 8 + 2 * tig);
        dq_acc[n][ri * 2] += x.x;
        dq_acc[n][ri * 2 + 1] += x.y;
      }
  dq_epilogue<T, kHeadDim>(p, rm, ps, rw, 0, dq_acc, gid, tig);
}

}  // namespace sparse_detail
}  // namespace nsa
