// Grouped sparse flash attention (DESIGN.md §1.5 selected blocks, §1.6 sliding window), forward
// and backward.
// Query-group-centric: the G query heads of a token (or, for G < 16, the heads of 16/G
// consecutive tokens) form the 16 rows of one tensor-core tile and walk one shared list of key
// tiles: the union of their selected blocks, or the union of their windows. Uses AttnParams
// (attention.h) with mode kSelected or kWindow.
#pragma once

#include "attention.h"

#if defined(__CUDACC__) || defined(NSA_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace nsa {

// o, lse of the selected or window branch. Head dims (Dk, Dv) in {(64,64), (128,128), (192,128),
// (256,256)}; sel_block a multiple of 32. Enqueues on `stream`, never synchronises. With
// p.sel_group_flags (sel_group_flags_bytes(p) bytes of scratch) the selected branch picks its CTA
// width per group of tokens on the GPU: the union walk where neighbours share blocks, two-warp
// CTAs where they do not (NSA_SEL_FWD_WARPS=4|2|1 forces one width). The backward's dQ does the
// same with the same scratch (NSA_SEL_DQ_WARPS=4|2 forces one).
Status sparse_attn_fwd_cuda(const AttnParams& p, DType dtype, cudaStream_t stream);
size_t sel_group_flags_bytes(const AttnParams& p);

template <typename T, int kHeadDim, int kHeadDimV>
Status run_sparse_attn_fwd(const AttnParams& p, cudaStream_t stream);

// dq, dk, dv of the selected or window branch from dout, out, lse and delta =
// rowsum(dout * out) - dlse (AttnBwdParams::delta). Deterministic: no atomics. The selected
// branch needs sparse_attn_bwd_workspace_bytes(p) bytes of workspace (p.workspace).
Status sparse_attn_bwd_cuda(const AttnBwdParams& p, DType dtype, cudaStream_t stream);
size_t sparse_attn_bwd_workspace_bytes(const AttnParams& p);

// delta of BwdDeltaParams (attention.h), shared by the three branches' backward. Deterministic
// (fixed reduction order).
Status attn_bwd_delta_cuda(const BwdDeltaParams& p, DType dtype, cudaStream_t stream);

template <typename T, int kHeadDim, int kHeadDimV>
Status run_sparse_attn_bwd(const AttnBwdParams& p, const int* sorted_keys, const int* sorted_tokens, index_t num_pairs,
                           cudaStream_t stream);

}  // namespace nsa
#endif
