// Argument validation and tensor -> params plumbing shared by every op of the extension.
// Errors name the op and the argument and say what was expected; dtype problems raise
// TypeError, everything else ValueError (both reach Python as those exception types).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "../kernels/attention.h"
#include "../kernels/nsa_common.h"

namespace nsa_torch {

using at::Tensor;

inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Floating tensor of rank `rank` (-1: any) on `device`; CUDA takes fp16/bf16, CPU also fp32/fp64.
inline void check_float_tensor(const Tensor& t, const char* op, const char* name, int64_t rank,
                               const c10::Device& device) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK_VALUE(t.device() == device, op, ": argument '", name, "' must be on ", device, ", got ", t.device());
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16, op, ": argument '", name,
                     "' must be float16 or bfloat16 on CUDA, got ", st);
  } else {
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op,
                     ": argument '", name, "' must be a floating tensor (float16/bfloat16/float32/float64), got ", st);
  }
  TORCH_CHECK_VALUE(rank < 0 || t.dim() == rank, op, ": argument '", name, "' must have ", rank, " dimensions, got shape ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(-1) == 1, op, ": argument '", name,
                    "' must be contiguous in its last dimension (stride 1), got strides ", t.strides());
}

inline void check_same_dtype(const Tensor& a, const Tensor& b, const char* op, const char* name_a, const char* name_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": argument '", name_b, "' must have the dtype of '",
                   name_a, "' (", a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_size(const Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": argument '", name, "' has ", what, " ", t.size(dim),
                    " (shape ", shape_str(t), "), expected ", expected);
}

inline void check_positive(int64_t v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v >= 1, op, ": argument '", name, "' must be >= 1, got ", v);
}

// DESIGN §1: d | l and d | l'.
constexpr int64_t kMaxBlock = int64_t(1) << 20;

inline void check_block_stride(int64_t block, int64_t stride, const char* op, const char* block_name,
                               const char* stride_name) {
  check_positive(block, op, block_name);
  check_positive(stride, op, stride_name);
  TORCH_CHECK_VALUE(block % stride == 0, op, ": '", stride_name, "' (", stride, ") must divide '", block_name,
                    "' (", block, ")");
  // Block sizes enter 32-bit index arithmetic in the kernels (products with tile sizes): bounded
  // far above any useful value.
  TORCH_CHECK_VALUE(block <= kMaxBlock, op, ": argument '", block_name, "' must be at most ", kMaxBlock, ", got ",
                    block);
}

// int32 [B+1] on the data's device, cu[0] = 0, non-decreasing, cu[B] = total. The values are
// checked wherever that needs no device sync in a captured graph: always on CPU, on CUDA only
// outside stream capture (the kernels clamp malformed arrays rather than read out of bounds).
void check_cu_seqlens(const Tensor& cu, int64_t total, const c10::Device& device, const char* op,
                      const char* name = "cu_seqlens");

// Batch geometry shared by the ops: padded [B, T, ...] (rank 4) or packed [total, ...] (rank 3).
struct Batch {
  bool packed = false;
  int64_t batch = 0;       // B
  int64_t seqlen = 0;      // padded T
  int64_t total_rows = 0;  // packed total, or T
  const int* cu = nullptr;
};

// Reads the geometry of `x` (rank 4 padded, or rank 3 with cu_seqlens) and validates it.
Batch batch_of(const Tensor& x, const c10::optional<Tensor>& cu_seqlens, const char* op, const char* name);

inline nsa::DType nsa_dtype(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return nsa::DType::kFloat16;
    case at::kBFloat16: return nsa::DType::kBFloat16;
    case at::kFloat: return nsa::DType::kFloat32;
    default: return nsa::DType::kFloat64;
  }
}

// batch / row / head strides of a rank-4 padded or rank-3 packed tensor.
inline nsa::Strides3 strides3(const Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), t.stride(1), t.stride(2)};
  return {0, t.stride(0), t.stride(1)};
}

// The CUDA kernels read 16 bytes at a time: rows must start 16-byte aligned (base pointer and
// batch/row/head strides multiples of 8 elements). Anything else is copied (documented).
inline Tensor aligned16(const Tensor& x) {
  bool ok = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < x.dim(); ++d) ok = x.size(d) == 1 || x.stride(d) % 8 == 0;
  // clone, not contiguous(): a misaligned view can already be contiguous
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// CPU path: half types are computed in fp32 (double for fp64) and cast back.
inline at::ScalarType cpu_compute_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// t in the CPU compute type with its last dim contiguous: Tensor::to() keeps the layout of a
// view whose heads overlap (head stride 1), which would leave a last-dim stride != 1.
inline Tensor to_compute(const Tensor& t, at::ScalarType ct) {
  Tensor r = t.to(ct);
  return r.dim() == 0 || r.numel() == 0 || r.stride(-1) == 1 ? r : r.contiguous();
}

// A launcher's Status as a Python exception: not compiled in this build -> NotImplementedError,
// bad argument -> ValueError, CUDA error -> RuntimeError.
inline void check_kernel_status(const nsa::Status& st, const char* op) {
  if (st.code == 1) TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": ", st.message);
  TORCH_CHECK_VALUE(st.code != 2, op, ": ", st.message);
  TORCH_CHECK(st.ok(), op, ": CUDA error: ", st.message);
}

// Raised by CUDA implementations whose kernels have not landed yet.
#define NSA_CUDA_NOT_IMPLEMENTED(OP, FEATURE)                                                     \
  TORCH_CHECK_NOT_IMPLEMENTED(false, OP, ": the CUDA kernel for ", FEATURE,                      \
                              " is not implemented yet; use CPU tensors or nsa_cuda.reference")

}  // namespace nsa_torch
