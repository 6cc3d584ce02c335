// The op registry: every nsa_cuda op's schema (DESIGN.md §2), plus the pybind11 module that
// carries non-op helpers (build_info). Implementations register per dispatch key in the
// *_ops.cpp files next to this one.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#define NSA_STR2(x) #x
#define NSA_STR(x) NSA_STR2(x)
#ifndef NSA_BUILD_ARCHS
#define NSA_BUILD_ARCHS none
#endif
#ifndef NSA_BUILD_DTYPES
#define NSA_BUILD_DTYPES bf16_fp16
#endif
#ifndef NSA_BUILD_HEADDIMS
#define NSA_BUILD_HEADDIMS 64_128_192_256
#endif

TORCH_LIBRARY(nsa_cuda, m) {
  // §1.1 compression. w = None: mean; pe needs w. Output [B, Nc, H, Dout] or packed [total/d, H, Dout].
  m.def("compress_fwd(Tensor x, Tensor? w, Tensor? pe, int block, int stride, Tensor? cu_seqlens) -> Tensor");
  // Returns (dx, dw, dpe); dw / dpe are empty when w / pe were not given.
  m.def("compress_bwd(Tensor dy, Tensor x, Tensor? w, Tensor? pe, int block, int stride, Tensor? cu_seqlens)"
        " -> (Tensor, Tensor, Tensor)");
  // The attention backwards take an optional precomputed delta = rowsum(dout * out), fp32, shaped
  // like lse (dlse, when given, is still subtracted): nsa_attention's backward has it from the
  // combine backward, which saves the delta kernel's pass over dout and out. With dq_acc (shaped
  // like q) the returned dq is dq_acc + the op's dq, summed before rounding: the three branches'
  // dq without separate adds.
  // §1.2 compressed attention -> (o, lse fp32).
  m.def("cmp_attn_fwd(Tensor q, Tensor k_cmp, Tensor v_cmp, float scale, int block, int stride, Tensor? cu_seqlens)"
        " -> (Tensor, Tensor)");
  m.def("cmp_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor out, Tensor lse,"
        " float scale, int block, int stride, Tensor? cu_seqlens, Tensor? delta=None, Tensor? dq_acc=None)"
        " -> (Tensor, Tensor, Tensor)");
  // §1.3-1.4 block scores + top-n -> int32 block_idx [.., H, top_n], ascending, -1 padded.
  m.def("select_blocks(Tensor q, Tensor k_cmp, Tensor lse, float scale, int cmp_block, int cmp_stride, int sel_block,"
        " int top_n, int init_blocks, int local_blocks, Tensor? cu_seqlens) -> Tensor");
  // §1.5 selected attention -> (o, lse fp32).
  m.def("sel_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor block_idx, float scale, int sel_block, Tensor? cu_seqlens)"
        " -> (Tensor, Tensor)");
  m.def("sel_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor block_idx, float scale, int sel_block, Tensor? cu_seqlens, Tensor? delta=None, Tensor? dq_acc=None)"
        " -> (Tensor, Tensor, Tensor)");
  // §1.6 sliding window -> (o, lse fp32).
  m.def("win_attn_fwd(Tensor q, Tensor k, Tensor v, float scale, int window, Tensor? cu_seqlens) -> (Tensor, Tensor)");
  m.def("win_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale,"
        " int window, Tensor? cu_seqlens, Tensor? delta=None, Tensor? dq_acc=None) -> (Tensor, Tensor, Tensor)");
  // §1.7 gated sum of the three branches.
  m.def("combine_fwd(Tensor o_cmp, Tensor o_slc, Tensor o_win, Tensor g_cmp, Tensor g_slc, Tensor g_win) -> Tensor");
  // dg_fp32: the gate gradients (sum over dim of dout * o_b) in fp32 instead of the gates' dtype.
  m.def("combine_bwd(Tensor dout, Tensor o_cmp, Tensor o_slc, Tensor o_win, Tensor g_cmp, Tensor g_slc, Tensor g_win,"
        " bool dg_fp32=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // §1.8 one decoding step of the newest token of each sequence against its cache.
  m.def("decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_cmp_cache, Tensor v_cmp_cache,"
        " Tensor cache_seqlens, Tensor g_cmp, Tensor g_slc, Tensor g_win, float scale, int cmp_block, int cmp_stride,"
        " int sel_block, int top_n, int init_blocks, int local_blocks, int window) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "nsa_cuda compiled extension; the ops live in torch.ops.nsa_cuda";
  m.def("build_info", [] {
    pybind11::dict d;
#ifdef NSA_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["archs"] = NSA_STR(NSA_BUILD_ARCHS);
    d["dtypes"] = NSA_STR(NSA_BUILD_DTYPES);
    d["head_dims"] = NSA_STR(NSA_BUILD_HEADDIMS);
    return d;
  }, "What this build compiled: CUDA or not, archs, dtypes and head dims ('_'-separated).");
}
