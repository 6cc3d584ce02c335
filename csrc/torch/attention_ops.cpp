// nsa_cuda attention ops (DESIGN.md §1.2-§1.8): cmp_attn_fwd/bwd, select_blocks,
// sel_attn_fwd/bwd, win_attn_fwd/bwd, decode_fwd (CPU implementations and CUDA kernels), and
// combine_fwd/bwd (ATen code, registered for CPU and CUDA).
//
// Every op validates its arguments in one prepare_* function shared by the CPU and CUDA
// registrations: bad input raises TypeError (dtype) or ValueError (everything else) naming
// the argument. The CPU path then upcasts to fp32 (fp64 stays fp64), runs the torch-free
// routine of csrc/kernels/cpu/attention_cpu.h and casts back to the caller's dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <tuple>
#include <vector>

#include "../kernels/attention.h"
#include "../kernels/cpu/attention_cpu.h"
#include "checks.h"
#include "combine_ops.h"

#ifdef NSA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/cmp_attn.h"
#include "../kernels/decode.h"
#include "../kernels/sparse_attn.h"
#endif

namespace nsa_torch {
namespace {

constexpr const char* kCmpFwd = "nsa_cuda.cmp_attn_fwd";
constexpr const char* kCmpBwd = "nsa_cuda.cmp_attn_bwd";
constexpr const char* kSelect = "nsa_cuda.select_blocks";
constexpr const char* kSelFwd = "nsa_cuda.sel_attn_fwd";
constexpr const char* kSelBwd = "nsa_cuda.sel_attn_bwd";
constexpr const char* kWinFwd = "nsa_cuda.win_attn_fwd";
constexpr const char* kWinBwd = "nsa_cuda.win_attn_bwd";
constexpr const char* kCombineFwd = "nsa_cuda.combine_fwd";
constexpr const char* kCombineBwd = "nsa_cuda.combine_bwd";
constexpr const char* kDecode = "nsa_cuda.decode_fwd";

// ---------------------------------------------------------------------------------------------
// Small checks

void check_scale(double scale, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, op, ": argument 'scale' must be finite and > 0, got ", scale);
}

void check_nonnegative(int64_t v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v >= 0, op, ": argument '", name, "' must be >= 0, got ", v);
}

int as_int(int64_t v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(v >= INT32_MIN && v <= INT32_MAX, op, ": argument '", name, "' is too large (", v,
                    "), it must fit in int32");
  return static_cast<int>(v);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Gradients coming from autograd may be expanded (stride 0); the kernels need a contiguous
// last dimension, so such tensors are copied rather than rejected.
Tensor last_dim_contiguous(const Tensor& t) {
  if (!t.defined() || t.dim() == 0 || t.numel() == 0 || t.stride(-1) == 1) return t;
  return t.contiguous();
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s.back() = last;
  return s;
}

std::vector<int64_t> drop_last(at::IntArrayRef sizes) { return std::vector<int64_t>(sizes.begin(), sizes.end() - 1); }

// fp32 tensor (lse / dlse) of exactly `shape` on `device`.
void check_lse(const Tensor& t, at::IntArrayRef shape, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": argument '", name, "' must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": argument '", name, "' must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": argument '", name, "' must have shape ", shape, " (the query rows x heads of 'q'), got ",
                    shape_str(t));
}

// A floating tensor shaped like `ref_shape` with `ref`'s dtype and device (dout, out).
void check_like(const Tensor& t, const Tensor& ref, at::IntArrayRef shape, const char* op, const char* name,
                const char* ref_name) {
  check_float_tensor(t, op, name, static_cast<int64_t>(shape.size()), ref.device());
  check_same_dtype(ref, t, op, ref_name, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": argument '", name, "' must have shape ", shape, ", got ", shape_str(t));
}

// Key / value tensor of an attention op: rank of q, dtype of q, `rows` rows per batch item
// (padded [B, rows, H, D]) or in all (packed [rows, H, D]); `rows_rule` says where `rows` comes from.
void check_kv(const Tensor& t, const Tensor& q, const Batch& g, int64_t rows, const char* rows_rule, const char* op,
              const char* name) {
  check_float_tensor(t, op, name, q.dim(), q.device());
  check_same_dtype(q, t, op, "q", name);
  if (!g.packed) check_size(t, 0, g.batch, op, name, "batch size (dim 0, that of 'q')");
  const int64_t dim = g.packed ? 0 : 1;
  TORCH_CHECK_VALUE(t.size(dim) == rows, op, ": argument '", name, "' must have ", rows, " rows in dim ", dim, " (",
                    rows_rule, "), got shape ", shape_str(t));
}

// Heads and head dims of q and k / v: HQ % H == 0, Dk(q) == Dk(k), H(v) == H(k).
void check_heads(const Tensor& q, const Tensor& k, const Tensor* v, const char* op, const char* kname,
                 const char* vname) {
  const int64_t HQ = q.size(-2), H = k.size(-2);
  TORCH_CHECK_VALUE(HQ >= 1 && q.size(-1) >= 1, op, ": argument 'q' needs at least one head and a head dim >= 1, got shape ",
                    shape_str(q));
  TORCH_CHECK_VALUE(H >= 1, op, ": argument '", kname, "' needs at least one head, got shape ", shape_str(k));
  TORCH_CHECK_VALUE(HQ % H == 0, op, ": the number of heads of 'q' (", HQ, ") must be a multiple of the number of heads of '",
                    kname, "' (", H, ")");
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), op, ": argument '", kname, "' has head dim ", k.size(-1),
                    ", expected the head dim of 'q' (", q.size(-1), ")");
  if (v) {
    TORCH_CHECK_VALUE(v->size(-2) == H, op, ": argument '", vname, "' has ", v->size(-2), " heads, expected the ", H,
                      " heads of '", kname, "'");
    TORCH_CHECK_VALUE(v->size(-1) >= 1, op, ": argument '", vname, "' needs a head dim >= 1, got shape ", shape_str(*v));
  }
  as_int(HQ, op, "q");
  as_int(q.size(-1), op, "q");
  if (v) as_int(v->size(-1), op, vname);
}

// Every block index of sequence b's rows in [-1, ceil(T_b / sel_block)) (CPU tensors only).
void check_block_idx_values(const Tensor& bi, const Batch& g, int64_t sel_block, const char* op) {
  if (bi.numel() == 0) return;
  const int* v = bi.data_ptr<int>();
  const int64_t per_row = bi.size(-2) * bi.size(-1);
  for (int64_t b = 0; b < g.batch; ++b) {
    const nsa::SeqGeom sg = nsa::seq_geom(g.cu, static_cast<int>(b), static_cast<int>(g.seqlen), g.total_rows);
    const int64_t nblocks = ceil_div(sg.len, sel_block);
    const int64_t row0 = g.packed ? sg.row_begin : b * g.seqlen;
    const int* p = v + row0 * per_row;
    for (int64_t e = 0; e < sg.len * per_row; ++e) {
      if (p[e] >= -1 && p[e] < nblocks) continue;
      const int64_t r = e / per_row;
      TORCH_CHECK_VALUE(false, op, ": argument 'block_idx' holds ", p[e], " at token ", r, " of sequence ", b,
                        " (length ", sg.len, "), expected -1 or a block index in [0, ", nblocks,
                        ") = [0, ceil(T / sel_block))");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Attention family (compressed / selected / window), forward and backward

struct AttnArgs {
  Batch batch;
  nsa::AttnParams params;
  std::vector<int64_t> o_shape, lse_shape;
  Tensor block_idx;  // contiguous int32 (kept alive for params.block_idx)
};

nsa::Strides3 lse_strides(const Batch& g, int64_t HQ) {
  return {g.packed ? 0 : g.seqlen * HQ, HQ, 1};
}

// Validates q, k, v (+ block_idx) and the branch's hyper-parameters; fills params except the
// output pointers. check_values: read block_idx values (CPU only: no device sync on CUDA).
AttnArgs prepare_attn(const char* op, nsa::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const char* kname, const char* vname, double scale, int64_t block, int64_t stride,
                      int64_t sel_block, int64_t window, const Tensor* block_idx,
                      const c10::optional<Tensor>& cu_seqlens, bool check_values) {
  check_float_tensor(q, op, "q", -1, q.device());
  AttnArgs a;
  a.batch = batch_of(q, cu_seqlens, op, "q");
  const Batch& g = a.batch;
  check_scale(scale, op);
  int64_t key_rows = g.packed ? g.total_rows : g.seqlen;
  const char* rows_rule = g.packed ? "the packed tokens of 'q'" : "the sequence length of 'q'";
  if (mode == nsa::AttnMode::kCompressed) {
    check_block_stride(block, stride, op, "block", "stride");
    as_int(block, op, "block");
    key_rows = g.packed ? g.total_rows / stride
                        : nsa::num_compressed(static_cast<int>(g.seqlen), static_cast<int>(block), static_cast<int>(stride));
    rows_rule = g.packed ? "packed compressed rows: total tokens of 'q' // stride"
                         : "compressed tokens Nc(T) = 0 if T < block else (T - block) // stride + 1, T from 'q'";
  } else if (mode == nsa::AttnMode::kSelected) {
    check_positive(sel_block, op, "sel_block");
    as_int(sel_block, op, "sel_block");
  } else {
    check_positive(window, op, "window");
  }
  check_kv(k, q, g, key_rows, rows_rule, op, kname);
  check_kv(v, q, g, key_rows, rows_rule, op, vname);
  check_heads(q, k, &v, op, kname, vname);
  const int64_t HQ = q.size(-2), H = k.size(-2);

  auto& p = a.params;
  p.q = q.data_ptr();
  p.q_stride = strides3(q);
  p.k = k.data_ptr();
  p.k_stride = strides3(k);
  p.v = v.data_ptr();
  p.v_stride = strides3(v);
  const auto ls = lse_strides(g, HQ);
  p.lse_batch_stride = ls.batch;
  p.lse_row_stride = ls.row;
  p.cu_seqlens = g.cu;
  p.batch = static_cast<int>(g.batch);
  p.seqlen = static_cast<int>(g.seqlen);
  p.total_rows = g.total_rows;
  p.heads_q = static_cast<int>(HQ);
  p.heads_kv = static_cast<int>(H);
  p.head_dim_qk = static_cast<int>(q.size(-1));
  p.head_dim_v = static_cast<int>(v.size(-1));
  p.scale = static_cast<float>(scale);
  p.scale_fp64 = scale;
  p.mode = mode;
  if (mode == nsa::AttnMode::kCompressed) {
    p.cmp_block = static_cast<int>(block);
    p.cmp_stride = static_cast<int>(stride);
    p.seqlen_k_cmp = g.packed ? 0 : static_cast<int>(key_rows);
  } else if (mode == nsa::AttnMode::kSelected) {
    p.sel_block = static_cast<int>(sel_block);
  } else {
    p.window = static_cast<int>(std::min<int64_t>(window, INT32_MAX));  // wider than any sequence: all keys
  }

  if (mode == nsa::AttnMode::kSelected) {
    TORCH_CHECK(block_idx != nullptr && block_idx->defined(), op, ": argument 'block_idx' is undefined");
    const Tensor& bi = *block_idx;
    TORCH_CHECK_TYPE(bi.scalar_type() == at::kInt, op, ": argument 'block_idx' must be int32, got ", bi.scalar_type());
    TORCH_CHECK_VALUE(bi.device() == q.device(), op, ": argument 'block_idx' must be on ", q.device(), ", got ",
                      bi.device());
    std::vector<int64_t> want = drop_last(q.sizes());
    want.back() = H;
    TORCH_CHECK_VALUE(bi.dim() == q.dim() && at::IntArrayRef(bi.sizes()).slice(0, want.size()) == at::IntArrayRef(want),
                      op, ": argument 'block_idx' must have shape ", at::IntArrayRef(want),
                      " + [n] (the query rows of 'q', the heads of '", kname, "', n selected blocks), got ",
                      shape_str(bi));
    p.top_n = as_int(bi.size(-1), op, "block_idx");
    a.block_idx = bi.is_contiguous() ? bi : bi.contiguous();
    if (check_values) check_block_idx_values(a.block_idx, g, sel_block, op);
    p.block_idx = a.block_idx.data_ptr<int>();
    p.block_idx_stride = strides3(a.block_idx);
  }
  a.o_shape = with_last(q.sizes(), v.size(-1));
  a.lse_shape = drop_last(q.sizes());
  return a;
}

// Backward: prepare_attn plus dout / out (shaped like o, dtype of q), lse / dlse (fp32).
// dout must already be last-dim contiguous (see last_dim_contiguous).
AttnArgs prepare_attn_bwd(const char* op, nsa::AttnMode mode, const Tensor& dout, const c10::optional<Tensor>& dlse,
                          const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          const char* kname, const char* vname, double scale, int64_t block, int64_t stride,
                          int64_t sel_block, int64_t window, const Tensor* block_idx,
                          const c10::optional<Tensor>& cu_seqlens, bool check_values,
                          const c10::optional<Tensor>& delta, const c10::optional<Tensor>& dq_acc) {
  AttnArgs a = prepare_attn(op, mode, q, k, v, kname, vname, scale, block, stride, sel_block, window, block_idx,
                            cu_seqlens, check_values);
  check_like(dout, q, a.o_shape, op, "dout", "q");
  check_like(out, q, a.o_shape, op, "out", "q");
  check_lse(lse, a.lse_shape, q.device(), op, "lse");
  if (dlse.has_value()) check_lse(*dlse, a.lse_shape, q.device(), op, "dlse");
  if (delta.has_value()) check_lse(*delta, a.lse_shape, q.device(), op, "delta");
  if (dq_acc.has_value()) check_like(*dq_acc, q, q.sizes(), op, "dq_acc", "q");
  return a;
}

// CPU forward of any branch: upcast, run, cast back.
std::tuple<Tensor, Tensor> attn_fwd_cpu(AttnArgs a, const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto ct = cpu_compute_type(q.scalar_type());
  const Tensor qc = to_compute(q, ct), kc = to_compute(k, ct), vc = to_compute(v, ct);
  auto& p = a.params;
  p.q = qc.data_ptr();
  p.q_stride = strides3(qc);
  p.k = kc.data_ptr();
  p.k_stride = strides3(kc);
  p.v = vc.data_ptr();
  p.v_stride = strides3(vc);
  Tensor o = at::empty(a.o_shape, qc.options());
  Tensor lse = at::empty(a.lse_shape, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.o_stride = strides3(o);
  p.lse = lse.data_ptr<float>();
  if (ct == at::kDouble) nsa::cpu::attn_fwd<double>(p);
  else nsa::cpu::attn_fwd<float>(p);
  return {o.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor> attn_bwd_cpu(AttnArgs a, const Tensor& dout, const c10::optional<Tensor>& dlse,
                                                const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                                const Tensor& lse, const c10::optional<Tensor>& delta,
                                                const c10::optional<Tensor>& dq_acc) {
  const auto ct = cpu_compute_type(q.scalar_type());
  const Tensor qc = to_compute(q, ct), kc = to_compute(k, ct), vc = to_compute(v, ct), oc = to_compute(out, ct), doc = to_compute(dout, ct);
  const Tensor lsec = lse.contiguous();
  const Tensor dlsec = dlse.has_value() ? dlse->contiguous() : Tensor();
  const Tensor deltac = delta.has_value() ? delta->contiguous() : Tensor();  // layout of lsec
  nsa::AttnBwdParams p;
  static_cast<nsa::AttnParams&>(p) = a.params;
  p.q = qc.data_ptr();
  p.q_stride = strides3(qc);
  p.k = kc.data_ptr();
  p.k_stride = strides3(kc);
  p.v = vc.data_ptr();
  p.v_stride = strides3(vc);
  p.o = const_cast<void*>(oc.data_ptr());
  p.o_stride = strides3(oc);
  p.lse = const_cast<float*>(lsec.data_ptr<float>());
  p.dout = doc.data_ptr();
  p.dout_stride = strides3(doc);
  p.dlse = dlse.has_value() ? dlsec.data_ptr<float>() : nullptr;
  p.delta = delta.has_value() ? deltac.data_ptr<float>() : nullptr;
  const auto contig = at::MemoryFormat::Contiguous;
  Tensor dq = at::empty(qc.sizes(), qc.options().memory_format(contig));
  Tensor dk = at::empty(kc.sizes(), kc.options().memory_format(contig));
  Tensor dv = at::empty(vc.sizes(), vc.options().memory_format(contig));
  p.dq = dq.data_ptr();
  p.dq_stride = strides3(dq);
  p.dk = dk.data_ptr();
  p.dk_stride = strides3(dk);
  p.dv = dv.data_ptr();
  p.dv_stride = strides3(dv);
  if (ct == at::kDouble) nsa::cpu::attn_bwd<double>(p);
  else nsa::cpu::attn_bwd<float>(p);
  if (dq_acc.has_value()) dq.add_(to_compute(*dq_acc, ct));  // summed before the one rounding, as on the GPU
  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

// ---- compressed attention

std::tuple<Tensor, Tensor> cmp_attn_fwd_cpu(const Tensor& q, const Tensor& k_cmp, const Tensor& v_cmp, double scale,
                                            int64_t block, int64_t stride, const c10::optional<Tensor>& cu_seqlens) {
  auto a = prepare_attn(kCmpFwd, nsa::AttnMode::kCompressed, q, k_cmp, v_cmp, "k_cmp", "v_cmp", scale, block, stride, 0,
                        0, nullptr, cu_seqlens, true);
  return attn_fwd_cpu(std::move(a), q, k_cmp, v_cmp);
}

std::tuple<Tensor, Tensor, Tensor> cmp_attn_bwd_cpu(const Tensor& dout_in, const c10::optional<Tensor>& dlse,
                                                    const Tensor& q, const Tensor& k_cmp, const Tensor& v_cmp,
                                                    const Tensor& out, const Tensor& lse, double scale, int64_t block,
                                                    int64_t stride, const c10::optional<Tensor>& cu_seqlens,
                                                    const c10::optional<Tensor>& delta,
                                                    const c10::optional<Tensor>& dq_acc) {
  const Tensor dout = last_dim_contiguous(dout_in);
  auto a = prepare_attn_bwd(kCmpBwd, nsa::AttnMode::kCompressed, dout, dlse, q, k_cmp, v_cmp, out, lse, "k_cmp", "v_cmp",
                            scale, block, stride, 0, 0, nullptr, cu_seqlens, true, delta, dq_acc);
  return attn_bwd_cpu(std::move(a), dout, dlse, q, k_cmp, v_cmp, out, lse, delta, dq_acc);
}

// ---- selected attention

std::tuple<Tensor, Tensor> sel_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& block_idx,
                                            double scale, int64_t sel_block, const c10::optional<Tensor>& cu_seqlens) {
  auto a = prepare_attn(kSelFwd, nsa::AttnMode::kSelected, q, k, v, "k", "v", scale, 0, 0, sel_block, 0, &block_idx,
                        cu_seqlens, true);
  return attn_fwd_cpu(std::move(a), q, k, v);
}

std::tuple<Tensor, Tensor, Tensor> sel_attn_bwd_cpu(const Tensor& dout_in, const c10::optional<Tensor>& dlse,
                                                    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                                    const Tensor& lse, const Tensor& block_idx, double scale,
                                                    int64_t sel_block, const c10::optional<Tensor>& cu_seqlens,
                                                    const c10::optional<Tensor>& delta,
                                                    const c10::optional<Tensor>& dq_acc) {
  const Tensor dout = last_dim_contiguous(dout_in);
  auto a = prepare_attn_bwd(kSelBwd, nsa::AttnMode::kSelected, dout, dlse, q, k, v, out, lse, "k", "v", scale, 0, 0,
                            sel_block, 0, &block_idx, cu_seqlens, true, delta, dq_acc);
  return attn_bwd_cpu(std::move(a), dout, dlse, q, k, v, out, lse, delta, dq_acc);
}

// ---- sliding window

std::tuple<Tensor, Tensor> win_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                            int64_t window, const c10::optional<Tensor>& cu_seqlens) {
  auto a = prepare_attn(kWinFwd, nsa::AttnMode::kWindow, q, k, v, "k", "v", scale, 0, 0, 0, window, nullptr, cu_seqlens,
                        true);
  return attn_fwd_cpu(std::move(a), q, k, v);
}

std::tuple<Tensor, Tensor, Tensor> win_attn_bwd_cpu(const Tensor& dout_in, const c10::optional<Tensor>& dlse,
                                                    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                                                    const Tensor& lse, double scale, int64_t window,
                                                    const c10::optional<Tensor>& cu_seqlens,
                                                    const c10::optional<Tensor>& delta,
                                                    const c10::optional<Tensor>& dq_acc) {
  const Tensor dout = last_dim_contiguous(dout_in);
  auto a = prepare_attn_bwd(kWinBwd, nsa::AttnMode::kWindow, dout, dlse, q, k, v, out, lse, "k", "v", scale, 0, 0, 0,
                            window, nullptr, cu_seqlens, true, delta, dq_acc);
  return attn_bwd_cpu(std::move(a), dout, dlse, q, k, v, out, lse, delta, dq_acc);
}

// ---------------------------------------------------------------------------------------------
// Block selection

struct SelectArgs {
  Batch batch;
  nsa::SelectParams params;
  std::vector<int64_t> out_shape;
};

// The selection hyper-parameters shared by select_blocks and decode_fwd.
void check_select_hparams(int64_t cmp_block, int64_t cmp_stride, int64_t sel_block, int64_t top_n, int64_t init_blocks,
                          int64_t local_blocks, const char* op) {
  check_block_stride(cmp_block, cmp_stride, op, "cmp_block", "cmp_stride");
  check_block_stride(sel_block, cmp_stride, op, "sel_block", "cmp_stride");
  check_positive(top_n, op, "top_n");
  check_nonnegative(init_blocks, op, "init_blocks");
  check_nonnegative(local_blocks, op, "local_blocks");
  as_int(cmp_block, op, "cmp_block");
  as_int(sel_block, op, "sel_block");
  as_int(top_n, op, "top_n");
}

SelectArgs prepare_select(const Tensor& q, const Tensor& k_cmp, const Tensor& lse, double scale, int64_t cmp_block,
                          int64_t cmp_stride, int64_t sel_block, int64_t top_n, int64_t init_blocks,
                          int64_t local_blocks, const c10::optional<Tensor>& cu_seqlens) {
  constexpr const char* op = kSelect;
  check_float_tensor(q, op, "q", -1, q.device());
  SelectArgs a;
  a.batch = batch_of(q, cu_seqlens, op, "q");
  const Batch& g = a.batch;
  check_scale(scale, op);
  check_select_hparams(cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks, op);
  const int64_t key_rows =
      g.packed ? g.total_rows / cmp_stride
               : nsa::num_compressed(static_cast<int>(g.seqlen), static_cast<int>(cmp_block), static_cast<int>(cmp_stride));
  check_kv(k_cmp, q, g, key_rows,
           g.packed ? "packed compressed rows: total tokens of 'q' // cmp_stride"
                    : "compressed tokens Nc(T) = 0 if T < cmp_block else (T - cmp_block) // cmp_stride + 1, T from 'q'",
           op, "k_cmp");
  check_heads(q, k_cmp, nullptr, op, "k_cmp", "");
  const std::vector<int64_t> lse_shape = drop_last(q.sizes());
  check_lse(lse, lse_shape, q.device(), op, "lse");
  const int64_t HQ = q.size(-2), H = k_cmp.size(-2);

  auto& p = a.params;
  p.q = q.data_ptr();
  p.q_stride = strides3(q);
  p.k_cmp = k_cmp.data_ptr();
  p.k_stride = strides3(k_cmp);
  const auto ls = lse_strides(g, HQ);
  p.lse_batch_stride = ls.batch;
  p.lse_row_stride = ls.row;
  p.cu_seqlens = g.cu;
  p.batch = static_cast<int>(g.batch);
  p.seqlen = static_cast<int>(g.seqlen);
  p.total_rows = g.total_rows;
  p.heads_q = static_cast<int>(HQ);
  p.heads_kv = static_cast<int>(H);
  p.head_dim_qk = static_cast<int>(q.size(-1));
  p.scale = static_cast<float>(scale);
  p.scale_fp64 = scale;
  p.cmp_block = static_cast<int>(cmp_block);
  p.cmp_stride = static_cast<int>(cmp_stride);
  p.sel_block = static_cast<int>(sel_block);
  p.top_n = static_cast<int>(top_n);
  p.init_blocks = static_cast<int>(std::min<int64_t>(init_blocks, INT32_MAX));
  p.local_blocks = static_cast<int>(std::min<int64_t>(local_blocks, INT32_MAX));
  p.seqlen_k_cmp = g.packed ? 0 : static_cast<int>(key_rows);
  a.out_shape = drop_last(q.sizes());
  a.out_shape.back() = H;
  a.out_shape.push_back(top_n);
  return a;
}

Tensor select_blocks_cpu(const Tensor& q, const Tensor& k_cmp, const Tensor& lse, double scale, int64_t cmp_block,
                         int64_t cmp_stride, int64_t sel_block, int64_t top_n, int64_t init_blocks,
                         int64_t local_blocks, const c10::optional<Tensor>& cu_seqlens) {
  auto a = prepare_select(q, k_cmp, lse, scale, cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks,
                          cu_seqlens);
  const auto ct = cpu_compute_type(q.scalar_type());
  const Tensor qc = to_compute(q, ct), kc = to_compute(k_cmp, ct), lsec = lse.contiguous();
  auto& p = a.params;
  p.q = qc.data_ptr();
  p.q_stride = strides3(qc);
  p.k_cmp = kc.data_ptr();
  p.k_stride = strides3(kc);
  p.lse = lsec.data_ptr<float>();
  Tensor out = at::empty(a.out_shape, q.options().dtype(at::kInt));
  p.block_idx = out.data_ptr<int>();
  p.block_idx_stride = strides3(out);
  if (ct == at::kDouble) nsa::cpu::select_blocks<double>(p);
  else nsa::cpu::select_blocks<float>(p);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Gated combination (§1.7): real ATen code for CPU and CUDA, computed in fp32 (fp64 for fp64).

void check_float_any_stride(const Tensor& t, const Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": argument '", name, "' must be on ", ref.device(), ", got ",
                    t.device());
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16, op, ": argument '", name,
                     "' must be float16 or bfloat16 on CUDA, got ", st);
  } else {
    TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op,
                     ": argument '", name, "' must be a floating tensor (float16/bfloat16/float32/float64), got ", st);
  }
  if (&t != &ref) check_same_dtype(ref, t, op, ref_name, name);
}

void prepare_combine(const Tensor& o_cmp, const Tensor& o_slc, const Tensor& o_win, const Tensor& g_cmp,
                     const Tensor& g_slc, const Tensor& g_win, const Tensor* dout, const char* op) {
  check_float_any_stride(o_cmp, o_cmp, op, "o_cmp", "o_cmp");
  TORCH_CHECK_VALUE(o_cmp.dim() >= 2, op, ": argument 'o_cmp' must be [..., heads, head_dim], got shape ",
                    shape_str(o_cmp));
  const std::pair<const Tensor*, const char*> outs[] = {{&o_slc, "o_slc"}, {&o_win, "o_win"}, {dout, "dout"}};
  for (const auto& [t, name] : outs) {
    if (!t) continue;
    check_float_any_stride(*t, o_cmp, op, name, "o_cmp");
    TORCH_CHECK_VALUE(t->sizes() == o_cmp.sizes(), op, ": argument '", name, "' must have the shape of 'o_cmp' ",
                      o_cmp.sizes(), ", got ", shape_str(*t));
  }
  const std::vector<int64_t> gshape = drop_last(o_cmp.sizes());
  const std::pair<const Tensor*, const char*> gates[] = {{&g_cmp, "g_cmp"}, {&g_slc, "g_slc"}, {&g_win, "g_win"}};
  for (const auto& [t, name] : gates) {
    check_float_any_stride(*t, o_cmp, op, name, "o_cmp");
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(gshape), op, ": argument '", name, "' must have shape ",
                      at::IntArrayRef(gshape), " (the leading dims of 'o_cmp' without head_dim), got ", shape_str(*t));
  }
}

Tensor combine_fwd(const Tensor& o_cmp, const Tensor& o_slc, const Tensor& o_win, const Tensor& g_cmp,
                   const Tensor& g_slc, const Tensor& g_win) {
  prepare_combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, nullptr, kCombineFwd);
#ifdef NSA_WITH_CUDA
  if (combine_cuda_applies(o_cmp)) return combine_fwd_cuda(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, kCombineFwd);
#endif
  const auto ct = cpu_compute_type(o_cmp.scalar_type());
  const Tensor o = g_cmp.to(ct).unsqueeze(-1).mul(o_cmp.to(ct))
                       .add(g_slc.to(ct).unsqueeze(-1).mul(o_slc.to(ct)))
                       .add(g_win.to(ct).unsqueeze(-1).mul(o_win.to(ct)));
  return o.to(o_cmp.scalar_type()).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> combine_bwd(const Tensor& dout, const Tensor& o_cmp,
                                                                       const Tensor& o_slc, const Tensor& o_win,
                                                                       const Tensor& g_cmp, const Tensor& g_slc,
                                                                       const Tensor& g_win, bool dg_fp32) {
  prepare_combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, &dout, kCombineBwd);
#ifdef NSA_WITH_CUDA
  if (combine_cuda_applies(o_cmp))
    return combine_bwd_cuda(dout, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, dg_fp32, kCombineBwd);
#endif
  const auto ct = cpu_compute_type(o_cmp.scalar_type());
  const auto st = o_cmp.scalar_type();
  const Tensor d = to_compute(dout, ct);
  auto branch = [&](const Tensor& o, const Tensor& g) {
    return std::make_pair(g.to(ct).unsqueeze(-1).mul(d).to(st).contiguous(),
                          d.mul(o.to(ct)).sum(-1).to(dg_fp32 ? at::kFloat : st).contiguous());
  };
  auto [do_cmp, dg_cmp] = branch(o_cmp, g_cmp);
  auto [do_slc, dg_slc] = branch(o_slc, g_slc);
  auto [do_win, dg_win] = branch(o_win, g_win);
  return {do_cmp, do_slc, do_win, dg_cmp, dg_slc, dg_win};
}

// ---------------------------------------------------------------------------------------------
// Decoding (§1.8)

struct DecodeArgs {
  nsa::DecodeParams params;
  std::vector<int64_t> out_shape;
};

DecodeArgs prepare_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_cmp_cache,
                          const Tensor& v_cmp_cache, const Tensor& cache_seqlens, const Tensor& g_cmp,
                          const Tensor& g_slc, const Tensor& g_win, double scale, int64_t cmp_block, int64_t cmp_stride,
                          int64_t sel_block, int64_t top_n, int64_t init_blocks, int64_t local_blocks, int64_t window,
                          bool check_values) {
  constexpr const char* op = kDecode;
  check_float_tensor(q, op, "q", 3, q.device());
  check_scale(scale, op);
  check_select_hparams(cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks, op);
  check_positive(window, op, "window");
  const int64_t B = q.size(0), HQ = q.size(1);
  const std::pair<const Tensor*, const char*> caches[] = {
      {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_cmp_cache, "k_cmp_cache"}, {&v_cmp_cache, "v_cmp_cache"}};
  for (const auto& [t, name] : caches) {
    check_float_tensor(*t, op, name, 4, q.device());
    check_same_dtype(q, *t, op, "q", name);
    check_size(*t, 0, B, op, name, "batch size (dim 0, that of 'q')");
  }
  const int64_t S = k_cache.size(1), Sc = k_cmp_cache.size(1);
  check_size(v_cache, 1, S, op, "v_cache", "cache length (dim 1, that of 'k_cache')");
  check_size(v_cmp_cache, 1, Sc, op, "v_cmp_cache", "cache length (dim 1, that of 'k_cmp_cache')");
  check_heads(q, k_cache, &v_cache, op, "k_cache", "v_cache");
  const int64_t H = k_cache.size(2), Dk = q.size(2), Dv = v_cache.size(3);
  check_size(k_cmp_cache, 2, H, op, "k_cmp_cache", "heads (dim 2, those of 'k_cache')");
  check_size(k_cmp_cache, 3, Dk, op, "k_cmp_cache", "head dim (dim 3, that of 'q')");
  check_size(v_cmp_cache, 2, H, op, "v_cmp_cache", "heads (dim 2, those of 'k_cache')");
  check_size(v_cmp_cache, 3, Dv, op, "v_cmp_cache", "head dim (dim 3, that of 'v_cache')");
  as_int(S, op, "k_cache");
  as_int(Sc, op, "k_cmp_cache");
  as_int(B, op, "q");

  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, op, ": argument 'cache_seqlens' must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.device() == q.device(), op, ": argument 'cache_seqlens' must be on ", q.device(),
                    ", got ", cache_seqlens.device());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, op,
                    ": argument 'cache_seqlens' must have shape [", B, "] (the batch of 'q'), got ",
                    shape_str(cache_seqlens));
  if (check_values && B > 0) {
    const Tensor cs = cache_seqlens.contiguous();
    const int* v = cs.data_ptr<int>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(v[b] >= 0 && v[b] <= S, op, ": argument 'cache_seqlens' holds ", v[b], " for sequence ", b,
                        ", expected a length in [0, ", S, "] (the cache length of 'k_cache')");
      const int nc = nsa::num_compressed(v[b], static_cast<int>(cmp_block), static_cast<int>(cmp_stride));
      TORCH_CHECK_VALUE(nc <= Sc, op, ": argument 'k_cmp_cache' has ", Sc, " rows (dim 1) but sequence ", b,
                        " of length ", v[b], " needs Nc = ", nc, " compressed tokens");
    }
  }
  const std::pair<const Tensor*, const char*> gates[] = {{&g_cmp, "g_cmp"}, {&g_slc, "g_slc"}, {&g_win, "g_win"}};
  for (const auto& [t, name] : gates) {
    check_float_tensor(*t, op, name, 2, q.device());
    check_same_dtype(q, *t, op, "q", name);
    TORCH_CHECK_VALUE(t->size(0) == B && t->size(1) == HQ, op, ": argument '", name, "' must have shape [", B, ", ", HQ,
                      "] (batch and heads of 'q'), got ", shape_str(*t));
  }

  DecodeArgs a;
  auto& p = a.params;
  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.k_stride = strides3(k_cache);
  p.v_cache = v_cache.data_ptr();
  p.v_stride = strides3(v_cache);
  p.k_cmp = k_cmp_cache.data_ptr();
  p.kc_stride = strides3(k_cmp_cache);
  p.v_cmp = v_cmp_cache.data_ptr();
  p.vc_stride = strides3(v_cmp_cache);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.batch = static_cast<int>(B);
  p.cache_len = static_cast<int>(S);
  p.cache_len_cmp = static_cast<int>(Sc);
  p.heads_q = static_cast<int>(HQ);
  p.heads_kv = static_cast<int>(H);
  p.head_dim_qk = static_cast<int>(Dk);
  p.head_dim_v = static_cast<int>(Dv);
  p.scale = static_cast<float>(scale);
  p.scale_fp64 = scale;
  p.cmp_block = static_cast<int>(cmp_block);
  p.cmp_stride = static_cast<int>(cmp_stride);
  p.sel_block = static_cast<int>(sel_block);
  p.top_n = static_cast<int>(top_n);
  p.init_blocks = static_cast<int>(std::min<int64_t>(init_blocks, INT32_MAX));
  p.local_blocks = static_cast<int>(std::min<int64_t>(local_blocks, INT32_MAX));
  p.window = static_cast<int>(std::min<int64_t>(window, INT32_MAX));
  a.out_shape = {B, HQ, Dv};
  return a;
}

Tensor decode_fwd_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_cmp_cache,
                      const Tensor& v_cmp_cache, const Tensor& cache_seqlens, const Tensor& g_cmp, const Tensor& g_slc,
                      const Tensor& g_win, double scale, int64_t cmp_block, int64_t cmp_stride, int64_t sel_block,
                      int64_t top_n, int64_t init_blocks, int64_t local_blocks, int64_t window) {
  auto a = prepare_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win, scale,
                          cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks, window, true);
  const auto ct = cpu_compute_type(q.scalar_type());
  const Tensor qc = to_compute(q, ct), kc = to_compute(k_cache, ct), vc = to_compute(v_cache, ct), kcc = to_compute(k_cmp_cache, ct),
               vcc = to_compute(v_cmp_cache, ct), csl = cache_seqlens.contiguous();
  const Tensor gc = g_cmp.to(ct).contiguous(), gs = g_slc.to(ct).contiguous(), gw = g_win.to(ct).contiguous();
  auto& p = a.params;
  p.q = qc.data_ptr();
  p.q_batch_stride = qc.stride(0);
  p.q_head_stride = qc.stride(1);
  p.k_cache = kc.data_ptr();
  p.k_stride = strides3(kc);
  p.v_cache = vc.data_ptr();
  p.v_stride = strides3(vc);
  p.k_cmp = kcc.data_ptr();
  p.kc_stride = strides3(kcc);
  p.v_cmp = vcc.data_ptr();
  p.vc_stride = strides3(vcc);
  p.cache_seqlens = csl.data_ptr<int>();
  p.g_cmp = gc.data_ptr();
  p.g_slc = gs.data_ptr();
  p.g_win = gw.data_ptr();
  p.g_batch_stride = p.heads_q;
  Tensor o = at::empty(a.out_shape, qc.options());
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0);
  p.o_head_stride = o.stride(1);
  if (ct == at::kDouble) nsa::cpu::decode_fwd<double>(p);
  else nsa::cpu::decode_fwd<float>(p);
  return o.to(q.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// CUDA: same validation, then the kernels (16-byte aligned copies of misaligned inputs).

#ifdef NSA_WITH_CUDA

// dq_acc (checked like q, through aligned16; undefined: none): the dq kernels return dq_acc +
// their dq, summed in fp32 before the one rounding. nsa_fwd's backward sums the three branches'
// dq this way instead of two full-size adds (one rounding, two launches fewer; the time measured
// the same on the H200, 64k).
void set_dq_acc(nsa::AttnBwdParams& p, const Tensor& dq_acc) {
  p.dq_acc = dq_acc.defined() ? dq_acc.data_ptr() : nullptr;
  if (dq_acc.defined()) p.dq_acc_stride = strides3(dq_acc);
}

// delta = rowsum(dout * out) in fp32, minus dlse: the backward's per-row constant, one
// memory-bound kernel over dout and out (no fp32 temporaries, also at 1M tokens). dout and out
// come through aligned16 (16-byte rows), shaped like o.
Tensor backward_delta(const Tensor& dout, const Tensor& out, const c10::optional<Tensor>& dlse,
                      const c10::optional<Tensor>& given = c10::nullopt) {
  if (given.has_value()) {  // precomputed rowsum (validated by prepare_attn_bwd): contiguous fp32 minus dlse
    const Tensor d = given->contiguous();
    return dlse.has_value() ? d.sub(*dlse).contiguous() : d;
  }
  std::vector<int64_t> shape(out.sizes().begin(), out.sizes().end() - 1);
  Tensor delta = at::empty(shape, out.options().dtype(at::kFloat));
  const Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : Tensor();
  nsa::BwdDeltaParams p;
  p.dout = dout.data_ptr();
  p.dout_stride = strides3(dout);
  p.out = out.data_ptr();
  p.out_stride = strides3(out);
  p.dlse = dlse.has_value() ? dlse_c.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.batch = out.dim() == 4 ? out.size(0) : 1;
  p.rows = out.size(out.dim() - 3);
  p.heads = static_cast<int>(out.size(-2));
  p.dim = static_cast<int>(out.size(-1));
  check_kernel_status(nsa::attn_bwd_delta_cuda(p, nsa_dtype(out.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()),
                      "attention backward (delta)");
  return delta;
}

std::tuple<Tensor, Tensor> cmp_attn_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale,
                                             int64_t block, int64_t stride, const c10::optional<Tensor>& cu_seqlens) {
  prepare_attn(kCmpFwd, nsa::AttnMode::kCompressed, q_in, k_in, v_in, "k_cmp", "v_cmp", scale, block, stride, 0, 0,
               nullptr, cu_seqlens, false);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  AttnArgs a = prepare_attn(kCmpFwd, nsa::AttnMode::kCompressed, q, k, v, "k_cmp", "v_cmp", scale, block, stride, 0, 0,
                            nullptr, cu_seqlens, false);
  Tensor o = at::empty(a.o_shape, q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty(a.lse_shape, q.options().dtype(at::kFloat));
  auto& p = a.params;
  p.o = o.data_ptr();
  p.o_stride = strides3(o);
  p.lse = lse.data_ptr<float>();
  check_kernel_status(
      nsa::cmp_attn_fwd_cuda(p, nsa_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()), kCmpFwd);
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> cmp_attn_bwd_cuda(const Tensor& dout_in, const c10::optional<Tensor>& dlse,
                                                     const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                     const Tensor& out_in, const Tensor& lse, double scale, int64_t block,
                                                     int64_t stride, const c10::optional<Tensor>& cu_seqlens,
                                                     const c10::optional<Tensor>& delta_in,
                                                     const c10::optional<Tensor>& dq_acc) {
  const Tensor dout_c = last_dim_contiguous(dout_in);
  prepare_attn_bwd(kCmpBwd, nsa::AttnMode::kCompressed, dout_c, dlse, q_in, k_in, v_in, out_in, lse, "k_cmp", "v_cmp",
                   scale, block, stride, 0, 0, nullptr, cu_seqlens, false, delta_in, dq_acc);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  const Tensor out = aligned16(out_in), dout = aligned16(dout_c);
  AttnArgs a = prepare_attn(kCmpBwd, nsa::AttnMode::kCompressed, q, k, v, "k_cmp", "v_cmp", scale, block, stride, 0, 0,
                            nullptr, cu_seqlens, false);
  const Tensor lse_c = lse.contiguous();
  const Tensor delta = backward_delta(dout, out, dlse, delta_in);
  const auto c = at::MemoryFormat::Contiguous;
  Tensor dq = at::empty(q.sizes(), q.options().memory_format(c));
  Tensor dk = at::zeros(k.sizes(), k.options().memory_format(c));  // gap rows stay zero
  Tensor dv = at::zeros(v.sizes(), v.options().memory_format(c));
  nsa::AttnBwdParams p;
  static_cast<nsa::AttnParams&>(p) = a.params;
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dout_stride = strides3(dout);
  p.dq = dq.data_ptr();
  p.dq_stride = strides3(dq);
  const Tensor dq_acc_c = dq_acc.has_value() ? aligned16(*dq_acc) : Tensor();
  set_dq_acc(p, dq_acc_c);
  p.dk = dk.data_ptr();
  p.dk_stride = strides3(dk);
  p.dv = dv.data_ptr();
  p.dv_stride = strides3(dv);
  // fp32 partials of the dK/dV key tiles whose query rows are split over several CTAs (size
  // fixed by the shapes; 0 when nothing is split).
  const size_t ws_bytes = nsa::sparse_attn_bwd_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  p.workspace = ws_bytes ? ws.data_ptr() : nullptr;
  check_kernel_status(
      nsa::cmp_attn_bwd_cuda(p, nsa_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()), kCmpBwd);
  return {dq, dk, dv};
}

Tensor select_blocks_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& lse, double scale, int64_t cmp_block,
                          int64_t cmp_stride, int64_t sel_block, int64_t top_n, int64_t init_blocks,
                          int64_t local_blocks, const c10::optional<Tensor>& cu_seqlens) {
  prepare_select(q_in, k_in, lse, scale, cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks,
                 cu_seqlens);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned16(q_in), k = aligned16(k_in), lse_c = lse.contiguous();
  auto a = prepare_select(q, k, lse_c, scale, cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks,
                          cu_seqlens);
  auto& p = a.params;
  p.lse = lse_c.data_ptr<float>();
  Tensor out = at::empty(a.out_shape, q.options().dtype(at::kInt));
  p.block_idx = out.data_ptr<int>();
  p.block_idx_stride = strides3(out);
  check_kernel_status(
      nsa::select_blocks_cuda(p, nsa_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream().stream()), kSelect);
  return out;
}

// Selected / window forward on the GPU (grouped sparse attention kernel).
std::tuple<Tensor, Tensor> sparse_fwd_cuda(const char* op, nsa::AttnMode mode, const Tensor& q_in, const Tensor& k_in,
                                           const Tensor& v_in, const Tensor* block_idx, double scale,
                                           int64_t sel_block, int64_t window,
                                           const c10::optional<Tensor>& cu_seqlens) {
  // Validate the caller's tensors, then the (possibly copied) aligned ones the kernel reads.
  prepare_attn(op, mode, q_in, k_in, v_in, "k", "v", scale, 0, 0, sel_block, window, block_idx, cu_seqlens, false);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  AttnArgs a = prepare_attn(op, mode, q, k, v, "k", "v", scale, 0, 0, sel_block, window, block_idx, cu_seqlens, false);
  TORCH_CHECK_VALUE(mode != nsa::AttnMode::kSelected || sel_block % 32 == 0, op,
                    ": on CUDA 'sel_block' must be a multiple of 32, got ", sel_block);
  Tensor o = at::empty(a.o_shape, q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty(a.lse_shape, q.options().dtype(at::kFloat));
  auto& p = a.params;
  p.o = o.data_ptr();
  p.o_stride = strides3(o);
  p.lse = lse.data_ptr<float>();
  // Selected branch: per group of tokens, whether they share blocks (picks the CTA width on the GPU).
  const size_t flag_bytes = nsa::sel_group_flags_bytes(p);
  Tensor flags = at::empty({static_cast<int64_t>(flag_bytes)}, q.options().dtype(at::kByte));
  p.sel_group_flags = flag_bytes ? static_cast<unsigned char*>(flags.data_ptr()) : nullptr;
  const nsa::Status st =
      nsa::sparse_attn_fwd_cuda(p, nsa_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream().stream());
  check_kernel_status(st, op);
  return {o, lse};
}

std::tuple<Tensor, Tensor> sel_attn_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& block_idx,
                                             double scale, int64_t sel_block, const c10::optional<Tensor>& cu_seqlens) {
  return sparse_fwd_cuda(kSelFwd, nsa::AttnMode::kSelected, q, k, v, &block_idx, scale, sel_block, 0, cu_seqlens);
}

// Selected / window backward on the GPU: dq, dk, dv without atomics (bitwise reproducible).
std::tuple<Tensor, Tensor, Tensor> sparse_bwd_cuda(const char* op, nsa::AttnMode mode, const Tensor& dout_in,
                                                   const c10::optional<Tensor>& dlse, const Tensor& q_in,
                                                   const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
                                                   const Tensor& lse, const Tensor* block_idx, double scale,
                                                   int64_t sel_block, int64_t window,
                                                   const c10::optional<Tensor>& cu_seqlens,
                                                   const c10::optional<Tensor>& delta_in,
                                                   const c10::optional<Tensor>& dq_acc) {
  const Tensor dout_c = last_dim_contiguous(dout_in);
  prepare_attn_bwd(op, mode, dout_c, dlse, q_in, k_in, v_in, out_in, lse, "k", "v", scale, 0, 0, sel_block, window,
                   block_idx, cu_seqlens, false, delta_in, dq_acc);
  TORCH_CHECK_VALUE(mode != nsa::AttnMode::kSelected || sel_block % 32 == 0, op,
                    ": on CUDA 'sel_block' must be a multiple of 32, got ", sel_block);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  const Tensor out = aligned16(out_in), dout = aligned16(dout_c);
  AttnArgs a = prepare_attn(op, mode, q, k, v, "k", "v", scale, 0, 0, sel_block, window, block_idx, cu_seqlens, false);
  const Tensor lse_c = lse.contiguous();
  const Tensor delta = backward_delta(dout, out, dlse, delta_in);
  const auto c = at::MemoryFormat::Contiguous;
  Tensor dq = at::empty(q.sizes(), q.options().memory_format(c));
  // keys of no sequence, and blocks no token selected, are not written by the kernels: zeros
  Tensor dk = at::zeros(k.sizes(), k.options().memory_format(c));
  Tensor dv = at::zeros(v.sizes(), v.options().memory_format(c));
  nsa::AttnBwdParams p;
  static_cast<nsa::AttnParams&>(p) = a.params;
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dout_stride = strides3(dout);
  p.dq = dq.data_ptr();
  p.dq_stride = strides3(dq);
  const Tensor dq_acc_c = dq_acc.has_value() ? aligned16(*dq_acc) : Tensor();
  set_dq_acc(p, dq_acc_c);
  p.dk = dk.data_ptr();
  p.dk_stride = strides3(dk);
  p.dv = dv.data_ptr();
  p.dv_stride = strides3(dv);
  const size_t ws_bytes = nsa::sparse_attn_bwd_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  p.workspace = ws_bytes ? ws.data_ptr() : nullptr;
  const size_t flag_bytes = nsa::sel_group_flags_bytes(p);  // dQ width per group of tokens
  Tensor flags = at::empty({static_cast<int64_t>(flag_bytes)}, q.options().dtype(at::kByte));
  p.sel_group_flags = flag_bytes ? static_cast<unsigned char*>(flags.data_ptr()) : nullptr;
  const nsa::Status st =
      nsa::sparse_attn_bwd_cuda(p, nsa_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream().stream());
  check_kernel_status(st, op);
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> sel_attn_bwd_cuda(const Tensor& dout, const c10::optional<Tensor>& dlse,
                                                     const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& out, const Tensor& lse, const Tensor& block_idx,
                                                     double scale, int64_t sel_block,
                                                     const c10::optional<Tensor>& cu_seqlens,
                                                     const c10::optional<Tensor>& delta,
                                                     const c10::optional<Tensor>& dq_acc) {
  return sparse_bwd_cuda(kSelBwd, nsa::AttnMode::kSelected, dout, dlse, q, k, v, out, lse, &block_idx, scale,
                         sel_block, 0, cu_seqlens, delta, dq_acc);
}

std::tuple<Tensor, Tensor> win_attn_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                             int64_t window, const c10::optional<Tensor>& cu_seqlens) {
  return sparse_fwd_cuda(kWinFwd, nsa::AttnMode::kWindow, q, k, v, nullptr, scale, 0, window, cu_seqlens);
}

std::tuple<Tensor, Tensor, Tensor> win_attn_bwd_cuda(const Tensor& dout, const c10::optional<Tensor>& dlse,
                                                     const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& out, const Tensor& lse, double scale, int64_t window,
                                                     const c10::optional<Tensor>& cu_seqlens,
                                                     const c10::optional<Tensor>& delta,
                                                     const c10::optional<Tensor>& dq_acc) {
  return sparse_bwd_cuda(kWinBwd, nsa::AttnMode::kWindow, dout, dlse, q, k, v, out, lse, nullptr, scale, 0, window,
                         cu_seqlens, delta, dq_acc);
}

Tensor decode_fwd_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_cmp_cache,
                       const Tensor& v_cmp_cache, const Tensor& cache_seqlens, const Tensor& g_cmp, const Tensor& g_slc,
                       const Tensor& g_win, double scale, int64_t cmp_block, int64_t cmp_stride, int64_t sel_block,
                       int64_t top_n, int64_t init_blocks, int64_t local_blocks, int64_t window) {
  prepare_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win, scale, cmp_block,
                 cmp_stride, sel_block, top_n, init_blocks, local_blocks, window, false);
  const c10::cuda::CUDAGuard guard(q.device());
  const Tensor qa = aligned16(q), kca = aligned16(k_cache), vca = aligned16(v_cache), kcc = aligned16(k_cmp_cache),
               vcc = aligned16(v_cmp_cache), csl = cache_seqlens.contiguous();
  // The kernel reads the three gates with one batch stride and contiguous heads (the module's
  // gates are views of one [B, n, 3, HQ] tensor and qualify as they are).
  const int64_t B = q.size(0), HQ = q.size(1);
  auto gate_ok = [&](const Tensor& t) {
    return (HQ == 1 || t.stride(1) == 1) && (B == 1 || t.stride(0) == g_cmp.stride(0));
  };
  const bool gates_direct = gate_ok(g_cmp) && gate_ok(g_slc) && gate_ok(g_win);
  const Tensor gc = gates_direct ? g_cmp : g_cmp.contiguous(), gs = gates_direct ? g_slc : g_slc.contiguous(),
               gw = gates_direct ? g_win : g_win.contiguous();
  auto a = prepare_decode(qa, kca, vca, kcc, vcc, csl, gc, gs, gw, scale, cmp_block, cmp_stride, sel_block, top_n,
                          init_blocks, local_blocks, window, false);
  auto& p = a.params;
  p.g_cmp = gc.data_ptr();
  p.g_slc = gs.data_ptr();
  p.g_win = gw.data_ptr();
  p.g_batch_stride = B == 1 ? 0 : gc.stride(0);
  TORCH_CHECK_VALUE(sel_block <= INT32_MAX / 2 && cmp_block <= INT32_MAX / 2, kDecode,
                    ": 'sel_block' and 'cmp_block' must be below 2^30 on CUDA");
  Tensor o = at::empty(a.out_shape, q.options().memory_format(at::MemoryFormat::Contiguous));
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0);
  p.o_head_stride = o.stride(1);
  if (o.numel() == 0) return o;
  // Scratch of a size fixed by the shapes, from the caching allocator on the current stream
  // (inside a CUDA graph capture: the graph's pool), so the op stays capturable.
  const size_t ws_bytes = nsa::decode_workspace_bytes(p);
  Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  check_kernel_status(nsa::decode_fwd_cuda(p, nsa_dtype(q.scalar_type()), ws.data_ptr(), ws_bytes,
                                           c10::cuda::getCurrentCUDAStream().stream()),
                      kDecode);
  return o;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(nsa_cuda, CPU, m) {
  m.impl("cmp_attn_fwd", &cmp_attn_fwd_cpu);
  m.impl("cmp_attn_bwd", &cmp_attn_bwd_cpu);
  m.impl("select_blocks", &select_blocks_cpu);
  m.impl("sel_attn_fwd", &sel_attn_fwd_cpu);
  m.impl("sel_attn_bwd", &sel_attn_bwd_cpu);
  m.impl("win_attn_fwd", &win_attn_fwd_cpu);
  m.impl("win_attn_bwd", &win_attn_bwd_cpu);
  m.impl("combine_fwd", &combine_fwd);
  m.impl("combine_bwd", &combine_bwd);
  m.impl("decode_fwd", &decode_fwd_cpu);
}

#ifdef NSA_WITH_CUDA
TORCH_LIBRARY_IMPL(nsa_cuda, CUDA, m) {
  m.impl("cmp_attn_fwd", &cmp_attn_fwd_cuda);
  m.impl("cmp_attn_bwd", &cmp_attn_bwd_cuda);
  m.impl("select_blocks", &select_blocks_cuda);
  m.impl("sel_attn_fwd", &sel_attn_fwd_cuda);
  m.impl("sel_attn_bwd", &sel_attn_bwd_cuda);
  m.impl("win_attn_fwd", &win_attn_fwd_cuda);
  m.impl("win_attn_bwd", &win_attn_bwd_cuda);
  m.impl("combine_fwd", &combine_fwd);
  m.impl("combine_bwd", &combine_bwd);
  m.impl("decode_fwd", &decode_fwd_cuda);
}
#endif

}  // namespace nsa_torch
