// CUDA path of combine_fwd / combine_bwd: the fused kernels of csrc/kernels/combine.h. The ops'
// validation and CPU path stay in attention_ops.cpp, which calls these for fp16 / bf16 CUDA
// tensors whose head dim is a multiple of 8 (everything the CUDA attention ops produce).
#include "combine_ops.h"

#ifdef NSA_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/combine.h"
#include "checks.h"

namespace nsa_torch {

bool combine_cuda_applies(const at::Tensor& o_cmp) {
  const auto st = o_cmp.scalar_type();
  return o_cmp.is_cuda() && (st == at::kHalf || st == at::kBFloat16) && o_cmp.dim() >= 1 && o_cmp.size(-1) % 8 == 0 &&
         o_cmp.size(-1) <= INT32_MAX;
}

namespace {
nsa::CombineParams params_of(const at::Tensor (&o)[3], const at::Tensor (&g)[3]) {
  nsa::CombineParams p;
  for (int b = 0; b < 3; ++b) {
    p.o[b] = o[b].data_ptr();
    p.g[b] = g[b].data_ptr();
  }
  p.dim = static_cast<int>(o[0].size(-1));
  p.vectors = p.dim > 0 ? o[0].numel() / p.dim : 0;
  return p;
}
}  // namespace

at::Tensor combine_fwd_cuda(const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_win,
                            const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_win, const char* op) {
  const c10::cuda::CUDAGuard guard(o_cmp.device());
  const at::Tensor o[3] = {o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous()};
  const at::Tensor g[3] = {g_cmp.contiguous(), g_slc.contiguous(), g_win.contiguous()};
  at::Tensor out = at::empty(o_cmp.sizes(), o[0].options());
  nsa::CombineParams p = params_of(o, g);
  p.out = out.data_ptr();
  check_kernel_status(nsa::combine_fwd_cuda(p, nsa_dtype(o_cmp.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
                      op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> combine_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& o_cmp, const at::Tensor& o_slc, const at::Tensor& o_win,
    const at::Tensor& g_cmp, const at::Tensor& g_slc, const at::Tensor& g_win, bool dg_fp32, const char* op) {
  const c10::cuda::CUDAGuard guard(o_cmp.device());
  const at::Tensor o[3] = {o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous()};
  const at::Tensor g[3] = {g_cmp.contiguous(), g_slc.contiguous(), g_win.contiguous()};
  const at::Tensor d = dout.contiguous();
  nsa::CombineParams p = params_of(o, g);
  p.dout = d.data_ptr();
  p.dg_fp32 = dg_fp32;
  at::Tensor d_o[3], d_g[3];
  for (int b = 0; b < 3; ++b) {
    d_o[b] = at::empty(o_cmp.sizes(), o[0].options());
    d_g[b] = at::empty(g_cmp.sizes(), dg_fp32 ? o[0].options().dtype(at::kFloat) : o[0].options());
    p.d_o[b] = d_o[b].data_ptr();
    p.d_g[b] = d_g[b].data_ptr();
  }
  check_kernel_status(nsa::combine_bwd_cuda(p, nsa_dtype(o_cmp.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
                      op);
  return {d_o[0], d_o[1], d_o[2], d_g[0], d_g[1], d_g[2]};
}

}  // namespace nsa_torch
#endif
