// Shared, torch-free definitions for every nsa_cuda kernel family: element types, sequence
// geometry (padded vs packed batches), the compressed-token layout, error plumbing.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NSA_HOST_DEVICE inline
#endif

namespace nsa {

using index_t = int64_t;  // every offset that multiplies a length by a stride is 64-bit

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
  }
  return "?";
}

// Status returned by every launcher: cudaSuccess-like 0, or a message the caller turns into an
// exception. Kernels never abort; host-side dispatch reports what was not compiled in.
struct Status {
  int code = 0;               // 0 ok, 1 not compiled in this build, 2 bad argument, 3 CUDA error
  const char* message = "";
  bool ok() const { return code == 0; }
};

// §1.1: Nc(T) = 0 if T < l else (T - l) // d + 1.
NSA_HOST_DEVICE int num_compressed(int seqlen, int block, int stride) {
  return seqlen < block ? 0 : (seqlen - block) / stride + 1;
}

// Geometry of one sequence of a batch. Padded batch: sequence b starts at row b*seqlen of a
// [B*T] row space (rows are addressed through batch/row strides). Packed (varlen) batch:
// rows cu_seqlens[b] .. cu_seqlens[b+1]-1 of a [total] row space.
struct SeqGeom {
  index_t row_begin;  // first row of the sequence in the packed row space, or 0 (padded)
  int len;            // T_b
};

// Reads cu_seqlens defensively: a malformed array (decreasing, out of [0, total]) yields empty
// or clamped sequences instead of out-of-bounds accesses. The torch layer rejects such arrays
// up front where it can read them without a device sync.
NSA_HOST_DEVICE SeqGeom seq_geom(const int* cu_seqlens, int b, int padded_seqlen, index_t total_rows) {
  if (cu_seqlens == nullptr) return SeqGeom{0, padded_seqlen};
  index_t s = cu_seqlens[b], e = cu_seqlens[b + 1];
  s = s < 0 ? 0 : (s > total_rows ? total_rows : s);
  e = e < s ? s : (e > total_rows ? total_rows : e);
  return SeqGeom{s, static_cast<int>(e - s)};
}

// Compressed-token layout of a packed batch: sequence b's Nc(T_b) compressed tokens are rows
// cu_seqlens[b] / stride + i of a [total / stride] tensor. Disjoint because
// floor(a/d) + floor(T/d) <= floor((a+T)/d) and Nc(T) <= T/d; rows of no sequence are zero.
NSA_HOST_DEVICE index_t compressed_row_begin(const int* cu_seqlens, int b, index_t total_rows, int stride) {
  if (cu_seqlens == nullptr) return 0;
  index_t s = cu_seqlens[b];
  s = s < 0 ? 0 : (s > total_rows ? total_rows : s);
  return s / stride;
}

// Which sequence of a packed batch owns row `row` (binary search over cu_seqlens); -1 if none.
NSA_HOST_DEVICE int find_sequence(const int* cu_seqlens, int batch, index_t row) {
  int lo = 0, hi = batch - 1, ans = -1;
  while (lo <= hi) {
    int mid = (lo + hi) >> 1;
    if (static_cast<index_t>(cu_seqlens[mid]) <= row) { ans = mid; lo = mid + 1; } else { hi = mid - 1; }
  }
  if (ans >= 0 && row >= static_cast<index_t>(cu_seqlens[ans + 1])) return -1;
  return ans;
}

}  // namespace nsa
