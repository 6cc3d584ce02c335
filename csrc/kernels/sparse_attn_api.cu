// Host dispatch of the grouped sparse attention: runtime (dtype, Dk, Dv) -> instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sparse_attn.h"
#include "static_switch.h"

namespace nsa {

// Dv that goes with each compiled Dk (DESIGN §1: Dk = Dv, or Dk = 192 with Dv = 128).
constexpr int value_dim_for(int dk) { return dk == 192 ? 128 : dk; }

Status sparse_attn_fwd_cuda(const AttnParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim_v != value_dim_for(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] {
      return run_sparse_attn_fwd<T, kHeadDim, value_dim_for(kHeadDim)>(p, stream);
    });
  });
}

}  // namespace nsa
