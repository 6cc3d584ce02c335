// sm_90a forward of the contiguous-key-range branches (compressed: keys [0, nvis(t)); window:
// keys [t - w + 1, t]) on warpgroup MMAs. The sm_80 kernel's row layout
// (range_attn_fwd_kernel.cuh): warps own consecutive tokens of one KV head, 16 query rows each,
// so 4 warps are exactly one m64 wgmma tile and the passes, masks and epilogue are the sm_80
// kernel's. Per 64-key tile each warpgroup issues S = Q K^T (both operands K-major in
// 128-byte-swizzled shared memory) and O += P V (P from the S accumulators in registers, V
// MN-major), instead of per-warp m16n8k16 products fed by ldmatrix. A warpgroup multiplies every
// tile of the CTA's key range (a wgmma is warpgroup-wide): its warps' ranges differ by at most
// the tokens of one CTA.
//
// Measured on the H200 (bench/NOTES.md, session 9): the first version (one warpgroup, two
// stages, each wgmma waited for at once) gained only 1.2x over sm_80; ncu showed it bound by
// instruction issue, not by L2. What paid: two warpgroups (128 rows) per CTA sharing every K/V
// tile, per-thread cp.async addresses computed once per pass (the strided loop cost ~600
// instructions per tile), masks only on partial tiles, and the step pipeline below (S of the
// next tile and P V of this one in flight during the softmax): 1.9x at 64k.
//
// Shared memory: Q (128 x Dk) + four stages of K (64 x Dk) and V (64 x Dv), all swizzled:
// 161 KiB at D = 128, one CTA per SM. Three ways to fill it: cp.async by every thread
// (NSA_DISABLE_TMA=1), TMA boxes issued by thread 0 with a CTA barrier per step (NSA_RANGE_WS=0),
// and the default producer form further down (a third warpgroup whose thread 0 issues every load,
// full / empty barriers instead of the CTA barrier).
#pragma once

#include "device_info.cuh"
#include "range_attn_fwd_kernel.cuh"
#include "tma_sm90.cuh"
#include "wgmma_sm90.cuh"

#include <cstdlib>

namespace nsa {
namespace sparse_detail {

template <int kHeadDim, int kHeadDimV, int kWarpGroups>
struct RangeFwdSm90Config {
  static constexpr int kWarps = 4 * kWarpGroups;  // a warpgroup = the sm_80 kernel's 4 warps
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsCta = kWarps * kRows;  // 64 per warpgroup: the wgmma M
  static constexpr int kTileN = 64;                // keys per tile (the S wgmma's N)
  static constexpr int kStages = 4;                // K/V tiles in flight (see the step's comment)
  static constexpr int kQBytes = kRowsCta * kHeadDim * 2;
  static constexpr int kKBytes = kTileN * kHeadDim * 2;
  static constexpr int kVBytes = kTileN * kHeadDimV * 2;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  // + the stages' full barriers (TMA form) + 1024-byte alignment
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kStages * 8 + 1024;
  static_assert(kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDimV <= 128, "wgmma path: D in {64, 128, 192}, Dv in {64, 128}");
};

// The key tiles come by TMA where the maps encode (tma::KvTileMaps; NSA_DISABLE_TMA=1 keeps
// cp.async): thread 0 issues the boxes of a tile into its stage, K-major swizzled (V too: P V and
// dS K read it MN-major from that layout), completing on the stage's full barrier. The consumers
// wait on that barrier instead of cp.async groups; the per-step CTA barrier still releases the
// stage the next boxes overwrite. Rows past the sequence inside the tensor are read as they are
// and masked like the rest.
// The full barriers of a CTA's kStages-stage tile ring (TMA form) and its running tile count:
// tile it of a pass is the CTA's tile seq + it, in stage (seq + it) % kStages, whose barrier
// completes for the ((seq + it) / kStages)-th time. Without TMA seq stays 0 (stage it % kStages).
template <int kStages>
struct TileRing {
  uint32_t bar_addr;  // kStages mbarriers, 8 bytes each
  uint32_t seq = 0;
  __device__ __forceinline__ explicit TileRing(uint32_t bars) : bar_addr(bars) {}
  // Thread 0 initialises the barriers; every thread then passes a CTA barrier.
  __device__ __forceinline__ void init(int tid) const {
    if (tid == 0) {
      for (int st = 0; st < kStages; ++st) tma::mbar_init(bar_addr + st * 8, 1);
      tma::fence_barrier_init();
    }
    __syncthreads();
  }
  __device__ __forceinline__ uint32_t stage(int it) const { return (seq + static_cast<uint32_t>(it)) % kStages; }
  __device__ __forceinline__ uint32_t bar(int it) const { return bar_addr + stage(it) * 8; }
  __device__ __forceinline__ void wait(int it) const {
    const uint32_t gi = seq + static_cast<uint32_t>(it);
    tma::mbar_wait(bar_addr + (gi % kStages) * 8, (gi / kStages) & 1);
  }
};


// Key offset x - s0 clamped to [-1, kTileN + 1], so that in-tile compares are 32-bit.
template <int kTileN>
__device__ __forceinline__ int tile_offset_n(index_t x, index_t s0) {
  const index_t r = x - s0;
  return r < -1 ? -1 : (r > kTileN + 1 ? kTileN + 1 : static_cast<int>(r));
}

// cp.async of rows [s0, s0 + kTileRows) of a [rows, kDim] tensor (row stride in elements) into a
// 128-byte-swizzled tile, K-major (wgmma::k_major_offset) or MN-major (mn_major_offset); rows
// outside [0, n_rows) are zero-filled without being read. Where the CTA's threads tile the rows
// evenly, each thread owns one 16-byte column chunk and every kStep-th row, so the addresses
// are computed once per pass and a tile costs kPasses cp.async per thread; otherwise (Dk = 192)
// the plain strided loop.
template <typename T, int kDim, int kTileRows, int kThreads, bool kMnMajor>
struct SwizzledRowLoader {
  static constexpr int kVec = kDim / 8;
  static constexpr bool kEven = kThreads % kVec == 0 && (kThreads / kVec) % 8 == 0 && kTileRows % (kThreads / kVec) == 0;
  static constexpr int kStep = kEven ? kThreads / kVec : 8;  // rows between a thread's chunks
  static constexpr int kPasses = kTileRows / kStep;
  // smem bytes between a thread's chunks: kStep rows, a multiple of the 8-row swizzle period
  static constexpr uint32_t kOffStep = kMnMajor ? (kDim / 64) * (kStep / 8) * 1024 : kStep * 128;
  const T* base;
  index_t row_stride, row_begin;
  int r0, c;
  uint32_t off0;

  __device__ __forceinline__ SwizzledRowLoader(const T* base_, index_t row_stride_, index_t row_begin_, int tid)
      : base(base_), row_stride(row_stride_), row_begin(row_begin_) {
    r0 = tid / kVec;
    c = tid % kVec;
    off0 = kMnMajor ? wgmma::mn_major_offset<kDim>(r0, c) : wgmma::k_major_offset(r0, c, kTileRows);
  }
  __device__ __forceinline__ void load(unsigned char* dst, index_t s0, index_t n_rows, const T* valid, int tid) const {
    if constexpr (kEven) {
      const T* src = base + (row_begin + s0 + r0) * row_stride + c * 8;
      const index_t step = kStep * row_stride;
#pragma unroll
      for (int j = 0; j < kPasses; ++j) {
        const index_t s = s0 + r0 + j * kStep;
        const bool on = s >= 0 && s < n_rows;
        mma::cp_async_16(dst + off0 + j * kOffStep, on ? src + j * step : valid, on);
      }
    } else {
      for (int i = tid; i < kTileRows * kVec; i += kThreads) {
        const int r = i / kVec, cc = i % kVec;
        const index_t s = s0 + r;
        const bool on = s >= 0 && s < n_rows;
        const uint32_t off = kMnMajor ? wgmma::mn_major_offset<kDim>(r, cc) : wgmma::k_major_offset(r, cc, kTileRows);
        mma::cp_async_16(dst + off, on ? base + (row_begin + s) * row_stride + cc * 8 : valid, on);
      }
    }
  }
};

// cp.async of the CTA's query-side rows of a [.., HQ, kDim] tensor (q, dout) into a K-major
// swizzled tile of kRowsCta rows: CTA row 16 w + r is row r of warp w's pass (token slot
// r / heads, head r % heads), the sm_80 kernels' layout; rows that are off are zero-filled.
template <typename T, int kDim, int kRowsCta, int kThreads>
__device__ __forceinline__ void load_query_rows_swizzled(unsigned char* dst, const T* base, const Strides3& st,
                                                         const RowMap& rm, const Pass& ps, int tid) {
  constexpr int kVec = kDim / 8;
  for (int i = tid; i < kRowsCta * kVec; i += kThreads) {
    const int row = i / kVec, c = i % kVec, w = row / kRows, r = row % kRows;
    const Pass ws = warp_pass(ps, w, rm.tokens);
    const int tok = r / rm.heads, hh = r % rm.heads;
    const bool on = tok >= ws.p_begin && tok < ws.p_end && r < rm.tokens * rm.heads;
    const T* src = on ? base + (ws.row_begin + ws.t0 + tok) * st.row + static_cast<index_t>(rm.head0 + hh) * st.head + c * 8
                      : base;
    mma::cp_async_16(dst + wgmma::k_major_offset(row, c, kRowsCta), src, on);
  }
}

// A thread's two rows of a warp's pass (rows gid and gid + 8 of its 16): the token slot and
// whether the row is real (the sm_80 kernels' layout, tokens of P x heads rows).
__device__ __forceinline__ void fwd_rows(const RowMap& rm, const Pass& wps, int gid, int (&tok)[2], bool (&on)[2]) {
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int r = gid + ri * 8;
    tok[ri] = r / rm.heads;
    on[ri] = r < rm.tokens * rm.heads && tok[ri] >= wps.p_begin && tok[ri] < wps.p_end;
  }
}

// The keys of a thread's two rows and the keys every token of the pass attends, for the masks.
struct RangeRowKeys {
  index_t lo[2], hi[2];       // keys [lo, hi) of the row's token
  index_t all_lo, all_hi;     // [all_lo, all_hi): keys of every token of the pass (ends monotone in t)
  // Most tiles lie inside every token's key range: no masks. The test is the same for the whole
  // CTA (a branch that diverged inside the warpgroup would serialize the wgmmas).
  template <int kTileN>
  __device__ __forceinline__ bool whole(index_t s0) const { return s0 >= all_lo && s0 + kTileN <= all_hi; }
};

template <bool kCompressed, class Params>
__device__ __forceinline__ RangeRowKeys range_row_keys(const Params& p, const RangeKeys<kCompressed>& rk, const Pass& ps,
                                                       const Pass& wps, const int (&tok)[2], const bool (&on)[2]) {
  RangeRowKeys k;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) rk.row_keys(p, wps.t0 + tok[ri], on[ri], k.lo[ri], k.hi[ri]);
  index_t unused;
  rk.row_keys(p, ps.t0 + ps.p_end - 1, true, k.all_lo, unused);
  rk.row_keys(p, ps.t0 + ps.p_begin, true, unused, k.all_hi);
  return k;
}

// Row ri's accumulator entries of a tile starting at key s0 whose key lies outside the row's
// range become `fill` (a select: masked entries may hold anything).
template <int kTileN>
__device__ __forceinline__ void mask_row_keys(float (&acc)[kTileN / 2], int ri, const RangeRowKeys& rows, index_t s0,
                                              int tig, float fill) {
  const int klo = tile_offset_n<kTileN>(rows.lo[ri], s0), khi = tile_offset_n<kTileN>(rows.hi[ri], s0);
#pragma unroll
  for (int n = 0; n < kTileN / 8; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int kk = n * 8 + 2 * tig + e;
      float& x = acc[4 * n + 2 * ri + e];
      x = kk >= klo && kk < khi ? x : fill;
    }
}

// t[0] = op over t[0 .. 2 kW): pairwise levels, each a compile-time trip count. A `w /= 2` loop
// was left rolled by nvcc at 16 leaves, which put t in local memory (64 B of stack per thread in
// the 128-key tile: session 18).
template <int kW, int kN, typename Op>
__device__ __forceinline__ void tree_fold(float (&t)[kN], Op op) {
  static_assert(2 * kW <= kN);
  if constexpr (kW > 0) {
#pragma unroll
    for (int n = 0; n < kW; ++n) t[n] = op(t[n], t[n + kW]);
    tree_fold<kW / 2>(t, op);
  }
}

// Online softmax of a tile starting at key s0 in s (the sm_80 fwd_tile's arithmetic on kTileN / 8
// column blocks): s becomes P (fp32), m_run / l_run advance, and alpha is the factor O must be
// rescaled by; returns whether alpha differs from 1 for one of the thread's rows (the caller
// skips the rescale when no row of the warp needs it).
// The running max moves only when the tile's exceeds it by more than slack_log2 (log2 units,
// FlashAttention-4's conditional rescale): until then the exponentials are taken against the
// stale max, so P <= 2^slack_log2 and O, l stay in that max's units, exactly (the final
// normalisation and lse use the same m). slack_log2 = 0 is the plain online softmax.
// Row max and sum by trees (depth log2 of kTileN / 4 instead of a chain of kTileN / 4).
template <int kTileN>
__device__ __forceinline__ bool online_softmax_tile(float (&s)[kTileN / 2], float (&alpha)[2], float (&m_run)[2],
                                                    float (&l_run)[2], const RangeRowKeys& rows, index_t s0, int tig,
                                                    float scale_log2, float slack_log2) {
  constexpr int kNt = kTileN / 8;
  static_assert((kNt & (kNt - 1)) == 0, "tree reductions over a power of two of column blocks");
  const bool whole = rows.whole<kTileN>(s0);
  bool bumped = false;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    if (!whole) mask_row_keys<kTileN>(s, ri, rows, s0, tig, -INFINITY);
    float t[kNt];
#pragma unroll
    for (int n = 0; n < kNt; ++n) t[n] = fmaxf(s[4 * n + 2 * ri], s[4 * n + 2 * ri + 1]);
    tree_fold<kNt / 2>(t, [](float a, float b) { return fmaxf(a, b); });
    float mx = t[0];
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // Same for the quad's four lanes (m_run and mx are), so a row's lanes agree. m_run = -inf and
    // a real mx: +inf > slack; both -inf: NaN, no bump (the row stays at m = -inf, P = 0).
    const bool bump = (mx - m_run[ri]) * scale_log2 > slack_log2;
    alpha[ri] = 1.f;
    if (bump) {
      alpha[ri] = exp2f((m_run[ri] - mx) * scale_log2);  // 0 from m_run = -inf
      m_run[ri] = mx;
      bumped = true;
    }
    const float m_scaled = (m_run[ri] == -INFINITY ? 0.f : m_run[ri]) * scale_log2;  // all masked so far: no inf - inf
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[4 * n + 2 * ri + e];
        x = exp2f(fmaf(x, scale_log2, -m_scaled));
      }
#pragma unroll
    for (int n = 0; n < kNt; ++n) t[n] = s[4 * n + 2 * ri] + s[4 * n + 2 * ri + 1];
    tree_fold<kNt / 2>(t, [](float a, float b) { return a + b; });
    l_run[ri] = l_run[ri] * alpha[ri] + t[0];
  }
  return bumped;
}

// wgmma::wait<0>() made control dependent on the row sums l_run of the softmax that the wait should
// hide, so that ptxas cannot sink that softmax's exponentials past the wait (it does otherwise: they
// land after it, beside the next S issue, and P V runs under nothing but the row max). The vote is
// always true: row sums are >= 0, or NaN.
__device__ __forceinline__ void wgmma_wait_all_after_softmax(const float (&l_run)[2]) {
  if (__any_sync(0xffffffffu, !(l_run[0] + l_run[1] < 0.f))) {
    wgmma::wait<0>();
  } else {
    wgmma::wait<0>();  // never taken; a wait on every path keeps ptxas from injecting one
    __trap();
  }
}

// The softmax's slack (NSA_SOFTMAX_SLACK, log2 units, read per launch: 0 = rescale on every new
// max; default 8, FlashAttention-4's threshold: P <= 256, exact in fp32 / bf16 / fp16).
inline float softmax_slack_log2() {
  const char* e = std::getenv("NSA_SOFTMAX_SLACK");
  return e != nullptr ? static_cast<float>(std::atof(e)) : 8.f;
}

template <int kHeadDimV>
__device__ __forceinline__ void rescale_rows(float (&o_acc)[kHeadDimV / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < kHeadDimV / 8; ++n) {
    o_acc[n][0] *= alpha[0];
    o_acc[n][1] *= alpha[0];
    o_acc[n][2] *= alpha[1];
    o_acc[n][3] *= alpha[1];
  }
}

// acc (+)= A B^T over kDim: A the CTA's kRowsCta query-side rows from a_addr (this warpgroup's 64
// rows; K-major, column atoms kRowsCta * 128 bytes apart), B a kTileN-key stage tile (K-major,
// atoms kTileN * 128 apart). S = Q K^T and dP = dO V^T; issued, not committed or waited for.
template <typename T, int kDim, int kTileN, int kRowsCta>
__device__ __forceinline__ void wgmma_rows_by_tile(float (&acc)[kTileN / 2], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
    const uint32_t off_a = (kk / 4) * kRowsCta * 128 + (kk % 4) * 32;
    const uint32_t off_b = (kk / 4) * kTileN * 128 + (kk % 4) * 32;
    wgmma::Wgmma<T, kTileN>::ss(acc, wgmma::make_desc(a_addr + off_a, 16, 1024), wgmma::make_desc(b_addr + off_b, 16, 1024),
                                kk > 0);
  }
}

// P of a 64-key tile (fp32 accumulators) as the bf16 / fp16 A fragments of P V: P's k16 slice kk
// is the C tiles 2kk, 2kk + 1 (keys 16kk .. 16kk + 15).
template <typename T, int kTileN>
__device__ __forceinline__ void pack_p_fragments(const float (&p_cur)[kTileN / 2], uint32_t (&pa)[kTileN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kTileN / 16; ++kk) {
    pa[kk][0] = mma::pack2<T>(p_cur[8 * kk + 0], p_cur[8 * kk + 1]);
    pa[kk][1] = mma::pack2<T>(p_cur[8 * kk + 2], p_cur[8 * kk + 3]);
    pa[kk][2] = mma::pack2<T>(p_cur[8 * kk + 4], p_cur[8 * kk + 5]);
    pa[kk][3] = mma::pack2<T>(p_cur[8 * kk + 6], p_cur[8 * kk + 7]);
  }
}

template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, int kWarpGroups, bool kTma = false>
__global__ void __launch_bounds__(kWarpGroups * 128, 1)
    range_attn_fwd_sm90_kernel(const AttnParams p, const __grid_constant__ tma::KvTileMaps maps, float slack_log2) {
#ifdef NSA_WGMMA
  using Cfg = RangeFwdSm90Config<kHeadDim, kHeadDimV, kWarpGroups>;
  constexpr int kTileN = Cfg::kTileN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = wgmma::align_smem_1024(smem_raw);
  unsigned char* sQ = smem;
  unsigned char* sStage = smem + Cfg::kQBytes;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t q_base = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t stage_addr = q_base + Cfg::kQBytes;
  const uint32_t q_addr = q_base + (warp / 4) * 64 * 128;  // this warpgroup's 64 rows of each column atom
  const int gid = lane >> 2, tig = lane & 3;

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
    // Steps come in pairs (the S buffers alternate); an odd count gets one more tile, past every
    // row's keys: fully masked, it changes nothing (its rows are zero-filled or real keys).
    const int n_steps = (n_tiles + 1) & ~1;

    const T* q = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_stride.batch);
    const T* k = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_stride.batch) + static_cast<index_t>(rm.g) * p.k_stride.head;
    const T* v = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_stride.batch) + static_cast<index_t>(rm.g) * p.v_stride.head;

    load_query_rows_swizzled<T, kHeadDim, Cfg::kRowsCta, Cfg::kThreads>(sQ, q, p.q_stride, rm, ps, tid);
    const SwizzledRowLoader<T, kHeadDim, kTileN, Cfg::kThreads, /*kMnMajor=*/false> k_loader(k, p.k_stride.row, kv_row_begin, tid);
    const SwizzledRowLoader<T, kHeadDimV, kTileN, Cfg::kThreads, /*kMnMajor=*/true> v_loader(v, p.v_stride.row, kv_row_begin, tid);
    auto load_tile = [&](int it) {  // tile it -> stage (seq + it) % kStages; TMA: thread 0 only
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
    if (n_steps > 0) load_tile(0);
    mma::cp_async_commit();  // group: query rows + tile 0
    if (n_steps > 1) load_tile(1);
    mma::cp_async_commit();  // group: tile 1
    if (n_steps > 2) load_tile(2);
    mma::cp_async_commit();  // group: tile 2

    int row_tok[2];
    bool row_on[2];
    fwd_rows(rm, wps, gid, row_tok, row_on);
    const RangeRowKeys rows = range_row_keys(p, rk, ps, wps, row_tok, row_on);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float o_acc[kHeadDimV / 8][4];
    zero_acc<kHeadDimV>(o_acc);
    float(&o_flat)[kHeadDimV / 2] = reinterpret_cast<float(&)[kHeadDimV / 2]>(o_acc);

    // S = Q K^T of tile it (64 x kTileN per warpgroup), issued and committed, not waited for.
    auto issue_s = [&](int it, float(&s_acc)[kTileN / 2]) {
      const uint32_t k_addr = stage_addr + ring.stage(it) * Cfg::kStageBytes;
      wgmma::fence();
      wgmma_rows_by_tile<T, kHeadDim, kTileN, Cfg::kRowsCta>(s_acc, q_addr, k_addr);
      wgmma::commit();
    };

    // Whether some row of the warp needs O rescaled (warp-uniform: the rescale is skipped otherwise).
    auto softmax = [&](int it, float(&s)[kTileN / 2], float(&alpha)[2]) {
      return __any_sync(0xffffffffu, online_softmax_tile<kTileN>(s, alpha, m_run, l_run, rows,
                                                                 lo + static_cast<index_t>(it) * kTileN, tig,
                                                                 scale_log2, slack_log2));
    };

    // Step it: P of tile it is in p_cur (softmax done, O rescaled). The tensor cores run S of tile
    // it + 1 and then O += P V of tile it; the softmax of tile it + 1 overlaps the latter.
    // Everything is waited for before the step ends (a wgmma still in flight across steps makes
    // ptxas serialize them), and every wgmma sits outside branches: on the last step S multiplies
    // a stale stage into s_nxt and the softmax masks all of it (no key of any row lies there).
    // Stages: tile it + 3 goes into the stage of tile it - 1, released by this step's barrier.
    auto step = [&](int it, float(&p_cur)[kTileN / 2], float(&s_nxt)[kTileN / 2]) {
      if constexpr (kTma) {
        __syncthreads();  // every warpgroup is past tile it - 1: its stage takes tile it + 3
        if (it + 3 < n_steps) load_tile(it + 3);
        if (it + 1 < n_steps) ring.wait(it + 1);  // the last step's S reads a stale stage, masked
      } else {
        mma::cp_async_wait<1>();  // tile it + 1; tile it + 2 may stay in flight
        wgmma::fence_proxy_async();
        __syncthreads();
        if (it + 3 < n_steps) load_tile(it + 3);
        mma::cp_async_commit();
      }
      uint32_t pa[kTileN / 16][4];
      pack_p_fragments<T, kTileN>(p_cur, pa);
      issue_s(it + 1, s_nxt);
      const uint32_t v_addr = stage_addr + ring.stage(it) * Cfg::kStageBytes + Cfg::kKBytes;
      wgmma::fence();
      if constexpr (kTma) {  // V in the K-major tile: column atoms kTileN * 128 bytes apart, 8-key groups 1024
#pragma unroll
        for (int kk = 0; kk < kTileN / 16; ++kk)
          wgmma::Wgmma<T, kHeadDimV>::rs_mn(o_flat, pa[kk], wgmma::make_desc(v_addr + kk * 2 * 1024, kTileN * 128, 1024));
      } else {
        constexpr uint32_t kSboV = (kHeadDimV / 64) * 1024;
#pragma unroll
        for (int kk = 0; kk < kTileN / 16; ++kk)
          wgmma::Wgmma<T, kHeadDimV>::rs_mn(o_flat, pa[kk], wgmma::make_desc(v_addr + kk * 2 * kSboV, 1024, kSboV));
      }
      wgmma::commit();
      wgmma::wait<1>();  // S (it + 1)
      wgmma::fence_operands(s_nxt);
      float alpha[2];
      const bool rescale = softmax(it + 1, s_nxt, alpha);
      wgmma_wait_all_after_softmax(l_run);  // P V (it)
      wgmma::fence_operands(o_flat);
      if (rescale) rescale_rows<kHeadDimV>(o_acc, alpha);
    };

    float s_a[kTileN / 2], s_b[kTileN / 2];
    if (n_steps > 0) {
      if constexpr (kTma) {
        mma::cp_async_wait<0>();  // query rows
        ring.wait(0);
      } else {
        mma::cp_async_wait<2>();  // query rows + tile 0
      }
      wgmma::fence_proxy_async();
      __syncthreads();
      issue_s(0, s_a);
      wgmma::wait<0>();
      wgmma::fence_operands(s_a);
      float alpha[2];
      softmax(0, s_a, alpha);  // O is still zero: no rescale
    }
    for (int it = 0; it < n_steps; it += 2) {  // two steps per trip: the S buffers swap roles
      step(it, s_a, s_b);
      step(it + 1, s_b, s_a);
    }
    wgmma::wait<0>();
    wgmma::fence_operands(o_flat);
    mma::cp_async_wait_all();  // no tiles: the query rows' group is still in flight

    fwd_epilogue<T, kHeadDimV>(p, rm, wps, row_tok, row_on, m_run, l_run, o_acc, gid, tig);
    if constexpr (kTma) ring.seq += static_cast<uint32_t>(n_steps);  // (the cp.async form keeps 0: stage = it % 4)
    __syncthreads();  // sQ and the stages are reused by the next pass
  }
#endif
}

// The producer form of the range forward and dQ, as the dK/dV tile (attn_bwd_dkdv_sm90_tma.cuh):
// three warpgroups; thread 0 of the first issues every load by TMA (per pass the CTA's 128 query
// rows, one box of (64 columns, heads, 128 / heads tokens) per 64 columns; per key tile its K / V
// boxes into the four-stage ring, each stage with a full and an empty barrier); warpgroups 1 and
// 2 compute as the kernels above but without the per-step CTA barrier, release a stage once
// their last product reading it is waited for, and the query rows once their epilogue has run.
// The CTA's rows must be whole (token, head) boxes: G in {1, 2, 4, 8, 16} or a multiple of 16.
// Measured on the H200 (session 14, bench/results/2026-11-29_range_ws_ab_NVIDIA_H200.md):
// forward 1.10-1.26x over the one-thread-TMA kernels, dQ 1.14-1.31x except the compressed dQ at
// 64k (G = 16 1.01x, G = 4 0.93x).
struct RangeWsMaps {
  tma::KvTileMaps kv;
  CUtensorMap q, dout;  // boxes of (64, min(G, 16), 128 / min(G, 16), 1)
};

// The producer form's maps; false where TMA cannot describe them or the CTA's rows are not
// whole (token, head) boxes.
template <typename T, bool kCompressed>
bool encode_range_ws_maps(RangeWsMaps& m, const AttnParams& p, const void* dout, const Strides3& dout_stride) {
  const int G = p.heads_q / p.heads_kv;
  const bool rows_ok = (G <= 16 && 16 % G == 0) || G % 16 == 0;
  if (!rows_ok || !tma::encode_kv_tile_maps<T, kCompressed>(m.kv, p, 64)) return false;
  const int hb = G < 16 ? G : 16;
  const bool packed = p.cu_seqlens != nullptr;
  const index_t batch = packed ? 1 : p.batch, rows = packed ? p.total_rows : p.seqlen;
  return tma::encode_rows_map<T>(&m.q, p.q, batch, rows, p.heads_q, p.head_dim_qk, p.q_stride.batch, p.q_stride.row,
                                 p.q_stride.head, hb, 128 / hb) &&
         (dout == nullptr || tma::encode_rows_map<T>(&m.dout, dout, batch, rows, p.heads_q, p.head_dim_v,
                                                     dout_stride.batch, dout_stride.row, dout_stride.head, hb, 128 / hb));
}

// NSA_RANGE_FWD_PIN=0: the producer-form forward without kPinSoftmax (an A/B switch read per launch).
inline bool range_fwd_pin_enabled() {
  const char* e = std::getenv("NSA_RANGE_FWD_PIN");
  return !(e != nullptr && e[0] == '0');
}

// NSA_RANGE_DQ_LAST=1: the producer-form dQ's last step issues the next tile's (discarded) S, dP
// as the other steps do (kSkipLast off; an A/B switch read per launch).
inline bool range_dq_last_products_enabled() {
  const char* e = std::getenv("NSA_RANGE_DQ_LAST");
  return e != nullptr && e[0] == '1';
}

// NSA_RANGE_WS=0 keeps the one-thread-TMA kernels (an A/B switch read per launch).
inline bool range_ws_enabled() {
  const char* e = std::getenv("NSA_RANGE_WS");
  return !(e != nullptr && e[0] == '0');
}

// The producer form's mbarriers, after the ring's stages: per stage a full barrier (the producer's
// TMA bytes) and an empty one (256 consumer arrivals), then per query-row buffer a full / empty
// pair. Tile it of a pass is the CTA's tile seq + it, in stage (seq + it) % kStages, whose barriers
// complete for the ((seq + it) / kStages)-th time; the CTA's pass i uses row buffer i % kRowBufs
// for the (i / kRowBufs)-th time.
template <int kStages, int kRowBufs = 1>
struct RangeWsBarriers {
  uint32_t base;
  __device__ __forceinline__ explicit RangeWsBarriers(uint32_t base_) : base(base_) {}
  __device__ __forceinline__ uint32_t full(uint32_t gi) const { return base + (gi % kStages) * 8; }
  __device__ __forceinline__ uint32_t empty(uint32_t gi) const { return base + (kStages + gi % kStages) * 8; }
  __device__ __forceinline__ uint32_t rows_full(uint32_t pass) const {
    return base + (2 * kStages + 2 * (pass % kRowBufs)) * 8;
  }
  __device__ __forceinline__ uint32_t rows_empty(uint32_t pass) const { return rows_full(pass) + 8; }
  __device__ __forceinline__ uint32_t rows_parity(uint32_t pass) const { return (pass / kRowBufs) & 1; }
  static constexpr int kBytes = (2 * kStages + 2 * kRowBufs) * 8;
  // Thread 0 initialises them; every thread then passes a CTA barrier.
  __device__ __forceinline__ void init(int tid) const {
    if (tid == 0) {
      for (int st = 0; st < kStages; ++st) {
        tma::mbar_init(full(st), 1);
        tma::mbar_init(empty(st), 256);
      }
      for (int r = 0; r < kRowBufs; ++r) {
        tma::mbar_init(rows_full(r), 1);
        tma::mbar_init(rows_empty(r), 256);
      }
      tma::fence_barrier_init();
    }
    __syncthreads();
  }
  __device__ __forceinline__ void wait_full(uint32_t gi) const { tma::mbar_wait(full(gi), (gi / kStages) & 1); }
};

// The work items (CTA groups) of a persistent CTA: blockIdx.x, + gridDim.x, ... of cta_groups,
// from the last when kLastFirst (the compressed branch: later tokens see more keys, so the longest
// items go first and the tail is short). fn(group) runs for each, in the same order in every warp.
template <bool kLastFirst, class Fn>
__device__ __forceinline__ void walk_items(const AttnParams& p, int cta_tokens, Fn&& fn) {
  const index_t n = cta_groups(p, cta_tokens);
  for (index_t k = blockIdx.x; k < n; k += gridDim.x) {
    Group gr;
    if (group_of(p, cta_tokens, kLastFirst ? n - 1 - k : k, gr)) fn(gr);
  }
}

// The producer's running counts over a CTA's passes (and, in the persistent forward, its work
// items): key tiles issued so far (seq) and passes started (pass_i).
struct RangeWsCursor {
  uint32_t seq = 0, pass_i = 0;
};

// The producer thread of the forward and dQ, for one work item (group): per pass the CTA's query
// rows (q at q_base, and dout at do_base when kHeadDimDout > 0; row buffer pass_i % kRowBufs,
// row_buf_bytes apart) on rows_full once the consumers released that buffer's previous pass,
// and the pass's n_tiles key tiles (rounded up to even when kEvenSteps: the forward's step pairs;
// the last one is masked) into the ring, each once its stage is empty. With one row buffer, a
// later pass's first kStages tiles are issued before the wait for the rows, so they load while
// the consumers finish the previous pass (the rows cannot: the consumers still read them).
template <typename Cfg, int kHeadDim, int kHeadDimV, int kHeadDimDout, bool kCompressed, bool kEvenSteps,
          int kRowBufs = 1, class Params>
__device__ __forceinline__ void range_ws_produce_group(const Params& p, const RangeWsMaps& maps,
                                                       const RangeWsBarriers<Cfg::kStages, kRowBufs>& bars,
                                                       const RowMap& rm, const Group& gr, int cta_tokens,
                                                       uint32_t q_base, uint32_t do_base, uint32_t stage_addr,
                                                       RangeWsCursor& cur, uint32_t row_buf_bytes) {
  constexpr int kTileN = Cfg::kTileN, kStages = Cfg::kStages;
  constexpr int kRowBytes = Cfg::kRowsCta * (kHeadDim + kHeadDimDout) * 2;
  const bool packed = p.cu_seqlens != nullptr;
  Pass ps;
  for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end, ++cur.pass_i) {
    const RangeKeys<kCompressed> rk(p, ps);
    index_t lo;
    const int n_tiles = rk.template pass_tiles<kTileN>(p, ps, lo);
    const int n_steps = kEvenSteps ? (n_tiles + 1) & ~1 : n_tiles;
    const int bc = packed ? 0 : ps.b;
    auto load_tile = [&](int it) {
      const uint32_t gi = cur.seq + static_cast<uint32_t>(it);
      if (gi >= kStages) tma::mbar_wait(bars.empty(gi), (gi / kStages - 1) & 1);
      tma::load_kv_tile<kHeadDim, kHeadDimV, kTileN>(stage_addr + (gi % kStages) * Cfg::kStageBytes, maps.kv, rm.g,
                                                     rk.kv_row_begin + lo + static_cast<index_t>(it) * kTileN, bc,
                                                     bars.full(gi));
    };
    const uint32_t pass = cur.pass_i;
    // Tiles issued before the rows: with one row buffer the rows wait for the previous pass's epilogue.
    const int early = kRowBufs == 1 && pass > 0 ? (n_steps < kStages ? n_steps : kStages) : 0;
    for (int it = 0; it < early; ++it) load_tile(it);
    if (pass >= kRowBufs) tma::mbar_wait(bars.rows_empty(pass), bars.rows_parity(pass - kRowBufs));
    tma::mbar_arrive_expect_tx(bars.rows_full(pass), kRowBytes);
    const uint32_t buf = (pass % kRowBufs) * row_buf_bytes;
    const int row0 = static_cast<int>(ps.row_begin + ps.t0);  // the CTA's first token slot
#pragma unroll
    for (int c = 0; c < kHeadDim / 64; ++c)
      tma::load_4d(q_base + buf + c * Cfg::kRowsCta * 128, &maps.q, 64 * c, rm.head0, row0, bc, bars.rows_full(pass));
#pragma unroll
    for (int c = 0; c < kHeadDimDout / 64; ++c)
      tma::load_4d(do_base + buf + c * Cfg::kRowsCta * 128, &maps.dout, 64 * c, rm.head0, row0, bc,
                   bars.rows_full(pass));
    for (int it = early; it < n_steps; ++it) load_tile(it);
    cur.seq += static_cast<uint32_t>(n_steps);
  }
}

// The producer thread over all of the CTA's work items, in the consumers' order.
template <typename Cfg, int kHeadDim, int kHeadDimV, int kHeadDimDout, bool kCompressed, bool kEvenSteps,
          int kRowBufs = 1, class Params>
__device__ __forceinline__ void range_ws_produce(const Params& p, const RangeWsMaps& maps,
                                                 const RangeWsBarriers<Cfg::kStages, kRowBufs>& bars, const RowMap& rm,
                                                 int cta_tokens, uint32_t q_base, uint32_t do_base, uint32_t stage_addr,
                                                 uint32_t row_buf_bytes = 0) {
  RangeWsCursor cur;
  walk_items<kCompressed>(p, cta_tokens, [&](const Group& gr) {
    range_ws_produce_group<Cfg, kHeadDim, kHeadDimV, kHeadDimDout, kCompressed, kEvenSteps, kRowBufs>(
        p, maps, bars, rm, gr, cta_tokens, q_base, do_base, stage_addr, cur, row_buf_bytes);
  });
}

// Query-row buffers of the persistent forward: two where they fit in shared memory (the next work
// item's rows load while this one's last tiles and epilogue run), else one.
template <typename Cfg>
constexpr int range_fwd_row_bufs() {
  return Cfg::kSmemBytes + Cfg::kQBytes + 4 * Cfg::kStages * 8 <= 227 * 1024 ? 2 : 1;
}
template <typename Cfg>
constexpr int range_fwd_ws_smem() {
  // Cfg's layout (+ one more row buffer where it fits) + the producer form's barriers (the ring's
  // full ones already counted).
  return Cfg::kSmemBytes + (range_fwd_row_bufs<Cfg>() - 1) * Cfg::kQBytes + 4 * Cfg::kStages * 8;
}

// NSA_RANGE_PERSISTENT=0: one CTA per work item (the grid of the other forms) instead of one per
// SM walking the items (an A/B switch read per launch).
inline bool range_persistent_enabled() {
  const char* e = std::getenv("NSA_RANGE_PERSISTENT");
  return !(e != nullptr && e[0] == '0');
}

// Grid x of the persistent producer forms: at most one CTA per SM over the grid's grid_y columns
// (one CTA fills an SM; a second wave would leave most SMs idle behind it); every item its own CTA
// with NSA_RANGE_PERSISTENT=0.
inline index_t range_persistent_grid_x(index_t items, index_t grid_y) {
  if (!range_persistent_enabled()) return items;
  const index_t per_column = current_sm_count() / grid_y;
  const index_t want = per_column > 0 ? per_column : 1;
  return want < items ? want : items;
}

// The forward's producer form (the header above), persistent: the grid holds about one CTA per SM
// (gridDim.x items per KV head column) and each CTA walks the work items blockIdx.x, + gridDim.x,
// ... (compressed: from the last, the longest key ranges first), so that the next item's key tiles
// (and, with two row buffers, its query rows) load while this one's last tiles and epilogue run,
// and no CTA launch, barrier set-up or pipeline fill sits between items. With gridDim.x = the
// item count it is the one-item-per-CTA kernel (NSA_RANGE_PERSISTENT=0).
// kPinSoftmax (the default; NSA_RANGE_FWD_PIN=0 turns it off): the P V wait of a step is control
// dependent on the row sums of the softmax it should hide, so ptxas cannot sink the exponentials
// past it. Unpinned, it does: they land beside the next step's S issue, after the wait (session
// 17's ncu), and P V runs under nothing but the row max. Pinned: 1.02-1.11x (session 18).
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, bool kPinSoftmax = true>
__global__ void __launch_bounds__(384, 1)
    range_attn_fwd_sm90_ws_kernel(const AttnParams p, const __grid_constant__ RangeWsMaps maps, float slack_log2) {
#ifdef NSA_WGMMA
  using Cfg = RangeFwdSm90Config<kHeadDim, kHeadDimV, 2>;
  constexpr int kTileN = Cfg::kTileN, kStages = Cfg::kStages, kRowBufs = range_fwd_row_bufs<Cfg>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = wgmma::align_smem_1024(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t q_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t stage_addr = q_base + kRowBufs * Cfg::kQBytes;
  const RangeWsBarriers<kStages, kRowBufs> bars(stage_addr + kStages * Cfg::kStageBytes);

  const RowMap rm = query_row_map(p);
  const int P = rm.tokens, cta_tokens = P * Cfg::kWarps;
  if (static_cast<index_t>(blockIdx.x) >= cta_groups(p, cta_tokens)) return;  // uniform over the CTA
  bars.init(tid);

  if (warp < 4) {  // ---- producer: thread 0 issues every load, the others leave
    tma::setmaxnreg_dec<24>();
    if (tid == 0)
      range_ws_produce<Cfg, kHeadDim, kHeadDimV, 0, kCompressed, true, kRowBufs>(p, maps, bars, rm, cta_tokens, q_base, 0,
                                                                              stage_addr, Cfg::kQBytes);
    return;
  }

  // ---- consumers
  tma::setmaxnreg_inc<240>();
  const int cw = warp - 4;
  const int gid = lane >> 2, tig = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  uint32_t seq = 0, pass_i = 0;
  walk_items<kCompressed>(p, cta_tokens, [&](const Group& gr) {
    Pass ps;
    for (int pb = 0; next_pass(p, cta_tokens, gr, pb, 0, ps); pb = ps.p_end, ++pass_i) {
      const Pass wps = warp_pass(ps, cw, P);
      const RangeKeys<kCompressed> rk(p, ps);
      index_t lo;
      const int n_tiles = rk.template pass_tiles<kTileN>(p, ps, lo);
      const int n_steps = (n_tiles + 1) & ~1;
      // this warpgroup's 64 rows of each column atom, in the pass's row buffer
      const uint32_t q_addr = q_base + (pass_i % kRowBufs) * Cfg::kQBytes + (cw / 4) * 64 * 128;

      int row_tok[2];
      bool row_on[2];
      fwd_rows(rm, wps, gid, row_tok, row_on);
      const RangeRowKeys rows = range_row_keys(p, rk, ps, wps, row_tok, row_on);
      float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
      float o_acc[kHeadDimV / 8][4];
      zero_acc<kHeadDimV>(o_acc);
      float(&o_flat)[kHeadDimV / 2] = reinterpret_cast<float(&)[kHeadDimV / 2]>(o_acc);
      auto stage_of = [&](int it) { return (seq + static_cast<uint32_t>(it)) % kStages; };

      auto issue_s = [&](int it, float(&s_acc)[kTileN / 2]) {
        const uint32_t k_addr = stage_addr + stage_of(it) * Cfg::kStageBytes;
        wgmma::fence();
        wgmma_rows_by_tile<T, kHeadDim, kTileN, Cfg::kRowsCta>(s_acc, q_addr, k_addr);
        wgmma::commit();
      };
      // The factor of the last softmax, applied to O just before the next P V is issued (under
      // the S product issued before it, as FlashAttention-3 does), and whether any row of the
      // warp needs it.
      float alpha[2] = {1.f, 1.f};
      bool rescale = false;
      auto softmax = [&](int it, float(&s)[kTileN / 2]) {
        rescale = __any_sync(0xffffffffu, online_softmax_tile<kTileN>(s, alpha, m_run, l_run, rows,
                                                                      lo + static_cast<index_t>(it) * kTileN, tig,
                                                                      scale_log2, slack_log2));
      };
      // As the kernel above without the CTA barrier; the last step's S reads the stage the next
      // tile will use (possibly being refilled for the next pass or item) and the softmax masks
      // all of it.
      auto step = [&](int it, float(&p_cur)[kTileN / 2], float(&s_nxt)[kTileN / 2]) {
        if (it + 1 < n_steps) {
          const uint32_t gi = seq + static_cast<uint32_t>(it + 1);
          bars.wait_full(gi);
        }
        uint32_t pa[kTileN / 16][4];
        pack_p_fragments<T, kTileN>(p_cur, pa);
        issue_s(it + 1, s_nxt);
        if (rescale) rescale_rows<kHeadDimV>(o_acc, alpha);  // P V (it - 1) was waited for
        const uint32_t v_addr = stage_addr + stage_of(it) * Cfg::kStageBytes + Cfg::kKBytes;
        wgmma::fence();
#pragma unroll
        for (int kk = 0; kk < kTileN / 16; ++kk)
          wgmma::Wgmma<T, kHeadDimV>::rs_mn(o_flat, pa[kk], wgmma::make_desc(v_addr + kk * 2 * 1024, kTileN * 128, 1024));
        wgmma::commit();
        wgmma::wait<1>();
        wgmma::fence_operands(s_nxt);
        softmax(it + 1, s_nxt);
        if constexpr (kPinSoftmax)
          wgmma_wait_all_after_softmax(l_run);
        else
          wgmma::wait<0>();
        wgmma::fence_operands(o_flat);
        tma::mbar_arrive(bars.empty(seq + static_cast<uint32_t>(it)));  // S and P V of tile it done
      };

      float s_a[kTileN / 2], s_b[kTileN / 2];
      tma::mbar_wait(bars.rows_full(pass_i), bars.rows_parity(pass_i));
      if (n_steps > 0) {
        bars.wait_full(seq);
        issue_s(0, s_a);
        wgmma::wait<0>();
        wgmma::fence_operands(s_a);
        softmax(0, s_a);
        rescale = false;  // O is still zero
      }
      for (int it = 0; it < n_steps; it += 2) {
        // The even-step padding of an odd tile count runs too: skipping it (a uniform branch
        // around the step) measured 0.93-0.98x at G = 16 (session 18).
        step(it, s_a, s_b);
        step(it + 1, s_b, s_a);
      }
      // The last step's softmax saw a tile past every row's keys: its factor is 1 unless every
      // key so far was masked (O = 0); kept for exactness.
      if (rescale) rescale_rows<kHeadDimV>(o_acc, alpha);
      // Every wgmma reading the rows was waited for: release them before the epilogue's stores.
      tma::mbar_arrive(bars.rows_empty(pass_i));
      fwd_epilogue<T, kHeadDimV>(p, rm, wps, row_tok, row_on, m_run, l_run, o_acc, gid, tig);
      seq += static_cast<uint32_t>(n_steps);
    }
  });
#endif
}

template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, int kWarpGroups>
Status run_range_attn_fwd_sm90(const AttnParams& p, cudaStream_t stream) {
  using Cfg = RangeFwdSm90Config<kHeadDim, kHeadDimV, kWarpGroups>;
  const int G = p.heads_q / p.heads_kv;
  const int tokens = (G >= kRows ? 1 : kRows / G) * Cfg::kWarps;
  const int chunks = G >= kRows ? (G + kRows - 1) / kRows : 1;
  const index_t items = cta_groups(p, tokens);
  if (items == 0) return Status{};
  const index_t grid_y = static_cast<index_t>(p.heads_kv) * chunks;
  if (grid_y > 65535) return Status{2, "too many KV heads x head chunks for one launch"};
  if (items > 0x7fffffff) return Status{2, "too many tokens for one launch"};
  if (kWarpGroups == 2 && range_ws_enabled()) {
    RangeWsMaps ws_maps{};
    if (encode_range_ws_maps<T, kCompressed>(ws_maps, p, nullptr, Strides3{})) {
      auto ws_kernel = range_fwd_pin_enabled() ? range_attn_fwd_sm90_ws_kernel<T, kHeadDim, kHeadDimV, kCompressed, true>
                                               : range_attn_fwd_sm90_ws_kernel<T, kHeadDim, kHeadDimV, kCompressed, false>;
      constexpr int kWsSmem = range_fwd_ws_smem<Cfg>();
      constexpr int kRowBufs = range_fwd_row_bufs<Cfg>();
      static_assert(kWsSmem >= Cfg::kSmemBytes - Cfg::kStages * 8 + (kRowBufs - 1) * Cfg::kQBytes +
                                   RangeWsBarriers<Cfg::kStages, kRowBufs>::kBytes);
      static_assert(kWsSmem <= 227 * 1024);
      cudaError_t e = cudaFuncSetAttribute(ws_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWsSmem);
      if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
      const index_t grid_x = range_persistent_grid_x(items, grid_y);
      ws_kernel<<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), 384, kWsSmem, stream>>>(
          p, ws_maps, softmax_slack_log2());
      e = cudaGetLastError();
      return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
    }
  }
  tma::KvTileMaps maps{};
  const bool use_tma = tma::encode_kv_tile_maps<T, kCompressed>(maps, p, Cfg::kTileN);
  auto kernel = use_tma ? range_attn_fwd_sm90_kernel<T, kHeadDim, kHeadDimV, kCompressed, kWarpGroups, true>
                        : range_attn_fwd_sm90_kernel<T, kHeadDim, kHeadDimV, kCompressed, kWarpGroups, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (e != cudaSuccess) return Status{3, cudaGetErrorString(e)};
  kernel<<<dim3(static_cast<unsigned>(items), static_cast<unsigned>(grid_y)), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      p, maps, softmax_slack_log2());
  e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : Status{3, cudaGetErrorString(e)};
}

// The range forward: the wgmma kernel where it runs and covers the head dims, else sm_80's.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
Status run_range_attn_fwd_best(const AttnParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDimV <= 128) {
    if (p.heads_kv > 0 && p.heads_q % p.heads_kv == 0 &&
        wgmma_kernel_usable(range_attn_fwd_sm90_kernel<T, kHeadDim, kHeadDimV, kCompressed, 2>))
      return run_range_attn_fwd_sm90<T, kHeadDim, kHeadDimV, kCompressed, 2>(p, stream);
  }
  return run_range_attn_fwd<T, kHeadDim, kHeadDimV, kCompressed>(p, stream);
}

}  // namespace sparse_detail
}  // namespace nsa
