// Launch configuration of the block scoring + top-n selection kernel; included by the generated
// instantiation files only.
#pragma once

#include "select_kernel.cuh"

namespace nsa {

template <typename T, int kHeadDim>
Status run_select_blocks(const SelectParams& p, cudaStream_t stream) {
  constexpr int kWarps = sparse_detail::kSelectWarps;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return Status{2, "heads_q must be a multiple of heads_kv"};
  if (p.top_n < 1) return Status{2, "top_n must be >= 1"};
  const int G = p.heads_q / p.heads_kv;
  const index_t items = p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
  if (items == 0) return Status{};
  if (p.heads_kv > 65535) return Status{2, "too many KV heads for one launch"};
  const size_t smem = kWarps * sparse_detail::select_warp_bytes<kHeadDim>(G, p.top_n);
  if (smem > 200 * 1024) return Status{2, "G x head dim x top_n too large for the selection kernel's shared memory"};
  auto kernel = sparse_detail::select_blocks_kernel<T, kHeadDim>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  kernel<<<dim3(static_cast<unsigned>((items + kWarps - 1) / kWarps), p.heads_kv), kWarps * 32, smem, stream>>>(p);
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace nsa
