// Gated sum of the three branches (DESIGN.md §1.7) and its backward on the GPU, torch-free:
// one pass over the branch outputs instead of ATen's fp32 temporaries (three full-size
// products plus upcasts in the forward).
#pragma once

#include "nsa_common.h"

#if defined(__CUDACC__) || defined(NSA_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace nsa {

// Vectors of length dim, contiguous; gates one scalar per vector (contiguous).
struct CombineParams {
  const void* o[3] = {nullptr, nullptr, nullptr};  // o_cmp, o_slc, o_win [vectors, dim]
  const void* g[3] = {nullptr, nullptr, nullptr};  // g_cmp, g_slc, g_win [vectors]
  const void* dout = nullptr;                       // backward: [vectors, dim]
  void* out = nullptr;                              // forward: o [vectors, dim]
  void* d_o[3] = {nullptr, nullptr, nullptr};       // backward: gate * dout
  void* d_g[3] = {nullptr, nullptr, nullptr};       // backward: sum_d dout * o_branch [vectors]
  bool dg_fp32 = false;                             // d_g as float (else the element type)
  index_t vectors = 0;
  int dim = 0;  // multiple of 8
};

// out = sum_b g_b * o_b, fp32 arithmetic, rounded once.
Status combine_fwd_cuda(const CombineParams& p, DType dtype, cudaStream_t stream);
// d_o[b] = g_b * dout, d_g[b] = sum over dim of dout * o_b (fp32, fixed order: deterministic).
Status combine_bwd_cuda(const CombineParams& p, DType dtype, cudaStream_t stream);

}  // namespace nsa
#endif
