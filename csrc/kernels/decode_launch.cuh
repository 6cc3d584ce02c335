// Launch sequence of the decoding step (decode.h); included by the generated instantiation
// files only.
#pragma once

#include "decode_kernel.cuh"

namespace nsa {

namespace decode_detail {

inline Status launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

template <class Kernel>
inline Status set_smem(Kernel kernel, size_t bytes, bool prefer_shared = false) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  // Three attention CTAs per SM need the largest shared-memory carveout (the driver may
  // otherwise pick one that holds two).
  if (e == cudaSuccess && prefer_shared)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace decode_detail

template <typename T, int kHeadDim, int kHeadDimV>
Status run_decode_fwd(const DecodeParams& p, const DecodePlan& pl, void* workspace, cudaStream_t stream) {
  namespace dd = decode_detail;
  using Cfg = dd::AttnCfg<kHeadDim, kHeadDimV>;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* o_part = reinterpret_cast<float*>(ws + pl.off_o);
  float* ml = reinterpret_cast<float*>(ws + pl.off_ml);
  float* bs = reinterpret_cast<float*>(ws + pl.off_bs);
  float* score = reinterpret_cast<float*>(ws + pl.off_score);
  int* sel = reinterpret_cast<int*>(ws + pl.off_sel);
  const unsigned grid_heads = static_cast<unsigned>(p.heads_kv * pl.head_chunks);

  // 1. compressed slices + window slices
  {
    auto kernel = dd::decode_attn_kernel<T, kHeadDim, kHeadDimV, false>;
    const size_t smem = Cfg::smem_bytes();
    Status st = dd::set_smem(kernel, smem, /*prefer_shared=*/true);
    if (!st.ok()) return st;
    kernel<<<dim3(static_cast<unsigned>(pl.splits_cmp + pl.splits_win), grid_heads, static_cast<unsigned>(p.batch)),
             Cfg::kThreads, smem, stream>>>(p, pl, o_part, ml, bs, sel);
    st = dd::launch_status();
    if (!st.ok()) return st;
  }
  // 2. block scores + top-n
  {
    auto kernel = dd::decode_select_kernel<dd::kSelectThreads>;
    const size_t weight_bytes = static_cast<size_t>(pl.tiles_cmp) * pl.G * sizeof(float);
    const bool weights_in_smem = weight_bytes <= dd::kSelectMaxWeightBytes;
    const size_t smem = 2 * static_cast<size_t>(pl.G) * sizeof(float) + (weights_in_smem ? weight_bytes : 0);
    Status st = dd::set_smem(kernel, smem);
    if (!st.ok()) return st;
    kernel<<<dim3(static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch)), dd::kSelectThreads, smem,
             stream>>>(p, pl, ml, bs, score, sel, weights_in_smem);
    st = dd::launch_status();
    if (!st.ok()) return st;
  }
  // 3. selected-block slices
  {
    auto kernel = dd::decode_attn_kernel<T, kHeadDim, kHeadDimV, true>;
    const size_t smem = Cfg::smem_bytes();
    Status st = dd::set_smem(kernel, smem, /*prefer_shared=*/true);
    if (!st.ok()) return st;
    kernel<<<dim3(static_cast<unsigned>(pl.splits_slc), grid_heads, static_cast<unsigned>(p.batch)), Cfg::kThreads,
             smem, stream>>>(p, pl, o_part, ml, bs, sel);
    st = dd::launch_status();
    if (!st.ok()) return st;
  }
  // 4. merge + gates
  {
    auto kernel = dd::decode_combine_kernel<T, dd::kCombineThreads>;
    const size_t smem =
        (static_cast<size_t>(dd::combine_coef_floats(pl.splits)) + (dd::kCombineThreads / 32) * p.head_dim_v) * sizeof(float);
    Status st = dd::set_smem(kernel, smem);
    if (!st.ok()) return st;
    kernel<<<dim3(static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)), dd::kCombineThreads, smem,
             stream>>>(p, pl, o_part, ml);
    return dd::launch_status();
  }
}

}  // namespace nsa
