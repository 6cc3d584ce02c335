// The per-tile step and the epilogue of the flash-attention forward, shared by the
// contiguous-range kernel (compressed branch, window) and the selected-block kernel. A warp owns
// 16 query rows (sparse_attn_common.cuh's layout); thread (gid, tig) holds rows gid and gid + 8.
#pragma once

#include "attn_cta_walk.cuh"
#include "warp_merge.cuh"

namespace nsa {
namespace sparse_detail {

// One tile of kKeys keys (32, or 16 for the split walk): S = Q K^T, keys with !keep(ri, kk)
// masked (kk: key offset inside the tile, so masks are 32-bit compares), online-softmax rescale,
// O += P V. Scores stay unscaled; the scale is folded into the exponent.
template <typename T, int kHeadDim, int kHeadDimV, int kKeys = 32, class Keep>
__device__ __forceinline__ void fwd_tile(const T* sQ, int ldq, const T* sK, const T* sV, int ldv, float scale_log2, float (&m_run)[2], float (&l_run)[2],
                                         float (&o_acc)[kHeadDimV / 8][4], int gid, int tig, Keep&& keep) {
  constexpr int kN = kKeys / 8;
  float s_acc[kN][4] = {};
  gemm_16x32_nt<T, kHeadDim, kKeys>(s_acc, sQ, ldq, sK, ldq, gid, tig);
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s_acc[n][ri * 2 + e];
        x = keep(ri, n * 8 + 2 * tig + e) ? x : -INFINITY;
        mx = fmaxf(mx, x);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_run[ri], mx);
    // All keys so far masked: keep everything at zero (no inf - inf).
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f((m_run[ri] - m_use) * scale_log2);
    m_run[ri] = m_new;
    float rs = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s_acc[n][ri * 2 + e];
        x = exp2f((x - m_use) * scale_log2);
        rs += x;
      }
    l_run[ri] = l_run[ri] * alpha + rs;
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n) {
      o_acc[n][ri * 2] *= alpha;
      o_acc[n][ri * 2 + 1] *= alpha;
    }
  }
  gemm_16x32_regs_nn<T, kHeadDimV, kKeys>(o_acc, s_acc, sV, ldv, gid, tig);
}

// Normalise and write o [.., HQ, Dv] and lse (fp32, heads contiguous) of the warp's rows that
// are on; row r = (token slot r / heads of the warp's pass, head head0 + r % heads).
template <typename T, int kHeadDimV>
__device__ __forceinline__ void fwd_epilogue(const AttnParams& p, const RowMap& rm, const Pass& wps,
                                             const int (&row_tok)[2], const bool (&row_on)[2], const float (&m_run)[2],
                                             const float (&l_run)[2], const float (&o_acc)[kHeadDimV / 8][4], int gid,
                                             int tig) {
  const bool packed = p.cu_seqlens != nullptr;
  T* o = static_cast<T*>(p.o) + (packed ? 0 : wps.b * p.o_stride.batch);
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float lsum = l_run[ri];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    if (!row_on[ri]) continue;
    const int r = gid + ri * 8;
    const index_t t = wps.t0 + row_tok[ri];
    const int hq = rm.head0 + r % rm.heads;
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    T* orow = o + (wps.row_begin + t) * p.o_stride.row + static_cast<index_t>(hq) * p.o_stride.head;
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * tig) =
          mma::pack2<T>(o_acc[n][ri * 2] * inv, o_acc[n][ri * 2 + 1] * inv);
    if (tig == 0)
      p.lse[(packed ? 0 : wps.b * p.lse_batch_stride) + (wps.row_begin + t) * p.lse_row_stride + hq] =
          lsum > 0.f ? m_run[ri] * p.scale + logf(lsum) : -INFINITY;
  }
}

}  // namespace sparse_detail
}  // namespace nsa
