// Kernel body of block scoring + top-n selection (DESIGN.md §1.3-1.4; see cmp_attn.h).
//
// One warp per (token t, KV head g). Lane i of a 32-key tile recomputes
// P[i] = sum_h exp(scale * q_h . k_c[i] - lse_h) over the G heads of g (CUDA cores in this
// first version). Lane 0 then adds c(i, j) * P[i] to the few selection blocks j the compressed
// token overlaps (ascending i, so each block's sum has a fixed order), finalises every block
// whose compressed tokens are all done, applies the forced init / local blocks (+inf) and keeps
// a running top-n list sorted by (score desc, block asc): ties go to the lower block because
// blocks arrive in ascending order and an equal score never displaces an earlier one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cmp_attn.h"
#include "cmp_attn_fwd_kernel.cuh"

namespace nsa {
namespace sparse_detail {

constexpr int kSelectWarps = 4;
constexpr int kOpenBlocks = 256;  // blocks a 32-key tile can touch: (32*d + l)/l' + 2 <= 34 + l/d

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

// Shared memory of one warp: q rows [G][kHeadDim] (T), lse [G], P [32], open block sums
// [kOpenBlocks], top list (score, block) [top_n].
template <int kHeadDim>
__host__ __device__ inline size_t select_warp_bytes(int G, int top_n) {
  size_t b = static_cast<size_t>(G) * kHeadDim * 2;
  b = (b + 15) / 16 * 16;
  b += (static_cast<size_t>(G) + 32 + kOpenBlocks + 2 * top_n) * 4;
  return (b + 15) / 16 * 16;  // the next warp's q rows take 16-byte stores
}

// Inserts (s, j) into the list sorted by (score desc, block asc); j is larger than every block
// already there, so equal scores keep the earlier (lower) block first.
__device__ __forceinline__ void topn_insert(float* sc, int* id, int& count, int n, float s, int j) {
  if (count == n && !(s > sc[n - 1])) return;
  int pos = count < n ? count : n - 1;
  while (pos > 0 && s > sc[pos - 1]) {
    sc[pos] = sc[pos - 1];
    id[pos] = id[pos - 1];
    --pos;
  }
  sc[pos] = s;
  id[pos] = j;
  if (count < n) ++count;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSelectWarps * 32) select_blocks_kernel(const SelectParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.heads_q / p.heads_kv, g = blockIdx.y;
  const int n = p.top_n;
  unsigned char* base = smem_raw + warp * select_warp_bytes<kHeadDim>(G, n);
  T* sq = reinterpret_cast<T*>(base);
  float* s_lse = reinterpret_cast<float*>(base + (static_cast<size_t>(G) * kHeadDim * 2 + 15) / 16 * 16);
  float* s_p = s_lse + G;
  float* s_open = s_p + 32;
  float* s_sc = s_open + kOpenBlocks;
  int* s_id = reinterpret_cast<int*>(s_sc + n);

  // (sequence, position) of this warp's token.
  const index_t item = static_cast<index_t>(blockIdx.x) * kSelectWarps + warp;
  const bool packed = p.cu_seqlens != nullptr;
  int b, seq_len;
  index_t row_begin, t;
  if (!packed) {
    if (p.seqlen <= 0 || item >= static_cast<index_t>(p.batch) * p.seqlen) return;
    b = static_cast<int>(item / p.seqlen);
    t = item % p.seqlen;
    row_begin = 0;
    seq_len = p.seqlen;
  } else {
    if (item >= p.total_rows) return;
    b = find_sequence(p.cu_seqlens, p.batch, item);
    if (b < 0) return;
    const SeqGeom sg = seq_geom(p.cu_seqlens, b, 0, p.total_rows);
    row_begin = sg.row_begin;
    seq_len = sg.len;
    t = item - row_begin;
  }
  const int l = p.cmp_block, d = p.cmp_stride, lp = p.sel_block;
  const int nc = num_compressed(seq_len, l, d);
  const index_t nvis = num_visible(t, nc, l, d);
  const int t_blk = static_cast<int>(t / lp);
  const index_t kv_begin = packed ? compressed_row_begin(p.cu_seqlens, b, p.total_rows, d) : 0;
  const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch) + (row_begin + t) * p.q_stride.row +
               static_cast<index_t>(g) * G * p.q_stride.head;
  const T* kc = static_cast<const T*>(p.k_cmp) + (packed ? 0 : b * p.k_stride.batch) + kv_begin * p.k_stride.row +
                static_cast<index_t>(g) * p.k_stride.head;
  const float* lse = p.lse + (packed ? 0 : b * p.lse_batch_stride) + (row_begin + t) * p.lse_row_stride +
                     static_cast<index_t>(g) * G;

  constexpr int kVec = kHeadDim / 8;
  for (int i = lane; i < G * kVec; i += 32) {
    const int h = i / kVec, c = (i % kVec) * 8;
    *reinterpret_cast<uint4*>(sq + h * kHeadDim + c) = *reinterpret_cast<const uint4*>(q + h * p.q_stride.head + c);
  }
  for (int h = lane; h < G; h += 32) s_lse[h] = lse[h];
  for (int j = lane; j < kOpenBlocks; j += 32) s_open[j] = 0.f;
  __syncwarp();

  int count = 0;          // lane 0's view of the top list
  int next_final = 0;     // next block to finalise (blocks are finalised in ascending order)
  const float scale = p.scale;
  auto finalise_until = [&](int j_end) {  // lane 0: blocks [next_final, j_end)
    for (; next_final < j_end; ++next_final) {
      const int j = next_final;
      const bool forced = j < p.init_blocks || j > t_blk - p.local_blocks;
      const float s = forced ? INFINITY : s_open[j % kOpenBlocks];
      s_open[j % kOpenBlocks] = 0.f;
      topn_insert(s_sc, s_id, count, n, s, j);
    }
  };

  for (index_t i0 = 0; i0 < nvis; i0 += 32) {
    const index_t i = i0 + lane;
    float P = 0.f;
    if (i < nvis) {
      const T* krow = kc + i * p.k_stride.row;
      for (int h = 0; h < G; ++h) {
        const float lh = s_lse[h];
        if (lh == -INFINITY) continue;
        float dot = 0.f;
#pragma unroll 4
        for (int c = 0; c < kHeadDim; c += 8) {
          const uint4 kv = *reinterpret_cast<const uint4*>(krow + c);
          const uint4 qv = *reinterpret_cast<const uint4*>(sq + h * kHeadDim + c);
          const T* ke = reinterpret_cast<const T*>(&kv);
          const T* qe = reinterpret_cast<const T*>(&qv);
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(to_f<T>(qe[e]), to_f<T>(ke[e]), dot);
        }
        P += expf(scale * dot - lh);
      }
    }
    s_p[lane] = P;
    __syncwarp();
    if (lane == 0) {
      const index_t i_end = i0 + 32 < nvis ? i0 + 32 : nvis;
      for (index_t ii = i0; ii < i_end; ++ii) {
        const index_t a0 = ii * d, a1 = ii * d + l;  // compressed token ii covers keys [a0, a1)
        for (index_t j = a0 / lp; j * lp < a1 && j <= t_blk; ++j) {
          const index_t lo = a0 > j * lp ? a0 : j * lp;
          const index_t hi = a1 < (j + 1) * lp ? a1 : (j + 1) * lp;
          s_open[j % kOpenBlocks] += s_p[ii - i0] * static_cast<float>((hi - lo) / d);
        }
      }
      // Blocks whose overlapping compressed tokens are all processed: j with every token
      // i <= i_end - 1 done, i.e. the first token after the tile starts at or after (j+1)*l'.
      index_t j_done = i_end >= nvis ? t_blk + 1 : (i_end * d) / lp;
      if (j_done > t_blk + 1) j_done = t_blk + 1;
      finalise_until(static_cast<int>(j_done));
    }
    __syncwarp();
  }
  if (lane == 0) {
    finalise_until(t_blk + 1);
    // Emit ascending block indices, -1 padded.
    for (int a = 1; a < count; ++a) {
      const int x = s_id[a];
      int c = a - 1;
      while (c >= 0 && s_id[c] > x) {
        s_id[c + 1] = s_id[c];
        --c;
      }
      s_id[c + 1] = x;
    }
  }
  __syncwarp();
  int* out = p.block_idx + (packed ? 0 : b * p.block_idx_stride.batch) + (row_begin + t) * p.block_idx_stride.row +
             static_cast<index_t>(g) * p.block_idx_stride.head;
  const int cnt = __shfl_sync(0xffffffffu, count, 0);
  for (int a = lane; a < n; a += 32) out[a] = a < cnt ? s_id[a] : -1;
}

}  // namespace sparse_detail
}  // namespace nsa
