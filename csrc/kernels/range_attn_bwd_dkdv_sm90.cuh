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

// The wide tile fed by TMA (attn_bwd_dkdv_sm90_tma.cuh), the sm_90a default where the maps
// encode (NSA_DISABLE_TMA=1: the cp.async form above).
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
__global__ void __launch_bounds__(384, 1)
    range_dkdv_sm90_tma_kernel(const AttnBwdParams p, int splits, float* ws, const __grid_constant__ dkdv::TmaMaps maps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  dkdv::range_dkdv_with<kHeadDim, kHeadDimV, kCompressed, 128>(p, splits, ws, [&](const dkdv::TileArgs& a, float* partial) {
    dkdv::dkdv_tile_sm90_tma<T, kHeadDim, kHeadDimV>(p, a, partial, smem_raw, maps);
  });
}

// The TMA tile's maps: keys in boxes of 128, q / dout rows with boxes of (64 columns, G heads,
// 64 / G tokens) (a step's 64 rows), lse / delta with boxes of (G heads, 64 / G tokens). False
// where TMA cannot describe one of them, and unless G is 4, 8, 16 or 32: a step must start at a
// token (chunks are cut at multiples of 32 rows) and a box row of lse must be 16 bytes.
template <typename T, bool kCompressed>
bool encode_dkdv_tma_maps(dkdv::TmaMaps& m, const AttnBwdParams& p) {
  const int G = p.heads_q / p.heads_kv;
  if (G < 4 || G > 32 || 32 % G != 0 || p.delta == nullptr || p.lse == nullptr) return false;
  if (!tma::encode_kv_tile_maps<T, kCompressed>(m.kv, p, 128)) return false;
  const bool packed = p.cu_seqlens != nullptr;
  const index_t batch = packed ? 1 : p.batch, rows = packed ? p.total_rows : p.seqlen;
  return tma::encode_rows_map<T>(&m.q, p.q, batch, rows, p.heads_q, p.head_dim_qk, p.q_stride.batch, p.q_stride.row,
                                 p.q_stride.head, G, 64 / G) &&
         tma::encode_rows_map<T>(&m.dout, p.dout, batch, rows, p.heads_q, p.head_dim_v, p.dout_stride.batch,
                                 p.dout_stride.row, p.dout_stride.head, G, 64 / G) &&
         tma::encode_stat_map(&m.lse, p.lse, batch, rows, p.heads_q, p.lse_batch_stride, p.lse_row_stride,
                              G, 64 / G) &&
         tma::encode_stat_map(&m.delta, p.delta, batch, rows, p.heads_q, p.lse_batch_stride, p.lse_row_stride,
                              G, 64 / G);
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
      dkdv::TmaMaps maps{};
      const bool use_tma = kWarpGroups == 2 && encode_dkdv_tma_maps<T, kCompressed>(maps, p);
      cudaError_t e;
      if (use_tma) {
        using TC = dkdv::TmaCfg<kHeadDim, kHeadDimV>;
        auto tma_kernel = range_dkdv_sm90_tma_kernel<T, kHeadDim, kHeadDimV, kCompressed>;
        e = cudaFuncSetAttribute(tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TC::kSmemBytes);
        if (e == cudaSuccess)
          tma_kernel<<<static_cast<unsigned>(tiles * splits), TC::kThreads, TC::kSmemBytes, stream>>>(p, splits, ws, maps);
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
