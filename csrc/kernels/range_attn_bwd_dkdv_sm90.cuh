// sm_90a dK / dV kernels of the contiguous-range branches (compressed, window) on the tile of
// attn_bwd_dkdv_sm90.cuh, and their launcher.
#pragma once

#include <cstdlib>

#include "attn_bwd_dkdv_sm90.cuh"
#include "attn_bwd_dkdv_sm90_tma.cuh"

namespace nsa {
namespace sparse_detail {

// Compressed (grid range_slots<128>(p) * H * splits) and window (splits = 1) dK / dV on the wide
// tile; the compressed reduce kernel adds the 128-key partials in chunk order.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, int kWarpGroups>
__global__ void __launch_bounds__(dkdv::WideCfg<kHeadDim, kHeadDimV, kWarpGroups>::kThreads,
                                  dkdv::WideCfg<kHeadDim, kHeadDimV, kWarpGroups>::kCtasPerSm)
    range_dkdv_sm90_wide_kernel(const AttnBwdParams p, int splits, float* ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  dkdv::range_dkdv_with<kHeadDim, kHeadDimV, kCompressed, dkdv::WideCfg<kHeadDim, kHeadDimV, kWarpGroups>::kTileKeys>(
      p, splits, ws, [&](const dkdv::TileArgs& a, float* partial) {
        dkdv::dkdv_tile_sm90_wide<T, kHeadDim, kHeadDimV, kWarpGroups>(p, a, partial, smem_raw);
      });
}

// The wide tile fed by a TMA producer warp (attn_bwd_dkdv_sm90_tma.cuh), the sm_90a default
// where the query rows' map can be encoded (NSA_DISABLE_TMA=1: the cp.async form above).
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
__global__ void __launch_bounds__(384, 1)
    range_dkdv_sm90_tma_kernel(const AttnBwdParams p, int splits, float* ws, const __grid_constant__ CUtensorMap tm_q,
                               const __grid_constant__ CUtensorMap tm_do) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  dkdv::range_dkdv_with<kHeadDim, kHeadDimV, kCompressed, 128>(p, splits, ws, [&](const dkdv::TileArgs& a, float* partial) {
    dkdv::dkdv_tile_sm90_tma<T, kHeadDim, kHeadDimV>(p, a, partial, smem_raw, &tm_q, &tm_do);
  });
}

// Map of the query-side rows (q or dout, [B, T, HQ, dim] or packed [total, HQ, dim]) with boxes of
// (64 columns, G heads, 64 / G tokens): one box is 64 rows of a step.
template <typename T>
bool encode_step_rows_map(CUtensorMap* map, const void* base, const Strides3& st, const AttnParams& p, int dim) {
  const int G = p.heads_q / p.heads_kv;
  const bool packed = p.cu_seqlens != nullptr;
  return tma::encode_rows_map<T>(map, base, packed ? 1 : p.batch, packed ? p.total_rows : p.seqlen, p.heads_q, dim,
                                 st.batch, st.row, st.head, G, 64 / G);
}

template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, int kTileKeys>
__global__ void __launch_bounds__(256) range_dkdv_wide_reduce_kernel(const AttnBwdParams p, int splits, const float* ws) {
  dkdv::range_reduce<T, kHeadDim, kHeadDimV, kCompressed, kTileKeys>(p, splits, ws);
}

// Launches the wide dK / dV (and, for split compressed tiles, its reduce kernel); false when it
// does not apply (head dims, device image without sm_90a, NSA_DKDV_WIDE=0, NSA_DISABLE_WGMMA):
// the caller runs its own kernel then. splits_allowed: the caller gave the partial workspace.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, int kWarpGroups = 2>
bool launch_range_dkdv_wide(const AttnBwdParams& p, bool splits_allowed, cudaStream_t stream, Status& st) {
  if constexpr (kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDim <= 128 && kHeadDimV <= 128) {
    if constexpr (kWarpGroups == 2) {  // NSA_DKDV_SM90_WGS=1: the one-warpgroup tile (A/B)
      const char* wgs = getenv("NSA_DKDV_SM90_WGS");
      if (wgs != nullptr && wgs[0] == '1')
        return launch_range_dkdv_wide<T, kHeadDim, kHeadDimV, kCompressed, 1>(p, splits_allowed, stream, st);
    }
    using C = dkdv::WideCfg<kHeadDim, kHeadDimV, kWarpGroups>;
    auto kernel = range_dkdv_sm90_wide_kernel<T, kHeadDim, kHeadDimV, kCompressed, kWarpGroups>;
    if (!dkdv::wide_dkdv_enabled() || !wgmma_kernel_usable(kernel)) return false;
    const index_t tiles = dkdv::range_slots<C::kTileKeys>(p) * p.heads_kv;
    const int splits = kCompressed && splits_allowed ? dkdv::range_splits<C::kTileKeys>(p) : 1;
    if (tiles * splits > INT32_MAX) {
      st = Status{2, "too many key tiles for one launch"};
      return true;
    }
    if (tiles > 0) {
      float* ws = static_cast<float*>(p.workspace);
      CUtensorMap tm_q{}, tm_do{};
      const int G = p.heads_q / p.heads_kv;
      // TMA: a step's 64 rows must start at a token, i.e. G divides 32 (chunks are cut at
      // multiples of 32 rows).
      const bool use_tma = kWarpGroups == 2 && tma::enabled() && G <= 32 && 32 % G == 0 &&
                           encode_step_rows_map<T>(&tm_q, p.q, p.q_stride, p, kHeadDim) &&
                           encode_step_rows_map<T>(&tm_do, p.dout, p.dout_stride, p, kHeadDimV);
      cudaError_t e;
      if (use_tma) {
        using TC = dkdv::TmaCfg<kHeadDim, kHeadDimV>;
        auto tma_kernel = range_dkdv_sm90_tma_kernel<T, kHeadDim, kHeadDimV, kCompressed>;
        e = cudaFuncSetAttribute(tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TC::kSmemBytes);
        if (e == cudaSuccess)
          tma_kernel<<<static_cast<unsigned>(tiles * splits), TC::kThreads, TC::kSmemBytes, stream>>>(p, splits, ws, tm_q,
                                                                                                      tm_do);
      } else {
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
        if (e == cudaSuccess) kernel<<<static_cast<unsigned>(tiles * splits), C::kThreads, C::kSmemBytes, stream>>>(p, splits, ws);
      }
      if (e != cudaSuccess) {
        st = Status{3, cudaGetErrorString(e)};
        return true;
      }
      if (splits > 1)
        range_dkdv_wide_reduce_kernel<T, kHeadDim, kHeadDimV, kCompressed, C::kTileKeys>
            <<<static_cast<unsigned>(tiles), 256, 0, stream>>>(p, splits, ws);
    }
    st = Status{};
    return true;
  } else {
    (void)p, (void)splits_allowed, (void)stream, (void)st;
    return false;
  }
}

}  // namespace sparse_detail
}  // namespace nsa
