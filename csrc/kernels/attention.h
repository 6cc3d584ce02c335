// Parameters of the attention families (DESIGN.md §1.2-§1.6, §1.8), torch-free.
// All three branches are "softmax attention of query row t, head h over a key set K(t, h)":
//   compressed:  K = compressed tokens i with i*d + l - 1 <= t              (§1.2)
//   selected:    K = union of blocks block_idx[t, h/G, :] (-1 skipped), keys s <= t   (§1.5)
//   window:      K = keys max(0, t-w+1) .. t                                 (§1.6)
// Layouts (last dim contiguous; strides in elements; B = batch, T = padded length):
//   q    [B, T, HQ, Dk]  or packed [total, HQ, Dk] with cu_seqlens [B+1]
//   k    [B, Tk, H, Dk], v [B, Tk, H, Dv]   Tk = T, or Nc(T) for compressed keys; packed:
//        [total, H, D], compressed keys packed as [total/d, H, D] (sequence b at row cu[b]/d)
//   o    [.., HQ, Dv] like q;   lse fp32 [B, T, HQ] or [total, HQ] (natural log; -inf: no key)
//   block_idx int32 [B, T, H, n] or [total, H, n], sorted ascending, -1 padded
#pragma once

#include "nsa_common.h"

namespace nsa {

enum class AttnMode : int { kCompressed = 0, kSelected = 1, kWindow = 2 };

struct Strides3 {  // batch / row / head strides of a [B, T, H, D] (or [total, H, D]) tensor
  index_t batch = 0, row = 0, head = 0;
};

struct AttnParams {
  const void* q = nullptr;  Strides3 q_stride;
  const void* k = nullptr;  Strides3 k_stride;
  const void* v = nullptr;  Strides3 v_stride;
  void* o = nullptr;        Strides3 o_stride;
  float* lse = nullptr;     index_t lse_batch_stride = 0, lse_row_stride = 0;  // heads contiguous

  const int* cu_seqlens = nullptr;  // [batch+1] or nullptr (padded)
  int batch = 0;
  int seqlen = 0;          // padded T (ignored when packed)
  index_t total_rows = 0;  // packed: total tokens; padded: T
  int heads_q = 0, heads_kv = 0;  // HQ, H (G = HQ / H)
  int head_dim_qk = 0, head_dim_v = 0;
  float scale = 0.f;
  double scale_fp64 = 0.0;  // the caller's scale unrounded (CPU fp64 path); 0 = use `scale`

  AttnMode mode = AttnMode::kWindow;
  // compressed branch
  int cmp_block = 32, cmp_stride = 16;
  int seqlen_k_cmp = 0;    // padded: Nc(T), rows of k per batch item
  // selected branch
  const int* block_idx = nullptr;  Strides3 block_idx_stride;
  int top_n = 0, sel_block = 64;
  // Selected forward and dQ: per CTA group of the 4-warp walk and KV head, whether its tokens'
  // lists overlap (1: one walk over their union) or not (0: two-warp CTAs); sparse_attn_fwd_cuda /
  // sparse_attn_bwd_cuda fill it when given sel_group_flags_bytes(p) bytes here. nullptr: 4-warp
  // CTAs throughout.
  unsigned char* sel_group_flags = nullptr;
  int sel_group_want = -1;  // the flag value one launch handles (-1: every group)
  // window branch
  int window = 512;
};

struct AttnBwdParams : AttnParams {
  const void* dout = nullptr;  Strides3 dout_stride;  // like o
  const float* dlse = nullptr;  // optional gradient of lse (layout of lse), nullptr = zero
  void* dq = nullptr;  Strides3 dq_stride;
  // optional, like dq: the kernels write dq = dq_acc + their dq (the sum in fp32, one rounding)
  const void* dq_acc = nullptr;  Strides3 dq_acc_stride;
  void* dk = nullptr;  Strides3 dk_stride;
  void* dv = nullptr;  Strides3 dv_stride;
  // rowsum(dout * out) - dlse per (token, query head), fp32, layout of lse (CUDA kernels).
  const float* delta = nullptr;
  void* workspace = nullptr;  // sparse_attn_bwd_workspace_bytes() bytes (selected mode)
};

// The backward's per-row constant delta = rowsum(dout * out) - dlse (FlashAttention's
// dot(dO, O)), fp32, in one pass over dout and out: ATen's form (upcast both, multiply, sum)
// moved ~6 full-size tensors per branch.
struct BwdDeltaParams {
  const void* dout = nullptr; Strides3 dout_stride;  // [B, T, HQ, Dv] / [total, HQ, Dv], rows 16-byte aligned
  const void* out = nullptr;  Strides3 out_stride;   // like dout
  const float* dlse = nullptr;  // contiguous [B, T, HQ] / [total, HQ], or nullptr (zero)
  float* delta = nullptr;       // contiguous, shape of dlse
  index_t batch = 0, rows = 0;  // padded: B, T; packed: 1, total
  int heads = 0, dim = 0;       // dim (Dv): multiple of 8
};

// Block scoring + top-n selection (§1.3-§1.4) from the compressed branch's lse.
struct SelectParams {
  const void* q = nullptr;    Strides3 q_stride;     // [.., HQ, Dk]
  const void* k_cmp = nullptr; Strides3 k_stride;    // compressed keys, layout as above
  const float* lse = nullptr; index_t lse_batch_stride = 0, lse_row_stride = 0;
  int* block_idx = nullptr;   Strides3 block_idx_stride;  // [.., H, n]
  const int* cu_seqlens = nullptr;
  int batch = 0, seqlen = 0;  index_t total_rows = 0;
  int heads_q = 0, heads_kv = 0, head_dim_qk = 0;
  float scale = 0.f;
  double scale_fp64 = 0.0;  // as in AttnParams
  int cmp_block = 32, cmp_stride = 16, sel_block = 64, top_n = 16, init_blocks = 1, local_blocks = 2;
  int seqlen_k_cmp = 0;       // padded: Nc(T)
};

// One decoding step (§1.8): the newest token of each sequence against its cache.
struct DecodeParams {
  const void* q = nullptr;  index_t q_batch_stride = 0, q_head_stride = 0;   // [B, HQ, Dk]
  const void* k_cache = nullptr;  Strides3 k_stride;    // [B, S, H, Dk]
  const void* v_cache = nullptr;  Strides3 v_stride;    // [B, S, H, Dv]
  const void* k_cmp = nullptr;    Strides3 kc_stride;   // [B, Sc, H, Dk]
  const void* v_cmp = nullptr;    Strides3 vc_stride;   // [B, Sc, H, Dv]
  const int* cache_seqlens = nullptr;  // [B]: tokens in the cache including the new one
  const void* g_cmp = nullptr; const void* g_slc = nullptr; const void* g_win = nullptr;  // [B, HQ]
  index_t g_batch_stride = 0;  // gates: heads contiguous, same batch stride for all three
  void* o = nullptr;  index_t o_batch_stride = 0, o_head_stride = 0;         // [B, HQ, Dv]
  int batch = 0, cache_len = 0, cache_len_cmp = 0;  // S, Sc
  int heads_q = 0, heads_kv = 0, head_dim_qk = 0, head_dim_v = 0;
  float scale = 0.f;
  double scale_fp64 = 0.0;  // as in AttnParams
  int cmp_block = 32, cmp_stride = 16, sel_block = 64, top_n = 16, init_blocks = 1, local_blocks = 2, window = 512;
};

}  // namespace nsa
