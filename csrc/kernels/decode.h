// One NSA decoding step on the GPU (DESIGN.md §1.8), torch-free: the newest token of each
// sequence against its KV cache and compressed KV cache, all three branches and the gates.
//
// Flash-decoding over four kernels, so that one long sequence still fills the GPU:
//   1. partials   grid (splits_cmp + splits_win, H * head_chunks, B): each CTA attends the 16
//                 query heads of one (b, KV head) chunk to one slice of the compressed keys or
//                 of the sliding window (mma.sync, K/V rows read once for all heads), writes an
//                 unnormalised partial (o, max, sum); compressed slices also write, per 32-token
//                 tile and head, the partial block scores of the blocks the tile overlaps
//                 (§1.3), relative to the head's running max after that tile (also written);
//   2. select     grid (H, B): merges the compressed lse of the group's G heads, rescales and
//                 sums the tiles' partial block scores into S[j], forces init / local blocks and takes the
//                 top-n by an exact radix select (ties to the lower block, §1.4);
//   3. selected   grid (splits_slc, H * head_chunks, B): attention over slices of the
//                 selected blocks, partials as in 1;
//   4. combine    grid (HQ, B): merges each branch's partials and applies the gates.
// Every grid size comes from shapes (B, S, Sc, heads, hyper-parameters, SM count), never from
// cache_seqlens, and nothing waits on the host: the step can be captured in a CUDA graph.
// Scratch comes from the caller (decode_workspace_bytes); every slot read is written first.
#pragma once

#include <cstddef>

#include "attention.h"

#if defined(__CUDACC__) || defined(NSA_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace nsa {

constexpr int kDecodeRows = 16;       // query heads per attention CTA (one m16 tile)
constexpr int kDecodeTile = 32;       // keys per tile
constexpr int kDecodeMaxChunk = 512;  // compressed tokens per split at most

// Warps of an attention CTA (kernels 1 and 3): 4, or 2 for the widest heads, whose tiles would
// not fit otherwise.
constexpr int decode_attn_warps(int dk, int dv) { return dk + dv <= 384 ? 4 : 2; }

// Dynamic shared memory of an attention CTA: the 16 query rows, one K and one V tile of 32 keys
// per warp (padded rows) and the warps' (max, sum) per row. The block scores need none (they
// are summed per tile from the registers), so three CTAs fit an SM (74.5 KB at Dk = Dv = 128).
constexpr size_t decode_attn_smem_bytes(int dk, int dv) {
  return (static_cast<size_t>(kDecodeRows) * (dk + 8) +
          static_cast<size_t>(decode_attn_warps(dk, dv)) * kDecodeTile * ((dk + 8) + (dv + 8))) * 2 +
         static_cast<size_t>(decode_attn_warps(dk, dv)) * kDecodeRows * 2 * sizeof(float);
}

// Block-score slots per (compressed tile, head): the blocks that a tile of 32 compressed tokens
// can overlap, a = l / d and b = l' / d in units of the stride d (which divides both): tokens
// [u, u + 32) cover units [u, u + 31 + a), i.e. blocks floor(u / b) .. floor((u + 30 + a) / b).
constexpr int decode_tile_blocks(int a_units, int b_units) { return (kDecodeTile - 2 + a_units) / b_units + 2; }

// Work split and scratch layout of one decode call; a pure function of the shapes.
struct DecodePlan {
  int G = 0, head_chunks = 0;           // query heads per KV head; CTAs of <= 16 heads per group
  int splits_cmp = 0, chunk_cmp = 0;    // compressed tokens per split (multiple of 32)
  int splits_win = 0, chunk_win = 0;    // window keys per split (multiple of 32)
  int splits_slc = 0, blocks_per_slc = 0;
  int splits = 0;                       // all partial slots of one (b, query head)
  int tiles_cmp = 0;                    // compressed tiles of 32 tokens: splits_cmp * chunk_cmp / 32
  int nbt = 0;                          // block-score slots per (tile, head): decode_tile_blocks
  int ld_bs = 0;                        // nbt + 1: the slots, then the head's max after the tile
  int nb_max = 0;                       // ceil(S / sel_block): blocks a sequence can have
  // byte offsets into the workspace
  size_t off_o = 0;      // fp32 [B, HQ, splits, Dv]   unnormalised partial outputs
  size_t off_ml = 0;     // fp32 [B, HQ, splits, 2]    (max of raw q.k, sum of exp) per partial
  size_t off_bs = 0;     // fp32 [B, H, tiles_cmp, G, ld_bs]  partial block scores + max per tile
  size_t off_score = 0;  // fp32 [B, H, nb_max]        block scores S[j]
  size_t off_sel = 0;    // int32 [B, H, top_n]        selected blocks, ascending, -1 padded
  size_t bytes = 0;
};

// Plan for `num_sms` multiprocessors (num_sms <= 0: the current device's count).
DecodePlan decode_plan(const DecodeParams& p, int num_sms = 0);
size_t decode_workspace_bytes(const DecodeParams& p);

// o [B, HQ, Dv] of the step. Head dims (Dk, Dv) in {(64,64), (128,128), (192,128), (256,256)};
// q, k/v caches, compressed caches 16-byte aligned rows (last dim contiguous); gates [B, HQ]
// with heads contiguous. `workspace` holds at least decode_workspace_bytes(p) bytes (no
// initialisation needed). Enqueues on `stream`, never synchronises.
Status decode_fwd_cuda(const DecodeParams& p, DType dtype, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

template <typename T, int kHeadDim, int kHeadDimV>
Status run_decode_fwd(const DecodeParams& p, const DecodePlan& plan, void* workspace, cudaStream_t stream);

}  // namespace nsa
#endif
