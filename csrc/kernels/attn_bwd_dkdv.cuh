// dK / dV of the attention backward (compressed, selected and window branches), shared by
// sparse_attn_bwd_kernel.cuh and cmp_attn_bwd_kernel.cuh.
//
// Why this layout. The first version gave each warp 16 keys and let it walk, alone and in order,
// every query row that attends them. Early keys are attended by almost every row (compressed
// token 0, selection block 0: T x G rows), so a few warps ran for the whole kernel while the
// rest of the GPU idled, and each warp re-read its own copy of every Q / dO tile (16 keys of
// reuse per 16 KB loaded).
//
// Here a CTA of 4 warps (8 for D = 256, see Cfg) owns 64 consecutive keys of one KV head (16
// per warp, FA2's dK/dV split) and streams the query rows through a shared, cp.async-pipelined Q / dO tile, so each
// tile feeds 64 keys. A key tile's rows (token x head, in a fixed order) are cut into chunks;
// each chunk is one CTA. A tile with one chunk writes dK / dV directly; a tile with several
// writes one fp32 partial per chunk to a workspace, and a second kernel adds the partials in
// chunk order. Every sum has a fixed order and there are no atomics: bitwise reproducible.
// How many chunks a tile gets depends only on shapes (compressed) or on device-side list
// lengths with a shape-only bound (selected), never on a host synchronisation.
#pragma once

#include <climits>

#include "sparse_attn_common.cuh"

namespace nsa {
namespace dkdv {

constexpr int kStep = 32;     // query rows per pipeline step (the n of the 16 x 32 products)
constexpr int kKeys = 64;     // keys per CTA: 4 key groups of 16 (one m16 tile each)
constexpr int kKeyGroups = kKeys / 16;
// Contiguous-range branches (compressed): split the rows of each key tile into at most
// kMaxSplits chunks so that about kTargetCtas CTAs exist (enough for a few waves on a
// 132-SM part at 2 CTAs/SM), but never into chunks under kMinChunkRows rows.
constexpr int kTargetCtas = 1024;
constexpr int kMaxSplits = 16;
constexpr int kMinChunkRows = 2048;
// Selected branch: chunk length = (all rows of all lists) / kSelTargetChunks, so the longest
// list (block 0: every token) is cut into pieces small against one SM's share of the work,
// and the partial workspace is bounded by 2 * kSelTargetChunks tiles whatever T is.
constexpr int kSelTargetChunks = 512;

template <int kHeadDim, int kHeadDimV>
struct Cfg {
  // D = 256: 16 keys x (256 + 256) fp32 accumulators are 256 registers per thread, which ptxas
  // moves to local memory wholesale. Two warps per key group instead, each accumulating half
  // of the dK / dV columns (128 registers, as D = 128); both compute the group's S^T and dP^T
  // (1.5x the tensor-core work of one warp per group, far cheaper than the spills).
  static constexpr int kColSplit = kHeadDim > 192 ? 2 : 1;
  static constexpr int kWarps = kKeyGroups * kColSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdQK = kHeadDim + 8;  // padded rows: ldmatrix phases hit distinct banks
  static constexpr int kLdV = kHeadDimV + 8;
  static constexpr int kKvBytes = kKeys * (kLdQK + kLdV) * 2;
  static constexpr int kStageRowBytes = kStep * (kLdQK + kLdV) * 2;
  static constexpr int kStageBytes = kStageRowBytes + 3 * kStep * 4;  // + token, lse, delta per row
  // Two stages (the next Q / dO tile in flight during the current product) when the CTAs that
  // the registers allow per SM (2 of 4 warps, 1 of 8) still fit in an sm_80 SM (164 KB).
  static constexpr int kCtasPerSm = 2 / kColSplit;
  static constexpr int kStages = (kKvBytes + 2 * kStageBytes) * kCtasPerSm <= 160 * 1024 ? 2 : 1;
  static constexpr int kSmemBytes = kKvBytes + kStages * kStageBytes;
  static constexpr int kCols = kHeadDim + kHeadDimV;  // fp32 partial row: dK then dV
  static constexpr int kPartialFloats = kKeys * kCols;
  static constexpr int kDkCols = kHeadDim / kColSplit, kDvCols = kHeadDimV / kColSplit;  // per warp
  static constexpr int kPartsPerRow = kThreads / kStep;  // loader threads per query row
};

NSA_HOST_DEVICE size_t align256(size_t x) { return (x + 255) / 256 * 256; }

NSA_HOST_DEVICE index_t partial_floats(const AttnParams& p) {
  return static_cast<index_t>(kKeys) * (p.head_dim_qk + p.head_dim_v);
}

// ---------------------------------------------------------------------------------------------
// Contiguous key ranges (compressed keys, window keys): tile slots.
// Padded batch: slot = tile * batch + b (tile-major: the heavy first tiles of every sequence are
// scheduled first). Packed batch: sequence b's tiles are slots base(b) .. base(b) + ntiles(b) - 1
// with base(b) = floor(cu[b] / U) + b, U = positions per tile (64 * d compressed, 64 window):
// disjoint because floor((a+T)/U) - floor(a/U) + 1 >= ceil(T/U) >= ntiles; some slots are empty.

// kTileKeys: keys per tile, 64 (the CTAs of dkdv_tile) or 128 (the two
// warpgroups of range_attn_bwd_dkdv_sm90.cuh); every helper below takes it.
template <int kTileKeys = kKeys>
NSA_HOST_DEVICE int range_unit(const AttnParams& p) {
  return p.mode == AttnMode::kCompressed ? p.cmp_stride * kTileKeys : kTileKeys;
}

NSA_HOST_DEVICE int range_keys_of(const AttnParams& p, int seq_len) {
  return p.mode == AttnMode::kCompressed ? num_compressed(seq_len, p.cmp_block, p.cmp_stride) : seq_len;
}

template <int kTileKeys = kKeys>
NSA_HOST_DEVICE index_t range_slots(const AttnParams& p) {
  if (p.cu_seqlens == nullptr) {
    if (p.batch <= 0 || p.seqlen <= 0) return 0;
    return static_cast<index_t>(p.batch) * ((range_keys_of(p, p.seqlen) + kTileKeys - 1) / kTileKeys);
  }
  if (p.batch <= 0) return 0;
  return p.total_rows / range_unit<kTileKeys>(p) + p.batch + 1;
}

// Chunks per key tile of the compressed branch (1 = no split). Shapes only: the same on every
// run, so the summation order (and the result) is reproducible. 128-key tiles run one CTA per
// SM, 64-key ones two: the CTA target scales with the tile.
template <int kTileKeys = kKeys>
NSA_HOST_DEVICE int range_splits(const AttnParams& p) {
  if (p.mode != AttnMode::kCompressed || p.heads_kv <= 0) return 1;
  const index_t tiles = range_slots<kTileKeys>(p) * p.heads_kv;
  if (tiles <= 0) return 1;
  index_t s = (kTargetCtas * kKeys / kTileKeys) / tiles;
  const index_t rows_max = static_cast<index_t>(p.cu_seqlens ? p.total_rows : p.seqlen) * (p.heads_q / p.heads_kv);
  if (s > rows_max / kMinChunkRows) s = rows_max / kMinChunkRows;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Rows per chunk of a tile with `rows` rows cut `splits` ways; the tile has ceil(rows / that)
// non-empty chunks (<= splits).
NSA_HOST_DEVICE index_t range_chunk_rows(index_t rows, int splits) {
  index_t c = (rows + splits - 1) / splits;
  c = (c + kStep - 1) / kStep * kStep;
  return c < kMinChunkRows ? kMinChunkRows : c;
}

template <int kTileKeys>
NSA_HOST_DEVICE size_t range_workspace_bytes_for(const AttnParams& p) {
  const int s = range_splits<kTileKeys>(p);
  if (s <= 1) return 0;
  return static_cast<size_t>(s) * range_slots<kTileKeys>(p) * p.heads_kv * kTileKeys * (p.head_dim_qk + p.head_dim_v) *
         sizeof(float);
}

// Enough for either tiling: which kernel runs is decided at launch (device, environment).
NSA_HOST_DEVICE size_t range_workspace_bytes(const AttnParams& p) {
  const size_t a = range_workspace_bytes_for<kKeys>(p), b = range_workspace_bytes_for<2 * kKeys>(p);
  return a > b ? a : b;
}

// ---------------------------------------------------------------------------------------------
// Selected branch: work units and workspace layout. After the (block, token) sort, bucket u
// (sequence, KV head, block) has a token list of len_u; its rows len_u * G are cut into
// chunks of chunk_rows, each chunk once per 64-key sub-tile of the block (tpb of them). Buckets
// are sorted by unit count, descending (longest first: a greedy schedule in that order leaves
// no long tail), unit w of the dK/dV grid maps to (sorted bucket k, chunk, sub-tile) through a
// map filled on the GPU. Buckets with >= 2 chunks sort first, so their units are w <
// (sum of their units) <= max_partials, which indexes their fp32 partials directly.
struct SelPlan {
  index_t chunk_rows = 0;
  int tpb = 1;               // 64-key sub-tiles per selection block
  index_t units_bound = 0;   // >= total units (grid of the dK/dV kernel)
  index_t max_partials = 0;  // >= units of all multi-chunk buckets
  size_t off_buckets = 0;    // int start[nb+1], units_in[nb], ids_in[nb], units[nb], order[nb], base[nb]
  size_t off_map = 0;        // int map[units_bound]
  size_t off_partials = 0;   // float [max_partials][kKeys][Dk + Dv]
  size_t off_temp = 0;       // CUB temporary storage (size known to the host code only)
};

NSA_HOST_DEVICE SelPlan sel_plan(const AttnParams& p, index_t num_pairs, index_t num_buckets) {
  SelPlan s;
  const index_t G = p.heads_kv > 0 ? p.heads_q / p.heads_kv : 1;
  const index_t rows = num_pairs * G;  // >= rows of all lists (invalid pairs are not listed)
  index_t c = (rows + kSelTargetChunks - 1) / kSelTargetChunks;
  c = (c + kStep - 1) / kStep * kStep;
  s.chunk_rows = c < kMinChunkRows ? kMinChunkRows : c;
  s.tpb = p.sel_block > 0 ? (p.sel_block + kKeys - 1) / kKeys : 1;
  // sum over lists of ceil(rows_u / C) <= rows / C + (non-empty lists)
  s.units_bound = s.tpb * (rows / s.chunk_rows + num_buckets);
  // a list with rows_u > C has ceil(rows_u / C) < 2 rows_u / C chunks
  s.max_partials = s.tpb * (2 * rows / s.chunk_rows);
  s.off_buckets = align256(4 * static_cast<size_t>(num_pairs) * sizeof(int));
  s.off_map = s.off_buckets + align256((6 * static_cast<size_t>(num_buckets) + 1) * sizeof(int));
  s.off_partials = s.off_map + align256(static_cast<size_t>(s.units_bound) * sizeof(int));
  s.off_temp = s.off_partials + align256(static_cast<size_t>(s.max_partials) * partial_floats(p) * sizeof(float));
  return s;
}

struct SelArrays {
  const int* start;  // [nb + 1] first index of bucket u in the sorted pairs
  const int* units;  // [nb] units of the k-th longest bucket (descending)
  const int* order;  // [nb] its bucket id
  const int* base;   // [nb] its first unit (exclusive prefix sum of units)
  const int* map;    // [units_bound] unit -> k, -1 past the last unit
};

// ---------------------------------------------------------------------------------------------
// Device primitives (the 16 x 32 products are sparse_attn_common.cuh's ldmatrix ones).

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 4 : 0));
}

// ---------------------------------------------------------------------------------------------
// One CTA: keys [0, nk) of a 64-key tile against query rows [r_begin, r_end) of its row list.
// Row r is (token index r / G, query head g*G + r % G); the token is list[r / G], or
// tok_lo + r / G when list is null. Key kk (0-based in the tile) takes row r iff the row's token
// lies in [lo(kk), hi(kk)] (per branch, below); the row list itself says which tokens can.
struct TileArgs {
  int b = 0;              // batch index (padded strides; unused when packed)
  int g = 0;              // KV head
  index_t q_row0 = 0;     // row of position 0 of the sequence in q / dout / lse
  index_t k_row0 = 0;     // row of key 0 of the tile in k / v / dk / dv
  int nk = 0;             // valid keys, 1 .. keys per tile (64, or 128 for the wide sm_90a tile)
  index_t key0 = 0;       // position (compressed index for the compressed branch) of key 0
  const int* list = nullptr;
  index_t tok_lo = 0;
  index_t r_begin = 0, r_end = 0;
};

// Tokens [lo, hi] whose rows key kk (0-based in the tile) takes; lo = INT_MAX (none) for a key
// past nk. Compressed key s: t >= s d + l - 1; window: s <= t <= s + w - 1; selected: t >= s.
__device__ __forceinline__ void key_token_window(const AttnParams& p, const TileArgs& a, int kk, int& lo_out, int& hi_out) {
  index_t lo = INT_MAX, hi = -1;
  if (kk < a.nk) {
    const index_t s = a.key0 + kk;
    if (p.mode == AttnMode::kCompressed) {
      lo = s * p.cmp_stride + p.cmp_block - 1;
      hi = INT_MAX;
    } else {
      lo = s;
      hi = p.mode == AttnMode::kWindow ? s + p.window - 1 : INT_MAX;
    }
  }
  lo_out = static_cast<int>(lo < INT_MAX ? lo : INT_MAX);
  hi_out = static_cast<int>(hi < INT_MAX ? hi : INT_MAX);
}

// The query side of a tile's rows: Q / dO at the first query head of KV head a.g in the tile's
// sequence, and lse / delta at the same place (rows indexed by token row and head offset).
template <typename T>
struct TileQuery {
  const T* q;
  const T* dout;
  const float* lse;
  const float* delta;
  __device__ __forceinline__ TileQuery(const AttnBwdParams& p, const TileArgs& a) {
    const bool packed = p.cu_seqlens != nullptr;
    const index_t G = p.heads_q / p.heads_kv;
    q = static_cast<const T*>(p.q) + (packed ? 0 : a.b * p.q_stride.batch) + a.g * G * p.q_stride.head;
    dout = static_cast<const T*>(p.dout) + (packed ? 0 : a.b * p.dout_stride.batch) + a.g * G * p.dout_stride.head;
    const index_t lse_off = (packed ? 0 : a.b * p.lse_batch_stride) + a.g * G;
    lse = p.lse + lse_off;
    delta = p.delta + lse_off;
  }
};

// partial == nullptr: write dK (scaled) and dV of the valid keys in T; else write the fp32 tile
// [kKeys][Dk + Dv] (rows of keys >= nk hold zeros or nothing; the reduction skips them).
// Warp w owns keys [16 (w % 4), +16) and dK / dV columns half w / 4 (D = 256) or all.
template <typename T, int kHeadDim, int kHeadDimV>
__device__ __forceinline__ void dkdv_tile(const AttnBwdParams& p, const TileArgs& a, float* partial,
                                          unsigned char* smem) {
  using C = Cfg<kHeadDim, kHeadDimV>;
  constexpr int kLdQK = C::kLdQK, kLdV = C::kLdV;
  constexpr int kVecQ = kHeadDim / 8, kVecV = kHeadDimV / 8;  // 16-byte pieces per row
  constexpr int kParts = C::kPartsPerRow;
  constexpr int kDkCols = C::kDkCols, kDvCols = C::kDvCols;
  static_assert(kVecQ % kParts == 0 && kVecV % kParts == 0, "row pieces must split evenly over the loader");
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int kg = warp % kKeyGroups, half = warp / kKeyGroups;
  const bool packed = p.cu_seqlens != nullptr;
  const int G = p.heads_q / p.heads_kv;
  const index_t n_steps = (a.r_end - a.r_begin + kStep - 1) / kStep;
  if (n_steps <= 0 && partial == nullptr) return;  // nothing attends these keys: dk, dv stay zero

  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kKeys * kLdQK;
  auto stage_q = [&](int st) { return reinterpret_cast<T*>(smem + C::kKvBytes + st * C::kStageBytes); };
  auto stage_do = [&](int st) { return stage_q(st) + kStep * kLdQK; };
  auto stage_tok = [&](int st) {
    return reinterpret_cast<int*>(smem + C::kKvBytes + st * C::kStageBytes + C::kStageRowBytes);
  };
  auto stage_lse = [&](int st) { return reinterpret_cast<float*>(stage_tok(st) + kStep); };
  auto stage_delta = [&](int st) { return stage_lse(st) + kStep; };

  const TileQuery<T> tq(p, a);
  const T *q = tq.q, *dout = tq.dout;
  const float *lse = tq.lse, *delta = tq.delta;

  float dk_acc[kDkCols / 8][4], dv_acc[kDvCols / 8][4];
#pragma unroll
  for (int n = 0; n < kDkCols / 8; ++n) dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
#pragma unroll
  for (int n = 0; n < kDvCols / 8; ++n) dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;
  const bool warp_on = kg * 16 < a.nk;

  if (n_steps > 0) {
    {  // K, V of the tile; rows past nk read as zero.
      const T* k = static_cast<const T*>(p.k) + (packed ? 0 : a.b * p.k_stride.batch) +
                   static_cast<index_t>(a.g) * p.k_stride.head;
      const T* v = static_cast<const T*>(p.v) + (packed ? 0 : a.b * p.v_stride.batch) +
                   static_cast<index_t>(a.g) * p.v_stride.head;
#pragma unroll
      for (int i = tid; i < kKeys * kVecQ; i += C::kThreads) {
        const int r = i / kVecQ, c = (i % kVecQ) * 8;
        const bool on = r < a.nk;
        mma::cp_async_16(sK + r * kLdQK + c, on ? k + (a.k_row0 + r) * p.k_stride.row + c : k, on);
      }
#pragma unroll
      for (int i = tid; i < kKeys * kVecV; i += C::kThreads) {
        const int r = i / kVecV, c = (i % kVecV) * 8;
        const bool on = r < a.nk;
        mma::cp_async_16(sV + r * kLdV + c, on ? v + (a.k_row0 + r) * p.v_stride.row + c : v, on);
      }
    }

    // Query-row window per key of this thread (its C-fragment rows gid, gid + 8 of the group).
    int key_lo[2], key_hi[2];
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) key_token_window(p, a, kg * 16 + gid + ri * 8, key_lo[ri], key_hi[ri]);

    // Loader: kParts threads per query row (row tid / kParts), each every kParts-th 16-byte
    // piece. (qi, hh) = (token index, head) of this thread's row in the next step to issue,
    // advanced by kStep rows per step with one 32-bit division (not a 64-bit one per piece).
    const int rr = tid / kParts, part = tid % kParts;
    index_t qi;
    int hh;
    {
      const index_t r = a.r_begin + rr;
      qi = r / G;
      hh = static_cast<int>(r - qi * G);
    }
    auto token_at = [&](index_t step) -> int {
      if (a.r_begin + step * kStep + rr >= a.r_end) return -1;
      return a.list ? __ldg(a.list + qi) : static_cast<int>(a.tok_lo + qi);
    };
    auto advance = [&]() {
      hh += kStep;
      const int adv = hh / G;
      qi += adv;
      hh -= adv * G;
    };
    auto issue = [&](int st, int tok) {
      const bool on = tok >= 0;
      const index_t row = a.q_row0 + (on ? tok : 0);
      const T* qs = q + row * p.q_stride.row + static_cast<index_t>(hh) * p.q_stride.head;
      const T* ds = dout + row * p.dout_stride.row + static_cast<index_t>(hh) * p.dout_stride.head;
      T* dq = stage_q(st) + rr * kLdQK;
      T* dd = stage_do(st) + rr * kLdV;
#pragma unroll
      for (int j = 0; j < kVecQ / kParts; ++j) {
        const int c = (part + kParts * j) * 8;
        mma::cp_async_16(dq + c, on ? qs + c : q, on);
      }
#pragma unroll
      for (int j = 0; j < kVecV / kParts; ++j) {
        const int c = (part + kParts * j) * 8;
        mma::cp_async_16(dd + c, on ? ds + c : dout, on);
      }
      if (part == 0) {
        stage_tok(st)[rr] = tok;
        const index_t at = row * p.lse_row_stride + hh;
        cp_async_4(stage_lse(st) + rr, on ? lse + at : p.lse, on);
        cp_async_4(stage_delta(st) + rr, on ? delta + at : p.delta, on);
      }
    };

    int tok_next = token_at(0);
    issue(0, tok_next);
    mma::cp_async_commit();
    advance();
    tok_next = token_at(1);  // prefetched: its latency hides behind step 0

    const float scale_log2 = p.scale * sparse_detail::kLog2e;
    const T* sKw = sK + kg * 16 * kLdQK;
    const T* sVw = sV + kg * 16 * kLdV;

    for (index_t step = 0; step < n_steps; ++step) {
      const int st = C::kStages == 2 ? static_cast<int>(step & 1) : 0;
      mma::cp_async_wait_all();
      // Step `step` is in shared memory for every thread, and every warp is done with step - 1,
      // whose stage the next issue overwrites (two stages).
      __syncthreads();
      if (C::kStages == 2 && step + 1 < n_steps) {
        issue(st ^ 1, tok_next);
        advance();
        tok_next = token_at(step + 2);
      }
      mma::cp_async_commit();

      if (warp_on) {
        const T* sQ = stage_q(st);
        const T* sdO = stage_do(st);
        const int* s_tok = stage_tok(st);
        const float* s_lse = stage_lse(st);
        const float* s_delta = stage_delta(st);
        float pt[4][4] = {};
        sparse_detail::gemm_16x32_nt<T, kHeadDim>(pt, sKw, kLdQK, sQ, kLdQK, gid, tig);    // S^T = K Q^T
        float dpt[4][4] = {};
        sparse_detail::gemm_16x32_nt<T, kHeadDimV>(dpt, sVw, kLdV, sdO, kLdV, gid, tig);   // dP^T = V dO^T
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n * 8 + 2 * tig + e;
            const int tok = s_tok[col];
            const float l = s_lse[col];
            // A row with no key (lse = -inf) has P = 0: make exp2(x - lse) vanish.
            const float lse_l2 = l == -INFINITY ? INFINITY : l * sparse_detail::kLog2e;
            const float dl = s_delta[col];
#pragma unroll
            for (int ri = 0; ri < 2; ++ri) {
              const bool ok = tok >= key_lo[ri] && tok <= key_hi[ri];
              const float pr = ok ? exp2f(pt[n][ri * 2 + e] * scale_log2 - lse_l2) : 0.f;
              pt[n][ri * 2 + e] = pr;                               // P^T
              dpt[n][ri * 2 + e] = pr * (dpt[n][ri * 2 + e] - dl);  // dS^T
            }
          }
        // dV += P^T dO, dK += dS^T Q (this warp's column half)
        sparse_detail::gemm_16x32_regs_nn<T, kDvCols>(dv_acc, pt, sdO + half * kDvCols, kLdV, gid, tig);
        sparse_detail::gemm_16x32_regs_nn<T, kDkCols>(dk_acc, dpt, sQ + half * kDkCols, kLdQK, gid, tig);
      }

      if (C::kStages == 1 && step + 1 < n_steps) {
        __syncthreads();  // every warp is done with the only stage
        issue(0, tok_next);
        advance();
        tok_next = token_at(step + 2);
        mma::cp_async_commit();
      }
    }
    mma::cp_async_wait_all();
  }

  if (!warp_on) return;
  if (partial != nullptr) {
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      float* row = partial + (kg * 16 + gid + ri * 8) * C::kCols;
#pragma unroll
      for (int n = 0; n < kDkCols / 8; ++n)
        *reinterpret_cast<float2*>(row + half * kDkCols + n * 8 + 2 * tig) =
            make_float2(dk_acc[n][ri * 2], dk_acc[n][ri * 2 + 1]);
#pragma unroll
      for (int n = 0; n < kDvCols / 8; ++n)
        *reinterpret_cast<float2*>(row + kHeadDim + half * kDvCols + n * 8 + 2 * tig) =
            make_float2(dv_acc[n][ri * 2], dv_acc[n][ri * 2 + 1]);
    }
    return;
  }
  T* dk = static_cast<T*>(p.dk) + (packed ? 0 : a.b * p.dk_stride.batch) + static_cast<index_t>(a.g) * p.dk_stride.head +
          half * kDkCols;
  T* dv = static_cast<T*>(p.dv) + (packed ? 0 : a.b * p.dv_stride.batch) + static_cast<index_t>(a.g) * p.dv_stride.head +
          half * kDvCols;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    const int kk = kg * 16 + gid + ri * 8;
    if (kk >= a.nk) continue;
    T* krow = dk + (a.k_row0 + kk) * p.dk_stride.row;
    T* vrow = dv + (a.k_row0 + kk) * p.dv_stride.row;
#pragma unroll
    for (int n = 0; n < kDkCols / 8; ++n)
      *reinterpret_cast<uint32_t*>(krow + n * 8 + 2 * tig) =
          mma::pack2<T>(dk_acc[n][ri * 2] * p.scale, dk_acc[n][ri * 2 + 1] * p.scale);
#pragma unroll
    for (int n = 0; n < kDvCols / 8; ++n)
      *reinterpret_cast<uint32_t*>(vrow + n * 8 + 2 * tig) = mma::pack2<T>(dv_acc[n][ri * 2], dv_acc[n][ri * 2 + 1]);
  }
}

// Sum of the fp32 partials of one key tile, chunk 0 first (fixed order: reproducible), written
// to dK (scaled) and dV. Partial c of the tile is slot slot0 + c * slot_step.
template <typename T, int kHeadDim, int kHeadDimV, int kTileKeys = kKeys>
__device__ __forceinline__ void reduce_tile(const AttnBwdParams& p, const float* ws, index_t slot0, index_t slot_step,
                                            int nch, int b, int g, index_t k_row0, int nk) {
  using C = Cfg<kHeadDim, kHeadDimV>;
  constexpr int kVec = C::kCols / 4;
  const bool packed = p.cu_seqlens != nullptr;
  T* dk = static_cast<T*>(p.dk) + (packed ? 0 : b * p.dk_stride.batch) + static_cast<index_t>(g) * p.dk_stride.head;
  T* dv = static_cast<T*>(p.dv) + (packed ? 0 : b * p.dv_stride.batch) + static_cast<index_t>(g) * p.dv_stride.head;
  for (int i = threadIdx.x; i < nk * kVec; i += blockDim.x) {
    const int kk = i / kVec, c = (i % kVec) * 4;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int ch = 0; ch < nch; ++ch) {
      const float4 x =
          *reinterpret_cast<const float4*>(ws + (slot0 + ch * slot_step) * (kTileKeys * C::kCols) + kk * C::kCols + c);
      s.x += x.x;
      s.y += x.y;
      s.z += x.z;
      s.w += x.w;
    }
    T* dst;
    if (c < kHeadDim) {
      dst = dk + (k_row0 + kk) * p.dk_stride.row + c;
      s.x *= p.scale;
      s.y *= p.scale;
      s.z *= p.scale;
      s.w *= p.scale;
    } else {
      dst = dv + (k_row0 + kk) * p.dv_stride.row + (c - kHeadDim);
    }
    reinterpret_cast<uint32_t*>(dst)[0] = mma::pack2<T>(s.x, s.y);
    reinterpret_cast<uint32_t*>(dst)[1] = mma::pack2<T>(s.z, s.w);
  }
}

// ---------------------------------------------------------------------------------------------
// Contiguous-range branches (compressed, window).

struct RangeTile {
  int b;
  int seq_len;
  index_t q_row0, k_row0, key0;
  int nk;
};

// Tile slot -> (sequence, keys); false for an empty slot.
template <bool kCompressed, int kTileKeys = kKeys>
__device__ __forceinline__ bool range_tile_of(const AttnParams& p, index_t slot, RangeTile& t) {
  const int d = p.cmp_stride;
  index_t tile;
  index_t kv_begin;
  if (p.cu_seqlens == nullptr) {
    t.b = static_cast<int>(slot % p.batch);
    tile = slot / p.batch;
    t.seq_len = p.seqlen;
    t.q_row0 = 0;
    kv_begin = 0;
  } else {
    const index_t unit = kCompressed ? static_cast<index_t>(d) * kTileKeys : kTileKeys;
    int lo = 0, hi = p.batch - 1, b = -1;
    while (lo <= hi) {
      const int mid = (lo + hi) >> 1;
      if (compressed_row_begin(p.cu_seqlens, mid, p.total_rows, static_cast<int>(unit)) + mid <= slot) {
        b = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    if (b < 0) return false;
    t.b = b;
    tile = slot - (compressed_row_begin(p.cu_seqlens, b, p.total_rows, static_cast<int>(unit)) + b);
    const SeqGeom sg = seq_geom(p.cu_seqlens, b, 0, p.total_rows);
    t.seq_len = sg.len;
    t.q_row0 = sg.row_begin;
    kv_begin = kCompressed ? compressed_row_begin(p.cu_seqlens, b, p.total_rows, d) : sg.row_begin;
  }
  const int nkeys = kCompressed ? num_compressed(t.seq_len, p.cmp_block, d) : t.seq_len;
  t.key0 = tile * kTileKeys;
  if (t.key0 >= nkeys) return false;
  t.nk = static_cast<int>(nkeys - t.key0 < kTileKeys ? nkeys - t.key0 : kTileKeys);
  t.k_row0 = kv_begin + t.key0;
  return true;
}

// Tokens that see at least one key of the tile: [tok_lo, tok_lo + n_tok).
template <bool kCompressed>
__device__ __forceinline__ void range_tokens(const AttnParams& p, const RangeTile& t, index_t& tok_lo, index_t& n_tok) {
  if (kCompressed) {
    tok_lo = t.key0 * p.cmp_stride + p.cmp_block - 1;
    n_tok = t.seq_len - tok_lo;
  } else {
    tok_lo = t.key0;
    index_t hi = t.key0 + t.nk - 1 + static_cast<index_t>(p.window) - 1;
    if (hi > t.seq_len - 1) hi = t.seq_len - 1;
    n_tok = hi - tok_lo + 1;
  }
  if (n_tok < 0) n_tok = 0;
}

// Grid: range_slots(p) * heads_kv * splits CTAs, unit w = (slot * H + g) * splits + chunk.
// tile(a, partial): the work unit (dkdv_tile, or the 128-key dkdv_tile_sm90_wide of
// range_attn_bwd_dkdv_sm90.cuh).
template <int kHeadDim, int kHeadDimV, bool kCompressed, int kTileKeys = kKeys, class Tile>
__device__ __forceinline__ void range_dkdv_with(const AttnBwdParams& p, int splits, float* ws, Tile&& tile) {
  const index_t w = blockIdx.x;
  const int chunk = static_cast<int>(w % splits);
  const index_t tile_id = w / splits;
  const int g = static_cast<int>(tile_id % p.heads_kv);
  RangeTile t;
  if (!range_tile_of<kCompressed, kTileKeys>(p, tile_id / p.heads_kv, t)) return;
  index_t tok_lo, n_tok;
  range_tokens<kCompressed>(p, t, tok_lo, n_tok);
  const index_t rows = n_tok * (p.heads_q / p.heads_kv);
  TileArgs a;
  a.b = t.b;
  a.g = g;
  a.q_row0 = t.q_row0;
  a.k_row0 = t.k_row0;
  a.nk = t.nk;
  a.key0 = t.key0;
  a.tok_lo = tok_lo;
  a.r_begin = 0;
  a.r_end = rows;
  float* partial = nullptr;
  if (splits > 1) {
    const index_t cr = range_chunk_rows(rows, splits);
    const index_t nch = (rows + cr - 1) / cr;
    if (chunk >= nch) return;
    a.r_begin = chunk * cr;
    a.r_end = a.r_begin + cr < rows ? a.r_begin + cr : rows;
    if (nch > 1) {
      const index_t n_tiles = static_cast<index_t>(gridDim.x) / splits;
      partial = ws + (chunk * n_tiles + tile_id) * (kTileKeys * Cfg<kHeadDim, kHeadDimV>::kCols);
    }
  } else if (chunk > 0) {
    return;
  }
  tile(a, partial);
}

template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed>
__device__ __forceinline__ void range_dkdv(const AttnBwdParams& p, int splits, float* ws, unsigned char* smem) {
  range_dkdv_with<kHeadDim, kHeadDimV, kCompressed>(
      p, splits, ws, [&](const TileArgs& a, float* partial) { dkdv_tile<T, kHeadDim, kHeadDimV>(p, a, partial, smem); });
}

// Grid: n_tiles = range_slots(p) * heads_kv CTAs; tiles with one chunk were written directly.
template <typename T, int kHeadDim, int kHeadDimV, bool kCompressed, int kTileKeys = kKeys>
__device__ __forceinline__ void range_reduce(const AttnBwdParams& p, int splits, const float* ws) {
  const index_t tile_id = blockIdx.x;
  const int g = static_cast<int>(tile_id % p.heads_kv);
  RangeTile t;
  if (!range_tile_of<kCompressed, kTileKeys>(p, tile_id / p.heads_kv, t)) return;
  index_t tok_lo, n_tok;
  range_tokens<kCompressed>(p, t, tok_lo, n_tok);
  const index_t rows = n_tok * (p.heads_q / p.heads_kv);
  const index_t cr = range_chunk_rows(rows, splits);
  const int nch = static_cast<int>((rows + cr - 1) / cr);
  if (nch <= 1) return;
  reduce_tile<T, kHeadDim, kHeadDimV, kTileKeys>(p, ws, tile_id, gridDim.x, nch, t.b, g, t.k_row0, t.nk);
}

}  // namespace dkdv
}  // namespace nsa
