// Launch configuration of the compression family; included by the generated instantiation
// files (one per dtype and direction) and nowhere else.
#pragma once

#include <algorithm>

#include "compress_kernel.cuh"

namespace nsa {
namespace compress_detail {

inline int grid_for(index_t n, int threads) {
  // Grid-stride loops: cap the grid, each thread walks the rest.
  const index_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(blocks, 132 * 32)));
}

inline Status last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

inline index_t x_rows(const CompressParams& p) {
  return p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
}

inline index_t pe_chunks(const CompressParams& p) {
  return (p.out_rows() + kPeRowsPerChunk - 1) / kPeRowsPerChunk;
}

}  // namespace compress_detail

template <typename T>
Status run_compress_fwd(const CompressParams& p, cudaStream_t stream) {
  using namespace compress_detail;
  const index_t rows = p.out_rows();
  if (rows == 0 || p.heads == 0) return Status{};
  if (p.head_dim % kVec != 0 || p.head_dim / kVec > kMaxChunks) return Status{2, "head dim must be a multiple of 8, at most 256"};
  if (p.linear() && (p.head_dim % kBN != 0 || p.out_dim % kBN != 0)) return Status{2, "linear mode needs head dims that are multiples of 64"};
  if (!p.linear()) {
    const dim3 block(p.head_dim / kVec, kMeanTileRows);
    const dim3 grid(static_cast<unsigned>((rows + kMeanTileRows - 1) / kMeanTileRows), p.heads);
    compress_mean_fwd_kernel<T><<<grid, block, 0, stream>>>(p);
    return last_error();
  }
  const dim3 grid(static_cast<unsigned>((rows + kBM - 1) / kBM), p.out_dim / kBN, p.heads);
  compress_gemm_kernel<T, LinearFwdProblem<T>><<<grid, kThreads, 0, stream>>>(LinearFwdProblem<T>{p});
  return last_error();
}

template <typename T>
Status run_compress_bwd(const CompressBwdParams& p, cudaStream_t stream) {
  using namespace compress_detail;
  const index_t xr = x_rows(p);
  if (xr == 0 || p.heads == 0) {
    // No token at all: the parameter gradients are exactly zero (dx is empty).
    const size_t ld = static_cast<size_t>(p.block) * p.head_dim * p.heads;
    cudaError_t e = cudaSuccess;
    if (p.dw != nullptr) e = cudaMemsetAsync(p.dw, 0, ld * p.out_dim * sizeof(T), stream);
    if (e == cudaSuccess && p.dpe != nullptr) e = cudaMemsetAsync(p.dpe, 0, ld * sizeof(T), stream);
    return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
  }
  if (p.head_dim % kVec != 0) return Status{2, "head dim must be a multiple of 8"};
  if (p.linear() && (p.head_dim % kBN != 0 || p.out_dim % kBN != 0)) return Status{2, "linear mode needs head dims that are multiples of 64"};
  const index_t n = xr * p.heads * (p.head_dim / kVec);
  if (!p.linear()) {
    compress_mean_bwd_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(p);
    return last_error();
  }
  const index_t rows = p.out_rows();
  const index_t ld = static_cast<index_t>(p.block) * p.head_dim;
  if (rows > 0) {
    const dim3 grid_da(static_cast<unsigned>((rows + kBM - 1) / kBM), static_cast<unsigned>(ld / kBN), p.heads);
    compress_gemm_kernel<T, LinearBwdDAProblem<T>><<<grid_da, kThreads, 0, stream>>>(LinearBwdDAProblem<T>{p});
  }
  // dW over all rows (a zero-row problem still writes dW = 0).
  const dim3 grid_dw(static_cast<unsigned>(ld / kBM), p.out_dim / kBN, p.heads);
  compress_gemm_kernel<T, LinearBwdDWProblem<T>><<<grid_dw, kThreads, 0, stream>>>(LinearBwdDWProblem<T>{p});
  if (rows > 0) compress_linear_dx_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(p);
  else {
    const cudaError_t e = cudaMemsetAsync(p.dx, 0, static_cast<size_t>(n) * kVec * sizeof(T), stream);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  }
  if (p.dpe != nullptr) {
    const index_t cols = ld * p.heads;
    const int chunks = static_cast<int>(pe_chunks(p));
    float* partial = static_cast<float*>(p.workspace) + rows * cols;
    const unsigned col_blocks = static_cast<unsigned>((cols + 255) / 256);
    if (chunks > 0) compress_dpe_partial_kernel<<<dim3(col_blocks, chunks), 256, 0, stream>>>(p, partial);
    compress_dpe_reduce_kernel<T><<<col_blocks, 256, 0, stream>>>(p, partial, chunks);
  }
  return last_error();
}

}  // namespace nsa
