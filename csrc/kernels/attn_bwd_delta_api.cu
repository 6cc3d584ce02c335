// Launch and dispatch of the backward's row constant (attention.h, BwdDeltaParams); both
// dtypes in this translation unit (a light, memory-bound kernel).
#include "attn_bwd_delta_kernel.cuh"
#include "sparse_attn.h"
#include "static_switch.h"

namespace nsa {

Status attn_bwd_delta_cuda(const BwdDeltaParams& p, DType dtype, cudaStream_t stream) {
  if (p.dim % 8 != 0 || p.dim <= 0) return Status{2, "attention backward: head_dim_v must be a positive multiple of 8 on CUDA"};
  const index_t vectors = p.batch * p.rows * p.heads;
  if (vectors == 0) return Status{};
  const int chunks = p.dim / 8;
  const int lanes = nsa_vec_lanes(chunks);
  constexpr int kThreads = 256;
  const index_t warps_needed = (vectors * lanes + 31) / 32;
  const index_t blocks = (warps_needed + kThreads / 32 - 1) / (kThreads / 32);
  const unsigned grid = static_cast<unsigned>(blocks < (index_t(1) << 20) ? blocks : (index_t(1) << 20));  // grid-stride beyond
  // Both [vectors, dim] contiguous (the usual case: out from the forward, dout from combine_bwd).
  auto dense = [&](const Strides3& st) {
    return st.head == p.dim && st.row == static_cast<index_t>(p.heads) * p.dim && (p.batch == 1 || st.batch == p.rows * st.row);
  };
  const bool is_dense = dense(p.dout_stride) && dense(p.out_stride);
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    NSA_BOOL_SWITCH(is_dense, kDense, [&] {
      NSA_LANES_SWITCH(lanes, kLanes, [&] {
        delta_detail::attn_bwd_delta_kernel<T, kLanes, kDense><<<grid, kThreads, 0, stream>>>(p);
      });
    });
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
  });
}

}  // namespace nsa
