// nsa_cuda::compress_fwd / compress_bwd: argument checks, CPU and CUDA implementations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../kernels/compress.h"
#include "../kernels/cpu/compress_cpu.h"
#include "checks.h"

#ifdef NSA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace nsa_torch {
namespace {

constexpr const char* kFwd = "nsa_cuda.compress";

struct CompressArgs {
  Batch batch;
  nsa::CompressParams params;
  std::vector<int64_t> out_shape;
};

// Validates (x, w, pe, block, stride, cu_seqlens) and fills everything but the data pointers
// of outputs. `op` names the public function in messages.
CompressArgs prepare(const Tensor& x, const c10::optional<Tensor>& w, const c10::optional<Tensor>& pe, int64_t block,
                     int64_t stride, const c10::optional<Tensor>& cu_seqlens, const char* op) {
  check_float_tensor(x, op, "x", -1, x.device());
  check_block_stride(block, stride, op, "block", "stride");
  CompressArgs a;
  a.batch = batch_of(x, cu_seqlens, op, "x");
  const int64_t H = x.size(-2), D = x.size(-1);
  TORCH_CHECK_VALUE(H >= 1 && D >= 1, op, ": argument 'x' needs at least one head and a head dim >= 1, got shape ",
                    shape_str(x));
  int64_t Dout = D;
  if (w.has_value()) {
    check_float_tensor(*w, op, "w", 3, x.device());
    check_same_dtype(x, *w, op, "x", "w");
    check_size(*w, 0, H, op, "w", "dim 0 (heads)");
    check_size(*w, 1, block * D, op, "w", "dim 1 (block*head_dim)");
    Dout = w->size(2);
    TORCH_CHECK_VALUE(w->is_contiguous(), op, ": argument 'w' must be contiguous");
  }
  if (pe.has_value()) {
    TORCH_CHECK_VALUE(w.has_value(), op, ": argument 'pe' (position table) needs 'w': mean compression takes no parameters");
    check_float_tensor(*pe, op, "pe", 3, x.device());
    check_same_dtype(x, *pe, op, "x", "pe");
    check_size(*pe, 0, H, op, "pe", "dim 0 (heads)");
    check_size(*pe, 1, block, op, "pe", "dim 1 (block)");
    check_size(*pe, 2, D, op, "pe", "dim 2 (head_dim)");
    TORCH_CHECK_VALUE(pe->is_contiguous(), op, ": argument 'pe' must be contiguous");
  }
  if (x.is_cuda()) {  // the vectorised kernels read 16 bytes at a time and tile Dout by 64
    TORCH_CHECK_VALUE(D % 8 == 0 && D <= 256, op,
                      ": on CUDA the head dim of 'x' must be a multiple of 8 and at most 256, got ", D);
    TORCH_CHECK_VALUE(!w.has_value() || (D % 64 == 0 && Dout % 64 == 0), op,
                      ": on CUDA linear compression needs head dims that are multiples of 64 (got D=", D,
                      ", Dout=", Dout, ")");
  }
  auto& p = a.params;
  const auto st = strides3(x);
  p.x = x.data_ptr();
  p.x_batch_stride = st.batch;
  p.x_row_stride = st.row;
  p.x_head_stride = st.head;
  p.w = w.has_value() ? w->data_ptr() : nullptr;
  p.pe = pe.has_value() ? pe->data_ptr() : nullptr;
  p.cu_seqlens = a.batch.cu;
  p.batch = static_cast<int>(a.batch.batch);
  p.seqlen = static_cast<int>(a.batch.seqlen);
  p.total_rows = a.batch.total_rows;
  p.heads = static_cast<int>(H);
  p.head_dim = static_cast<int>(D);
  p.out_dim = static_cast<int>(Dout);
  p.block = static_cast<int>(block);
  p.stride = static_cast<int>(stride);
  if (a.batch.packed) a.out_shape = {a.batch.total_rows / stride, H, Dout};
  else a.out_shape = {a.batch.batch, nsa::num_compressed(static_cast<int>(a.batch.seqlen), static_cast<int>(block), static_cast<int>(stride)), H, Dout};
  return a;
}


Tensor compress_fwd_cpu(const Tensor& x, const c10::optional<Tensor>& w, const c10::optional<Tensor>& pe, int64_t block,
                        int64_t stride, const c10::optional<Tensor>& cu_seqlens) {
  prepare(x, w, pe, block, stride, cu_seqlens, kFwd);  // validate the caller's tensors first
  const auto ct = cpu_compute_type(x.scalar_type());
  const Tensor xc = to_compute(x, ct);
  c10::optional<Tensor> wc, pec;
  if (w) wc = w->to(ct).contiguous();
  if (pe) pec = pe->to(ct).contiguous();
  auto a = prepare(xc, wc, pec, block, stride, cu_seqlens, kFwd);
  Tensor y = at::empty(a.out_shape, xc.options());
  a.params.y = y.data_ptr();
  if (ct == at::kDouble) nsa::cpu::compress_fwd<double>(a.params);
  else nsa::cpu::compress_fwd<float>(a.params);
  return y.to(x.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> compress_bwd_cpu(const Tensor& dy_in, const Tensor& x, const c10::optional<Tensor>& w,
                                                    const c10::optional<Tensor>& pe, int64_t block, int64_t stride,
                                                    const c10::optional<Tensor>& cu_seqlens) {
  constexpr const char* op = "nsa_cuda.compress_bwd";
  prepare(x, w, pe, block, stride, cu_seqlens, op);
  const auto ct = cpu_compute_type(x.scalar_type());
  const Tensor xc = to_compute(x, ct);
  c10::optional<Tensor> wc, pec;
  if (w) wc = w->to(ct).contiguous();
  if (pe) pec = pe->to(ct).contiguous();
  auto a = prepare(xc, wc, pec, block, stride, cu_seqlens, op);
  const Tensor dy = dy_in.contiguous();  // autograd may hand in expanded (stride-0) gradients
  check_float_tensor(dy, op, "dy", static_cast<int64_t>(a.out_shape.size()), x.device());
  check_same_dtype(x, dy, op, "x", "dy");
  TORCH_CHECK_VALUE(dy.sizes() == at::IntArrayRef(a.out_shape), op, ": argument 'dy' must have the output's shape ",
                    at::IntArrayRef(a.out_shape), ", got ", shape_str(dy));
  const Tensor dyc = dy.to(ct).contiguous();
  nsa::CompressBwdParams p;
  static_cast<nsa::CompressParams&>(p) = a.params;
  Tensor dx = at::empty(xc.sizes(), xc.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dw = w ? at::empty_like(*wc) : at::empty({0}, xc.options());
  Tensor dpe = pe ? at::empty_like(*pec) : at::empty({0}, xc.options());
  p.dy = dyc.data_ptr();
  p.dx = dx.data_ptr();
  p.dw = w ? dw.data_ptr() : nullptr;
  p.dpe = pe ? dpe.data_ptr() : nullptr;
  if (ct == at::kDouble) nsa::cpu::compress_bwd<double>(p);
  else nsa::cpu::compress_bwd<float>(p);
  return {dx.to(x.scalar_type()), dw.to(x.scalar_type()), dpe.to(x.scalar_type())};
}

#ifdef NSA_WITH_CUDA
Tensor compress_fwd_cuda(const Tensor& x_in, const c10::optional<Tensor>& w, const c10::optional<Tensor>& pe,
                         int64_t block, int64_t stride, const c10::optional<Tensor>& cu_seqlens) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = aligned16(x_in);
  auto a = prepare(x, w, pe, block, stride, cu_seqlens, kFwd);
  Tensor y = at::empty(a.out_shape, x.options());
  a.params.y = y.data_ptr();
  check_kernel_status(nsa::compress_fwd_cuda(a.params, nsa_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()), kFwd);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> compress_bwd_cuda(const Tensor& dy_in, const Tensor& x_in,
                                                     const c10::optional<Tensor>& w, const c10::optional<Tensor>& pe,
                                                     int64_t block, int64_t stride,
                                                     const c10::optional<Tensor>& cu_seqlens) {
  constexpr const char* op = "nsa_cuda.compress_bwd";
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = aligned16(x_in);
  auto a = prepare(x, w, pe, block, stride, cu_seqlens, op);
  const Tensor dy = dy_in.contiguous();  // autograd may hand in expanded (stride-0) gradients
  check_float_tensor(dy, op, "dy", static_cast<int64_t>(a.out_shape.size()), x.device());
  check_same_dtype(x, dy, op, "x", "dy");
  TORCH_CHECK_VALUE(dy.sizes() == at::IntArrayRef(a.out_shape), op, ": argument 'dy' must have the output's shape ",
                    at::IntArrayRef(a.out_shape), ", got ", shape_str(dy));
  nsa::CompressBwdParams p;
  static_cast<nsa::CompressParams&>(p) = a.params;
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dw = w ? at::empty_like(*w) : at::empty({0}, x.options());
  Tensor dpe = pe ? at::empty_like(*pe) : at::empty({0}, x.options());
  const size_t ws_bytes = nsa::compress_bwd_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.dw = w ? dw.data_ptr() : nullptr;
  p.dpe = pe ? dpe.data_ptr() : nullptr;
  p.workspace = ws_bytes ? ws.data_ptr() : nullptr;
  check_kernel_status(nsa::compress_bwd_cuda(p, nsa_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()), op);
  return {dx, dw, dpe};
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(nsa_cuda, CPU, m) {
  m.impl("compress_fwd", &compress_fwd_cpu);
  m.impl("compress_bwd", &compress_bwd_cpu);
}

#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa_cuda, CUDA, m) {
  m.impl("compress_fwd", &compress_fwd_cuda);
  m.impl("compress_bwd", &compress_bwd_cuda);
}
#endif

}  // namespace nsa_torch
