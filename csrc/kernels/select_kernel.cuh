// Kernel body of block scoring + top-n selection (DESIGN.md §1.3-1.4; see cmp_attn.h), sm_80.
//
// A warp owns the 16 query rows of the attention kernels' layout (the G heads of 16/G
// consecutive tokens, or 16 heads of one token per chunk when G > 16) and walks the compressed
// keys in 32-key tiles:
//   1. S = Q K_c^T on the tensor cores (mma.sync), P = exp(scale S - lse) per row, masked to the
//      keys the row's token may see;
//   2. P summed over the heads of each token (shared memory, fixed head order);
//   3, 4. block sums and the running top-n lists: SelectWarpLists (select_lists.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cmp_attn.h"
#include "cmp_attn_fwd_kernel.cuh"
#include "select_lists.cuh"

namespace nsa {
namespace sparse_detail {

constexpr int kSelectTileKeys = 32;  // compressed keys per step (one gemm_16x32_nt)
constexpr int kSelectMaxWarps = 4;

struct SelectShape {
  int tokens;  // tokens per warp: 16/G, or 1 when G >= 16
  int chunks;  // 16-head chunks per token (G > 16), else 1
  int heads;   // heads per token in one chunk
};

__host__ __device__ inline SelectShape select_shape(int G) {
  SelectShape s;
  s.tokens = G >= kRows ? 1 : kRows / G;
  s.chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  s.heads = G >= kRows ? kRows : G;
  return s;
}

// Per-warp shared memory: q rows [chunks*16][kLd] (T), P rows [16][33] (f32), then the lists
// (SelectListLayout). After the warps: two stages of the CTA's key tile [32][kLd] (T).
template <int kHeadDim>
struct SelectLayout {
  static constexpr int kLd = kHeadDim + 8;  // +16 bytes per row: conflict-free fragment reads
  static constexpr int kLdS = kSelectTileKeys + 1;
  int q_elems;
  size_t s_off, bytes;
  SelectListLayout<kSelectTileKeys, kSelectRing> lists;
  __host__ __device__ SelectLayout(int G, int n)
      : q_elems(select_shape(G).chunks * kRows * kLd),
        s_off(static_cast<size_t>(q_elems) * 2),
        lists(s_off + kRows * kLdS * 4, select_shape(G).tokens, n) {
    bytes = (lists.end + 15) / 16 * 16;
  }
};

// cp.async of rows [s0, s0 + kTileRows) by the `nthreads` threads of the CTA; rows outside
// [0, n_rows) are zero-filled without being read.
template <typename T, int kDim, int kTileRows>
__device__ __forceinline__ void load_rows_cta_n(T* dst, int ld, const T* base, index_t row_stride, index_t row_begin,
                                                index_t s0, index_t n_rows, int tid, int nthreads) {
  constexpr int kVec = kDim / 8;
  if (nthreads % kVec == 0) {  // a fixed column per thread: one 64-bit address per tile
    const int step = nthreads / kVec, r0 = tid / kVec, c = (tid % kVec) * 8;
    const T* src = base + (row_begin + s0 + r0) * row_stride + c;
    const index_t src_step = static_cast<index_t>(step) * row_stride;
    const index_t rows_left = n_rows - s0 - r0;  // rows r0, r0 + step, ... exist while < this
    for (int r = r0, x = 0; r < kTileRows; r += step, x += step, src += src_step) {
      const bool on = s0 + r >= 0 && x < rows_left;
      mma::cp_async_16(dst + r * ld + c, on ? src : base, on);
    }
    return;
  }
  for (int i = tid; i < kTileRows * kVec; i += nthreads) {
    const int r = i / kVec, c = (i % kVec) * 8;
    const index_t s = s0 + r;
    const bool on = s >= 0 && s < n_rows;
    mma::cp_async_16(dst + r * ld + c, on ? base + (row_begin + s) * row_stride + c : base, on);
  }
}

// acc[nt] (16 x 8) += A (16 x kDim) * B[nt*8 .. nt*8+7]^T with a 16-row B tile, both row-major
// in shared memory with 16-byte aligned rows (ldmatrix fragments, as gemm_16x32_nt).
template <typename T, int kDim>
__device__ __forceinline__ void gemm_16x16_nt(float (&acc)[2][4], const T* sA, int lda, const T* sB, int ldb, int lane) {
  const int mat = lane >> 3, row8 = lane & 7;
  const T* a_row = sA + ((mat & 1) * 8 + row8) * lda + (mat >> 1) * 8;
  const T* b_row = sB + ((mat >> 1) * 8 + row8) * ldb + (mat & 1) * 8;
#pragma unroll
  for (int k0 = 0; k0 < kDim; k0 += 16) {
    uint32_t a[4], bq[4];
    mma::ldmatrix_x4(a, a_row + k0);
    mma::ldmatrix_x4(bq, b_row + k0);
    const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
    mma::m16n8k16<T>(acc[0], a, b0);
    mma::m16n8k16<T>(acc[1], a, b1);
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSelectMaxWarps * 32, 4) select_blocks_kernel(const SelectParams sp) {
  using Layout = SelectLayout<kHeadDim>;
  constexpr int kLd = Layout::kLd, kLdS = Layout::kLdS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int G = sp.heads_q / sp.heads_kv, g = blockIdx.y, n = sp.top_n;
  const SelectShape sh = select_shape(G);
  const Layout lay(G, n);
  unsigned char* base = smem_raw + warp * lay.bytes;
  T* sQ = reinterpret_cast<T*>(base);
  T* sStage = reinterpret_cast<T*>(smem_raw + warps * lay.bytes);
  float* sS = reinterpret_cast<float*>(base + lay.s_off);
  float* sP = reinterpret_cast<float*>(base + lay.lists.p_off);

  const AttnParams geo = select_batch_geometry(sp);
  Group gr;
  const int cta_tokens = sh.tokens * warps;
  if (!group_of(geo, cta_tokens, blockIdx.x, gr)) return;  // uniform over the CTA
  const bool packed = sp.cu_seqlens != nullptr;
  const int l = sp.cmp_block, d = sp.cmp_stride;
  const float scale_log2 = sp.scale * kLog2e;

  Pass cps;
  for (int pb = 0; next_pass(geo, cta_tokens, gr, pb, 0, cps); pb = cps.p_end) {
    // The CTA walks the key tiles of its whole pass; `ps` is this warp's slice of it.
    Pass ps = cps;
    ps.t0 = cps.t0 + warp * sh.tokens;
    ps.p_begin = max(cps.p_begin - warp * sh.tokens, 0);
    ps.p_end = min(cps.p_end - warp * sh.tokens, sh.tokens);
    const bool warp_on = ps.p_begin < ps.p_end;
    if (!warp_on) ps.p_begin = ps.p_end = 0;
    const int b = ps.b;
    const index_t row_begin = ps.row_begin, t0 = ps.t0;
    const int nc = num_compressed(ps.seq_len, l, d);
    const index_t kv_begin = packed ? compressed_row_begin(sp.cu_seqlens, b, sp.total_rows, d) : 0;
    const T* q = static_cast<const T*>(sp.q) + (packed ? 0 : b * sp.q_stride.batch);
    const T* kc = static_cast<const T*>(sp.k_cmp) + (packed ? 0 : b * sp.k_stride.batch) +
                  static_cast<index_t>(g) * sp.k_stride.head;
    const index_t lse_b = packed ? 0 : b * sp.lse_batch_stride;

    // q rows of every chunk: row c*16 + r = (token r / heads, head c*16 + r % heads).
    constexpr int kVec = kHeadDim / 8;
    for (int i = lane; i < sh.chunks * kRows * kVec; i += 32) {
      const int rr = i / kVec, c = (i % kVec) * 8;
      const int chunk = rr / kRows, r = rr % kRows;
      const int tok = r / sh.heads, h = chunk * kRows + r % sh.heads;
      const bool on = tok >= ps.p_begin && tok < ps.p_end && r < sh.tokens * sh.heads && h < G;
      const T* src = on ? q + (row_begin + t0 + tok) * sp.q_stride.row +
                              static_cast<index_t>(g * G + h) * sp.q_stride.head + c
                        : q;
      mma::cp_async_16(sQ + rr * kLd + c, src, on);
    }
    mma::cp_async_commit();
    SelectWarpLists<kSelectTileKeys, kSelectRing, /*kPerLaneWork=*/false> lists(sp, base, lay.lists, sh.tokens, ps.p_begin, ps.p_end, t0, nc, lane);
    // Rows of the current chunk: visible keys and lse (log2 units; +inf for rows that are off).
    index_t row_nv[2];
    float row_lse[2];
    auto row_state = [&](int chunk) {
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        const int r = gid + ri * 8;
        const int tok = r / sh.heads, h = chunk * kRows + r % sh.heads;
        const bool on = r < sh.tokens * sh.heads && h < G && tok >= ps.p_begin && tok < ps.p_end;
        row_nv[ri] = 0;
        row_lse[ri] = INFINITY;
        if (on) {
          row_nv[ri] = num_visible(t0 + tok, nc, l, d);
          const float x = sp.lse[lse_b + (row_begin + t0 + tok) * sp.lse_row_stride + g * G + h];
          row_lse[ri] = x == -INFINITY ? INFINITY : x * kLog2e;
        }
      }
    };
    row_state(0);
    const bool pow2_heads = (sh.heads & (sh.heads - 1)) == 0;
    // Columns of the keys-major product held by this thread: query rows 2tig, 2tig+1, 2tig+8,
    // 2tig+9 of the current chunk (index nt * 2 + e).
    index_t col_nv[4];
    float col_lse[4];
    auto col_state = [&](int chunk) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = (c >> 1) * 8 + 2 * tig + (c & 1);
        const int tok = r / sh.heads, h = chunk * kRows + r % sh.heads;
        const bool on = r < sh.tokens * sh.heads && h < G && tok >= ps.p_begin && tok < ps.p_end;
        col_nv[c] = 0;
        col_lse[c] = INFINITY;
        if (on) {
          col_nv[c] = num_visible(t0 + tok, nc, l, d);
          const float x = sp.lse[lse_b + (row_begin + t0 + tok) * sp.lse_row_stride + g * G + h];
          col_lse[c] = x == -INFINITY ? INFINITY : x * kLog2e;
        }
      }
    };
    if (pow2_heads) col_state(0);
    const index_t nvis_cta = num_visible(cps.t0 + cps.p_end - 1, nc, l, d);
    const index_t nvis_warp = warp_on ? num_visible(t0 + ps.p_end - 1, nc, l, d) : 0;
    const int n_tiles = static_cast<int>((nvis_cta + kSelectTileKeys - 1) / kSelectTileKeys);
    auto load_tile = [&](int it) {
      load_rows_cta_n<T, kHeadDim, kSelectTileKeys>(sStage + (it & 1) * kSelectTileKeys * kLd, kLd, kc, sp.k_stride.row,
                                                    kv_begin, static_cast<index_t>(it) * kSelectTileKeys, nc,
                                                    threadIdx.x, blockDim.x);
    };
    if (n_tiles > 0) load_tile(0);
    mma::cp_async_commit();
    for (int it = 0; it < n_tiles; ++it) {
      if (it + 1 < n_tiles) {
        load_tile(it + 1);
        mma::cp_async_commit();
        mma::cp_async_wait<1>();
      } else {
        mma::cp_async_wait_all();
      }
      __syncthreads();
      const index_t s0 = static_cast<index_t>(it) * kSelectTileKeys;
      // Warps whose tokens see no key of the tile skip it, but every thread reaches the
      // same barrier below.
      if (s0 < nvis_warp) {
        const T* sK = sStage + (it & 1) * kSelectTileKeys * kLd;

        // Power-of-two head counts: S^T = K_c Q^T (keys as the mma rows, query rows as the
        // columns), so the heads of a token are neighbouring columns of one thread and its quad:
        // summed in registers with at most two shuffles, in a fixed order.
        for (int chunk = 0; pow2_heads && chunk < sh.chunks; ++chunk) {
          if (chunk > 0) col_state(chunk);
          int col_vis[4];  // keys of this tile each column's token sees (32-bit compares below)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            col_vis[c] = static_cast<int>(min(col_nv[c] - s0, static_cast<index_t>(kSelectTileKeys)));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            float st[2][4] = {};
            gemm_16x16_nt<T, kHeadDim>(st, sK + mt * 16 * kLd, kLd, sQ + chunk * kRows * kLd, kLd, lane);
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {  // key rows gid, gid + 8
              const int kk = mt * 16 + gid + h2 * 8;
              float v[2][2];  // [nt][e]
#pragma unroll
              for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const int c = nt * 2 + e;
                  v[nt][e] = kk < col_vis[c] ? exp2f(st[nt][h2 * 2 + e] * scale_log2 - col_lse[c]) : 0.f;
                }
              if (sh.heads == 1) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                  for (int e = 0; e < 2; ++e) sP[(nt * 8 + 2 * tig + e) * kSelectTileKeys + kk] = v[nt][e];
                continue;
              }
              float u[2] = {v[0][0] + v[0][1], v[1][0] + v[1][1]};  // heads 2tig, 2tig+1 of each half
              if (sh.heads >= 4) {
                u[0] += __shfl_xor_sync(0xffffffffu, u[0], 1);
                u[1] += __shfl_xor_sync(0xffffffffu, u[1], 1);
              }
              if (sh.heads >= 8) {
                u[0] += __shfl_xor_sync(0xffffffffu, u[0], 2);
                u[1] += __shfl_xor_sync(0xffffffffu, u[1], 2);
              }
              if (sh.heads == 16) {
                if (tig == 0) {
                  float* dst = sP + kk;  // one token per warp
                  *dst = (chunk == 0 ? 0.f : *dst) + (u[0] + u[1]);
                }
              } else if ((2 * tig) % sh.heads == 0) {  // the first thread of each token's columns
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) sP[((nt * 8 + 2 * tig) / sh.heads) * kSelectTileKeys + kk] = u[nt];
              }
            }
          }
          __syncwarp();
        }
        for (int chunk = 0; !pow2_heads && chunk < sh.chunks; ++chunk) {
          float acc[4][4] = {};
          gemm_16x32_nt<T, kHeadDim>(acc, sQ + chunk * kRows * kLd, kLd, sK, kLd, gid, tig);
          if (chunk > 0) row_state(chunk);
          // P = exp(scale S - lse) of the keys the row's token sees (32-bit offsets in the tile).
  #pragma unroll
          for (int ri = 0; ri < 2; ++ri) {
            const int vis = static_cast<int>(min(row_nv[ri] - s0, static_cast<index_t>(kSelectTileKeys)));
  #pragma unroll
            for (int nn = 0; nn < 4; ++nn)
  #pragma unroll
              for (int e = 0; e < 2; ++e) {
                float& x = acc[nn][ri * 2 + e];
                x = nn * 8 + 2 * tig + e < vis ? exp2f(x * scale_log2 - row_lse[ri]) : 0.f;
              }
          }
          // Other head counts: rows to shared memory, heads summed by token (fixed order).
#pragma unroll
          for (int ri = 0; ri < 2; ++ri)
#pragma unroll
            for (int nn = 0; nn < 4; ++nn)
#pragma unroll
              for (int e = 0; e < 2; ++e) sS[(gid + ri * 8) * kLdS + nn * 8 + 2 * tig + e] = acc[nn][ri * 2 + e];
          __syncwarp();
          for (int w = lane; w < sh.tokens * kSelectTileKeys; w += 32) {
            const int tok = w / kSelectTileKeys, kk = w % kSelectTileKeys;
            float sum = chunk == 0 ? 0.f : sP[w];
            for (int h = 0; h < sh.heads; ++h) sum += sS[(tok * sh.heads + h) * kLdS + kk];
            sP[w] = sum;
          }
          __syncwarp();
        }

        if (sh.chunks > 1) {
          if (pow2_heads) col_state(0);
          else row_state(0);
        }
        lists.add_tile(s0);
      }
      __syncwarp();     // reconverge the token lanes before the CTA barrier
      __syncthreads();  // the next iteration's load overwrites this stage
    }
    mma::cp_async_wait_all();  // no tiles: the q rows are still in flight
    __syncwarp();

    lists.finish(sp.block_idx + (packed ? 0 : b * sp.block_idx_stride.batch) + static_cast<index_t>(g) * sp.block_idx_stride.head,
                 row_begin + t0, sp.block_idx_stride.row);
    __syncthreads();  // the next pass reuses the stages
  }
}

}  // namespace sparse_detail
}  // namespace nsa
