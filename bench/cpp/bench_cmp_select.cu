// C++ benchmark of the compressed attention (DESIGN.md §1.2) and the block scoring + top-n
// selection (§1.3-1.4): checks the CUDA forward and the selection against the CPU
// implementation on a small packed ragged batch, then times the headline shape (HQ = 64,
// H = 4, D = 128, l = 32, d = 16, l' = 64, n = 16) and G = 4 at several T. Prints [OK]/[FAIL],
// ms and TFLOP/s (FLOPs of the (query, compressed key) pairs a query may see).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_util.h"
#include "kernels/cmp_attn.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/nsa_common.h"
#include "kernels/sparse_attn.h"

using nsa::index_t;

namespace {

constexpr int kL = 32, kD = 16, kLp = 64, kN = 16;

index_t visible(index_t t, int nc) { return t + 1 < kL ? 0 : std::min<index_t>((t - kL + 1) / kD + 1, nc); }

struct Shape {
  std::vector<int> lens;  // packed when more than one
  int H, G, D;
  bool packed() const { return lens.size() > 1; }
  index_t total() const {
    index_t s = 0;
    for (int L : lens) s += L;
    return s;
  }
  // Rows of the compressed tensors: packed layout (sequence b from cu[b] / d) or Nc(T).
  index_t kc_rows() const { return packed() ? total() / kD : nsa::num_compressed(lens[0], kL, kD); }
};

nsa::AttnBwdParams attn_params(const Shape& s, const int* cu, const void* q, const void* kc, const void* vc, void* o,
                               float* lse) {
  const int HQ = s.H * s.G;
  nsa::AttnBwdParams p;
  p.q = q;  p.q_stride = {0, static_cast<index_t>(HQ) * s.D, s.D};
  p.k = kc;  p.k_stride = {0, static_cast<index_t>(s.H) * s.D, s.D};
  p.v = vc;  p.v_stride = p.k_stride;
  p.o = o;  p.o_stride = p.q_stride;
  p.lse = lse;  p.lse_row_stride = HQ;
  p.cu_seqlens = s.packed() ? cu : nullptr;
  p.batch = s.packed() ? static_cast<int>(s.lens.size()) : 1;
  p.seqlen = s.packed() ? 0 : s.lens[0];
  p.total_rows = s.total();
  p.heads_q = HQ;  p.heads_kv = s.H;
  p.head_dim_qk = p.head_dim_v = s.D;
  p.scale = 1.f / std::sqrt(static_cast<float>(s.D));
  p.mode = nsa::AttnMode::kCompressed;
  p.cmp_block = kL;  p.cmp_stride = kD;
  p.seqlen_k_cmp = s.packed() ? 0 : static_cast<int>(s.kc_rows());
  return p;
}

nsa::SelectParams select_params(const nsa::AttnParams& a, const float* lse, int* block_idx) {
  nsa::SelectParams p;
  p.q = a.q;  p.q_stride = a.q_stride;
  p.k_cmp = a.k;  p.k_stride = a.k_stride;
  p.lse = lse;  p.lse_row_stride = a.lse_row_stride;
  p.block_idx = block_idx;  p.block_idx_stride = {0, static_cast<index_t>(a.heads_kv) * kN, kN};
  p.cu_seqlens = a.cu_seqlens;
  p.batch = a.batch;  p.seqlen = a.seqlen;  p.total_rows = a.total_rows;
  p.heads_q = a.heads_q;  p.heads_kv = a.heads_kv;  p.head_dim_qk = a.head_dim_qk;
  p.scale = a.scale;
  p.cmp_block = kL;  p.cmp_stride = kD;  p.sel_block = kLp;  p.top_n = kN;  p.init_blocks = 1;  p.local_blocks = 2;
  p.seqlen_k_cmp = a.seqlen_k_cmp;
  return p;
}

// Forward and selection against the CPU implementation (same params, fp32 host copies).
bool check(const Shape& s) {
  const index_t total = s.total(), rows_c = s.kc_rows();
  const int HQ = s.H * s.G;
  std::vector<int> cu_h(1, 0);
  for (int L : s.lens) cu_h.push_back(cu_h.back() + L);
  bench::Bf16Buffer q(total * HQ * s.D, 1.f, 31), kc(rows_c * s.H * s.D, 1.f, 32), vc(rows_c * s.H * s.D, 1.f, 33);
  int *cu, *idx;
  __nv_bfloat16* o;
  float* lse;
  BENCH_CHECK(cudaMalloc(&cu, cu_h.size() * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(cu, cu_h.data(), cu_h.size() * sizeof(int), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMalloc(&o, total * HQ * s.D * 2));
  BENCH_CHECK(cudaMemset(o, 0xff, total * HQ * s.D * 2));  // NaN poison
  BENCH_CHECK(cudaMalloc(&lse, total * HQ * 4));
  BENCH_CHECK(cudaMalloc(&idx, total * s.H * kN * 4));
  BENCH_CHECK(cudaMemset(idx, 0x7f, total * s.H * kN * 4));
  nsa::AttnParams p = attn_params(s, cu, q.dev, kc.dev, vc.dev, o, lse);
  BENCH_STATUS(nsa::cmp_attn_fwd_cuda(p, nsa::DType::kBFloat16, nullptr));
  BENCH_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::to_host_float(o, total * HQ * s.D);
  std::vector<float> ref(total * HQ * s.D), ref_lse(total * HQ);
  nsa::AttnParams ph = attn_params(s, cu_h.data(), q.host.data(), kc.host.data(), vc.host.data(), ref.data(),
                                   ref_lse.data());
  nsa::cpu::attn_fwd<float>(ph);
  double max_err = 0, max_ref = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite &= std::isfinite(got[i]);
    max_err = std::max(max_err, static_cast<double>(std::fabs(got[i] - ref[i])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(ref[i])));
  }
  const bool ok_fwd = finite && max_err <= 4 * std::ldexp(max_ref, -8) + 1e-3;
  std::printf("[%s] check cmp_attn fwd, %s batch (%lld tokens, G=%d): max|err| %.3e (max|o| %.3e)\n",
              ok_fwd ? "OK" : "FAIL", s.packed() ? "packed ragged" : "padded", static_cast<long long>(total), s.G,
              max_err, max_ref);

  // Selection from the same (CPU) lse on both sides: rows may differ only on near-ties.
  BENCH_CHECK(cudaMemcpy(lse, ref_lse.data(), ref_lse.size() * 4, cudaMemcpyHostToDevice));
  BENCH_STATUS(nsa::select_blocks_cuda(select_params(p, lse, idx), nsa::DType::kBFloat16, nullptr));
  std::vector<int> got_idx(total * s.H * kN), ref_idx(total * s.H * kN);
  BENCH_CHECK(cudaMemcpy(got_idx.data(), idx, got_idx.size() * 4, cudaMemcpyDeviceToHost));
  nsa::cpu::select_blocks<float>(select_params(ph, ref_lse.data(), ref_idx.data()));
  index_t differ = 0;
  for (index_t r = 0; r < total * s.H; ++r)
    differ += !std::equal(got_idx.begin() + r * kN, got_idx.begin() + (r + 1) * kN, ref_idx.begin() + r * kN);
  const bool ok_sel = differ * 1000 <= total * s.H;
  std::printf("[%s] check select_blocks: %lld of %lld rows differ (near-ties allowed: <= 0.1%%)\n", ok_sel ? "OK" : "FAIL",
              static_cast<long long>(differ), static_cast<long long>(total * s.H));
  cudaFree(cu); cudaFree(o); cudaFree(lse); cudaFree(idx);
  return ok_fwd && ok_sel;
}

void time_one(int T, int G) {
  const Shape s{{T}, 4, G, 128};
  const int HQ = s.H * s.G;
  const index_t rows_c = s.kc_rows();
  bench::Bf16Buffer q(static_cast<index_t>(T) * HQ * s.D, 1.f, 41), kc(rows_c * s.H * s.D, 1.f, 42),
      vc(rows_c * s.H * s.D, 1.f, 43), dout(static_cast<index_t>(T) * HQ * s.D, 1.f, 44);
  double pairs = 0;
  for (index_t t = 0; t < T; ++t) pairs += static_cast<double>(visible(t, static_cast<int>(rows_c)));
  const double fwd_flops = 2.0 * pairs * HQ * (2 * s.D), sel_flops = 2.0 * pairs * HQ * s.D;
  __nv_bfloat16 *o, *dq, *dk, *dv;
  float *lse, *delta;
  int* idx;
  BENCH_CHECK(cudaMalloc(&o, static_cast<size_t>(T) * HQ * s.D * 2));
  BENCH_CHECK(cudaMalloc(&dq, static_cast<size_t>(T) * HQ * s.D * 2));
  BENCH_CHECK(cudaMalloc(&dk, rows_c * s.H * s.D * 2));
  BENCH_CHECK(cudaMalloc(&dv, rows_c * s.H * s.D * 2));
  BENCH_CHECK(cudaMalloc(&lse, static_cast<size_t>(T) * HQ * 4));
  BENCH_CHECK(cudaMalloc(&delta, static_cast<size_t>(T) * HQ * 4));
  BENCH_CHECK(cudaMemset(delta, 0, static_cast<size_t>(T) * HQ * 4));
  BENCH_CHECK(cudaMalloc(&idx, static_cast<size_t>(T) * s.H * kN * 4));
  nsa::AttnBwdParams p = attn_params(s, nullptr, q.dev, kc.dev, vc.dev, o, lse);
  p.dout = dout.dev;  p.dout_stride = p.q_stride;
  p.dq = dq;  p.dq_stride = p.q_stride;
  p.dk = dk;  p.dk_stride = p.k_stride;
  p.dv = dv;  p.dv_stride = p.k_stride;
  p.delta = delta;
  void* ws = nullptr;
  const size_t ws_bytes = nsa::sparse_attn_bwd_workspace_bytes(p);
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&ws, ws_bytes));
  p.workspace = ws;
  const nsa::SelectParams sp = select_params(p, lse, idx);
  const float fwd = bench::median_ms([&] { BENCH_STATUS(nsa::cmp_attn_fwd_cuda(p, nsa::DType::kBFloat16, nullptr)); }, 2, 5, 1);
  const float sel = bench::median_ms([&] { BENCH_STATUS(nsa::select_blocks_cuda(sp, nsa::DType::kBFloat16, nullptr)); }, 2, 5, 1);
  const float bwd = bench::median_ms([&] { BENCH_STATUS(nsa::cmp_attn_bwd_cuda(p, nsa::DType::kBFloat16, nullptr)); }, 1, 3, 1);
  std::printf("[OK] cmp_select T=%6d HQ=%d H=%d D=%d  cmp fwd %8.3f ms %6.1f TFLOP/s | select %8.3f ms %6.1f TFLOP/s | "
              "cmp bwd %8.3f ms %6.1f TFLOP/s\n",
              T, HQ, s.H, s.D, fwd, fwd_flops / (fwd * 1e9), sel, sel_flops / (sel * 1e9), bwd,
              2.5 * fwd_flops / (bwd * 1e9));
  cudaFree(o); cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(lse); cudaFree(delta); cudaFree(idx);
  if (ws) cudaFree(ws);
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int> Ts = bench::lengths_from_args(argc, argv, {8192, 65536});
  std::printf("device: %s\n", bench::device_name().c_str());
  bool ok = true;
  ok &= check({{1, 37, 300, 5, 129}, 2, 4, 128});
  ok &= check({{1, 37, 300, 5, 129}, 2, 16, 128});
  ok &= check({{700}, 2, 1, 128});
  for (int T : Ts)
    for (int G : {16, 4}) time_one(T, G);
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
