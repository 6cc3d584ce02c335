// Launch configuration of the compressed-attention forward and backward;
// included by the generated instantiation files only.
#pragma once

#include "cmp_attn_bwd_kernel.cuh"
#include "range_attn_bwd_dkdv_sm90.cuh"
#include "range_attn_bwd_dq_sm90.cuh"
#include "range_attn_fwd_sm90.cuh"

namespace nsa {

template <typename T, int kHeadDim, int kHeadDimV>
Status run_cmp_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  return sparse_detail::run_range_attn_fwd_best<T, kHeadDim, kHeadDimV, /*kCompressed=*/true>(p, stream);
}

template <typename T, int kHeadDim, int kHeadDimV>
Status run_cmp_attn_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  using Cfg = sparse_detail::DqConfig<kHeadDim, kHeadDimV>;
  constexpr int kRows = sparse_detail::kRows;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return Status{2, "heads_q must be a multiple of heads_kv"};
  const int G = p.heads_q / p.heads_kv;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  const index_t dq_ctas = sparse_detail::dq_ctas<Cfg::kRowGroups>(p);
  if (dq_ctas == 0) return Status{};
  if (static_cast<index_t>(p.heads_kv) * chunks > 65535) return Status{2, "too many KV heads x head chunks"};
  // dQ: one CTA per group of consecutive tokens (attn_bwd_dq.cuh).
  const Status st = sparse_detail::launch_range_dq_best<T, kHeadDim, kHeadDimV, /*kCompressed=*/true>(
      sparse_detail::cmp_attn_bwd_dq_kernel<T, kHeadDim, kHeadDimV>, Cfg::kThreads, Cfg::kRangeSmemBytes, dq_ctas, p, stream);
  if (!st.ok()) return st;
  cudaError_t e;
  // dK/dV: split the key tiles' query rows only when the caller gave the workspace
  // (sparse_attn_bwd_workspace_bytes(p) with mode kCompressed); without it, one chunk per tile.
  // sm_90a: 128-key tiles on two warpgroups (range_attn_bwd_dkdv_sm90.cuh) where they apply.
  {
    Status wide;
    if (sparse_detail::launch_range_dkdv_wide<T, kHeadDim, kHeadDimV, /*kCompressed=*/true>(p, p.workspace != nullptr,
                                                                                             stream, wide)) {
      if (!wide.ok()) return wide;
      e = cudaGetLastError();
      return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
    }
  }
  using KvCfg = dkdv::Cfg<kHeadDim, kHeadDimV>;
  const index_t tiles = dkdv::range_slots(p) * p.heads_kv;
  const int splits = p.workspace != nullptr ? dkdv::range_splits(p) : 1;
  if (tiles * splits > INT32_MAX) return Status{2, "too many compressed key tiles for one launch"};
  if (tiles > 0) {
    float* ws = static_cast<float*>(p.workspace);
    auto kv_kernel = sparse_detail::cmp_attn_bwd_dkdv_kernel<T, kHeadDim, kHeadDimV>;
    e = cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, KvCfg::kSmemBytes);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    kv_kernel<<<static_cast<unsigned>(tiles * splits), KvCfg::kThreads, KvCfg::kSmemBytes, stream>>>(p, splits, ws);
    if (splits > 1)
      sparse_detail::cmp_attn_bwd_dkdv_reduce_kernel<T, kHeadDim, kHeadDimV>
          <<<static_cast<unsigned>(tiles), KvCfg::kThreads, 0, stream>>>(p, splits, ws);
  }
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace nsa
