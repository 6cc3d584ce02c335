// sm_90a block scoring + top-n selection (DESIGN.md §1.3-1.4) on warpgroup MMAs, for a power-of-two
// G <= 16 (every warp owns the G heads of 16 / G whole tokens).
//
// ncu of the sm_80 kernel (select_kernel.cuh) at 16k, headline shape: issue-bound (IPC 2.1,
// 25% occupancy at 128 registers); a third of its instructions were the per-warp 16 x 32 score
// products and their head sums through shared memory, a quarter the block sums, a fifth the
// list merges. Here a CTA is the range forward's (range_attn_fwd_sm90.cuh): two warpgroups, 128
// query rows, swizzled Q and three stages of 64 compressed keys filled by cp.async, S = Q K^T
// per warpgroup on one m64n64 wgmma chain. Each step issues S of the next tile before it works
// on the current one, so the tensor cores run under the scalar phase (kPipelined; the default is
// the one-buffer variant with two CTAs per SM, which measured faster). Per tile and warp:
//   1. P = exp2(S scale log2e - lse log2e), masked to the keys each row's token sees (only on
//      tiles that some token of the warp does not see whole);
//   2. the sum over each token's heads is a reduce-scatter across the quad rows of the
//      accumulator layout (xor shuffles over gid bits, halving the columns each time: 14
//      shuffles per 64 keys at G = 16 instead of 48 for a full butterfly), then stored as
//      sP [tokens][64] in a fixed order;
//   3, 4. SelectWarpLists::add_tile (block sums, top-n lists), shared with the sm_80 kernel.
#pragma once

#include "range_attn_fwd_sm90.cuh"
#include "select_lists.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kRing_ = 64>
struct SelectSm90Config {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsCta = kWarps * kRows;  // 64 per warpgroup: the wgmma M
  static constexpr int kTileN = 64;                // compressed keys per tile (the wgmma N)
  static constexpr int kStages = 3;               // tile it + 2 loads while tile it is multiplied
  // Open block sums per token (SelectWarpLists): 64, or 128 for geometries whose 64-key tile
  // opens more blocks (l = d = l' = 64: 65).
  static constexpr int kRing = kRing_;
  static constexpr int kQBytes = kRowsCta * kHeadDim * 2;
  static constexpr int kKBytes = kTileN * kHeadDim * 2;
  // + the stages' full and empty barriers (TMA form); the lists of the 8 warps follow (16-byte aligned)
  static constexpr int kFixedBytes = kQBytes + kStages * kKBytes + 64;
  static_assert(kHeadDim % 64 == 0, "wgmma path: Dk in {64, 128, 192, 256}");
  __host__ __device__ static size_t list_bytes(int G, int n) {
    return (SelectListLayout<kTileN, kRing>(0, kRows / G, n).end + 15) / 16 * 16;
  }
  __host__ __device__ static size_t smem_bytes(int G, int n) {
    return kFixedBytes + kWarps * list_bytes(G, n) + 1024;  // + 1024-byte alignment
  }
};

// Step 2 for kHeads (a power of two <= 16) heads per token: s is one warp's 16 x kTileN
// accumulator tile (m16n8 layout: s[4 nt + 2 ri + e] = row gid + 8 ri, key 8 nt + 2 tig + e).
// Rows gid + 8 ri with the same token differ in gid bits [0, log2 kHeads) (and ri at 16 heads):
// level k exchanges half of the remaining key groups with lane ^ (4 << k) and keeps the sums of
// the other half. Stores sP[token][key] for the warp's 16 / kHeads tokens.
template <int kHeads>
constexpr int select_head_levels() {
  return kHeads >= 8 ? 3 : (kHeads == 4 ? 2 : (kHeads == 2 ? 1 : 0));
}

// The reduce-scatter of row half ri (both halves at 16 heads): v[i] for i < kTileN / 8 >>
// levels are the head sums of keys 8 (off + i) + 2 tig + {0, 1}.
template <int kTileN, int kHeads>
__device__ __forceinline__ void select_reduce_heads(const float (&s)[kTileN / 2], int ri, float (&v)[kTileN / 8][2],
                                                    int& off, int gid) {
  constexpr int kNt = kTileN / 8;
  constexpr int kLevels = select_head_levels<kHeads>();
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      v[nt][e] = kHeads == 16 ? s[4 * nt + e] + s[4 * nt + 2 + e] : s[4 * nt + 2 * ri + e];
  off = 0;  // first key group still held
#pragma unroll
  for (int k = 0; k < kLevels; ++k) {
    const int half = kNt >> (k + 1);
    const bool upper = (gid >> k) & 1;
#pragma unroll
    for (int i = 0; i < half; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float send = upper ? v[i][e] : v[i + half][e];
        const float keep = upper ? v[i + half][e] : v[i][e];
        v[i][e] = keep + __shfl_xor_sync(0xffffffffu, send, 4 << k);
      }
    off += upper ? half : 0;
  }
}

template <int kTileN, int kHeads>
__device__ __forceinline__ void select_sum_heads(const float (&s)[kTileN / 2], float* sP, int gid, int tig) {
  constexpr int kNt = kTileN / 8;
  constexpr int kLevels = select_head_levels<kHeads>();
  constexpr int kHalves = kHeads == 16 ? 1 : 2;  // row halves summed separately (different tokens)
#pragma unroll
  for (int ri = 0; ri < kHalves; ++ri) {
    float v[kNt][2];
    int off;
    select_reduce_heads<kTileN, kHeads>(s, ri, v, off, gid);
    const int tok = kHeads == 16 ? 0 : (gid + 8 * ri) / kHeads;
#pragma unroll
    for (int i = 0; i < (kNt >> kLevels); ++i)
      *reinterpret_cast<float2*>(sP + tok * kTileN + 8 * (off + i) + 2 * tig) = make_float2(v[i][0], v[i][1]);
  }
}

// kPipelined: two S buffers, S of the next tile in flight while this one is scored, ~215
// registers, one CTA per SM. Otherwise one buffer and two CTAs per SM (<= 128 registers; the
// faster one where it fits, see select_sm90_pipelined).
// kRegList: the default geometry at G = 16 with its block scores and lists in registers
// (SelectWarpRegList, select_reg_list_covers); the shared-memory lists otherwise.
// kTma: thread 0 loads each compressed key tile as one box per 64 columns into its stage,
// completing on the stage's full barrier (no loader address arithmetic in every thread). In the
// pipelined form a CTA barrier per step still releases the stage the next box fills.
// The pipelined form with the register lists fits two CTAs per SM (<= 128 registers) at Dk <= 128;
// wider rows leave shared memory for one CTA, which then takes the registers it needs.
// tile_barrier = false (the one-S-buffer TMA form's default): no CTA barrier per tile; each warp
// arrives on the stage's empty barrier once its S is waited for, and thread 0 waits on it before
// the stage takes the tile three later, so only warp 0 waits for the slowest warp.
template <typename T, int kHeadDim, bool kPipelined, int kRing, bool kRegList = false, bool kTma = false>
__global__ void __launch_bounds__(256, kPipelined && !(kRegList && kHeadDim <= 128) ? 1 : 2)
    select_blocks_sm90_kernel(const SelectParams sp, const __grid_constant__ tma::KvTileMaps maps, bool tile_barrier) {
#ifdef NSA_WGMMA
  using Cfg = SelectSm90Config<kHeadDim, kRing>;
  constexpr int kTileN = Cfg::kTileN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = wgmma::align_smem_1024(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sStage = smem + Cfg::kQBytes;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const uint32_t q_base = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t stage_addr = q_base + Cfg::kQBytes;
  const uint32_t q_addr = q_base + (warp / 4) * 64 * 128;  // this warpgroup's 64 rows of each column atom

  const int G = sp.heads_q / sp.heads_kv, g = blockIdx.y, n = sp.top_n;
  const int P = kRows / G;  // tokens per warp
  const SelectListLayout<kTileN, Cfg::kRing> list_lay(0, P, n);
  unsigned char* warp_lists = smem + Cfg::kFixedBytes + warp * Cfg::list_bytes(G, n);
  float* sP = reinterpret_cast<float*>(warp_lists + list_lay.p_off);
  RowMap rm;
  rm.g = g;
  rm.tokens = P;
  rm.heads = G;
  rm.head0 = g * G;

  const AttnParams geo = select_batch_geometry(sp);
  const int cta_tokens = P * Cfg::kWarps;
  Group gr;
  if (!group_of(geo, cta_tokens, blockIdx.x, gr)) return;  // uniform over the CTA
  TileRing<Cfg::kStages> ring(stage_addr + Cfg::kStages * Cfg::kKBytes);  // barriers after the stages
  // the stages' empty barriers after the full ones: tile gi's stage is free once its 8 warps arrived
  const uint32_t empty_addr = stage_addr + Cfg::kStages * Cfg::kKBytes + Cfg::kStages * 8;
  auto empty_bar = [&](uint32_t gi) { return empty_addr + (gi % Cfg::kStages) * 8; };
  if constexpr (kTma) {
    if (tid == 0)
      for (int st = 0; st < Cfg::kStages; ++st) tma::mbar_init(empty_addr + st * 8, Cfg::kWarps);
    ring.init(tid);  // its fence and CTA barrier cover these too
  }
  static_assert(2 * Cfg::kStages * 8 <= 64, "barriers fit the 64 bytes after the stages");
  const bool packed = sp.cu_seqlens != nullptr;
  const int l = sp.cmp_block, d = sp.cmp_stride;
  const float scale_log2 = sp.scale * kLog2e;

  Pass ps;
  for (int pb = 0; next_pass(geo, cta_tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const Pass wps = warp_pass(ps, warp, P);
    const int nc = num_compressed(ps.seq_len, l, d);
    const index_t kv_begin = packed ? compressed_row_begin(sp.cu_seqlens, b, sp.total_rows, d) : 0;
    const T* q = static_cast<const T*>(sp.q) + (packed ? 0 : b * sp.q_stride.batch);
    const T* kc = static_cast<const T*>(sp.k_cmp) + (packed ? 0 : b * sp.k_stride.batch) +
                  static_cast<index_t>(g) * sp.k_stride.head;
    const index_t lse_b = packed ? 0 : b * sp.lse_batch_stride;

    // Keys of the CTA (its last token sees the most) and of this warp's tokens: all of
    // [0, nvis_warp_lo) is visible to every token of the warp.
    const index_t nvis_cta = num_visible(ps.t0 + ps.p_end - 1, nc, l, d);
    const bool warp_on = wps.p_begin < wps.p_end;
    const index_t nvis_warp = warp_on ? num_visible(wps.t0 + wps.p_end - 1, nc, l, d) : 0;
    const index_t nvis_warp_lo = warp_on ? num_visible(wps.t0 + wps.p_begin, nc, l, d) : 0;
    const int n_tiles = static_cast<int>((nvis_cta + kTileN - 1) / kTileN);
    // Steps come in pairs (the S buffers alternate); an odd count gets one more step, whose
    // tile lies past every token's keys and is skipped.
    const int n_steps = (n_tiles + 1) & ~1;
    const int n_load = kPipelined ? n_steps : n_tiles;  // tiles the loads may touch

    load_query_rows_swizzled<T, kHeadDim, Cfg::kRowsCta, Cfg::kThreads>(sQ, q, sp.q_stride, rm, ps, tid);
    const SwizzledRowLoader<T, kHeadDim, kTileN, Cfg::kThreads, /*kMnMajor=*/false> k_loader(kc, sp.k_stride.row, kv_begin, tid);
    auto load_tile = [&](int it) {  // tile it -> stage (seq + it) % kStages (seq = 0 without TMA); TMA: thread 0 only
      if constexpr (kTma) {
        if (tid == 0) {
          tma::mbar_arrive_expect_tx(ring.bar(it), Cfg::kKBytes);
#pragma unroll
          for (int c = 0; c < kHeadDim / 64; ++c)
            tma::load_4d(stage_addr + ring.stage(it) * Cfg::kKBytes + c * kTileN * 128, &maps.k, 64 * c, g,
                         static_cast<int>(kv_begin + static_cast<index_t>(it) * kTileN), packed ? 0 : b, ring.bar(it));
        }
      } else {
        k_loader.load(sStage + ring.stage(it) * Cfg::kKBytes, static_cast<index_t>(it) * kTileN, nc, kc, tid);
      }
    };
    if (n_load > 0) load_tile(0);
    mma::cp_async_commit();  // group: query rows + tile 0
    if (n_load > 1) load_tile(1);
    mma::cp_async_commit();

    // Only the form in use is built (the shared-memory lists clear their ring on construction).
    auto lists = [&] {
      if constexpr (kRegList)
        return SelectWarpRegList(sp, wps.p_begin <= 0 && 0 < wps.p_end, wps.t0, lane);  // the warp's one token
      else
        return SelectWarpLists<kTileN, Cfg::kRing, /*kPerLaneWork=*/true>(sp, warp_lists, list_lay, P, wps.p_begin,
                                                                           wps.p_end, wps.t0, nc, lane);
    }();
    // Rows gid, gid + 8 of the warp: visible keys and lse (log2 units; +inf for rows that are off).
    index_t row_nv[2];
    float row_lse[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + ri * 8, tok = r / G, h = r % G;
      const bool on = tok >= wps.p_begin && tok < wps.p_end;
      row_nv[ri] = 0;
      row_lse[ri] = INFINITY;
      if (on) {
        row_nv[ri] = num_visible(wps.t0 + tok, nc, l, d);
        const float x = sp.lse[lse_b + (wps.row_begin + wps.t0 + tok) * sp.lse_row_stride + g * G + h];
        row_lse[ri] = x == -INFINITY ? INFINITY : x * kLog2e;
      }
    }

    auto issue_s = [&](int it, float(&s_acc)[kTileN / 2]) {
      const uint32_t k_addr = stage_addr + ring.stage(it) * Cfg::kKBytes;
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t off_q = (kk / 4) * Cfg::kRowsCta * 128 + (kk % 4) * 32;
        const uint32_t off_k = (kk / 4) * kTileN * 128 + (kk % 4) * 32;
        wgmma::Wgmma<T, kTileN>::ss(s_acc, wgmma::make_desc(q_addr + off_q, 16, 1024),
                                    wgmma::make_desc(k_addr + off_k, 16, 1024), kk > 0);
      }
      wgmma::commit();
    };

    // Steps 1-4 for tile it of this warp (warp-uniform: no wgmma inside).
    auto score_tile = [&](int it, float(&s)[kTileN / 2]) {
      const index_t s0 = static_cast<index_t>(it) * kTileN;
      if (s0 >= nvis_warp) return;
      // Every key of the tile visible to every row of the warp (all but its last tiles): no
      // per-element mask (a compare and select per score otherwise).
      if (s0 + kTileN <= nvis_warp_lo) {
#pragma unroll
        for (int ri = 0; ri < 2; ++ri)
#pragma unroll
          for (int nt = 0; nt < kTileN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[4 * nt + 2 * ri + e];
              x = exp2f(fmaf(x, scale_log2, -row_lse[ri]));
            }
      } else {
#pragma unroll
        for (int ri = 0; ri < 2; ++ri) {
          const int vis = tile_offset_n<kTileN>(row_nv[ri], s0);
#pragma unroll
          for (int nt = 0; nt < kTileN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[4 * nt + 2 * ri + e];
              x = 8 * nt + 2 * tig + e < vis ? exp2f(fmaf(x, scale_log2, -row_lse[ri])) : 0.f;
            }
        }
      }
      if constexpr (kRegList) {
        float v[kTileN / 8][2];
        int off;
        select_reduce_heads<kTileN, 16>(s, 0, v, off, gid);
        const float x[2] = {v[0][0], v[0][1]};
        lists.add_tile(x, off, tig, it);
      } else {
        switch (G) {
          case 16: select_sum_heads<kTileN, 16>(s, sP, gid, tig); break;
          case 8: select_sum_heads<kTileN, 8>(s, sP, gid, tig); break;
          case 4: select_sum_heads<kTileN, 4>(s, sP, gid, tig); break;
          case 2: select_sum_heads<kTileN, 2>(s, sP, gid, tig); break;
          default: select_sum_heads<kTileN, 1>(s, sP, gid, tig); break;
        }
        __syncwarp();
        lists.add_tile(s0);
      }
    };

    // Step it: S of tile it is in s_cur. The tensor cores run S of tile it + 1 (a stale stage on
    // the last step: never scored) while the warps score tile it; the wgmma is waited for before
    // the step ends and sits outside every branch (see range_attn_fwd_sm90.cuh).
    // Stages: tile it + 2 goes into the stage of tile it - 1, whose S was waited for last step.
    auto step = [&](int it, float(&s_cur)[kTileN / 2], float(&s_nxt)[kTileN / 2]) {
      if constexpr (kTma) {
        __syncthreads();  // every warp waited for S (it - 1): its stage takes tile it + 2
        if (it + 2 < n_steps) load_tile(it + 2);
        if (it + 1 < n_steps) ring.wait(it + 1);  // the last step's S reads a stale stage, never scored
      } else {
        mma::cp_async_wait<0>();  // tile it + 1
        wgmma::fence_proxy_async();
        __syncthreads();
        if (it + 2 < n_steps) load_tile(it + 2);
        mma::cp_async_commit();
      }
      issue_s(it + 1, s_nxt);
      score_tile(it, s_cur);
      __syncwarp();
      wgmma::wait<0>();
      wgmma::fence_operands(s_nxt);
    };

    if constexpr (kPipelined) {
      float s_a[kTileN / 2], s_b[kTileN / 2];
      if (n_steps > 0) {
        if constexpr (kTma) {
          mma::cp_async_wait<0>();  // the query rows
          wgmma::fence_proxy_async();
          ring.wait(0);
        } else {
          mma::cp_async_wait<1>();  // query rows + tile 0
          wgmma::fence_proxy_async();
        }
        __syncthreads();
        issue_s(0, s_a);
        wgmma::wait<0>();
        wgmma::fence_operands(s_a);
      }
      for (int it = 0; it < n_steps; it += 2) {
        step(it, s_a, s_b);
        step(it + 1, s_b, s_a);
      }
    } else {
      float s_acc[kTileN / 2];
      for (int it = 0; it < n_tiles; ++it) {
        if constexpr (kTma) {
          if (it == 0) {
            mma::cp_async_wait<0>();  // the query rows
            wgmma::fence_proxy_async();
          }
          if (it == 0 || tile_barrier) __syncthreads();  // (tile_barrier: every warp is past tile it - 1)
          if (it + 2 < n_tiles) {
            // The stage of tile it + 2 held tile it - 1 (this pass or, in its first steps, the last).
            const uint32_t gi = ring.seq + static_cast<uint32_t>(it + 2);
            if (!tile_barrier && tid == 0 && gi >= Cfg::kStages)
              tma::mbar_wait(empty_bar(gi - Cfg::kStages), ((gi - Cfg::kStages) / Cfg::kStages) & 1);
            load_tile(it + 2);
          }
          ring.wait(it);
        } else {
          mma::cp_async_wait<1>();  // tile it; tile it + 1 may stay in flight
          wgmma::fence_proxy_async();
          __syncthreads();
          if (it + 2 < n_tiles) load_tile(it + 2);  // the stage of tile it - 1, multiplied last step
          mma::cp_async_commit();
        }
        issue_s(it, s_acc);
        wgmma::wait<0>();
        wgmma::fence_operands(s_acc);
        if constexpr (kTma) {
          __syncwarp();
          if (lane == 0) tma::mbar_arrive(empty_bar(ring.seq + static_cast<uint32_t>(it)));  // this warp's S of tile it done
        }
        score_tile(it, s_acc);
        __syncwarp();
      }
    }
    mma::cp_async_wait_all();  // no tiles: the query rows' group is still in flight
    __syncwarp();
    if constexpr (kTma) ring.seq += static_cast<uint32_t>(n_load);
    int* out = sp.block_idx + (packed ? 0 : b * sp.block_idx_stride.batch) + static_cast<index_t>(g) * sp.block_idx_stride.head;
    lists.finish(out, wps.row_begin + wps.t0, sp.block_idx_stride.row);
    __syncthreads();  // sQ, the stages and the lists are reused by the next pass
  }
#endif
}

// The ring the arguments need: 64 entries, or 128 where one 64-key tile opens more blocks; 0 if
// even 128 is too few (the sm_80 kernel's 32-key tiles then run).
inline int select_sm90_ring(const SelectParams& p) {
  const int open = select_open_blocks(p.cmp_block, p.cmp_stride, p.sel_block, 64);
  return open <= 64 ? 64 : (open <= 128 ? 128 : 0);
}

// Whether the sm_90a selection kernel takes these arguments: power-of-two G <= 16, a ring that
// holds the open blocks, and shared memory that fits.
template <int kHeadDim>
bool select_sm90_covers(const SelectParams& p) {
  const int G = p.heads_q / p.heads_kv;
  if (G < 1 || G > kRows || (G & (G - 1)) != 0) return false;
  const int ring = select_sm90_ring(p);
  if (ring == 0) return false;
  const size_t smem = ring == 64 ? SelectSm90Config<kHeadDim, 64>::smem_bytes(G, p.top_n)
                                 : SelectSm90Config<kHeadDim, 128>::smem_bytes(G, p.top_n);
  return smem <= 227 * 1024;
}

// Which variant runs. Measured on the H200 (64k, G = 16): one S buffer with two CTAs per SM
// 14.8 ms, pipelined with one CTA 23.1 ms (sm_80: 25.4): the scalar phase is latency-bound and
// wants the warps. So the pipelined kernel runs only where two CTAs do not fit in an SM's shared
// memory (G = 1, long lists, large Dk), or when NSA_SELECT_SM90_PIPELINED=1 (read per launch, so
// one process can time both).
template <int kHeadDim, int kRing>
bool select_sm90_pipelined(const SelectParams& p) {
  const int G = p.heads_q / p.heads_kv;
  if (2 * (SelectSm90Config<kHeadDim, kRing>::smem_bytes(G, p.top_n) + 1024) > 228 * 1024) return true;
  const char* v = getenv("NSA_SELECT_SM90_PIPELINED");
  return v != nullptr && v[0] == '1';
}

// Whether the register lists take these arguments: one token per warp (G = 16), l = 2d, l' = 4d
// (a 64-key tile is 16 whole blocks), n <= 32 (a lane per entry); NSA_SELECT_REG_LIST=0 keeps the
// shared-memory lists (an A/B switch read per launch).
inline bool select_reg_list_covers(const SelectParams& p) {
  const char* e = std::getenv("NSA_SELECT_REG_LIST");
  if (e != nullptr && e[0] == '0') return false;
  return p.heads_q == 16 * p.heads_kv && p.cmp_block == 2 * p.cmp_stride && p.sel_block == 4 * p.cmp_stride &&
         p.top_n <= 32;
}

// The K map of the TMA form (the compressed keys as KvTileMaps' K, 64-key boxes); false where TMA
// cannot describe them or NSA_SELECT_TMA=0 / NSA_DISABLE_TMA=1 (read per launch).
template <typename T>
bool encode_select_k_map(tma::KvTileMaps& m, const SelectParams& p) {
  const char* e = std::getenv("NSA_SELECT_TMA");
  if ((e != nullptr && e[0] == '0') || !tma::enabled()) return false;
  const bool packed = p.cu_seqlens != nullptr;
  const index_t rows = packed ? p.total_rows / p.cmp_stride : p.seqlen_k_cmp;
  return tma::encode_rows_map<T>(&m.k, p.k_cmp, packed ? 1 : p.batch, rows, p.heads_kv, p.head_dim_qk,
                                 p.k_stride.batch, p.k_stride.row, p.k_stride.head, 1, 64);
}

template <typename T, int kHeadDim, bool kPipelined, int kRing, bool kRegList = false>
Status run_select_blocks_sm90(const SelectParams& p, cudaStream_t stream) {
  using Cfg = SelectSm90Config<kHeadDim, kRing>;
  const int G = p.heads_q / p.heads_kv;
  const int cta_tokens = (kRows / G) * Cfg::kWarps;
  const index_t ctas = p.cu_seqlens ? (p.total_rows + cta_tokens - 1) / cta_tokens
                                    : static_cast<index_t>(p.batch) * ((p.seqlen + cta_tokens - 1) / cta_tokens);
  if (ctas == 0) return Status{};
  if (p.heads_kv > 65535) return Status{2, "too many KV heads for one launch"};
  if (ctas > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  const size_t smem = Cfg::smem_bytes(G, p.top_n);
  tma::KvTileMaps maps{};
  const bool use_tma = encode_select_k_map<T>(maps, p);
  auto kernel = use_tma ? select_blocks_sm90_kernel<T, kHeadDim, kPipelined, kRing, kRegList, true>
                        : select_blocks_sm90_kernel<T, kHeadDim, kPipelined, kRing, kRegList, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  const char* tb = std::getenv("NSA_SELECT_TILE_BARRIER");  // 1: a CTA barrier per tile (A/B)
  kernel<<<dim3(static_cast<unsigned>(ctas), p.heads_kv), Cfg::kThreads, smem, stream>>>(
      p, maps, tb != nullptr && tb[0] == '1');
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

template <typename T, int kHeadDim, int kRing>
Status run_select_blocks_sm90_ring(const SelectParams& p, cudaStream_t stream) {
  if constexpr (kRing == 64) {  // the ring the register lists' geometry needs
    if (select_reg_list_covers(p))
      return select_sm90_pipelined<kHeadDim, kRing>(p) ? run_select_blocks_sm90<T, kHeadDim, true, kRing, true>(p, stream)
                                                       : run_select_blocks_sm90<T, kHeadDim, false, kRing, true>(p, stream);
  }
  if (select_sm90_pipelined<kHeadDim, kRing>(p)) return run_select_blocks_sm90<T, kHeadDim, true, kRing>(p, stream);
  return run_select_blocks_sm90<T, kHeadDim, false, kRing>(p, stream);
}

}  // namespace sparse_detail
}  // namespace nsa
