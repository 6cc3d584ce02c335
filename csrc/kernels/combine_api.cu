// Launch and dtype dispatch of the gated branch sum (see combine.h). Light, memory-bound
// kernels: both dtypes live in this one translation unit.
#include "combine_kernel.cuh"
#include "static_switch.h"

namespace nsa {

namespace {
constexpr int kThreads = 256;

unsigned grid_for(index_t work_items) {
  const index_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);  // grid-stride beyond
}
}  // namespace

Status combine_fwd_cuda(const CombineParams& p, DType dtype, cudaStream_t stream) {
  if (p.dim % 8 != 0) return Status{2, "combine: head_dim must be a multiple of 8 on CUDA"};
  if (p.vectors == 0) return Status{};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    combine_detail::combine_fwd_kernel<T><<<grid_for(p.vectors * (p.dim / 8)), kThreads, 0, stream>>>(p);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
  });
}

Status combine_bwd_cuda(const CombineParams& p, DType dtype, cudaStream_t stream) {
  if (p.dim % 8 != 0) return Status{2, "combine: head_dim must be a multiple of 8 on CUDA"};
  if (p.vectors == 0) return Status{};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    const int lanes = nsa_vec_lanes(p.dim / 8);
    const unsigned grid = grid_for((p.vectors * lanes + 31) / 32 * 32);
    NSA_LANES_SWITCH(lanes, kLanes, [&] {
      combine_detail::combine_bwd_kernel<T, kLanes><<<grid, kThreads, 0, stream>>>(p);
    });
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
  });
}

}  // namespace nsa
