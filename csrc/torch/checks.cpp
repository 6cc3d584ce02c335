#include "checks.h"

#include <ATen/ops/empty.h>

#ifdef NSA_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace nsa_torch {

// Positions inside one sequence are int in the kernels, and a few sums round a length up to a
// multiple of a block (<= 2^20) or a CTA's tokens in int: 2^21 of headroom keeps them below
// 2^31 (docs/OFFSET_AUDIT.md, R1-R5).
constexpr int64_t kMaxTokens = INT32_MAX - (int64_t{1} << 21);

void check_cu_seqlens(const Tensor& cu, int64_t total, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": argument '", name, "' must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, op, ": argument '", name,
                    "' must be 1-D of length batch+1 >= 2, got shape ", shape_str(cu));
  TORCH_CHECK_VALUE(cu.device() == device, op, ": argument '", name, "' must be on ", device, ", got ", cu.device());
  TORCH_CHECK_VALUE(cu.is_contiguous(), op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK_VALUE(total <= kMaxTokens, op, ": packed batches hold at most 2^31 - 2^21 tokens (int32 '", name,
                    "' with headroom for in-kernel rounding up to block multiples, docs/OFFSET_AUDIT.md)");
  Tensor host;
  if (cu.is_cpu()) {
    host = cu;
  } else {
#ifdef NSA_WITH_CUDA
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cu.device().index()).stream();
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess || status != cudaStreamCaptureStatusNone) return;
    host = cu.to(at::kCPU);
#else
    return;
#endif
  }
  const int* v = host.data_ptr<int>();
  const int64_t n = host.size(0);
  TORCH_CHECK_VALUE(v[0] == 0, op, ": argument '", name, "' must start at 0, got ", v[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK_VALUE(v[i] >= v[i - 1], op, ": argument '", name, "' must be non-decreasing, but entry ", i, " (",
                      v[i], ") < entry ", i - 1, " (", v[i - 1], ")");
  TORCH_CHECK_VALUE(v[n - 1] == total, op, ": argument '", name, "' must end at the number of packed tokens (",
                    total, "), got ", v[n - 1]);
}

Batch batch_of(const Tensor& x, const c10::optional<Tensor>& cu_seqlens, const char* op, const char* name) {
  Batch g;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(x.dim() == 3, op, ": with cu_seqlens, argument '", name,
                      "' must be packed [total, heads, dim], got shape ", shape_str(x));
    g.packed = true;
    g.total_rows = x.size(0);
    g.batch = cu_seqlens->size(0) - 1;
    check_cu_seqlens(*cu_seqlens, g.total_rows, x.device(), op);
    g.cu = cu_seqlens->data_ptr<int>();
  } else {
    TORCH_CHECK_VALUE(x.dim() == 4, op, ": argument '", name,
                      "' must be [batch, seqlen, heads, dim] (or packed [total, heads, dim] with cu_seqlens), got shape ",
                      shape_str(x));
    g.batch = x.size(0);
    g.seqlen = x.size(1);
    g.total_rows = g.seqlen;
  }
  TORCH_CHECK_VALUE(g.seqlen <= kMaxTokens && g.batch <= INT32_MAX, op, ": argument '", name,
                    "' is too large (at most 2^31 - 2^21 tokens per sequence)");
  return g;
}

}  // namespace nsa_torch
