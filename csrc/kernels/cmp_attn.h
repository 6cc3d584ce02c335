// Compressed attention (DESIGN.md §1.2) and block scoring + top-n selection (§1.3-1.4) on the
// GPU, torch-free.
//
// Compressed attention: query t attends compressed tokens i < nvis(t), nvis(t) = 0 if t+1 < l
// else min(Nc, (t - l + 1) // d + 1); same warp layout as the sparse kernels (16 query rows
// per warp), keys walked in 32-row tiles. Selection: one warp per (token, KV head) recomputes
// p = exp(scale q.k_c - lse) for the G heads, sums them, maps compressed scores to selection
// blocks with the overlap weights and keeps a running top-n (ties to the lower block): memory
// O(n) per warp, never [T, Nc].
#pragma once

#include "attention.h"

#if defined(__CUDACC__) || defined(NSA_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace nsa {

// o, lse of the compressed branch (p.mode == kCompressed). Head dims as the sparse kernels.
Status cmp_attn_fwd_cuda(const AttnParams& p, DType dtype, cudaStream_t stream);
// dq, dk_cmp, dv_cmp from dout, lse and delta = rowsum(dout * out) - dlse (AttnBwdParams::delta);
// deterministic (no atomics). dk / dv gap rows of a packed batch are left untouched (the caller
// zero-fills them).
Status cmp_attn_bwd_cuda(const AttnBwdParams& p, DType dtype, cudaStream_t stream);
// block_idx [.., H, top_n] int32, ascending, -1 padded.
Status select_blocks_cuda(const SelectParams& p, DType dtype, cudaStream_t stream);

template <typename T, int kHeadDim, int kHeadDimV>
Status run_cmp_attn_fwd(const AttnParams& p, cudaStream_t stream);
template <typename T, int kHeadDim, int kHeadDimV>
Status run_cmp_attn_bwd(const AttnBwdParams& p, cudaStream_t stream);
template <typename T, int kHeadDim>
Status run_select_blocks(const SelectParams& p, cudaStream_t stream);

}  // namespace nsa
#endif
