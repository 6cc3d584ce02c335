// Host dispatch of the grouped sparse attention: runtime (dtype, Dk, Dv) -> instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "sparse_attn.h"
#include "sel_split_walk.cuh"
#include "sparse_attn_bwd_kernel.cuh"
#include "static_switch.h"

namespace nsa {

// Dv that goes with each compiled Dk (DESIGN §1: Dk = Dv, or Dk = 192 with Dv = 128).
constexpr int value_dim_for(int dk) { return dk == 192 ? 128 : dk; }

size_t sel_group_flags_bytes(const AttnParams& p) {
  if (p.mode != AttnMode::kSelected || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return 0;
  return static_cast<size_t>(sparse_detail::cta_groups(p, sparse_detail::sel_flag_group_tokens(p))) * p.heads_kv;
}

namespace {

// AttnParams::sel_group_flags: one warp per (4-warp CTA group, KV head) decides whether the
// group's tokens share enough blocks for the union walk (flag 1), whose 4-warp CTAs walk the
// union of the group's lists once for all its tokens. Either choice gives the same output (up to
// the split walk's summation order), so this only decides speed:
// - where flag 0 runs the split walk (G >= 16, D <= 192): flag 1 iff the union of the group's
//   lists holds at most 1.4 lists' worth of blocks. H200, 64k, G = 16: the union walk costs
//   about its union (15.6 ms at 1.0 list) and the split walk 21.8 ms at any sharing, so they
//   cross near 1.4. The earlier test (half of each token's blocks repeat the previous token's)
//   sent queries correlated over 64 tokens (union 1.97 lists) to the union walk: forward 25.7 ms
//   instead of ~21 (session 14).
// - otherwise (flag 0 runs 2-warp union CTAs): flag 1 iff at least half of the listed blocks
//   repeat the previous token's (random queries: ~3 of 16, the forced blocks).
__global__ void __launch_bounds__(32) sel_group_flags_kernel(const AttnParams p) {
  const int group_tokens = sparse_detail::sel_flag_group_tokens(p);
  const int g = blockIdx.y, lane = threadIdx.x;
  sparse_detail::Group gr;
  if (!sparse_detail::group_of(p, group_tokens, blockIdx.x, gr)) return;
  const bool packed = p.cu_seqlens != nullptr;
  const index_t n_rows = packed ? p.total_rows : p.seqlen;
  const int rows = static_cast<int>(min(static_cast<index_t>(group_tokens), n_rows - gr.row0));
  const int* base = p.block_idx + (packed ? 0 : gr.b * p.block_idx_stride.batch) +
                    static_cast<index_t>(g) * p.block_idx_stride.head + gr.row0 * p.block_idx_stride.row;
  const bool vs_split = sparse_detail::sel_split_fits(p) && p.head_dim_qk <= 192;
  // vs_split: blocks not in any earlier token's list (the union); else: blocks in the previous one's.
  int counted = 0, listed = 0;
  for (int r = vs_split ? 0 : 1; r < rows; ++r) {
    const int* cur = base + r * p.block_idx_stride.row;
    for (int i0 = 0; i0 < p.top_n; i0 += 32) {
      const int a = i0 + lane < p.top_n ? __ldg(cur + i0 + lane) : -1;
      bool seen = false;
      for (int r2 = vs_split ? 0 : r - 1; r2 < r; ++r2) {
        const int* prev = base + r2 * p.block_idx_stride.row;
        for (int k = 0; k < p.top_n; ++k) seen |= __ldg(prev + k) == a;
      }
      counted += __popc(__ballot_sync(0xffffffffu, a >= 0 && (vs_split ? !seen : seen)));
      listed += __popc(__ballot_sync(0xffffffffu, a >= 0));
    }
  }
  const bool share = vs_split ? 5 * counted * rows <= 7 * listed : 2 * counted >= listed;
  if (lane == 0) p.sel_group_flags[static_cast<index_t>(blockIdx.x) * p.heads_kv + g] = share ? 1 : 0;
}


// Whether the selected walk of this call picks its width per group of tokens: it has the flags'
// memory and the width is not forced by `env` (an A/B switch read per call).
bool sel_width_adaptive(const AttnParams& p, const char* env) {
  const char* forced = getenv(env);
  return p.mode == AttnMode::kSelected && p.sel_group_flags != nullptr && p.top_n > 0 &&
         sel_group_flags_bytes(p) > 0 && !(forced != nullptr && forced[0] != '\0');
}

Status fill_sel_group_flags(const AttnParams& p, cudaStream_t stream) {
  const index_t groups = static_cast<index_t>(sel_group_flags_bytes(p)) / p.heads_kv;
  if (groups > 0x7fffffff || p.heads_kv > 65535) return Status{2, "too many tokens or KV heads for one launch"};
  sel_group_flags_kernel<<<dim3(static_cast<unsigned>(groups), static_cast<unsigned>(p.heads_kv)), 32, 0, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace

Status sparse_attn_fwd_cuda(const AttnParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim_v != value_dim_for(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  auto run = [&](const AttnParams& pp) {
    return NSA_DTYPE_SWITCH(dtype, T, [&] {
      return NSA_HEADDIM_SWITCH(pp.head_dim_qk, kHeadDim, [&] {
        return run_sparse_attn_fwd<T, kHeadDim, value_dim_for(kHeadDim)>(pp, stream);
      });
    });
  };
  if (!sel_width_adaptive(p, "NSA_SEL_FWD_WARPS")) {
    AttnParams one = p;
    one.sel_group_want = -1;
    return run(one);
  }
  const Status st = fill_sel_group_flags(p, stream);
  if (!st.ok()) return st;
  for (int want : {1, 0}) {
    AttnParams part = p;
    part.sel_group_want = want;
    const Status sp = run(part);
    if (!sp.ok()) return sp;
  }
  return Status{};
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

int bits_for(index_t top) {  // bits of the largest key value `top`
  int bits = 1;
  while (bits < 31 && (index_t{1} << bits) <= top) ++bits;
  return bits;
}

int key_bits(const AttnParams& p) { return bits_for(sparse_detail::num_buckets(p)); }  // sentinel = num_buckets

// Per bucket u: first index in the sorted pairs, and its work units (chunks of the list's rows
// times the block's 64-key sub-tiles; 0 for an empty list) as the key of the second sort.
__global__ void __launch_bounds__(256) sel_bucket_units_kernel(const int* sorted_keys, index_t n, index_t nb, int G,
                                                               index_t chunk_rows, int tpb, int* start, int* units,
                                                               int* ids) {
  const index_t u = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  if (u >= nb) return;
  const index_t s = sparse_detail::lower_bound(sorted_keys, n, static_cast<int>(u));
  const index_t e = sparse_detail::lower_bound(sorted_keys, n, static_cast<int>(u + 1));
  start[u] = static_cast<int>(s);
  if (u == nb - 1) start[nb] = static_cast<int>(e);
  const index_t rows = (e - s) * G;
  units[u] = static_cast<int>((rows + chunk_rows - 1) / chunk_rows) * tpb;
  ids[u] = static_cast<int>(u);
}

// map[base[k] .. base[k] + units[k]) = k: the dK/dV CTA of unit w finds its list in one load.
__global__ void __launch_bounds__(256) sel_work_map_kernel(const int* units, const int* base, index_t nb,
                                                           index_t bound, int* map) {
  const index_t k = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  if (k >= nb) return;
  const int n = units[k];
  for (int x = 0; x < n; ++x) {
    const index_t w = static_cast<index_t>(base[k]) + x;
    if (w < bound) map[w] = static_cast<int>(k);
  }
}

struct SelTemp {
  size_t sort_pairs = 0, sort_units = 0, scan = 0;
  size_t max() const { return std::max(sort_pairs, std::max(sort_units, scan)); }
};

SelTemp sel_temp_bytes(const AttnParams& p, index_t n, index_t nb, const dkdv::SelPlan& plan) {
  SelTemp t;
  cub::DeviceRadixSort::SortPairs(nullptr, t.sort_pairs, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                  static_cast<const int*>(nullptr), static_cast<int*>(nullptr), static_cast<int>(n), 0,
                                  key_bits(p));
  cub::DeviceRadixSort::SortPairsDescending(nullptr, t.sort_units, static_cast<const int*>(nullptr),
                                            static_cast<int*>(nullptr), static_cast<const int*>(nullptr),
                                            static_cast<int*>(nullptr), static_cast<int>(nb), 0,
                                            bits_for(plan.units_bound));
  cub::DeviceScan::ExclusiveSum(nullptr, t.scan, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                static_cast<int>(nb));
  return t;
}

}  // namespace

// Selected: the (block, token) pairs and their sort, the bucket arrays, the unit map and the
// fp32 partials of long lists (dkdv::SelPlan), then CUB's temporary storage. Compressed: the
// fp32 partials of split key tiles (dkdv::range_workspace_bytes). Window: nothing.
size_t sparse_attn_bwd_workspace_bytes(const AttnParams& p) {
  if (p.mode == AttnMode::kCompressed) return dkdv::range_workspace_bytes(p);
  if (p.mode != AttnMode::kSelected || p.heads_kv <= 0) return 0;
  const index_t n = num_pairs_of(p);
  if (n == 0) return 0;
  const index_t nb = sparse_detail::num_buckets(p);
  const dkdv::SelPlan plan = dkdv::sel_plan(p, n, nb);
  return plan.off_temp + sel_temp_bytes(p, n, nb, plan).max();
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
    if (p.workspace == nullptr) return Status{2, "the selected backward needs sparse_attn_bwd_workspace_bytes() of workspace"};
    const index_t nb = sparse_detail::num_buckets(p);
    if (nb + 1 > INT32_MAX) return Status{2, "too many (sequence, KV head, block) lists for one backward"};
    const dkdv::SelPlan plan = dkdv::sel_plan(p, n, nb);
    if (plan.units_bound > INT32_MAX) return Status{2, "too many (list, chunk) units for one backward"};
    unsigned char* ws = static_cast<unsigned char*>(p.workspace);
    int* keys_in = reinterpret_cast<int*>(ws);
    int* toks_in = keys_in + n;
    int* keys_out = toks_in + n;
    int* toks_out = keys_out + n;
    int* start = reinterpret_cast<int*>(ws + plan.off_buckets);
    int* units_in = start + (nb + 1);
    int* ids_in = units_in + nb;
    int* units = ids_in + nb;
    int* order = units + nb;
    int* base = order + nb;
    int* map = reinterpret_cast<int*>(ws + plan.off_map);
    unsigned char* temp = ws + plan.off_temp;
    const SelTemp tb = sel_temp_bytes(p, n, nb, plan);

    sparse_bucket_pairs_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p, keys_in, toks_in);
    // LSD radix sort is stable: tokens stay ascending inside each block's list.
    size_t bytes = tb.sort_pairs;
    cudaError_t e = cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, toks_in, toks_out,
                                                    static_cast<int>(n), 0, key_bits(p), stream);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    sel_bucket_units_kernel<<<static_cast<unsigned>((nb + 255) / 256), 256, 0, stream>>>(
        keys_out, n, nb, p.heads_q / p.heads_kv, plan.chunk_rows, plan.tpb, start, units_in, ids_in);
    // Longest lists first (stable: equal lengths keep bucket order), so the dK/dV grid runs them
    // first and the lists with partials occupy units [0, max_partials).
    bytes = tb.sort_units;
    e = cub::DeviceRadixSort::SortPairsDescending(temp, bytes, units_in, units, ids_in, order, static_cast<int>(nb), 0,
                                                  bits_for(plan.units_bound), stream);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    bytes = tb.scan;
    e = cub::DeviceScan::ExclusiveSum(temp, bytes, units, base, static_cast<int>(nb), stream);
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    e = cudaMemsetAsync(map, 0xff, static_cast<size_t>(plan.units_bound) * sizeof(int), stream);  // -1: no unit
    if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
    sel_work_map_kernel<<<static_cast<unsigned>((nb + 255) / 256), 256, 0, stream>>>(units, base, nb,
                                                                                      plan.units_bound, map);
    sorted_keys = keys_out;
    sorted_tokens = toks_out;
  }
  // dQ of the selected walk: per-group widths as the forward (run_sparse_attn_bwd reads the flags).
  AttnBwdParams pq = p;
  pq.sel_group_want = -1;
  if (sel_width_adaptive(p, "NSA_SEL_DQ_WARPS")) {
    const Status st = fill_sel_group_flags(p, stream);
    if (!st.ok()) return st;
  } else {
    pq.sel_group_flags = nullptr;
  }
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(pq.head_dim_qk, kHeadDim, [&] {
      return run_sparse_attn_bwd<T, kHeadDim, value_dim_for(kHeadDim)>(pq, sorted_keys, sorted_tokens, n, stream);
    });
  });
}

}  // namespace nsa
