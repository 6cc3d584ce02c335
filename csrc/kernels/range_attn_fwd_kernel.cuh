// Forward kernel of the branches whose keys form one contiguous range per query: the
// compressed branch (compressed tokens [0, nvis(t))) and the sliding window (keys
// [t - w + 1, t]).
//
// The warps of a CTA own consecutive tokens of one KV head (each warp the 16-row layout of
// sparse_attn_common.cuh), so their key ranges nearly coincide: the CTA walks the union range
// once, loading every 32-key K/V tile cooperatively into a two-stage cp.async pipeline (the next
// tile streams in while the current one is multiplied), and each warp multiplies only the tiles
// its own tokens need. Compared with one private tile per warp, global / L2 traffic drops by
// the number of warps and load latency hides behind the tensor-core work. Key ranges and the
// pipeline (RangeKeys, range_tile_loop: attn_cta_walk.cuh) are shared with the dQ kernel.
#pragma once

#include "cmp_attn.h"
#include "attn_fwd_tile.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV>
struct RangeFwdConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded smem rows: conflict-free fragment loads
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kStageElems = kBlockN * kLdQK + kBlockN * kLdV;
  static constexpr int kSmemBytes = (kWarps * kRows * kLdQK + 2 * kStageElems) * 2;
};

template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
__global__ void __launch_bounds__(RangeFwdConfig<kHeadDim, kHeadDimV>::kThreads)
    range_attn_fwd_kernel(const AttnParams p) {
  using Cfg = RangeFwdConfig<kHeadDim, kHeadDimV>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem_raw) + warp * kRows * Cfg::kLdQK;
  T* sStage = reinterpret_cast<T*>(smem_raw) + Cfg::kWarps * kRows * Cfg::kLdQK;

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kWarps;
  Group gr;
  if (!group_of(p, cta_tokens, blockIdx.x, gr)) return;  // uniform over the CTA
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;

  Pass ps;
  for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const Pass wps = warp_pass(ps, warp, P);
    const bool warp_on = wps.p_begin < wps.p_end;

    const RangeKeys<kCompressed> rk(p, ps);
    const index_t kv_row_begin = rk.kv_row_begin, n_keys = rk.n_keys;
    // Key range of the CTA and of this warp, [lo, hi).
    index_t lo, hi, w_lo = 0, w_hi = 0;
    rk.tiles_of(p, ps.t0 + ps.p_begin, ps.t0 + ps.p_end - 1, lo, hi);
    if (warp_on) rk.tiles_of(p, wps.t0 + wps.p_begin, wps.t0 + wps.p_end - 1, w_lo, w_hi);
    const int n_tiles = hi > lo ? static_cast<int>((hi - lo + kBlockN - 1) / kBlockN) : 0;

    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;
    auto load_tile = [&](int it) {
      T* sK = sStage + (it & 1) * Cfg::kStageElems;
      T* sV = sK + kBlockN * Cfg::kLdQK;
      const index_t s0 = lo + static_cast<index_t>(it) * kBlockN;
      load_rows_cta<T, kHeadDim, kBlockN, Cfg::kThreads>(sK, Cfg::kLdQK, k, p.k_stride.row, kv_row_begin, s0, n_keys, tid);
      load_rows_cta<T, kHeadDimV, kBlockN, Cfg::kThreads>(sV, Cfg::kLdV, v, p.v_stride.row, kv_row_begin, s0, n_keys, tid);
    };

    load_query_rows_async<T, kHeadDim>(sQ, Cfg::kLdQK, q, p.q_stride, rm, wps, lane);
    if (n_tiles > 0) load_tile(0);
    mma::cp_async_commit();

    int row_tok[2];
    bool row_on[2];
    index_t row_lo[2], row_hi[2];  // keys [row_lo, row_hi) of the row's token
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8;
      row_tok[ri] = r / rm.heads;
      row_on[ri] = r < P * rm.heads && row_tok[ri] >= wps.p_begin && row_tok[ri] < wps.p_end;
      rk.row_keys(p, wps.t0 + row_tok[ri], row_on[ri], row_lo[ri], row_hi[ri]);
    }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o_acc[kHeadDimV / 8][4];
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

    range_tile_loop(n_tiles, load_tile, [&](int it) {
      const index_t s0 = lo + static_cast<index_t>(it) * kBlockN;
      if (warp_on && s0 < w_hi && s0 + kBlockN > w_lo) {
        const T* sK = sStage + (it & 1) * Cfg::kStageElems;
        const T* sV = sK + kBlockN * Cfg::kLdQK;
        const int lo0 = tile_offset(row_lo[0], s0), hi0 = tile_offset(row_hi[0], s0);
        const int lo1 = tile_offset(row_lo[1], s0), hi1 = tile_offset(row_hi[1], s0);
        fwd_tile<T, kHeadDim, kHeadDimV>(sQ, Cfg::kLdQK, sK, sV, Cfg::kLdV, scale_log2, m_run, l_run, o_acc, gid, tig,
                                         [&](int ri, int kk) {
                                           return ri == 0 ? kk >= lo0 && kk < hi0 : kk >= lo1 && kk < hi1;
                                         });
      }
    });

    fwd_epilogue<T, kHeadDimV>(p, rm, wps, row_tok, row_on, m_run, l_run, o_acc, gid, tig);
    __syncthreads();  // sQ and the stages are reused by the next pass
  }
}

template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
Status run_range_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  using Cfg = RangeFwdConfig<kHeadDim, kHeadDimV>;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return Status{2, "heads_q must be a multiple of heads_kv"};
  const int G = p.heads_q / p.heads_kv;
  const int tokens = (G >= kRows ? 1 : kRows / G) * Cfg::kWarps;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  const index_t items = cta_groups(p, tokens);
  if (items == 0) return Status{};
  const index_t grid_y = static_cast<index_t>(p.heads_kv) * chunks;
  if (grid_y > 65535) return Status{2, "too many KV heads x head chunks for one launch"};
  if (items > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  auto kernel = range_attn_fwd_kernel<T, kHeadDim, kHeadDimV, kCompressed>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  kernel<<<dim3(static_cast<unsigned>(items), static_cast<unsigned>(grid_y)), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

}  // namespace sparse_detail
}  // namespace nsa
