// sm_90a bulk-tensor (TMA) loads and the shared-memory mbarriers they complete on, plus the
// host-side tensor-map encoding. Device helpers compile to nothing outside sm_90a images (the
// kernels that use them are only launched where wgmma_kernel_usable holds).
//
// A query-side or key-side tensor of this library is [batch, rows, heads, dim] (or packed
// [total, heads, dim]); its map is 4-d (dim, heads, rows, batch), innermost first, so that one
// box (64 columns, bh heads, br rows, 1) lands as a K-major tile of bh * br rows x 64 columns,
// row = row_in_box * bh + head_in_box, with the 128-byte swizzle of wgmma::k_major_offset.
// Boxes that reach past the tensor's extent are zero-filled; rows inside the tensor but outside
// a sequence are read as they are and must be masked by the consumer (as FlashAttention 3 does).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "attention.h"
#include "wgmma_sm90.cuh"

namespace nsa {
namespace tma {

__device__ __forceinline__ void mbar_init(uint32_t addr, int count) {
#ifdef NSA_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr), "r"(count) : "memory");
#endif
}

// Makes the barriers' initialisation visible to the async proxy (the TMA unit) before first use.
__device__ __forceinline__ void fence_barrier_init() {
#ifdef NSA_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t addr) {
#ifdef NSA_WGMMA
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(addr) : "memory");
#endif
}

// One arrival that also announces `bytes` of transactions (the TMA boxes of this phase).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t addr, uint32_t bytes) {
#ifdef NSA_WGMMA
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(addr), "r"(bytes)
               : "memory");
#endif
}

// Waits until the phase of the given parity has completed (the k-th completion has parity k & 1).
__device__ __forceinline__ void mbar_wait(uint32_t addr, uint32_t parity) {
#ifdef NSA_WGMMA
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// One 4-d box of `map` at coordinates (c0, c1, c2, c3) into shared memory, completing on mbar.
__device__ __forceinline__ void load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                        uint32_t mbar) {
#ifdef NSA_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(mbar)
      : "memory");
#endif
}

// One 3-d box of `map` at (c0, c1, c2) into shared memory, completing on mbar.
__device__ __forceinline__ void load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t mbar) {
#ifdef NSA_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(mbar)
      : "memory");
#endif
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifdef NSA_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifdef NSA_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no libcuda link); null when
// the driver does not provide it.
inline PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    if (e == cudaSuccess && q == cudaDriverEntryPointSuccess) return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
    (void)cudaGetLastError();  // a failed query must not surface as the next launch's error
    return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
  }();
  return fn;
}

// The map of a [batch, rows, heads, dim] tensor (`st`: element strides; packed: batch = 1) with
// boxes of (64, box_heads, box_rows, 1) and the 128-byte swizzle. False when TMA cannot describe
// it (no encoder, base not 16-byte aligned, a stride not a multiple of 16 bytes or >= 2^40 bytes,
// a dimension >= 2^32); the caller then takes its cp.async kernel.
template <typename T>
bool encode_rows_map(CUtensorMap* map, const void* base, index_t batch, index_t rows, index_t heads, index_t dim,
                     index_t batch_stride, index_t row_stride, index_t head_stride, int box_heads, int box_rows) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  const auto enc = encoder();
  if (enc == nullptr || base == nullptr || (reinterpret_cast<uintptr_t>(base) & 15) != 0) return false;
  if (batch <= 0 || rows <= 0 || heads <= 0 || dim < 64 || box_heads <= 0 || box_rows <= 0 || box_heads > 256 ||
      box_rows > 256 || box_heads > heads)
    return false;
  const index_t dims_el[4] = {dim, heads, rows, batch};
  for (index_t d : dims_el)
    if (d >= (index_t(1) << 32)) return false;
  if (batch == 1) batch_stride = rows * row_stride;  // unused, but must be a valid stride
  const index_t strides_el[3] = {head_stride, row_stride, batch_stride};
  cuuint64_t dims[4], strides[3];
  for (int i = 0; i < 4; ++i) dims[i] = static_cast<cuuint64_t>(dims_el[i]);
  for (int i = 0; i < 3; ++i) {
    const index_t b = strides_el[i] * static_cast<index_t>(sizeof(T));
    if (b <= 0 || b % 16 != 0 || b >= (index_t(1) << 40)) return false;
    strides[i] = static_cast<cuuint64_t>(b);
  }
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_heads), static_cast<cuuint32_t>(box_rows), 1};
  cuuint32_t elem[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return enc(map, dt, 4, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

// Whether the sm_90a kernels may use TMA loads (NSA_DISABLE_TMA=1 keeps their cp.async forms).
// Read at every launch, as the other kernel switches, so that one process can time both forms.
inline bool enabled() {
  const char* e = std::getenv("NSA_DISABLE_TMA");
  return !(e != nullptr && e[0] == '1');
}

// The K / V maps of a range branch's key tiles (box: 64 columns, 1 head, tile_n keys).
struct KvTileMaps {
  CUtensorMap k, v;
};

// False when TMA is off (NSA_DISABLE_TMA=1) or cannot describe the tensors.
template <typename T, bool kCompressed>
bool encode_kv_tile_maps(KvTileMaps& m, const AttnParams& p, int tile_n) {
  if (!enabled()) return false;
  const bool packed = p.cu_seqlens != nullptr;
  const index_t rows = kCompressed ? (packed ? p.total_rows / p.cmp_stride : p.seqlen_k_cmp) : (packed ? p.total_rows : p.seqlen);
  const index_t batch = packed ? 1 : p.batch;
  return encode_rows_map<T>(&m.k, p.k, batch, rows, p.heads_kv, p.head_dim_qk, p.k_stride.batch, p.k_stride.row,
                            p.k_stride.head, 1, tile_n) &&
         encode_rows_map<T>(&m.v, p.v, batch, rows, p.heads_kv, p.head_dim_v, p.v_stride.batch, p.v_stride.row,
                            p.v_stride.head, 1, tile_n);
}

// One thread: the boxes of key rows [row0, row0 + kTileN) of KV head g (batch item b; 0 when
// packed) into a stage (K, then V at kTileN * kHeadDim * 2 bytes, both K-major swizzled),
// completing on `bar`; the caller announces their kTileN * (kHeadDim + kHeadDimV) * 2 bytes.
template <int kHeadDim, int kHeadDimV, int kTileN>
__device__ __forceinline__ void load_kv_boxes(uint32_t k_dst, const KvTileMaps& m, int g, index_t row0, int b,
                                              uint32_t bar) {
  const int r = static_cast<int>(row0);
#pragma unroll
  for (int c = 0; c < kHeadDim / 64; ++c) load_4d(k_dst + c * kTileN * 128, &m.k, 64 * c, g, r, b, bar);
  const uint32_t v_dst = k_dst + kTileN * kHeadDim * 2;
#pragma unroll
  for (int c = 0; c < kHeadDimV / 64; ++c) load_4d(v_dst + c * kTileN * 128, &m.v, 64 * c, g, r, b, bar);
}

// load_kv_boxes as the only arrival of the stage's phase (announcing the tile's bytes).
template <int kHeadDim, int kHeadDimV, int kTileN>
__device__ __forceinline__ void load_kv_tile(uint32_t k_dst, const KvTileMaps& m, int g, index_t row0, int b,
                                             uint32_t bar) {
  mbar_arrive_expect_tx(bar, kTileN * (kHeadDim + kHeadDimV) * 2);
  load_kv_boxes<kHeadDim, kHeadDimV, kTileN>(k_dst, m, g, row0, b, bar);
}

// The map of a per-row fp32 statistic of the query rows (lse, delta: [batch, rows, heads], heads
// contiguous) with boxes of (box_heads, box_rows, 1), no swizzle; false where TMA cannot take it.
inline bool encode_stat_map(CUtensorMap* map, const float* base, index_t batch, index_t rows, index_t heads,
                            index_t batch_stride, index_t row_stride, int box_heads, int box_rows) {
  const auto enc = encoder();
  if (enc == nullptr || base == nullptr || (reinterpret_cast<uintptr_t>(base) & 15) != 0) return false;
  if (batch <= 0 || rows <= 0 || heads < box_heads || box_heads * 4 % 16 != 0 || box_rows <= 0 || box_rows > 256 ||
      box_heads > 256)
    return false;
  if (batch >= (index_t(1) << 32) || rows >= (index_t(1) << 32) || heads >= (index_t(1) << 32)) return false;
  if (batch == 1) batch_stride = rows * row_stride;
  const index_t strides_el[2] = {row_stride, batch_stride};
  cuuint64_t dims[3] = {static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(rows), static_cast<cuuint64_t>(batch)};
  cuuint64_t strides[2];
  for (int i = 0; i < 2; ++i) {
    const index_t bytes = strides_el[i] * 4;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (index_t(1) << 40)) return false;
    strides[i] = static_cast<cuuint64_t>(bytes);
  }
  cuuint32_t box[3] = {static_cast<cuuint32_t>(box_heads), static_cast<cuuint32_t>(box_rows), 1};
  cuuint32_t elem[3] = {1, 1, 1};
  return enc(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<float*>(base), dims, strides, box, elem,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace tma
}  // namespace nsa
