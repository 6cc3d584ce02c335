// sm_90a dQ of the contiguous-key-range branches (compressed keys [0, nvis(t)), window
// [t - w + 1, t]) on warpgroup MMAs: the sm_90a forward's CTA and pipeline
// (range_attn_fwd_sm90.cuh) with the backward's tile (attn_bwd_dq.cuh):
//
//   S = Q K^T, dP = dO V^T (both operands K-major), P = exp2(S scale log2e - lse log2e) under the
//   row masks, dS = P (dP - delta), dQ += dS K (dS from the accumulators as register A
//   fragments; K read MN-major from the same swizzled tile: LBO = one column atom of the tile,
//   SBO = 8 keys), dq = scale dQ written once per row.
//
// Two warpgroups of 64 rows (8 row groups of the sm_80 layout) share 4 stages of K/V tiles; per
// step the tensor cores run S and dP of tile it + 1 and then dQ of tile it while dS of tile
// it + 1 is computed. Every row's sum runs over the tiles in ascending order: no atomics,
// bitwise reproducible.
#pragma once

#include "attn_bwd_dq.cuh"
#include "range_attn_fwd_sm90.cuh"

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV>
struct RangeDqSm90Config {
  static constexpr int kWarps = 8;  // two warpgroups = 8 row groups of 16
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsCta = kWarps * kRows;  // 128
  static constexpr int kTileN = 64;
  static constexpr int kStages = 4;
  static constexpr int kQBytes = kRowsCta * kHeadDim * 2;
  static constexpr int kOBytes = kRowsCta * kHeadDimV * 2;
  static constexpr int kKBytes = kTileN * kHeadDim * 2;
  static constexpr int kVBytes = kTileN * kHeadDimV * 2;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  // + the stages' full barriers (TMA form) + 1024-byte alignment
  static constexpr int kSmemBytes = kQBytes + kOBytes + kStages * kStageBytes + kStages * 8 + 1024;
  static_assert(kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDim <= 128 && kHeadDimV <= 128,
                "wgmma dQ: D, Dv in {64, 128}");
};

// dS = P (dP - delta) of a tile starting at key s0 into s (fp32), P = exp2(S scale_log2 - lse_l2);
// keys outside a row's range give 0 (a select: masked keys may hold anything). The masks run only
// on tiles that are not whole (a CTA-uniform branch, as the forward's softmax): with them folded
// into every tile's selects, ptxas kept 64 predicates live per tile and packed them with P2R
// (ncu, compressed dQ at 64k in the producer form: ~200 extra instructions per tile and warp).
template <int kTileN>
__device__ __forceinline__ void make_ds_tile(float (&s_acc)[kTileN / 2], const float (&dp_acc)[kTileN / 2],
                                             const RangeRowKeys& rows, const DqRows& rw, index_t s0, int tig,
                                             float scale_log2) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri)
#pragma unroll
    for (int n = 0; n < kTileN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s_acc[4 * n + 2 * ri + e];
        x = exp2f(fmaf(x, scale_log2, -rw.lse_l2[ri])) * (dp_acc[4 * n + 2 * ri + e] - rw.delta[ri]);
      }
  if (!rows.whole<kTileN>(s0)) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) mask_row_keys<kTileN>(s_acc, ri, rows, s0, tig, 0.f);
  }
}

// S = Q K^T and dP = dO V^T of one stage tile (K at k_addr, V at v_addr), one wgmma group, not
// waited for.
template <typename T, int kHeadDim, int kHeadDimV, int kTileN, int kRowsCta>
__device__ __forceinline__ void issue_s_dp_tile(float (&s_acc)[kTileN / 2], float (&dp_acc)[kTileN / 2], uint32_t q_addr,
                                                uint32_t do_addr, uint32_t k_addr, uint32_t v_addr) {
  wgmma::fence();
  wgmma_rows_by_tile<T, kHeadDim, kTileN, kRowsCta>(s_acc, q_addr, k_addr);
  wgmma_rows_by_tile<T, kHeadDimV, kTileN, kRowsCta>(dp_acc, do_addr, v_addr);
  wgmma::commit();
}

// kTma: the key tiles come by TMA (tma::KvTileMaps, tma::load_kv_tile).
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, bool kTma = false>
__global__ void __launch_bounds__(256, 1)
    range_attn_bwd_dq_sm90_kernel(const AttnBwdParams p, const __grid_constant__ tma::KvTileMaps maps) {
#ifdef NSA_WGMMA
  using Cfg = RangeDqSm90Config<kHeadDim, kHeadDimV>;
  constexpr int kTileN = Cfg::kTileN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = wgmma::align_smem_1024(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sdO = smem + Cfg::kQBytes;
  unsigned char* sStage = sdO + Cfg::kOBytes;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const uint32_t q_base = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t q_addr = q_base + (warp / 4) * 64 * 128;  // this warpgroup's 64 rows of each column atom
  const uint32_t do_addr = q_base + Cfg::kQBytes + (warp / 4) * 64 * 128;
  const uint32_t stage_addr = q_base + Cfg::kQBytes + Cfg::kOBytes;

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kWarps;
  Group gr;
  if (!group_of(p, cta_tokens, blockIdx.x, gr)) return;  // uniform over the CTA
  const float scale_log2 = p.scale * kLog2e;
  const bool packed = p.cu_seqlens != nullptr;
  TileRing<Cfg::kStages> ring(stage_addr + Cfg::kStages * Cfg::kStageBytes);  // barriers after the stages
  if constexpr (kTma) ring.init(tid);

  Pass ps;
  for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end) {
    const int b = ps.b;
    const Pass wps = warp_pass(ps, warp, P);
    const RangeKeys<kCompressed> rk(p, ps);
    const index_t kv_row_begin = rk.kv_row_begin, n_keys = rk.n_keys;
    index_t lo;
    const int n_tiles = rk.template pass_tiles<kTileN>(p, ps, lo);

    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* dout = static_cast<const T*>(p.dout) + (packed ? 0 : b * p.dout_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;

    load_query_rows_swizzled<T, kHeadDim, Cfg::kRowsCta, Cfg::kThreads>(sQ, q, p.q_stride, rm, ps, tid);
    load_query_rows_swizzled<T, kHeadDimV, Cfg::kRowsCta, Cfg::kThreads>(sdO, dout, p.dout_stride, rm, ps, tid);
    // K and V tiles both K-major (S and dP reduce over the head dims); dQ reads K MN-major.
    const SwizzledRowLoader<T, kHeadDim, kTileN, Cfg::kThreads, /*kMnMajor=*/false> k_loader(k, p.k_stride.row, kv_row_begin, tid);
    const SwizzledRowLoader<T, kHeadDimV, kTileN, Cfg::kThreads, /*kMnMajor=*/false> v_loader(v, p.v_stride.row, kv_row_begin, tid);
    auto load_tile = [&](int it) {  // TMA: thread 0 only
      const index_t s0 = lo + static_cast<index_t>(it) * kTileN;
      if constexpr (kTma) {
        if (tid == 0)
          tma::load_kv_tile<kHeadDim, kHeadDimV, kTileN>(stage_addr + ring.stage(it) * Cfg::kStageBytes, maps, rm.g,
                                                        kv_row_begin + s0, packed ? 0 : b, ring.bar(it));
      } else {
        unsigned char* sK = sStage + ring.stage(it) * Cfg::kStageBytes;
        k_loader.load(sK, s0, n_keys, k, tid);
        v_loader.load(sK + Cfg::kKBytes, s0, n_keys, v, tid);
      }
    };
    if (n_tiles > 0) load_tile(0);
    mma::cp_async_commit();  // group: Q, dO rows + tile 0
    if (n_tiles > 1) load_tile(1);
    mma::cp_async_commit();
    if (n_tiles > 2) load_tile(2);
    mma::cp_async_commit();

    const DqRows rw = dq_rows(p, rm, wps, gid);
    const RangeRowKeys rows = range_row_keys(p, rk, ps, wps, rw.tok, rw.on);
    float dq_acc[kHeadDim / 8][4];
    zero_acc<kHeadDim>(dq_acc);
    float(&dq_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(dq_acc);

    // S and dP of tile it, one wgmma group, not waited for.
    auto issue_s_dp = [&](int it, float(&s_acc)[kTileN / 2], float(&dp_acc)[kTileN / 2]) {
      const uint32_t k_addr = stage_addr + ring.stage(it) * Cfg::kStageBytes;
      issue_s_dp_tile<T, kHeadDim, kHeadDimV, kTileN, Cfg::kRowsCta>(s_acc, dp_acc, q_addr, do_addr, k_addr,
                                                                     k_addr + Cfg::kKBytes);
    };
    auto make_ds = [&](int it, float(&s_acc)[kTileN / 2], const float(&dp_acc)[kTileN / 2]) {
      make_ds_tile<kTileN>(s_acc, dp_acc, rows, rw, lo + static_cast<index_t>(it) * kTileN, tig, scale_log2);
    };

    // Step it: dS of tile it is in s. Its bf16 A fragments are taken first, so S of tile it + 1
    // can land in the same registers. Tensor cores: S, dP of tile it + 1, then dQ += dS K of
    // tile it, during which dS of tile it + 1 is computed. Everything is waited for inside the
    // step and every wgmma sits outside branches (see the forward); the last step multiplies a
    // stale stage into s / dp and never uses the result.
    float s[kTileN / 2], dp[kTileN / 2];
    auto step = [&](int it) {
      if constexpr (kTma) {
        __syncthreads();  // every warpgroup is past tile it - 1: its stage takes tile it + 3
        if (it + 3 < n_tiles) load_tile(it + 3);
        if (it + 1 < n_tiles) ring.wait(it + 1);  // the last step's S, dP read a stale stage, unused
      } else {
        mma::cp_async_wait<1>();  // tile it + 1
        wgmma::fence_proxy_async();
        __syncthreads();
        if (it + 3 < n_tiles) load_tile(it + 3);
        mma::cp_async_commit();
      }
      uint32_t da[kTileN / 16][4];
      pack_p_fragments<T, kTileN>(s, da);
      issue_s_dp(it + 1, s, dp);
      // K MN-major: column atoms (64 head dims) kTileN * 128 bytes apart, 8-key groups 1024.
      const uint32_t k_addr = stage_addr + ring.stage(it) * Cfg::kStageBytes;
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk)
        wgmma::Wgmma<T, kHeadDim>::rs_mn(dq_flat, da[kk], wgmma::make_desc(k_addr + kk * 2 * 1024, kTileN * 128, 1024));
      wgmma::commit();
      wgmma::wait<1>();  // S, dP (it + 1)
      wgmma::fence_operands(s);
      wgmma::fence_operands(dp);
      make_ds(it + 1, s, dp);
      wgmma::wait<0>();  // dQ (it)
      wgmma::fence_operands(dq_flat);
    };

    if (n_tiles > 0) {
      if constexpr (kTma) {
        mma::cp_async_wait<0>();  // Q, dO
        ring.wait(0);
      } else {
        mma::cp_async_wait<2>();  // Q, dO + tile 0
      }
      wgmma::fence_proxy_async();
      __syncthreads();
      issue_s_dp(0, s, dp);
      wgmma::wait<0>();
      wgmma::fence_operands(s);
      wgmma::fence_operands(dp);
      make_ds(0, s, dp);
    }
    for (int it = 0; it < n_tiles; ++it) step(it);
    mma::cp_async_wait_all();

    dq_epilogue<T, kHeadDim>(p, rm, wps, rw, 0, dq_acc, gid, tig);
    if constexpr (kTma) ring.seq += static_cast<uint32_t>(n_tiles);
    __syncthreads();  // the rows and stages are reused by the next pass
  }
#endif
}

// The dQ kernel in the producer form of the dK/dV tile (attn_bwd_dkdv_sm90_tma.cuh), the default
// (NSA_RANGE_WS=0: the kernel above). Three warpgroups: thread 0 of the first issues every load
// (per pass the CTA's 128 query rows of q and dout, one box of (64 columns, heads, 128 / heads
// tokens) per 64 columns; per key tile its K / V boxes into a four-stage ring, each stage with a
// full and an empty barrier); warpgroups 1 and 2 compute as the kernel above but without the
// per-step CTA barrier, releasing a stage once their dQ product of it is waited for and the query
// rows once their last product reading them is (RangeWsMaps and the conditions:
// range_attn_fwd_sm90.cuh). Persistent like the forward's producer form (NSA_RANGE_PERSISTENT).
template <int kHeadDim, int kHeadDimV>
struct RangeDqWsConfig {
  using Base = RangeDqSm90Config<kHeadDim, kHeadDimV>;
  static constexpr int kThreads = 384;
  static constexpr int kSmemBytes = Base::kQBytes + Base::kOBytes + Base::kStages * Base::kStageBytes +
                                    RangeWsBarriers<Base::kStages>::kBytes + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// kSkipLast (the default; NSA_RANGE_DQ_LAST=1 turns it off): a pass's last step issues no S, dP of
// a next tile (they read a stale stage and were discarded), only its dQ product.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, bool kSkipLast = true>
__global__ void __launch_bounds__(384, 1)
    range_attn_bwd_dq_sm90_ws_kernel(const AttnBwdParams p, const __grid_constant__ RangeWsMaps maps) {
#ifdef NSA_WGMMA
  using Cfg = RangeDqSm90Config<kHeadDim, kHeadDimV>;
  constexpr int kTileN = Cfg::kTileN, kStages = Cfg::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = wgmma::align_smem_1024(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t q_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t do_base = q_base + Cfg::kQBytes;
  const uint32_t stage_addr = do_base + Cfg::kOBytes;
  const RangeWsBarriers<kStages> bars(stage_addr + kStages * Cfg::kStageBytes);

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kWarps;
  if (static_cast<index_t>(blockIdx.x) >= cta_groups(p, cta_tokens)) return;  // uniform over the CTA
  bars.init(tid);
  // Persistent as the forward (range_attn_fwd_sm90_ws_kernel, walk_items). One row buffer (q and
  // dout of two items do not fit next to the ring): the next item's first key tiles load during
  // this one's tail, its rows after the last product reading this one's.

  if (warp < 4) {  // ---- producer: thread 0 issues every load, the others leave
    tma::setmaxnreg_dec<24>();
    if (tid == 0)
      range_ws_produce<Cfg, kHeadDim, kHeadDimV, kHeadDimV, kCompressed, false>(p, maps, bars, rm, cta_tokens, q_base,
                                                                                do_base, stage_addr);
    return;
  }

  // ---- consumers: warpgroups 1 and 2 are the kernel above's two warpgroups
  tma::setmaxnreg_inc<240>();
  const int cw = warp - 4;
  const int gid = lane >> 2, tig = lane & 3;
  const uint32_t q_addr = q_base + (cw / 4) * 64 * 128;  // this warpgroup's 64 rows of each column atom
  const uint32_t do_addr = do_base + (cw / 4) * 64 * 128;
  const float scale_log2 = p.scale * kLog2e;
  uint32_t seq = 0, pass_i = 0;
  walk_items<kCompressed>(p, cta_tokens, [&](const Group& gr) {
    Pass ps;
    for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end, ++pass_i) {
      const Pass wps = warp_pass(ps, cw, P);
      const RangeKeys<kCompressed> rk(p, ps);
      index_t lo;
      const int n_tiles = rk.template pass_tiles<kTileN>(p, ps, lo);

      const DqRows rw = dq_rows(p, rm, wps, gid);
      const RangeRowKeys rows = range_row_keys(p, rk, ps, wps, rw.tok, rw.on);
      float dq_acc[kHeadDim / 8][4];
      zero_acc<kHeadDim>(dq_acc);
      float(&dq_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(dq_acc);
      auto stage_of = [&](int it) { return (seq + static_cast<uint32_t>(it)) % kStages; };

      auto issue_s_dp = [&](int it, float(&s_acc)[kTileN / 2], float(&dp_acc)[kTileN / 2]) {
        const uint32_t k_addr = stage_addr + stage_of(it) * Cfg::kStageBytes;
        issue_s_dp_tile<T, kHeadDim, kHeadDimV, kTileN, Cfg::kRowsCta>(s_acc, dp_acc, q_addr, do_addr, k_addr,
                                                                       k_addr + Cfg::kKBytes);
      };
      auto make_ds = [&](int it, float(&s_acc)[kTileN / 2], const float(&dp_acc)[kTileN / 2]) {
        make_ds_tile<kTileN>(s_acc, dp_acc, rows, rw, lo + static_cast<index_t>(it) * kTileN, tig, scale_log2);
      };

      // As above, without the CTA barrier: the last step's S, dP read the stage the next tile will
      // use (possibly being refilled for the next pass); their result is never used.
      float s[kTileN / 2], dp[kTileN / 2];
      auto issue_dq = [&](int it, uint32_t(&da)[kTileN / 16][4]) {  // dQ += dS K of tile it
        const uint32_t k_addr = stage_addr + stage_of(it) * Cfg::kStageBytes;
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kTileN / 16; ++kk)
          wgmma::Wgmma<T, kHeadDim>::rs_mn(dq_flat, da[kk], wgmma::make_desc(k_addr + kk * 2 * 1024, kTileN * 128, 1024));
        wgmma::commit();
      };
      auto step = [&](int it) {
        if (it + 1 < n_tiles) {
          const uint32_t gi = seq + static_cast<uint32_t>(it + 1);
          bars.wait_full(gi);
        }
        uint32_t da[kTileN / 16][4];
        pack_p_fragments<T, kTileN>(s, da);
        issue_s_dp(it + 1, s, dp);
        issue_dq(it, da);
        wgmma::wait<1>();
        wgmma::fence_operands(s);
        wgmma::fence_operands(dp);
        make_ds(it + 1, s, dp);
        wgmma::wait<0>();
        wgmma::fence_operands(dq_flat);
        tma::mbar_arrive(bars.empty(seq + static_cast<uint32_t>(it)));  // stage of tile it: S, dP and dQ done
      };

      tma::mbar_wait(bars.rows_full(pass_i), bars.rows_parity(pass_i));
      if (n_tiles > 0) {
        bars.wait_full(seq);
        issue_s_dp(0, s, dp);
        wgmma::wait<0>();
        wgmma::fence_operands(s);
        wgmma::fence_operands(dp);
        make_ds(0, s, dp);
      }
      auto last_step = [&](int it) {  // kSkipLast: step(it) without the next tile's S, dP
        uint32_t da[kTileN / 16][4];
        pack_p_fragments<T, kTileN>(s, da);
        issue_dq(it, da);
        wgmma::wait<0>();
        wgmma::fence_operands(dq_flat);
        tma::mbar_arrive(bars.empty(seq + static_cast<uint32_t>(it)));
      };
      for (int it = 0; it < n_tiles; ++it) {
        if (!kSkipLast || it + 1 < n_tiles)
          step(it);
        else
          last_step(it);
      }

      // Every wgmma reading the rows was waited for: release them before the epilogue's stores.
      tma::mbar_arrive(bars.rows_empty(pass_i));
      dq_epilogue<T, kHeadDim>(p, rm, wps, rw, 0, dq_acc, gid, tig);
      seq += static_cast<uint32_t>(n_tiles);
    }
  });
#endif
}

// The range dQ: the wgmma kernel where it runs and covers the head dims, else sm_80's.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, class Sm80Kernel>
Status launch_range_dq_best(Sm80Kernel sm80_kernel, int sm80_threads, int sm80_smem, index_t sm80_ctas,
                            const AttnBwdParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDim <= 128 && kHeadDimV <= 128) {
    if (wgmma_kernel_usable(range_attn_bwd_dq_sm90_kernel<T, kHeadDim, kHeadDimV, kCompressed>)) {
      using Cfg = RangeDqSm90Config<kHeadDim, kHeadDimV>;
      if (range_ws_enabled()) {
        RangeWsMaps ws_maps{};
        if (encode_range_ws_maps<T, kCompressed>(ws_maps, p, p.dout, p.dout_stride)) {
          using WC = RangeDqWsConfig<kHeadDim, kHeadDimV>;
          const int G = p.heads_q / p.heads_kv;  // launch_dq's grid y: KV heads x head chunks
          const index_t grid_y = static_cast<index_t>(p.heads_kv) * (G >= kRows ? (G + kRows - 1) / kRows : 1);
          if (range_dq_last_products_enabled())
            return launch_dq(range_attn_bwd_dq_sm90_ws_kernel<T, kHeadDim, kHeadDimV, kCompressed, false>, WC::kThreads,
                             WC::kSmemBytes, range_persistent_grid_x(dq_ctas<Cfg::kWarps>(p), grid_y), p, stream,
                             ws_maps);
          return launch_dq(range_attn_bwd_dq_sm90_ws_kernel<T, kHeadDim, kHeadDimV, kCompressed>, WC::kThreads,
                           WC::kSmemBytes, range_persistent_grid_x(dq_ctas<Cfg::kWarps>(p), grid_y), p, stream,
                           ws_maps);
        }
      }
      tma::KvTileMaps maps{};
      const bool use_tma = tma::encode_kv_tile_maps<T, kCompressed>(maps, p, Cfg::kTileN);
      auto kernel = use_tma ? range_attn_bwd_dq_sm90_kernel<T, kHeadDim, kHeadDimV, kCompressed, true>
                            : range_attn_bwd_dq_sm90_kernel<T, kHeadDim, kHeadDimV, kCompressed, false>;
      return launch_dq(kernel, Cfg::kThreads, Cfg::kSmemBytes, dq_ctas<Cfg::kWarps>(p), p, stream, maps);
    }
  }
  return launch_dq(sm80_kernel, sm80_threads, sm80_smem, sm80_ctas, p, stream);
}

}  // namespace sparse_detail
}  // namespace nsa
