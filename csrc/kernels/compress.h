// Compression of keys/values into compressed tokens (DESIGN.md §1.1), torch-free.
//
//   mean:   y[i] = mean(x[i*d : i*d+l])
//   linear: y[i] = flatten(x[i*d : i*d+l] + pe) @ W          (per KV head)
//
// Layouts (last dim contiguous everywhere):
//   x  [B, T, H, D]          padded, or [total, H, D] packed with cu_seqlens [B+1]
//   w  [H, l*D, Dout]        contiguous, nullptr = mean mode (then Dout == D)
//   pe [H, l, D]             contiguous, optional (linear mode only)
//   y  [B, Nc(T), H, Dout]   padded, or [total/d, H, Dout] packed: sequence b owns rows
//                            cu[b]/d .. cu[b]/d + Nc(T_b) - 1; other rows are written as 0.
#pragma once

#include <cstddef>

#include "nsa_common.h"

#if defined(__CUDACC__) || defined(NSA_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace nsa {

struct CompressParams {
  const void* x = nullptr;
  index_t x_batch_stride = 0, x_row_stride = 0, x_head_stride = 0;  // elements
  const void* w = nullptr;   // [H, l*D, Dout] or nullptr
  const void* pe = nullptr;  // [H, l, D] or nullptr
  void* y = nullptr;         // contiguous [num_out_rows_total, H, Dout]
  const int* cu_seqlens = nullptr;  // [batch+1] or nullptr (padded)

  int batch = 0;
  int seqlen = 0;        // padded T (ignored when packed)
  index_t total_rows = 0;  // rows of x: packed total, or T (padded, per sequence)
  int heads = 0;
  int head_dim = 0;      // D
  int out_dim = 0;       // Dout (== D in mean mode)
  int block = 32;        // l
  int stride = 16;       // d

  // Rows of y per "batch item": padded Nc(T) (y has batch*Nc rows), packed total/d (one item).
  NSA_HOST_DEVICE index_t out_rows() const {
    return cu_seqlens ? total_rows / stride : static_cast<index_t>(batch) * num_compressed(seqlen, block, stride);
  }
  NSA_HOST_DEVICE bool linear() const { return w != nullptr; }
};

struct CompressBwdParams : CompressParams {
  const void* dy = nullptr;  // contiguous, shaped like y
  void* dx = nullptr;        // contiguous [rows of x, H, D]
  void* dw = nullptr;        // [H, l*D, Dout] (linear mode)
  void* dpe = nullptr;       // [H, l, D] (linear mode with pe)
  void* workspace = nullptr; // compress_bwd_workspace_bytes(*this) bytes, any content
};

// Rows of dA summed per partial of the deterministic dpe reduction.
constexpr int kCompressPeRowsPerChunk = 256;

// Scratch the backward needs (0 in mean mode): fp32 dA = dy @ W^T and partial pe sums.
size_t compress_bwd_workspace_bytes(const CompressParams& p);

#if defined(__CUDACC__) || defined(NSA_WITH_CUDA)
// Host-side dispatch to the compiled instantiations. Enqueue on `stream`, never synchronise.
Status compress_fwd_cuda(const CompressParams& p, DType dtype, cudaStream_t stream);
Status compress_bwd_cuda(const CompressBwdParams& p, DType dtype, cudaStream_t stream);

template <typename T>
Status run_compress_fwd(const CompressParams& p, cudaStream_t stream);
template <typename T>
Status run_compress_bwd(const CompressBwdParams& p, cudaStream_t stream);
#endif

}  // namespace nsa
