// Host dispatch of the compressed attention and the selection: runtime (dtype, Dk) ->
// instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cmp_attn.h"
#include "static_switch.h"

namespace nsa {

namespace {
constexpr int value_dim_of(int dk) { return dk == 192 ? 128 : dk; }
}  // namespace

Status cmp_attn_fwd_cuda(const AttnParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim_v != value_dim_of(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  if (p.mode != AttnMode::kCompressed) return Status{2, "cmp_attn_fwd_cuda runs the compressed branch"};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] {
      return run_cmp_attn_fwd<T, kHeadDim, value_dim_of(kHeadDim)>(p, stream);
    });
  });
}

Status cmp_attn_bwd_cuda(const AttnBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim_v != value_dim_of(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  if (p.mode != AttnMode::kCompressed) return Status{2, "cmp_attn_bwd_cuda runs the compressed branch"};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] {
      return run_cmp_attn_bwd<T, kHeadDim, value_dim_of(kHeadDim)>(p, stream);
    });
  });
}

Status select_blocks_cuda(const SelectParams& p, DType dtype, cudaStream_t stream) {
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] { return run_select_blocks<T, kHeadDim>(p, stream); });
  });
}

}  // namespace nsa
