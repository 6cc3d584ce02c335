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

namespace nsa {
namespace decode_detail {

constexpr int kRows = kDecodeRows;
constexpr int kTile = kDecodeTile;
constexpr int kSelectThreads = 512;
constexpr size_t kSelectMaxWeightBytes = 64 * 1024;  // per-(split, head) weights kept in shared memory up to this
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
  static_assert(kTileBytes + kStatBytes == decode_attn_smem_bytes(kHeadDim, kHeadDimV, 0),
                "decode.h's shared-memory formula must match the layout");
  // Two CTAs per SM on sm_90 (the loads of one hide the other's epilogue); fits sm_80's 163 KB.
  static_assert(decode_attn_smem_bytes(kHeadDim, kHeadDimV, kDecodeMaxChunk) <= 163 * 1024, "sm_80 shared memory");
  // Dynamic shared memory; score_cols > 0 adds the compressed slice's exponentials and tile maxima.
  static size_t smem_bytes(int score_cols) { return decode_attn_smem_bytes(kHeadDim, kHeadDimV, score_cols); }
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

// Attention of the CTA's 16 query rows over `n_tiles` key tiles; the caller has issued and
// committed the cp.async group of the query rows (sQ), not waited for it. tile_of(it, s0, s_end)
// gives tile `it`'s first key row and the end of its valid rows (s_end <= s0: empty). Warp w
// takes tiles w, w + kWarps, ... (a second tile in flight per warp, with one CTA per SM, measured
// slower on the H200 than two CTAs of one tile per warp: the CTAs hide each other's epilogue).
// kScores also
// stores, for every key at column (s - col0) of sS, exp(scale (q.k - m_tile)) (0 for masked
// keys), with m_tile, the row's running max after tile `it`, at sS[16 * ldS + row * (ldS / 32)
// + it] (the softmax computes these exponentials anyway; the block scores only rescale them).
// Writes the CTA's partial. On return sS is complete and sMw / sLw hold every warp's (m, l)
// (the slice max of a row is their max over warps): both were written before a __syncthreads.
template <typename T, int kHeadDim, int kHeadDimV, bool kScores, class TileFn>
__device__ __forceinline__ void attend_slice(unsigned char* smem, const T* kb, index_t k_row_stride, const T* vb,
                                             index_t v_row_stride, int n_tiles, TileFn&& tile_of, float scale_log2,
                                             int rows, const PartialOut& out, float* sS, int ldS, index_t col0) {
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
        if constexpr (kScores) {  // exp(scale (q.k - m_tile)) and m_tile, rescaled to the slice max later
          const int r = gid + ri * 8;
          float* row = sS + r * ldS + (s0 - col0) + 2 * tig;
#pragma unroll
          for (int n = 0; n < 4; ++n)
            *reinterpret_cast<float2*>(row + n * 8) = make_float2(s_acc[n][ri * 2], s_acc[n][ri * 2 + 1]);
          if (tig == 0) sS[kRows * ldS + r * (ldS / kTile) + it] = m_new;  // -inf: no valid key in the tile
        }
#pragma unroll
        for (int n = 0; n < kHeadDimV / 8; ++n) {
          o_acc[n][ri * 2] *= alpha;
          o_acc[n][ri * 2 + 1] *= alpha;
        }
      }
      gemm_pv<T, kHeadDimV, Cfg::kLdV>(o_acc, s_acc, sV, lane);
    }
    __syncwarp();  // the next tile overwrites sK / sV
    issue(it + kWarps, s0, s_end);
  }
  mma::cp_async_wait_all();  // nothing of this warp's may land in the merge buffers below

  // ---- merge the warps: per row max M over warps, o and l rescaled to M, summed in warp order
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float l = l_run[ri];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (tig == 0) {
      sMw[warp * kRows + gid + ri * 8] = m_run[ri];
      sLw[warp * kRows + gid + ri * 8] = l;
    }
  }
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
__global__ void __launch_bounds__(AttnCfg<kHeadDim, kHeadDimV>::kThreads)
    decode_attn_kernel(const DecodeParams p, const DecodePlan pl, float* o_part, float* ml, float* bs, const int* sel) {
  using Cfg = AttnCfg<kHeadDim, kHeadDimV>;
  constexpr int kWarps = Cfg::kWarps, kThreads = Cfg::kThreads;
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
                                                 nslots > 0 ? nslots * tpb : 0, tile_of, scale_log2, rows, out, nullptr,
                                                 0, 0);
  } else if (static_cast<int>(blockIdx.x) < pl.splits_cmp) {
    const int split = blockIdx.x;
    const int nvis = len > 0 ? visible_compressed(p, len) : 0;
    const index_t c0 = static_cast<index_t>(split) * pl.chunk_cmp;
    const index_t c_end = c0 + pl.chunk_cmp < nvis ? c0 + pl.chunk_cmp : static_cast<index_t>(nvis);
    const T* kc = static_cast<const T*>(p.k_cmp) + b * p.kc_stride.batch + static_cast<index_t>(g) * p.kc_stride.head;
    const T* vc = static_cast<const T*>(p.v_cmp) + b * p.vc_stride.batch + static_cast<index_t>(g) * p.vc_stride.head;
    float* sS = reinterpret_cast<float*>(smem + Cfg::kTileBytes + Cfg::kStatBytes);
    const int ldS = pl.chunk_cmp + 8;
    auto tile_of = [&](int it, index_t& s0, index_t& s_end) {
      s0 = c0 + static_cast<index_t>(it) * kTile;
      s_end = c_end;
    };
    attend_slice<T, kHeadDim, kHeadDimV, true>(smem, kc, p.kc_stride.row, vc, p.vc_stride.row, pl.chunk_cmp / kTile,
                                                tile_of, scale_log2, rows, out, sS, ldS, c0);
    // Partial block scores (§1.3) of the slice's tokens, relative to the slice max of each head:
    // bs[jj] = sum_i c(i, jbase + jj) * exp(scale * (q.k_i - m)), tokens ascending. In units of
    // the stride d (which divides l and l'), token i covers [i, i + a) and block j covers
    // [j b, (j + 1) b): bounds and overlaps are integer differences (the 64-bit divisions per
    // (head, block, token) they replace dominated the kernel). Positions fit in int (cache_len).
    const float* sMw = reinterpret_cast<const float*>(smem + Cfg::kTileBytes);
    const int a_units = p.cmp_block / p.cmp_stride, b_units = p.sel_block / p.cmp_stride, nbc = pl.nbc;
    const int c0i = static_cast<int>(c0), c_last = static_cast<int>(c_end) - 1;
    const int jbase = c0i / b_units;
    float* bs_out = bs + ((static_cast<index_t>(b) * p.heads_kv + g) * pl.splits_cmp + split) * G * nbc +
                    static_cast<index_t>(h_in_group) * nbc;
    // Each (row, tile) factor exp(scale (m_tile - M)) once, in place of m_tile.
    float* sTileM = sS + kRows * ldS;
    const int ld_tiles = ldS / kTile;
    const int n_valid = c_last - c0i + 1;  // tokens of the slice (<= 0: none)
    const int valid_tiles = n_valid > 0 ? (n_valid + kTile - 1) / kTile : 0;
    for (int idx = threadIdx.x; idx < rows * ld_tiles; idx += kThreads) {
      const int r = idx / ld_tiles;
      if (idx - r * ld_tiles >= valid_tiles) continue;  // a tile past the visible tokens: never written
      float M = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sMw[w * kRows + r]);
      const float mt = sTileM[idx];
      sTileM[idx] = (M == -INFINITY || mt == -INFINITY) ? 0.f : exp2f((mt - M) * scale_log2);
    }
    __syncthreads();
    // Every exponential rescaled to the slice max once (not once per block that overlaps it).
    for (int r = 0; r < rows; ++r)
      for (int i = threadIdx.x; i < n_valid; i += kThreads) sS[r * ldS + i] *= sTileM[r * ld_tiles + i / kTile];
    __syncthreads();
    // Items (row r, block jj) in order idx = r * nbc + jj, stepped without a division per item
    // (the divisions were a third of this loop's instructions).
    int r = threadIdx.x / nbc, jj = threadIdx.x - r * nbc;
    const int step_r = kThreads / nbc, step_jj = kThreads - step_r * nbc;
    for (int idx = threadIdx.x; idx < rows * nbc; idx += kThreads) {
      const int j = jbase + jj;
      const int j_lo = j * b_units, j_hi = j_lo + b_units;  // the block's units [j_lo, j_hi)
      const int i_lo = max(max(j_lo - a_units + 1, 0), c0i), i_hi = min(j_hi - 1, c_last);
      const float* srow = sS + r * ldS - c0i;
      float acc = 0.f;
      for (int i = i_lo; i <= i_hi; ++i) {
        const int overlap = min(i + a_units, j_hi) - max(i, j_lo);
        acc += static_cast<float>(overlap) * srow[i];
      }
      bs_out[static_cast<index_t>(r) * nbc + jj] = acc;
      r += step_r;
      jj += step_jj;
      if (jj >= nbc) {
        jj -= nbc;
        ++r;
      }
    }
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
                                                 pl.chunk_win / kTile, tile_of, scale_log2, rows, out, nullptr, 0, 0);
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
  // (compressed split k, head h) partial block score: exp(m_kh - M_h) / L_h, [splits_cmp][G]
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

  // A head without any visible compressed token (L = 0) has p = 0: weight 0 (its partials are 0).
  auto weight = [&](index_t k, int h) {
    const float inv = sInvL[h];
    return inv == 0.f ? 0.f : exp2f((ml_g[h * ml_head + 2 * k] - sM[h]) * scale_log2) * inv;
  };
  float* sW = s_heads + 2 * G;
  if (weights_in_smem) {
    for (int e = tid; e < pl.splits_cmp * G; e += kBlockThreads) sW[e] = weight(e / G, e % G);
    __syncthreads();
  }

  float* sc = score + (static_cast<index_t>(b) * p.heads_kv + g) * pl.nb_max;
  const float* bs_g = bs + (static_cast<index_t>(b) * p.heads_kv + g) * pl.splits_cmp * G * pl.nbc;
  const int t_blk = nv - 1;
  const index_t chunk = pl.chunk_cmp;
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
        for (index_t k = i_lo / chunk; k <= i_hi / chunk; ++k) {
          const float* bk = bs_g + k * G * pl.nbc + (j - k * chunk * d / lp);
          if (weights_in_smem) {
            const float* wk = sW + k * G;
#pragma unroll 8
            for (int h = 0; h < G; ++h) s += bk[static_cast<index_t>(h) * pl.nbc] * wk[h];
          } else {
            for (int h = 0; h < G; ++h) s += bk[static_cast<index_t>(h) * pl.nbc] * weight(k, h);
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
  __shared__ float s_branch[3][2];
  const int hq = blockIdx.x, b = blockIdx.y;
  const int Dv = p.head_dim_v;
  T* orow = static_cast<T*>(p.o) + b * p.o_batch_stride + static_cast<index_t>(hq) * p.o_head_stride;
  const int len = seq_len_of(p, b);
  if (len <= 0) {  // empty sequence: o = 0 (as the CPU path)
    for (int c = threadIdx.x; c < Dv; c += kBlockThreads) orow[c] = from_f<T>(0.f);
    return;
  }
  const float scale_log2 = p.scale * kLog2e;
  const index_t slot0 = (static_cast<index_t>(b) * p.heads_q + hq) * pl.splits;
  const float* mlb = ml + slot0 * 2;
  const int end_cmp = pl.splits_cmp, end_win = pl.splits_cmp + pl.splits_win;
  static_assert(kBlockThreads >= 96, "one warp per branch");
  if (threadIdx.x < 96) {  // warp 0: compressed, 1: window, 2: selected; lanes over the splits
    const int br = threadIdx.x / 32, lane = threadIdx.x % 32;
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
    if (lane == 0) {
      s_branch[br][0] = M;
      s_branch[br][1] = L;
    }
  }
  __syncthreads();
  const index_t go = b * p.g_batch_stride + hq;
  const float gate[3] = {to_f<T>(static_cast<const T*>(p.g_cmp)[go]), to_f<T>(static_cast<const T*>(p.g_win)[go]),
                         to_f<T>(static_cast<const T*>(p.g_slc)[go])};
  for (int k = threadIdx.x; k < pl.splits; k += kBlockThreads) {
    const int br = k < end_cmp ? 0 : (k < end_win ? 1 : 2);
    const float M = s_branch[br][0], L = s_branch[br][1], m = mlb[2 * k];
    s_coef[k] = (L > 0.f && m != -INFINITY) ? gate[br] * exp2f((m - M) * scale_log2) / L : 0.f;
  }
  __syncthreads();
  // Warp w sums splits w, w + kW, ... over float4 columns (a single serial chain over all the
  // splits was the kernel's latency at batch 1); the warps' sums are added in warp order, so
  // every run gives the same bits.
  constexpr int kW = kBlockThreads / 32;
  float* s_part = s_coef + combine_coef_floats(pl.splits);  // [kW][Dv]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* ob = o_part + slot0 * Dv;
  for (int c = lane * 4; c < Dv; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int k = warp; k < pl.splits; k += kW) {
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
