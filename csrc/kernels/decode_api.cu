// Host side of the decoding step: the work split (a function of shapes and the SM count only,
// so a captured graph replays with any cache_seqlens) and dispatch (dtype, Dk) -> instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>

#include "decode.h"
#include "device_info.cuh"
#include "static_switch.h"

namespace nsa {

namespace {

constexpr int kRows = kDecodeRows, kTile = kDecodeTile, kMaxChunk = kDecodeMaxChunk;
constexpr int kMinKeysPerCta = 128;                     // below this the partials cost more than they save
constexpr int kCtasPerSm = 3;  // attention CTAs resident per SM (74.5 KB of shared memory each at D = 128)

constexpr int value_dim_of(int dk) { return dk == 192 ? 128 : dk; }

index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
index_t round_up(index_t a, index_t m) { return ceil_div(a, m) * m; }
size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// Positive integer from the environment, or `fallback`. Tuning switches for A/B runs on a GPU
// (read on every call, so a benchmark can sweep them in one process); the plan stays a function
// of the shapes and these values only.
index_t env_knob(const char* name, index_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  const long long x = std::atoll(v);
  return x > 0 ? static_cast<index_t>(x) : fallback;
}

}  // namespace

DecodePlan decode_plan(const DecodeParams& p, int num_sms) {
  DecodePlan pl;
  if (num_sms <= 0) num_sms = current_sm_count();
  const index_t H = std::max(p.heads_kv, 1), B = std::max(p.batch, 0);
  const index_t S = std::max(p.cache_len, 0), Sc = std::max(p.cache_len_cmp, 0);
  const index_t l = std::max(p.cmp_block, 1), d = std::max(p.cmp_stride, 1), lp = std::max(p.sel_block, 1);
  const index_t n = std::max(p.top_n, 1);
  pl.G = std::max(p.heads_q / static_cast<int>(H), 1);
  pl.head_chunks = static_cast<int>(ceil_div(pl.G, kRows));
  pl.nb_max = static_cast<int>(std::max<index_t>(1, ceil_div(S, lp)));

  // Keys per CTA so that each launch covers the GPU about kCtasPerSm times over: kernel 1 runs
  // the compressed and window slices together, kernel 3 the selected slices on its own.
  const index_t win_keys = std::min<index_t>(std::max(p.window, 1), S);
  const index_t n_eff = std::min<index_t>(n, pl.nb_max);
  const index_t groups = B * H * pl.head_chunks;
  const index_t target = static_cast<index_t>(std::max(num_sms, 1)) * kCtasPerSm;
  const index_t kpc = round_up(std::max<index_t>(kMinKeysPerCta, ceil_div(groups * (Sc + win_keys), target)), kTile);
  const index_t kpc_slc = ceil_div(groups * std::min(n_eff * lp, S), target);

  // NSA_DECODE_CMP_CHUNK: compressed tokens per split at most (rounded up to a tile).
  const index_t max_chunk = round_up(env_knob("NSA_DECODE_CMP_CHUNK", kMaxChunk), kTile);
  index_t chunk = std::min<index_t>({kpc, max_chunk, round_up(std::max<index_t>(Sc, 1), kTile)});
  pl.splits_cmp = static_cast<int>(std::max<index_t>(1, ceil_div(Sc, chunk)));
  pl.chunk_cmp = static_cast<int>(round_up(std::max<index_t>(1, ceil_div(Sc, pl.splits_cmp)), kTile));

  index_t cw = std::min<index_t>(kpc, round_up(std::max<index_t>(win_keys, 1), kTile));
  pl.splits_win = static_cast<int>(std::max<index_t>(1, ceil_div(win_keys, cw)));
  pl.chunk_win = static_cast<int>(round_up(std::max<index_t>(1, ceil_div(win_keys, pl.splits_win)), kTile));

  // NSA_DECODE_SLC_BLOCKS: selected blocks per split at most.
  const index_t bpc = std::min<index_t>({std::max<index_t>(1, kpc_slc / lp), env_knob("NSA_DECODE_SLC_BLOCKS", n_eff), n_eff});
  pl.splits_slc = static_cast<int>(ceil_div(n_eff, bpc));
  pl.blocks_per_slc = static_cast<int>(ceil_div(n_eff, pl.splits_slc));
  pl.splits = pl.splits_cmp + pl.splits_win + pl.splits_slc;
  pl.tiles_cmp = pl.splits_cmp * (pl.chunk_cmp / kTile);
  pl.nbt = decode_tile_blocks(static_cast<int>(std::max<index_t>(l / d, 1)), static_cast<int>(std::max<index_t>(lp / d, 1)));
  pl.ld_bs = pl.nbt + 1;

  const index_t HQ = std::max(p.heads_q, 0), Dv = std::max(p.head_dim_v, 0);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += align256(bytes);
    return at;
  };
  pl.off_o = take(sizeof(float) * B * HQ * pl.splits * Dv);
  pl.off_ml = take(sizeof(float) * B * HQ * pl.splits * 2);
  pl.off_bs = take(sizeof(float) * B * H * pl.tiles_cmp * pl.G * pl.ld_bs);
  pl.off_score = take(sizeof(float) * B * H * pl.nb_max);
  pl.off_sel = take(sizeof(int) * B * H * n);
  pl.bytes = off;
  return pl;
}

size_t decode_workspace_bytes(const DecodeParams& p) { return decode_plan(p).bytes; }

Status decode_fwd_cuda(const DecodeParams& p, DType dtype, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (p.head_dim_v != value_dim_of(p.head_dim_qk))
    return Status{2, "head dims (Dk, Dv) must be (64,64), (128,128), (192,128) or (256,256) on CUDA"};
  if (p.heads_kv <= 0 || p.heads_q <= 0 || p.heads_q % p.heads_kv != 0)
    return Status{2, "heads_q must be a positive multiple of heads_kv"};
  if (p.cmp_block <= 0 || p.cmp_stride <= 0 || p.sel_block <= 0 || p.top_n <= 0 || p.window <= 0 ||
      p.init_blocks < 0 || p.local_blocks < 0)
    return Status{2, "invalid decode hyper-parameters"};
  if (p.batch == 0) return Status{};
  if (p.batch > 65535) return Status{2, "batch too large for one decode launch (at most 65535)"};
  const DecodePlan pl = decode_plan(p);
  if (static_cast<index_t>(p.heads_kv) * pl.head_chunks > 65535) return Status{2, "too many KV heads x head chunks"};
  if (workspace_bytes < pl.bytes || (pl.bytes > 0 && workspace == nullptr))
    return Status{2, "decode workspace too small (decode_workspace_bytes)"};
  return NSA_DTYPE_SWITCH(dtype, T, [&] {
    return NSA_HEADDIM_SWITCH(p.head_dim_qk, kHeadDim, [&] {
      return run_decode_fwd<T, kHeadDim, value_dim_of(kHeadDim)>(p, pl, workspace, stream);
    });
  });
}

}  // namespace nsa
