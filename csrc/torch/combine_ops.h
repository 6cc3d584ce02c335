// Fused CUDA gated branch sum (see combine_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace nsa_torch {

#ifdef NSA_WITH_CUDA
// True for the tensors the fused kernels take (CUDA fp16 / bf16, head dim a multiple of 8).
bool combine_cuda_applies(const at::Tensor& o_cmp);
at::Tensor combine_fwd_cuda(const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_win,
                            const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_win, const char* op);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> combine_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_win,
    const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_win, bool dg_fp32, const char* op);
#endif

}  // namespace nsa_torch
