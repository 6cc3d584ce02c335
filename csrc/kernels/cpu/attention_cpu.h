// CPU implementation of the attention families (DESIGN.md §1.2-§1.6, §1.8) on the same params
// as the CUDA kernels. Element type T is float or double (the torch layer upcasts half types);
// accumulation in double. Used by the extension's CPU path and as the C++ benchmarks'
// reference. Single-threaded, fixed loop order: results are deterministic.
//
// Every routine writes every element of its outputs (rows of empty key sets: o = 0,
// lse = -inf; gap rows of packed compressed keys: dk = dv = 0; rows of no sequence of a
// malformed packed batch: zeros / -inf / -1). Nothing crosses a sequence boundary; block
// indices outside [0, ceil(T/l')) are skipped, never read.
#pragma once

#include "../attention.h"

namespace nsa {
namespace cpu {

// o, lse of the branch selected by p.mode (kCompressed / kSelected / kWindow).
template <typename T>
void attn_fwd(const AttnParams& p);

// dq, dk, dv (FlashAttention formulas from the given out and lse; dlse optional, nullptr = 0).
// P is renormalised over each row's key set, so the fp32 lse only stabilises the exponentials.
// Rows with lse = -inf contribute nothing.
// dq, dk, dv must be laid out like q, k, v (strides dq_stride, dk_stride, dv_stride).
template <typename T>
void attn_bwd(const AttnBwdParams& p);

// Block scores from the compressed branch's lse, top-n per (token, KV head) -> block_idx.
template <typename T>
void select_blocks(const SelectParams& p);

// One decoding step: compressed + selected + window attention of the newest token of each
// sequence against its cache, gated. cache_seqlens[b] <= 0 gives o = 0.
template <typename T>
void decode_fwd(const DecodeParams& p);

}  // namespace cpu
}  // namespace nsa
