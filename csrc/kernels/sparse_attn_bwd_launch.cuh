// Launch configuration of the grouped sparse attention backward (dQ and dK/dV kernels);
// included by the generated instantiation files only. For the selected branch,
// sparse_attn_bwd_cuda (sparse_attn_api.cu) has already sorted the (block, token) pairs and
// filled the bucket arrays of dkdv::SelPlan in p.workspace. Keys that no query attends (blocks
// nobody selected) are not written: the caller zero-fills dk and dv.
#pragma once

#include "range_attn_bwd_dkdv_sm90.cuh"
#include "range_attn_bwd_dq_sm90.cuh"
#include "sel_attn_dq_split.cuh"
#include "sparse_attn_bwd_kernel.cuh"

#include <cstdlib>
#include <type_traits>

namespace nsa {

template <typename T, int kHeadDim, int kHeadDimV>
Status run_sparse_attn_bwd(const AttnBwdParams& p, const int* sorted_keys, const int* sorted_tokens, index_t num_pairs,
                           cudaStream_t stream) {
  using Cfg = sparse_detail::DqConfig<kHeadDim, kHeadDimV>;
  using KvCfg = dkdv::Cfg<kHeadDim, kHeadDimV>;
  constexpr int kRows = sparse_detail::kRows;
  const int G = p.heads_q / p.heads_kv;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  const index_t dq_ctas = sparse_detail::dq_ctas<Cfg::kRowGroups>(p);
  if (dq_ctas == 0) return Status{};
  if (static_cast<index_t>(p.heads_kv) * chunks > 65535) return Status{2, "too many KV heads x head chunks for one launch"};

  // dQ: one CTA per group of consecutive tokens (attn_bwd_dq.cuh).
  Status st;
  if (p.mode == AttnMode::kWindow) {
    st = sparse_detail::launch_range_dq_best<T, kHeadDim, kHeadDimV, /*kCompressed=*/false>(
        sparse_detail::sparse_attn_bwd_dq_window_kernel<T, kHeadDim, kHeadDimV>, Cfg::kThreads, Cfg::kRangeSmemBytes,
        dq_ctas, p, stream);
  } else {
    // Selected: with p.sel_group_flags (filled by sparse_attn_bwd_cuda) groups of tokens that
    // share blocks run 4 row groups per CTA and the others 2, as the forward; without it one
    // width for all, NSA_SEL_DQ_WARPS = 2 or 4 (default).
    auto launch_sel_dq = [&](auto row_groups, const AttnBwdParams& pp) {
      constexpr int kGroups = decltype(row_groups)::value;
      using C = sparse_detail::DqConfig<kHeadDim, kHeadDimV, kGroups>;
      return sparse_detail::launch_dq(sparse_detail::sparse_attn_bwd_dq_kernel<T, kHeadDim, kHeadDimV, kGroups>,
                                      C::kThreads, C::kSelSmemBytes, sparse_detail::dq_ctas<kGroups>(pp), pp, stream);
    };
    using Four = std::integral_constant<int, 4>;
    using Two = std::integral_constant<int, 2>;
    // The split walk (sel_attn_dq_split.cuh, one CTA per token) takes the groups of flag 0 where
    // it fits; NSA_SEL_DQ_SPLIT=0: 2-row-group CTAs as before, =1: every group.
    const char* split_env = getenv("NSA_SEL_DQ_SPLIT");
    const int split_mode = split_env != nullptr && split_env[0] != '\0' ? atoi(split_env) : -1;
    auto launch_split_dq = [&](auto split, const AttnBwdParams& pp) {
      constexpr int kSplit = decltype(split)::value;
      using C = sparse_detail::SelDqSplitConfig<kHeadDim, kHeadDimV, kSplit, 2>;
      return sparse_detail::launch_dq(sparse_detail::sel_attn_dq_split_kernel<T, kHeadDim, kHeadDimV, kSplit, 2>,
                                      C::kThreads, C::kSmemBytes, sparse_detail::cta_groups(pp, 1), pp, stream);
    };
    auto launch_independent = [&](const AttnBwdParams& pp, bool split_ok) {
      if constexpr (kHeadDim <= 192) {  // D = 256: a 16 x 256 fp32 dQ per warp would spill
        if (split_ok && sparse_detail::sel_split_fits(pp))  // NSA_SEL_SPLIT_WARPS=4: A/B (default 2)
          return sparse_detail::split_warps_env(2) == 4 ? launch_split_dq(Four{}, pp) : launch_split_dq(Two{}, pp);
      }
      return launch_sel_dq(Two{}, pp);
    };
    if (p.sel_group_flags == nullptr) {
      const char* forced = getenv("NSA_SEL_DQ_WARPS");
      AttnBwdParams one = p;
      one.sel_group_want = -1;
      if (split_mode == 1)
        st = launch_independent(one, true);
      else
        st = forced != nullptr && atoi(forced) == 2 ? launch_sel_dq(Two{}, one) : launch_sel_dq(Four{}, one);
    } else {
      AttnBwdParams shared = p, independent = p;
      shared.sel_group_want = 1;
      independent.sel_group_want = 0;
      st = split_mode == 1 ? launch_independent(shared, true) : launch_sel_dq(Four{}, shared);
      if (st.ok()) st = launch_independent(independent, split_mode != 0);
    }
  }
  if (!st.ok()) return st;
  cudaError_t e;

  Status wide;
  if (p.mode == AttnMode::kWindow &&
      sparse_detail::launch_range_dkdv_wide<T, kHeadDim, kHeadDimV, /*kCompressed=*/false>(p, false, stream, wide)) {
    if (!wide.ok()) return wide;
  } else if (p.mode == AttnMode::kWindow) {
    const index_t ctas = dkdv::range_slots(p) * p.heads_kv;
    if (ctas > INT32_MAX) return Status{2, "too many key tiles for one launch"};
    if (ctas > 0) {
      auto kv_kernel = sparse_detail::sparse_attn_bwd_dkdv_window_kernel<T, kHeadDim, kHeadDimV>;
      e = cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, KvCfg::kSmemBytes);
      if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
      kv_kernel<<<static_cast<unsigned>(ctas), KvCfg::kThreads, KvCfg::kSmemBytes, stream>>>(p);
    }
  } else if (num_pairs > 0 && sorted_tokens != nullptr && p.workspace != nullptr) {
    (void)sorted_keys;  // consumed by the bucket pass in sparse_attn_bwd_cuda
    const index_t nb = sparse_detail::num_buckets(p);
    const dkdv::SelPlan plan = dkdv::sel_plan(p, num_pairs, nb);
    if (plan.units_bound > INT32_MAX) return Status{2, "too many (list, chunk) units for one launch"};
    unsigned char* ws = static_cast<unsigned char*>(p.workspace);
    const int* bucket = reinterpret_cast<const int*>(ws + plan.off_buckets);
    dkdv::SelArrays arr;
    arr.start = bucket;
    arr.units = bucket + (nb + 1) + 2 * nb;
    arr.order = arr.units + nb;
    arr.base = arr.order + nb;
    arr.map = reinterpret_cast<const int*>(ws + plan.off_map);
    float* partials = reinterpret_cast<float*>(ws + plan.off_partials);
    auto kv_kernel = sparse_detail::sparse_attn_bwd_dkdv_kernel<T, kHeadDim, kHeadDimV>;
    int kv_threads = KvCfg::kThreads, kv_smem = KvCfg::kSmemBytes;
    if constexpr (kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDim <= 128 && kHeadDimV <= 128) {
      // sm_90a: the one-warpgroup wgmma tile (same units, partials and reduction; H200, 64k,
      // headline: 17.1 -> 13.4 ms on independent lists). NSA_SEL_DKDV_SM90=0: sm_80's tile.
      const char* sm90_env = getenv("NSA_SEL_DKDV_SM90");
      const bool sm90_on = sm90_env == nullptr || sm90_env[0] == '\0' || sm90_env[0] != '0';
      auto sm90 = sparse_detail::sparse_attn_bwd_dkdv_sm90_kernel<T, kHeadDim, kHeadDimV>;
      if (sm90_on && sparse_detail::wgmma_kernel_usable(sm90)) {
        kv_kernel = sm90;
        kv_threads = dkdv::WideCfg<kHeadDim, kHeadDimV, 1>::kThreads;
        kv_smem = dkdv::WideCfg<kHeadDim, kHeadDimV, 1>::kSmemBytes;
      }
    }
    e = cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kv_smem);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    if (plan.units_bound > 0)
      kv_kernel<<<static_cast<unsigned>(plan.units_bound), kv_threads, kv_smem, stream>>>(
          p, sorted_tokens, arr, plan.chunk_rows, plan.tpb, plan.max_partials, partials);
    // Lists with >= 2 chunks: at most max_partials / 2 (list, sub-tile) pairs.
    const index_t red = plan.max_partials / 2;
    if (red > 0)
      sparse_detail::sparse_attn_bwd_dkdv_reduce_kernel<T, kHeadDim, kHeadDimV>
          <<<static_cast<unsigned>(red), KvCfg::kThreads, 0, stream>>>(p, arr, nb, plan.tpb, plan.max_partials,
                                                                     partials);
  }
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace nsa
