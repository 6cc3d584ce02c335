// Kernel bodies of the decoding step (see decode.h for the pipeline). Self-contained on purpose:
// only the fragment conventions of mma_sm80.cuh are shared with the prefill kernels.
//
// Partial of a slice (kernels 1 and 3): the 16 query heads of one CTA form the rows of an m16
// tensor-core tile (zero rows past G). Each warp walks its own 32-key tiles of the slice
// (cp.async K and V rows -> shared memory, S = Q K^T, online softmax, O += P V); at the end the
// warps merge in shared memory in a fixed order and the CTA writes one unnormalised partial per
// head: o (fp32, relative to the slice max m), m (max of the raw q.k) and l (sum of exp).
// Deterministic: no atomics anywhere, every sum has a fixed order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half_convert.cuh"

#include <cmath>

#include "decode.h"
#include "mma_sm80.cuh"
#include "warp_merge.cuh"

namespace nsa {
namespace decode_detail {

constexpr int kRows = kDecodeRows;
static_assert(kRows == 16, "publish_row_stats (warp_merge.cuh) takes 16-row warps");
constexpr int kTile = kDecodeTile;
constexpr int kSelectThreads = 512;
constexpr size_t kSelectMaxWeightBytes = 64 * 1024;  // per-(tile, head) weights kept in shared memory up to this
constexpr int kCombineThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim, int kHeadDimV>
struct AttnCfg {
  static constexpr int kWarps = decode_attn_warps(kHeadDim, kHeadDimV);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded rows: conflict-free fragment loads
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kLdO = kHeadDimV + 8;  // fp32 merge rows (float2 stores conflict-free)
  static constexpr int kWarpElems = kTile * kLdQK + kTile * kLdV;  // one warp's K and V tiles
  static constexpr size_t kTileBytes = (static_cast<size_t>(kRows) * kLdQK + static_cast<size_t>(kWarps) * kWarpElems) * 2;
  static constexpr size_t kStatBytes = static_cast<size_t>(kWarps) * kRows * 2 * sizeof(float);
  static_assert(kRows * kLdO * sizeof(float) <= kWarpElems * 2, "merge buffer must fit in a warp's tiles");
  static_assert(kTileBytes + kStatBytes == decode_attn_smem_bytes(kHeadDim, kHeadDimV),
                "decode.h's shared-memory formula must match the layout");
  // Three CTAs per SM on sm_90 (the loads of one hide the others' epilogues); fits sm_80's 163 KB.
  static_assert(decode_attn_smem_bytes(kHeadDim, kHeadDimV) <= 163 * 1024, "sm_80 shared memory");
  static_assert(kRows * (kTile + 1) + kRows <= kTile * kLdQK / 2, "tile scores are staged in a warp's K tile");
  static size_t smem_bytes() { return decode_attn_smem_bytes(kHeadDim, kHeadDimV); }
};

// Tokens of the sequence including the new one; cache_seqlens outside [0, S] are clamped.
__device__ __forceinline__ int seq_len_of(const DecodeParams& p, int b) {
  const int len = p.cache_seqlens[b];
  return len < 0 ? 0 : (len > p.cache_len ? p.cache_len : len);
}

// Compressed tokens visible to the new token (§1.2: i*d + l - 1 <= t), at most the rows held.
__device__ __forceinline__ int visible_compressed(const DecodeParams& p, int len) {
  const int nc = num_compressed(len, p.cmp_block, p.cmp_stride);
  return nc < p.cache_len_cmp ? nc : p.cache_len_cmp;
}

// Compressed tokens that overlap block j: [first, last] (empty when first > last).
__device__ __forceinline__ void tokens_of_block(index_t j, int l, int d, int lp, index_t& first, index_t& last) {
  const index_t num = j * lp - l + 1;  // i*d + l - 1 >= j*l'
  first = num <= 0 ? 0 : (num + d - 1) / d;
  last = ((j + 1) * lp - 1) / d;       // i*d <= (j+1)*l' - 1
}

// cp.async of rows [s0, s0 + 32) of a [.., D] tensor (row stride in elements) into a padded
// shared tile; rows at or past s_end are zero-filled without being read. Where a row is a
// whole number of lane groups, a lane keeps its column and steps its source pointer by whole
// rows (no per-copy index division or 64-bit multiply).
template <typename T, int kDim, int kLd>
__device__ __forceinline__ void load_tile_async(T* dst, const T* base, index_t row_stride, index_t s0, index_t s_end,
                                                int lane) {
  constexpr int kVec = kDim / 8;
  if constexpr (32 % kVec == 0) {
    constexpr int kRowStep = 32 / kVec;
    const int r0 = lane / kVec, c = (lane % kVec) * 8;
    const T* src = base + (s0 + r0) * row_stride + c;
    const index_t step = kRowStep * row_stride;
    if (s0 + kTile <= s_end) {  // a whole tile (all but a slice's last): no per-row bounds
#pragma unroll
      for (int r = r0; r < kTile; r += kRowStep, src += step) mma::cp_async_16(dst + r * kLd + c, src, true);
    } else {
#pragma unroll
      for (int r = r0; r < kTile; r += kRowStep, src += step) {
        const bool on = s0 + r < s_end;
        mma::cp_async_16(dst + r * kLd + c, on ? src : base, on);
      }
    }
  } else {
#pragma unroll 4
    for (int i = lane; i < kTile * kVec; i += 32) {
      const int r = i / kVec, c = (i % kVec) * 8;
      const index_t s = s0 + r;
      const bool on = s < s_end;
      mma::cp_async_16(dst + r * kLd + c, on ? base + s * row_stride + c : base, on);
    }
  }
}

// S (16 x 32) += Q (16 x kDim) K^T, Q and K row-major in shared memory; fragments by ldmatrix
// (one instruction per 16 x 16 operand instead of four 32-bit loads).
template <typename T, int kDim, int kLd>
__device__ __forceinline__ void gemm_qk(float (&acc)[4][4], const T* sQ, const T* sK, int lane) {
  const T* q_row = sQ + (((lane >> 3) & 1) * 8 + (lane & 7)) * kLd + (lane >> 4) * 8;
  const T* k_row = sK + ((lane >> 4) * 8 + (lane & 7)) * kLd + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int k0 = 0; k0 < kDim; k0 += 16) {
    uint32_t a[4];
    mma::ldmatrix_x4(a, q_row + k0);
#pragma unroll
    for (int np = 0; np < 2; ++np) {  // keys 16 np .. 16 np + 15: two n8 tiles
      uint32_t bb[4];
      mma::ldmatrix_x4(bb, k_row + np * 16 * kLd + k0);
      const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
      mma::m16n8k16<T>(acc[2 * np], a, b0);
      mma::m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// O (16 x kDimV) += P V, P in the C-fragment registers of gemm_qk, V (32 x kDimV) row-major;
// V's fragments by ldmatrix.trans.
template <typename T, int kDimV, int kLd>
__device__ __forceinline__ void gemm_pv(float (&acc)[kDimV / 8][4], const float (&pf)[4][4], const T* sV, int lane) {
  const T* v_row = sV + (((lane >> 3) & 1) * 8 + (lane & 7)) * kLd + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t a[4];
    a[0] = mma::pack2<T>(pf[2 * kk][0], pf[2 * kk][1]);
    a[1] = mma::pack2<T>(pf[2 * kk][2], pf[2 * kk][3]);
    a[2] = mma::pack2<T>(pf[2 * kk + 1][0], pf[2 * kk + 1][1]);
    a[3] = mma::pack2<T>(pf[2 * kk + 1][2], pf[2 * kk + 1][3]);
#pragma unroll
    for (int np = 0; np < kDimV / 16; ++np) {  // value columns 16 np .. 16 np + 15
      uint32_t bb[4];
      mma::ldmatrix_x4_trans(bb, v_row + kk * 16 * kLd + np * 16);
      const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
      mma::m16n8k16<T>(acc[2 * np], a, b0);
      mma::m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// Where a CTA's partial goes: rows (query heads) hq0 .. hq0 + rows - 1 of sequence b, slot
// `slot` of the plan's partial slots.
struct PartialOut {
  float* o;    // o_part of (b, hq0, slot); next head at + head_step_o
  float* ml;   // ml of (b, hq0, slot); next head at + head_step_ml
  index_t head_step_o, head_step_ml;
};

// Where a compressed slice's per-tile block scores go: slots of (tile, first row) at
// base + tile * tile_step; row r at + r * ld (nbt block slots, then the row's max after the tile).
struct TileScoreOut {
  float* base;
  index_t tile_step;
  int ld, nbt;
  int a_units, b_units;  // l / d and l' / d
};

// kScores step of attend_slice for one tile (tokens [s0, s0 + 32), s0 a multiple of 32): the
// exponentials x (C fragments, 0 for masked keys) go to the warp's K tile as [16][33] fp32 and
// the rows' maxima after it; each lane then sums (row, block) items. sK must no longer be read
// by gemm_qk of this tile (the first __syncwarp) and is free again for the next tile's loads
// after the second.
template <typename T>
__device__ __forceinline__ void tile_block_scores(const float (&x)[4][4], const float (&m_tile)[2], T* sK, index_t s0,
                                                  int rows, const TileScoreOut& ts, int lane) {
  constexpr int kLdX = kTile + 1;  // odd stride: lanes on different rows read different banks
  const int gid = lane >> 2, tig = lane & 3;
  float* sX = reinterpret_cast<float*>(sK);
  float* sM = sX + kRows * kLdX;
  __syncwarp();
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = gid + ri * 8;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      sX[r * kLdX + n * 8 + 2 * tig] = x[n][ri * 2];
      sX[r * kLdX + n * 8 + 2 * tig + 1] = x[n][ri * 2 + 1];
    }
    if (tig == 0) sM[r] = m_tile[ri];
  }
  __syncwarp();
  // Positions fit in int (cache_len); in units of d, token i covers [i, i + a), block j [j b, (j + 1) b).
  const int u0 = static_cast<int>(s0), a = ts.a_units, b = ts.b_units, nbt = ts.nbt;
  const int jfirst = u0 / b;
  float* dst = ts.base + (s0 / kTile) * ts.tile_step;
  for (int item = lane; item < rows * nbt; item += 32) {
    const int r = item / nbt, jj = item - r * nbt;
    const int j_lo = (jfirst + jj) * b, j_hi = j_lo + b;
    const int i_lo = max(j_lo - a + 1, u0), i_hi = min(j_hi - 1, u0 + kTile - 1);
    const float* xr = sX + r * kLdX - u0;
    float acc = 0.f;
    for (int i = i_lo; i <= i_hi; ++i) acc += static_cast<float>(min(i + a, j_hi) - max(i, j_lo)) * xr[i];
    dst[r * ts.ld + jj] = acc;
  }
  if (lane < rows) dst[lane * ts.ld + nbt] = sM[lane];
  __syncwarp();
}

// Attention of the CTA's 16 query rows over `n_tiles` key tiles; the caller has issued and
// committed the cp.async group of the query rows (sQ), not waited for it. tile_of(it, s0, s_end)
// gives tile `it`'s first key row and the end of its valid rows (s_end <= s0: empty). Warp w
// takes tiles w, w + kWarps, ... (a second tile in flight per warp, with one CTA per SM, measured
// slower on the H200 than several CTAs of one tile per warp: the CTAs hide each other's epilogue).
// kScores (compressed slices, whose key rows are compressed tokens and whose tiles start at
// multiples of 32) also writes, per tile and row, the partial block scores of §1.3 from the
// softmax's own exponentials x_i = exp(scale (q.k_i - m_tile)), m_tile being the row's running
// max after the tile: bs[jj] = sum over the tile's tokens i of overlap(i, j) x_i for the blocks
// j = floor(u / b) + jj the tile overlaps, and m_tile (kernel 2 rescales each tile to the head's
// max). The exponentials are staged in the warp's K tile, free once S is computed.
// Writes the CTA's partial.
template <typename T, int kHeadDim, int kHeadDimV, bool kScores, class TileFn>
__device__ __forceinline__ void attend_slice(unsigned char* smem, const T* kb, index_t k_row_stride, const T* vb,
                                             index_t v_row_stride, int n_tiles, TileFn&& tile_of, float scale_log2,
                                             int rows, const PartialOut& out, const TileScoreOut& ts) {
  using Cfg = AttnCfg<kHeadDim, kHeadDimV>;
  constexpr int kWarps = Cfg::kWarps, kThreads = Cfg::kThreads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const T* sQ = reinterpret_cast<const T*>(smem);
  T* sK = reinterpret_cast<T*>(smem) + kRows * Cfg::kLdQK + warp * Cfg::kWarpElems;
  T* sV = sK + kTile * Cfg::kLdQK;
  float* sMw = reinterpret_cast<float*>(smem + Cfg::kTileBytes);
  float* sLw = sMw + kWarps * kRows;

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float o_acc[kHeadDimV / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDimV / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

  // Issue tile `it` (if any) into the warp's K / V tiles; always commits a group (possibly
  // empty), so that every thread's group count advances alike.
  auto issue = [&](int it, index_t& s0, index_t& s_end) {
    s0 = 0;
    s_end = 0;
    if (it < n_tiles) tile_of(it, s0, s_end);
    if (s_end > s0) {  // warp-uniform
      load_tile_async<T, kHeadDim, Cfg::kLdQK>(sK, kb, k_row_stride, s0, s_end, lane);
      load_tile_async<T, kHeadDimV, Cfg::kLdV>(sV, vb, v_row_stride, s0, s_end, lane);
    }
    mma::cp_async_commit();
  };
  index_t s0, s_end;
  issue(warp, s0, s_end);
  mma::cp_async_wait<1>();  // the query rows (the group before) have landed, for this thread
  __syncthreads();          // ... and for every thread

  for (int it = warp; it < n_tiles; it += kWarps) {
    mma::cp_async_wait_all();
    __syncwarp();
    if (s_end > s0) {  // warp-uniform
      float s_acc[4][4] = {};
      gemm_qk<T, kHeadDim, Cfg::kLdQK>(s_acc, sQ, sK, lane);
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s_acc[n][ri * 2 + e];
            x = s0 + n * 8 + 2 * tig + e < s_end ? x : -INFINITY;
            mx = fmaxf(mx, x);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[ri], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing valid yet: stay at zero
        const float alpha = exp2f((m_run[ri] - m_use) * scale_log2);
        m_run[ri] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int n = 0; n < 4; ++n)
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
      if constexpr (kScores) tile_block_scores(s_acc, m_run, sK, s0, rows, ts, lane);
      gemm_pv<T, kHeadDimV, Cfg::kLdV>(o_acc, s_acc, sV, lane);
    }
    __syncwarp();  // the next tile overwrites sK / sV
    issue(it + kWarps, s0, s_end);
  }
  mma::cp_async_wait_all();  // nothing of this warp's may land in the merge buffers below

  // ---- merge the warps: per row max M over warps, o and l rescaled to M, summed in warp order
  publish_row_stats(sMw, sLw, warp, m_run, l_run, gid, tig);
  __syncthreads();  // every warp is past its tiles: sK / sV become the merge buffers
  float* sO = reinterpret_cast<float*>(sK);  // this warp's [16][kLdO] fp32
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = gid + ri * 8;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sMw[w * kRows + r]);
    const float f = M == -INFINITY ? 0.f : exp2f((m_run[ri] - M) * scale_log2);
#pragma unroll
    for (int n = 0; n < kHeadDimV / 8; ++n)
      *reinterpret_cast<float2*>(sO + r * Cfg::kLdO + n * 8 + 2 * tig) =
          make_float2(o_acc[n][ri * 2] * f, o_acc[n][ri * 2 + 1] * f);
  }
  __syncthreads();
  const float* sO0 = reinterpret_cast<const float*>(smem) + kRows * Cfg::kLdQK / 2;  // warp 0's buffer
  for (int idx = threadIdx.x; idx < rows * kHeadDimV; idx += kThreads) {
    const int r = idx / kHeadDimV, c = idx % kHeadDimV;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += sO0[w * (Cfg::kWarpElems / 2) + r * Cfg::kLdO + c];
    out.o[r * out.head_step_o + c] = acc;
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sMw[w * kRows + r]);
    float L = 0.f;
    if (M != -INFINITY)
      for (int w = 0; w < kWarps; ++w) {
        const float mw = sMw[w * kRows + r];
        if (mw != -INFINITY) L += sLw[w * kRows + r] * exp2f((mw - M) * scale_log2);
      }
    out.ml[r * out.head_step_ml] = M;
    out.ml[r * out.head_step_ml + 1] = L;
  }
}

// Kernels 1 and 3. kSelected = false: blockIdx.x < splits_cmp is a slice of the compressed
// tokens, the rest slices of the sliding window; kSelected = true: a slice of the selected
// blocks (kernel 2's list). blockIdx.y = KV head * head_chunks + head chunk, blockIdx.z = b.
template <typename T, int kHeadDim, int kHeadDimV, bool kSelected>
__global__ void __launch_bounds__(AttnCfg<kHeadDim, kHeadDimV>::kThreads, 3)
    decode_attn_kernel(const DecodeParams p, const DecodePlan pl, float* o_part, float* ml, float* bs, const int* sel) {
  using Cfg = AttnCfg<kHeadDim, kHeadDimV>;
  constexpr int kThreads = Cfg::kThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.z;
  const int g = blockIdx.y / pl.head_chunks, chunk = blockIdx.y % pl.head_chunks;
  const int G = pl.G, HQ = p.heads_q;
  const int h_in_group = chunk * kRows;
  const int rows = G - h_in_group < kRows ? G - h_in_group : kRows;
  const int hq0 = g * G + h_in_group;
  const int len = seq_len_of(p, b);
  const float scale_log2 = p.scale * kLog2e;

  // The CTA's 16 query rows (rows past the group are zero): issued here, awaited in attend_slice
  // together with the first K/V tile.
  {
    T* sQ = reinterpret_cast<T*>(smem);
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride;
    constexpr int kVec = kHeadDim / 8;
    for (int i = threadIdx.x; i < kRows * kVec; i += kThreads) {
      const int r = i / kVec, c = (i % kVec) * 8;
      const bool on = r < rows;
      mma::cp_async_16(sQ + r * Cfg::kLdQK + c, on ? q + static_cast<index_t>(hq0 + r) * p.q_head_stride + c : q, on);
    }
    mma::cp_async_commit();
  }

  const int slot = kSelected ? pl.splits_cmp + pl.splits_win + blockIdx.x : blockIdx.x;
  PartialOut out;
  out.head_step_o = static_cast<index_t>(pl.splits) * p.head_dim_v;
  out.head_step_ml = static_cast<index_t>(pl.splits) * 2;
  const index_t slot0 = (static_cast<index_t>(b) * HQ + hq0) * pl.splits + slot;
  out.o = o_part + slot0 * p.head_dim_v;
  out.ml = ml + slot0 * 2;

  const T* k_cache = static_cast<const T*>(p.k_cache) + b * p.k_stride.batch + static_cast<index_t>(g) * p.k_stride.head;
  const T* v_cache = static_cast<const T*>(p.v_cache) + b * p.v_stride.batch + static_cast<index_t>(g) * p.v_stride.head;

  if constexpr (kSelected) {
    // Blocks slots [split * bpc, split * bpc + nslots) of the group's list; ceil(l'/32) tiles each.
    const int n = p.top_n, lp = p.sel_block;
    const int first = blockIdx.x * pl.blocks_per_slc;
    const int nslots = n - first < pl.blocks_per_slc ? n - first : pl.blocks_per_slc;
    const int tpb = (lp + kTile - 1) / kTile;
    const int* list = sel + (static_cast<index_t>(b) * p.heads_kv + g) * n;
    auto tile_of = [&](int it, index_t& s0, index_t& s_end) {
      const int j = list[first + it / tpb];
      s0 = 0;
      s_end = 0;
      if (j < 0) return;
      const index_t blk0 = static_cast<index_t>(j) * lp;
      s0 = blk0 + static_cast<index_t>(it % tpb) * kTile;
      index_t e = s0 + kTile;
      if (e > blk0 + lp) e = blk0 + lp;
      if (e > len) e = len;  // causal cut at t = len - 1; never past the sequence
      s_end = e;
    };
    attend_slice<T, kHeadDim, kHeadDimV, false>(smem, k_cache, p.k_stride.row, v_cache, p.v_stride.row,
                                                 nslots > 0 ? nslots * tpb : 0, tile_of, scale_log2, rows, out,
                                                 TileScoreOut{});
  } else if (static_cast<int>(blockIdx.x) < pl.splits_cmp) {
    const int split = blockIdx.x;
    const int nvis = len > 0 ? visible_compressed(p, len) : 0;
    const index_t c0 = static_cast<index_t>(split) * pl.chunk_cmp;
    const index_t c_end = c0 + pl.chunk_cmp < nvis ? c0 + pl.chunk_cmp : static_cast<index_t>(nvis);
    const T* kc = static_cast<const T*>(p.k_cmp) + b * p.kc_stride.batch + static_cast<index_t>(g) * p.kc_stride.head;
    const T* vc = static_cast<const T*>(p.v_cmp) + b * p.vc_stride.batch + static_cast<index_t>(g) * p.vc_stride.head;
    auto tile_of = [&](int it, index_t& s0, index_t& s_end) {
      s0 = c0 + static_cast<index_t>(it) * kTile;
      s_end = c_end;
    };
    TileScoreOut ts;
    ts.ld = pl.ld_bs;
    ts.nbt = pl.nbt;
    ts.tile_step = static_cast<index_t>(G) * pl.ld_bs;
    ts.base = bs + (static_cast<index_t>(b) * p.heads_kv + g) * pl.tiles_cmp * ts.tile_step +
              static_cast<index_t>(h_in_group) * pl.ld_bs;
    ts.a_units = p.cmp_block / p.cmp_stride;
    ts.b_units = p.sel_block / p.cmp_stride;
    attend_slice<T, kHeadDim, kHeadDimV, true>(smem, kc, p.kc_stride.row, vc, p.vc_stride.row, pl.chunk_cmp / kTile,
                                                tile_of, scale_log2, rows, out, ts);
  } else {
    // Window keys [lo, t] (§1.6), this CTA's slice of them.
    const int wsplit = blockIdx.x - pl.splits_cmp;
    const index_t t = static_cast<index_t>(len) - 1;
    const index_t lo = t - p.window + 1 > 0 ? t - p.window + 1 : 0;
    const index_t k0 = lo + static_cast<index_t>(wsplit) * pl.chunk_win;
    const index_t k_end = k0 + pl.chunk_win < len ? k0 + pl.chunk_win : static_cast<index_t>(len);
    auto tile_of = [&](int it, index_t& s0, index_t& s_end) {
      s0 = k0 + static_cast<index_t>(it) * kTile;
      s_end = k_end;
    };
    attend_slice<T, kHeadDim, kHeadDimV, false>(smem, k_cache, p.k_stride.row, v_cache, p.v_stride.row,
                                                 pl.chunk_win / kTile, tile_of, scale_log2, rows, out, TileScoreOut{});
  }
}

// ------------------------------------------------------------------------------------------
// Kernel 2: block scores and top-n selection of one (b, KV head).

// float -> unsigned with the same order (NaN as -inf, -0 as +0, as the CPU path compares).
__device__ __forceinline__ unsigned order_key(float f) {
  if (f != f) f = -INFINITY;
  if (f == 0.f) f = 0.f;
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum over the block (thread order); s_warp holds kThreads/32 ints.
template <int kBlockThreads>
__device__ __forceinline__ int block_exclusive_sum(int v, int* s_warp) {
  constexpr int kW = kBlockThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int x = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kW ? s_warp[lane] : 0;
    int incl = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += y;
    }
    if (lane < kW) s_warp[lane] = incl - w;
  }
  __syncthreads();
  const int r = s_warp[warp] + x - v;
  __syncthreads();  // s_warp is reused by the next call
  return r;
}

// Two CTAs per SM (63 registers): at batch 64 the B * H CTAs run in one wave, not two.
// Selection: S[j] for the valid blocks j <= t / l' from the partial block scores and the group's
// compressed lse, forced blocks +inf, then the n largest by (score desc, block asc): an exact
// MSB-first radix select on the order-preserving 32-bit keys finds the n-th largest key and how
// many blocks equal to it to take (the lowest ones); a block-wide scan emits the chosen blocks
// in ascending order.
template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 2)
    decode_select_kernel(const DecodeParams p, const DecodePlan pl, const float* ml, const float* bs, float* score,
                         int* sel, bool weights_in_smem) {
  // [G] max, [G] 1 / sum of the compressed branch; then, if weights_in_smem, the weight of every
  // (compressed tile k, head h) partial block score: exp(m_kh - M_h) / L_h, [tiles_cmp][G]
  extern __shared__ float s_heads[];
  __shared__ int s_hist[256];
  __shared__ int s_warp[kBlockThreads / 32];
  __shared__ int s_digit[2];
  const int g = blockIdx.x, b = blockIdx.y;
  const int G = pl.G, n = p.top_n, lp = p.sel_block, l = p.cmp_block, d = p.cmp_stride;
  const int tid = threadIdx.x;
  int* out = sel + (static_cast<index_t>(b) * p.heads_kv + g) * n;
  const int len = seq_len_of(p, b);
  if (len <= 0) {
    for (int q = tid; q < n; q += kBlockThreads) out[q] = -1;
    return;
  }
  const int t = len - 1;
  const int nv = t / lp + 1;  // valid blocks: j * l' <= t
  if (nv <= n) {              // every valid block is taken
    for (int q = tid; q < n; q += kBlockThreads) out[q] = q < nv ? q : -1;
    return;
  }
  const int nvis = visible_compressed(p, len);
  const float scale_log2 = p.scale * kLog2e;
  float* sM = s_heads;
  float* sInvL = s_heads + G;
  const index_t ml_head = static_cast<index_t>(pl.splits) * 2;
  const float* ml_g = ml + (static_cast<index_t>(b) * p.heads_q + static_cast<index_t>(g) * G) * ml_head;
  // One warp per head: lanes stride over the splits (a serial loop per head was a chain of
  // dependent global loads), fixed butterflies: the same bits every run.
  for (int h = tid / 32; h < G; h += kBlockThreads / 32) {
    const int lane = tid % 32;
    const float* mh = ml_g + h * ml_head;
    float M = -INFINITY;
    for (int k = lane; k < pl.splits_cmp; k += 32) M = fmaxf(M, mh[2 * k]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float L = 0.f;
    if (M != -INFINITY)
      for (int k = lane; k < pl.splits_cmp; k += 32)
        if (mh[2 * k] != -INFINITY) L += mh[2 * k + 1] * exp2f((mh[2 * k] - M) * scale_log2);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
    if (lane == 0) {
      sM[h] = M;
      sInvL[h] = L > 0.f ? 1.f / L : 0.f;  // 0: no visible compressed token, p = 0 (lse = -inf)
    }
  }
  __syncthreads();

  // Tile k's partial block scores of head h are relative to m_kh, the head's running max after
  // that tile: weight exp(m_kh - M_h) / L_h. A head without any visible compressed token (L = 0)
  // has p = 0: weight 0. Only tiles holding a visible token were written (k * 32 < nvis).
  const int ld = pl.ld_bs, nbt = pl.nbt;
  const index_t tile_step = static_cast<index_t>(G) * ld;
  const float* bs_g = bs + (static_cast<index_t>(b) * p.heads_kv + g) * pl.tiles_cmp * tile_step;
  auto weight = [&](index_t k, int h) {
    const float inv = sInvL[h];
    const float m = bs_g[k * tile_step + static_cast<index_t>(h) * ld + nbt];
    return inv == 0.f || m == -INFINITY ? 0.f : exp2f((m - sM[h]) * scale_log2) * inv;
  };
  float* sW = s_heads + 2 * G;
  const int tiles_vis = (nvis + kTile - 1) / kTile;
  if (weights_in_smem) {
    for (int e = tid; e < tiles_vis * G; e += kBlockThreads) sW[e] = weight(e / G, e % G);
    __syncthreads();
  }

  float* sc = score + (static_cast<index_t>(b) * p.heads_kv + g) * pl.nb_max;
  const int t_blk = nv - 1;
  const int b_units = lp / d;
  for (int j = tid; j < nv; j += kBlockThreads) {
    const bool forced = j < p.init_blocks || static_cast<index_t>(j) > static_cast<index_t>(t_blk) - p.local_blocks;
    float s = 0.f;
    if (forced) {
      s = INFINITY;
    } else {
      index_t i_lo, i_hi;
      tokens_of_block(j, l, d, lp, i_lo, i_hi);
      if (i_hi > nvis - 1) i_hi = nvis - 1;
      if (i_lo <= i_hi) {
        for (index_t k = i_lo / kTile; k <= i_hi / kTile; ++k) {
          // slot of block j in tile k: j - floor(first unit of the tile / b)
          const float* bk = bs_g + k * tile_step + (j - (k * kTile) / b_units);
          if (weights_in_smem) {
            const float* wk = sW + k * G;
#pragma unroll 16  // the heads' loads are independent: keep 16 in flight
            for (int h = 0; h < G; ++h) s += bk[static_cast<index_t>(h) * ld] * wk[h];
          } else {
            for (int h = 0; h < G; ++h) s += bk[static_cast<index_t>(h) * ld] * weight(k, h);
          }
        }
      }
    }
    sc[j] = s;
  }
  __syncthreads();  // the scores are re-read in contiguous segments by other threads

  const int per = (nv + kBlockThreads - 1) / kBlockThreads;
  const int jb = tid * per < nv ? tid * per : nv;
  const int je = jb + per < nv ? jb + per : nv;
  unsigned prefix = 0, pmask = 0;
  int need = n;  // how many of the keys matching `prefix` are still to be taken
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kBlockThreads) s_hist[i] = 0;
    __syncthreads();
    for (int j = jb; j < je; ++j) {
      const unsigned key = order_key(sc[j]);
      if ((key & pmask) == prefix) atomicAdd(&s_hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (tid < 32) {  // digit holding the need-th largest key: lane L scans digits 255-8L .. 248-8L
      const int lane = tid;
      int c[8], tot = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = s_hist[255 - 8 * lane - e];
        tot += c[e];
      }
      int incl = tot;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
      }
      const unsigned ball = __ballot_sync(0xffffffffu, incl >= need);
      const int src = ball ? __ffs(ball) - 1 : 31;
      if (lane == src) {
        int acc = incl - tot, dg = -1, above = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (dg < 0 && acc + c[e] >= need) {
            dg = 255 - 8 * lane - e;
            above = acc;
          }
          acc += c[e];
        }
        s_digit[0] = dg < 0 ? 248 - 8 * lane : dg;
        s_digit[1] = above;  // keys matching the prefix with a larger digit: all taken
      }
    }
    __syncthreads();
    prefix |= static_cast<unsigned>(s_digit[0]) << shift;
    pmask |= 0xFFu << shift;
    need -= s_digit[1];
    __syncthreads();  // s_hist / s_digit are rewritten by the next pass
  }
  // Taken: keys above the threshold, and the `need` lowest blocks whose key equals it.
  const unsigned thr = prefix;
  int n_eq = 0;
  for (int j = jb; j < je; ++j) n_eq += order_key(sc[j]) == thr;
  const int eq_before = block_exclusive_sum<kBlockThreads>(n_eq, s_warp);
  int n_take = 0;
  for (int j = jb, e = eq_before; j < je; ++j) {
    const unsigned key = order_key(sc[j]);
    if (key > thr) ++n_take;
    else if (key == thr) n_take += (e++ < need);
  }
  int pos = block_exclusive_sum<kBlockThreads>(n_take, s_warp);
  for (int j = jb, e = eq_before; j < je; ++j) {
    const unsigned key = order_key(sc[j]);
    bool take = key > thr;
    if (key == thr) take = e++ < need;
    if (take && pos < n) out[pos++] = j;
  }
}

// ------------------------------------------------------------------------------------------
// Kernel 4: merge each branch's partials, gate, write o.

// Floats of the per-split coefficients in the combine kernel's shared memory, rounded to 16
// bytes (the warps' float4 sums follow). 16 spare floats: the coefficient loop's unrolled
// shared loads may read a few past `splits` (seen under compute-sanitizer); they multiply nothing.
__host__ __device__ constexpr int combine_coef_floats(int splits) { return (splits + 16 + 3) / 4 * 4; }

template <typename T, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    decode_combine_kernel(const DecodeParams p, const DecodePlan pl, const float* o_part, const float* ml) {
  extern __shared__ __align__(16) float s_coef[];  // [splits]: gate * exp(m_k - M) / L of the split's branch
  constexpr int kW = kBlockThreads / 32;
  constexpr int kPre = 4;  // partial rows per warp loaded before the coefficients are known
  const int hq = blockIdx.x, b = blockIdx.y;
  const int Dv = p.head_dim_v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* orow = static_cast<T*>(p.o) + b * p.o_batch_stride + static_cast<index_t>(hq) * p.o_head_stride;
  const int len = seq_len_of(p, b);
  if (len <= 0) {  // empty sequence: o = 0 (as the CPU path)
    for (int c = threadIdx.x; c < Dv; c += kBlockThreads) orow[c] = from_f<T>(0.f);
    return;
  }
  const float scale_log2 = p.scale * kLog2e;
  const index_t slot0 = (static_cast<index_t>(b) * p.heads_q + hq) * pl.splits;
  const float* mlb = ml + slot0 * 2;
  const float* ob = o_part + slot0 * Dv;
  const int end_cmp = pl.splits_cmp, end_win = pl.splits_cmp + pl.splits_win;

  // Warp w sums splits w, w + kW, ... over float4 columns. Its first kPre partial rows (of the
  // first 128 columns) are loaded now, so that their latency overlaps the statistics' below
  // (one round trip to memory per CTA instead of three).
  float4 pre[kPre];
#pragma unroll
  for (int i = 0; i < kPre; ++i) {
    const int k = warp + i * kW;
    pre[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (k < pl.splits && lane * 4 < Dv) pre[i] = *reinterpret_cast<const float4*>(ob + static_cast<index_t>(k) * Dv + lane * 4);
  }

  static_assert(kBlockThreads >= 96, "one warp per branch");
  if (warp < 3) {  // warp 0: compressed, 1: window, 2: selected; lanes over the branch's splits
    const int br = warp;
    const int k0 = br == 0 ? 0 : (br == 1 ? end_cmp : end_win);
    const int k1 = br == 0 ? end_cmp : (br == 1 ? end_win : pl.splits);
    float M = -INFINITY;
    for (int k = k0 + lane; k < k1; k += 32) M = fmaxf(M, mlb[2 * k]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float L = 0.f;
    if (M != -INFINITY)
      for (int k = k0 + lane; k < k1; k += 32)
        if (mlb[2 * k] != -INFINITY) L += mlb[2 * k + 1] * exp2f((mlb[2 * k] - M) * scale_log2);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
    const index_t go = b * p.g_batch_stride + hq;
    const T* gp = static_cast<const T*>(br == 0 ? p.g_cmp : (br == 1 ? p.g_win : p.g_slc));
    const float gate = to_f<T>(gp[go]);
    for (int k = k0 + lane; k < k1; k += 32) {
      const float m = mlb[2 * k];
      s_coef[k] = (L > 0.f && m != -INFINITY) ? gate * exp2f((m - M) * scale_log2) / L : 0.f;
    }
  }
  __syncthreads();
  // The warps' sums are added in warp order, so every run gives the same bits.
  float* s_part = s_coef + combine_coef_floats(pl.splits);  // [kW][Dv]
  for (int c = lane * 4; c < Dv; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    int k = warp;
    if (c == lane * 4) {  // first 128 columns: the prefetched rows first
#pragma unroll
      for (int i = 0; i < kPre; ++i, k += kW) {
        if (k < pl.splits) {
          const float cf = s_coef[k];
          acc.x += cf * pre[i].x;
          acc.y += cf * pre[i].y;
          acc.z += cf * pre[i].z;
          acc.w += cf * pre[i].w;
        }
      }
    }
#pragma unroll 4
    for (; k < pl.splits; k += kW) {
      const float cf = s_coef[k];
      const float4 x = *reinterpret_cast<const float4*>(ob + static_cast<index_t>(k) * Dv + c);
      acc.x += cf * x.x;
      acc.y += cf * x.y;
      acc.z += cf * x.z;
      acc.w += cf * x.w;
    }
    *reinterpret_cast<float4*>(s_part + warp * Dv + c) = acc;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < Dv; c += kBlockThreads) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kW; ++w) acc += s_part[w * Dv + c];
    orow[c] = from_f<T>(acc);
  }
}

}  // namespace decode_detail
}  // namespace nsa
