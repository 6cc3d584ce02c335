// Launch configuration of the grouped sparse attention forward; included by the generated
// instantiation files only.
#pragma once

#include "range_attn_fwd_sm90.cuh"
#include "sel_attn_fwd_split.cuh"
#include "sparse_attn_fwd_kernel.cuh"

#include <cstdlib>

namespace nsa {

template <typename T, int kHeadDim, int kHeadDimV, int kWarps>
Status launch_sel_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  using Cfg = sparse_detail::SelFwdConfig<kHeadDim, kHeadDimV, kWarps>;
  constexpr int kRows = sparse_detail::kRows;
  if (p.sel_block <= 0 || p.sel_block % sparse_detail::kBlockN != 0)
    return Status{2, "sel_block must be a positive multiple of 32 on CUDA"};
  const int G = p.heads_q / p.heads_kv;
  const int tokens = (G >= kRows ? 1 : kRows / G) * Cfg::kWarps;  // per CTA
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  const index_t items = sparse_detail::cta_groups(p, tokens);
  if (items == 0) return Status{};
  const index_t grid_y = static_cast<index_t>(p.heads_kv) * chunks;
  if (grid_y > 65535) return Status{2, "too many KV heads x head chunks for one launch"};
  if (items > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(grid_y));
  auto kernel = sparse_detail::sparse_attn_fwd_kernel<T, kHeadDim, kHeadDimV, kWarps>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  if (kWarps <= 2) {  // five one- or two-warp CTAs per SM need the max-shared carveout
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  }
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

// The split walk (sel_attn_fwd_split.cuh): one CTA of kSplit warps per token and 16-head chunk,
// kStages buffers per warp.
template <typename T, int kHeadDim, int kHeadDimV, int kSplit, int kStages>
Status launch_sel_attn_fwd_split(const AttnParams& p, cudaStream_t stream) {
  using Cfg = sparse_detail::SelFwdSplitConfig<kHeadDim, kHeadDimV, kSplit, kStages>;
  const int chunks = (p.heads_q / p.heads_kv + sparse_detail::kRows - 1) / sparse_detail::kRows;
  const index_t items = sparse_detail::cta_groups(p, 1);
  if (items == 0) return Status{};
  const index_t grid_y = static_cast<index_t>(p.heads_kv) * chunks;
  if (grid_y > 65535) return Status{2, "too many KV heads x head chunks for one launch"};
  if (items > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  auto kernel = sparse_detail::sel_attn_fwd_split_kernel<T, kHeadDim, kHeadDimV, Cfg::kSplit, Cfg::kStages>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  kernel<<<dim3(static_cast<unsigned>(items), static_cast<unsigned>(grid_y)), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

template <typename T, int kHeadDim, int kHeadDimV>
Status run_sparse_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return Status{2, "heads_q must be a multiple of heads_kv"};
  if (p.mode == AttnMode::kCompressed) return Status{2, "the sparse kernel runs the selected and window branches"};
  // The window's keys are one contiguous range per token: the CTA-shared range kernel.
  if (p.mode == AttnMode::kWindow)
    return sparse_detail::run_range_attn_fwd_best<T, kHeadDim, kHeadDimV, /*kCompressed=*/false>(p, stream);
  const int G = p.heads_q / p.heads_kv;
  // Width: NSA_SEL_FWD_WARPS (1 (G >= 16), 2 or 4) forces one for every group; otherwise the
  // launch for flag 0 (tokens that do not share blocks) runs 2-warp CTAs, the rest 4.
  // The groups of flag 0 run the split walk where it fits (NSA_SEL_FWD_SPLIT=0: 2-warp CTAs as
  // before; =1: every group, both launches).
  const char* warps = getenv("NSA_SEL_FWD_WARPS");
  const bool forced = warps != nullptr && warps[0] != '\0';
  const char* split = getenv("NSA_SEL_FWD_SPLIT");
  const int split_mode = split != nullptr && split[0] != '\0' ? atoi(split) : -1;
  if constexpr (kHeadDim <= 192) {  // D = 256: 143 KB of buffers, one CTA per SM; not built
    if (!forced && split_mode != 0 && (p.sel_group_want == 0 || split_mode == 1) &&
        sparse_detail::sel_split_fits(p)) {
      // A/B switch: NSA_SEL_SPLIT_WARPS=2 (two warps per token; default 4). Three buffers per warp
      // measured 1-8% slower (bench/NOTES.md, session 11): two.
      return sparse_detail::split_warps_env(4) == 2 ? launch_sel_attn_fwd_split<T, kHeadDim, kHeadDimV, 2, 2>(p, stream)
                                                    : launch_sel_attn_fwd_split<T, kHeadDim, kHeadDimV, 4, 2>(p, stream);
    }
  }
  const int w = forced ? atoi(warps) : (p.sel_group_want == 0 ? 2 : 4);
  if (w == 1 && G >= sparse_detail::kRows) return launch_sel_attn_fwd<T, kHeadDim, kHeadDimV, 1>(p, stream);
  if (w == 2) return launch_sel_attn_fwd<T, kHeadDim, kHeadDimV, 2>(p, stream);
  return launch_sel_attn_fwd<T, kHeadDim, kHeadDimV, 4>(p, stream);
}

}  // namespace nsa
