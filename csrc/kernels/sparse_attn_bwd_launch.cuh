// Launch configuration of the grouped sparse attention backward (dQ and dK/dV kernels);
// included by the generated instantiation files only. The selected branch's per-block token
// lists are built beforehand by sparse_attn_bwd_cuda (sparse_attn_api.cu).
#pragma once

#include "sparse_attn_bwd_kernel.cuh"

namespace nsa {

template <typename T, int kHeadDim, int kHeadDimV>
Status run_sparse_attn_bwd(const AttnBwdParams& p, const int* sorted_keys, const int* sorted_tokens, index_t num_pairs,
                           cudaStream_t stream) {
  using Cfg = sparse_detail::BwdConfig<kHeadDim, kHeadDimV>;
  constexpr int kRows = sparse_detail::kRows;
  const int G = p.heads_q / p.heads_kv;
  const int tokens = G >= kRows ? 1 : kRows / G;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  auto groups = [&](int per) -> index_t {
    return p.cu_seqlens ? (p.total_rows + per - 1) / per : static_cast<index_t>(p.batch) * ((p.seqlen + per - 1) / per);
  };
  const index_t dq_items = groups(tokens), kv_items = groups(kRows);
  if (dq_items == 0) return Status{};
  if (static_cast<index_t>(p.heads_kv) * chunks > 65535) return Status{2, "too many KV heads x head chunks for one launch"};

  auto dq_kernel = sparse_detail::sparse_attn_bwd_dq_kernel<T, kHeadDim, kHeadDimV>;
  cudaError_t e = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kDqSmemBytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  dq_kernel<<<dim3(static_cast<unsigned>((dq_items + Cfg::kWarps - 1) / Cfg::kWarps), p.heads_kv * chunks),
              Cfg::kThreads, Cfg::kDqSmemBytes, stream>>>(p);

  auto kv_kernel = sparse_detail::sparse_attn_bwd_dkdv_kernel<T, kHeadDim, kHeadDimV>;
  e = cudaFuncSetAttribute(kv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kDkvSmemBytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  kv_kernel<<<dim3(static_cast<unsigned>((kv_items + Cfg::kWarps - 1) / Cfg::kWarps), p.heads_kv), Cfg::kThreads,
              Cfg::kDkvSmemBytes, stream>>>(p, sorted_keys, sorted_tokens, num_pairs);
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace nsa
