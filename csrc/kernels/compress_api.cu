// Host dispatch of the compression family: runtime dtype -> compiled instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "compress.h"
#include "static_switch.h"

namespace nsa {

size_t compress_bwd_workspace_bytes(const CompressParams& p) {
  if (!p.linear()) return 0;
  const index_t cols = static_cast<index_t>(p.block) * p.head_dim * p.heads;
  const index_t rows = p.out_rows();
  const index_t chunks = (rows + kCompressPeRowsPerChunk - 1) / kCompressPeRowsPerChunk;
  return static_cast<size_t>((rows + chunks) * cols) * sizeof(float);
}

Status compress_fwd_cuda(const CompressParams& p, DType dtype, cudaStream_t stream) {
  return NSA_DTYPE_SWITCH(dtype, T, [&] { return run_compress_fwd<T>(p, stream); });
}

Status compress_bwd_cuda(const CompressBwdParams& p, DType dtype, cudaStream_t stream) {
  return NSA_DTYPE_SWITCH(dtype, T, [&] { return run_compress_bwd<T>(p, stream); });
}

}  // namespace nsa
