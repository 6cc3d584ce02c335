// Host dispatch of the grouped sparse attention: runtime (dtype, Dk, Dv) -> instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_radix_sort.cuh>

#include "sparse_attn.h"
#include "sparse_attn_bwd_kernel.cuh"
#include "static_switch.h"

namespace nsa {

// Dv that goes with each compiled Dk (DESIGN §1: Dk = Dv, or Dk = 192 with Dv = 128).
constexpr int value_dim_for(int dk) { return dk == 192 ? 128 : dk; }

Status sparse_attn_fwd_cuda(const AttnParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim_v != value_dim_for(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] {
      return run_sparse_attn_fwd<T, kHeadDim, value_dim_for(kHeadDim)>(p, stream);
    });
  });
}

namespace {

__global__ void __launch_bounds__(256) sparse_bucket_pairs_kernel(const AttnParams p, int* keys, int* tokens) {
  const index_t rows = p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
  const index_t n = rows * p.heads_kv * p.top_n;
  const index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  if (e >= n) return;
  const int i = static_cast<int>(e % p.top_n);
  const index_t rg = e / p.top_n;
  const int g = static_cast<int>(rg % p.heads_kv);
  const index_t row = rg / p.heads_kv;
  int b, seq_len;
  index_t t, bi_row;
  if (p.cu_seqlens == nullptr) {
    b = static_cast<int>(row / p.seqlen);
    t = row % p.seqlen;
    seq_len = p.seqlen;
    bi_row = b * p.block_idx_stride.batch + t * p.block_idx_stride.row;
  } else {
    b = find_sequence(p.cu_seqlens, p.batch, row);
    const SeqGeom sg = b >= 0 ? seq_geom(p.cu_seqlens, b, 0, p.total_rows) : SeqGeom{0, 0};
    t = row - sg.row_begin;
    seq_len = sg.len;
    bi_row = row * p.block_idx_stride.row;
  }
  const int* list = p.block_idx + bi_row + static_cast<index_t>(g) * p.block_idx_stride.head;
  const int j = list[i];
  bool valid = b >= 0 && j >= 0 && static_cast<index_t>(j) * p.sel_block <= t && t < seq_len;
  for (int i2 = 0; valid && i2 < i; ++i2) valid = list[i2] != j;  // count each block once per row
  keys[e] = valid ? static_cast<int>(sparse_detail::bucket_of(p, b, g, j)) : static_cast<int>(sparse_detail::num_buckets(p));
  tokens[e] = static_cast<int>(t);
}

index_t num_pairs_of(const AttnParams& p) {
  const index_t rows = p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
  return rows * p.heads_kv * p.top_n;
}

int key_bits(const AttnParams& p) {  // bits of the largest key (the sentinel num_buckets)
  const index_t top = sparse_detail::num_buckets(p);
  int bits = 1;
  while (bits < 31 && (index_t{1} << bits) <= top) ++bits;
  return bits;
}

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

}  // namespace

size_t sparse_attn_bwd_workspace_bytes(const AttnParams& p) {
  if (p.mode != AttnMode::kSelected) return 0;
  const index_t n = num_pairs_of(p);
  if (n == 0) return 0;
  size_t temp = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                  static_cast<const int*>(nullptr), static_cast<int*>(nullptr), static_cast<int>(n), 0,
                                  key_bits(p));
  return align256(4 * static_cast<size_t>(n) * sizeof(int)) + temp;
}

Status sparse_attn_bwd_cuda(const AttnBwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim_v != value_dim_for(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return Status{2, "heads_q must be a multiple of heads_kv"};
  if (p.mode == AttnMode::kSelected && (p.sel_block <= 0 || p.sel_block % sparse_detail::kBlockN != 0))
    return Status{2, "sel_block must be a positive multiple of 32 on CUDA"};
  if (p.mode == AttnMode::kCompressed) return Status{2, "the sparse kernel runs the selected and window branches"};
  const int* sorted_keys = nullptr;
  const int* sorted_tokens = nullptr;
  index_t n = 0;
  if (p.mode == AttnMode::kSelected && (n = num_pairs_of(p)) > 0) {
    if (n > INT32_MAX) return Status{2, "too many (token, block) pairs for one backward"};
    int* keys_in = static_cast<int*>(p.workspace);
    int* toks_in = keys_in + n;
    int* keys_out = toks_in + n;
    int* toks_out = keys_out + n;
    const size_t head = align256(4 * static_cast<size_t>(n) * sizeof(int));
    size_t temp = sparse_attn_bwd_workspace_bytes(p) - head;
    sparse_bucket_pairs_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p, keys_in,
                                                                                                        toks_in);
    // LSD radix sort is stable: tokens stay ascending inside each block's list.
    const cudaError_t e = cub::DeviceRadixSort::SortPairs(static_cast<unsigned char*>(p.workspace) + head, temp, keys_in,
                                                          keys_out, toks_in, toks_out, static_cast<int>(n), 0,
                                                          key_bits(p), stream);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    sorted_keys = keys_out;
    sorted_tokens = toks_out;
  }
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] {
      return run_sparse_attn_bwd<T, kHeadDim, value_dim_for(kHeadDim)>(p, sorted_keys, sorted_tokens, n, stream);
    });
  });
}

}  // namespace nsa
