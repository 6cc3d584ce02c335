// Launch configuration of the block scoring + top-n selection kernel; included by the generated
// instantiation files only.
#pragma once

#include "select_kernel.cuh"
#include "select_kernel_sm90.cuh"

namespace nsa {

template <typename T, int kHeadDim>
Status run_select_blocks(const SelectParams& p, cudaStream_t stream) {
  using sparse_detail::SelectLayout;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return Status{2, "heads_q must be a multiple of heads_kv"};
  if (p.top_n < 1) return Status{2, "top_n must be >= 1"};
  if (sparse_detail::select_open_blocks(p.cmp_block, p.cmp_stride, p.sel_block, sparse_detail::kSelectTileKeys) > sparse_detail::kSelectRing)
    return Status{2, "cmp_block / cmp_stride too large relative to sel_block for the CUDA selection kernel"};
  if constexpr (kHeadDim % 64 == 0) {
    if (sparse_detail::select_sm90_covers<kHeadDim>(p) &&
        sparse_detail::wgmma_kernel_usable(sparse_detail::select_blocks_sm90_kernel<T, kHeadDim, true, 64>))
      return sparse_detail::select_sm90_ring(p) == 64
                 ? sparse_detail::run_select_blocks_sm90_ring<T, kHeadDim, 64>(p, stream)
                 : sparse_detail::run_select_blocks_sm90_ring<T, kHeadDim, 128>(p, stream);
  }
  const int G = p.heads_q / p.heads_kv;
  const sparse_detail::SelectShape sh = sparse_detail::select_shape(G);
  // As many warps per CTA (up to 4) as fit in shared memory: large G x head dim x top_n take
  // more per warp. The CTA's tokens share its key tiles (two stages after the warps' space).
  const size_t warp_bytes = SelectLayout<kHeadDim>(G, p.top_n).bytes;
  const size_t stage_bytes = 2 * sparse_detail::kSelectTileKeys * SelectLayout<kHeadDim>::kLd * 2;
  constexpr size_t kMaxSmem = 200 * 1024;
  int warps = sparse_detail::kSelectMaxWarps;
  while (warps > 1 && warps * warp_bytes + stage_bytes > kMaxSmem) --warps;
  if (warp_bytes + stage_bytes > kMaxSmem)
    return Status{2, "G x head dim x top_n too large for the selection kernel's shared memory"};
  const size_t smem = warps * warp_bytes + stage_bytes;
  const int cta_tokens = sh.tokens * warps;
  const index_t ctas = p.cu_seqlens ? (p.total_rows + cta_tokens - 1) / cta_tokens
                                    : static_cast<index_t>(p.batch) * ((p.seqlen + cta_tokens - 1) / cta_tokens);
  if (ctas == 0) return Status{};
  if (p.heads_kv > 65535) return Status{2, "too many KV heads for one launch"};
  auto kernel = sparse_detail::select_blocks_kernel<T, kHeadDim>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  // Latency-bound (scalar phase): ask for the shared-memory carveout that lets 4 CTAs of 128
  // registers per thread share an SM (the driver otherwise sized it for the register limit).
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  if (ctas > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  kernel<<<dim3(static_cast<unsigned>(ctas), p.heads_kv), warps * 32, smem, stream>>>(p);
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace nsa
