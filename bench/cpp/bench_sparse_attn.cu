// C++ benchmark of the grouped sparse attention (DESIGN.md §1.5-1.6): checks the CUDA forward and
// backward against the CPU implementation on a small packed ragged batch, then times the
// headline shape (HQ = 64, H = 4, D = 128, l' = 64, n = 16, w = 512) and G = 4 at several T.
// Prints [OK]/[FAIL], ms and TFLOP/s (FLOPs of the keys actually attended).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "bench_util.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/sparse_attn.h"

using nsa::index_t;

namespace {

// Block lists as selection makes them: block 0 and the two local blocks forced, the rest drawn
// from the valid blocks (redrawn every 16 tokens), sorted, unique, -1 padded. [rows, H, n].
std::vector<int> make_block_idx(const std::vector<int>& lens, int H, int n, int lp, uint32_t seed) {
  std::mt19937 gen(seed);
  index_t total = 0;
  for (int L : lens) total += L;
  std::vector<int> idx(static_cast<size_t>(total) * H * n, -1);
  index_t row = 0;
  std::vector<int> pick;
  for (int L : lens)
    for (int t = 0; t < L; ++t, ++row)
      for (int h = 0; h < H; ++h) {
        const int cur = t / lp;
        if (h == 0 && (t % 16 == 0 || pick.empty())) {
          pick = {0, cur > 0 ? cur - 1 : 0, cur};
          std::uniform_int_distribution<int> u(0, cur);
          while (static_cast<int>(pick.size()) < n + 3) pick.push_back(u(gen));
        }
        std::vector<int> uniq;
        for (int j : pick)
          if (j <= cur && std::find(uniq.begin(), uniq.end(), j) == uniq.end() && static_cast<int>(uniq.size()) < n)
            uniq.push_back(j);
        std::sort(uniq.begin(), uniq.end());
        for (size_t i = 0; i < uniq.size(); ++i) idx[(static_cast<size_t>(row) * H + h) * n + i] = uniq[i];
      }
  return idx;
}

struct Problem {
  std::vector<int> lens;
  int H, G, D, n, lp, w;
  nsa::AttnMode mode;
};

// Keys attended, summed over (token, KV head): the FLOP count's key term.
double attended_keys(const Problem& pr, const std::vector<int>& idx) {
  double keys = 0;
  index_t row = 0;
  for (int L : pr.lens)
    for (int t = 0; t < L; ++t, ++row)
      for (int h = 0; h < pr.H; ++h) {
        if (pr.mode == nsa::AttnMode::kWindow) {
          keys += std::min(pr.w, t + 1);
          continue;
        }
        for (int i = 0; i < pr.n; ++i) {
          const int j = idx[(static_cast<size_t>(row) * pr.H + h) * pr.n + i];
          if (j >= 0) keys += std::max(0, std::min(pr.lp, t + 1 - j * pr.lp));
        }
      }
  return keys;
}

nsa::AttnBwdParams make_params(const Problem& pr, const int* cu, index_t total, const void* q, const void* k,
                               const void* v, void* o, float* lse, const int* bi) {
  const int HQ = pr.H * pr.G;
  nsa::AttnBwdParams p;
  p.q = q;  p.q_stride = {0, static_cast<index_t>(HQ) * pr.D, pr.D};
  p.k = k;  p.k_stride = {0, static_cast<index_t>(pr.H) * pr.D, pr.D};
  p.v = v;  p.v_stride = p.k_stride;
  p.o = o;  p.o_stride = p.q_stride;
  p.lse = lse;  p.lse_row_stride = HQ;
  p.cu_seqlens = cu;
  p.batch = static_cast<int>(pr.lens.size());
  p.total_rows = total;
  p.heads_q = HQ;  p.heads_kv = pr.H;
  p.head_dim_qk = p.head_dim_v = pr.D;
  p.scale = 1.f / std::sqrt(static_cast<float>(pr.D));
  p.mode = pr.mode;
  p.block_idx = bi;  p.block_idx_stride = {0, static_cast<index_t>(pr.H) * pr.n, pr.n};
  p.top_n = pr.n;  p.sel_block = pr.lp;  p.window = pr.w;
  return p;
}

// Forward check against the CPU implementation (same params, fp32 host copies).
bool check(const Problem& pr, const char* name) {
  index_t total = 0;
  std::vector<int> cu_h(1, 0);
  for (int L : pr.lens) cu_h.push_back(cu_h.back() + L), total += L;
  const int HQ = pr.H * pr.G;
  bench::Bf16Buffer q(total * HQ * pr.D, 1.f, 11), k(total * pr.H * pr.D, 1.f, 12), v(total * pr.H * pr.D, 1.f, 13);
  const std::vector<int> idx = make_block_idx(pr.lens, pr.H, pr.n, pr.lp, 14);
  int *cu, *bi;
  __nv_bfloat16* o;
  float* lse;
  BENCH_CHECK(cudaMalloc(&cu, cu_h.size() * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(cu, cu_h.data(), cu_h.size() * sizeof(int), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMalloc(&bi, idx.size() * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(bi, idx.data(), idx.size() * sizeof(int), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMalloc(&o, total * HQ * pr.D * 2));
  BENCH_CHECK(cudaMemset(o, 0xff, total * HQ * pr.D * 2));  // NaN poison
  BENCH_CHECK(cudaMalloc(&lse, total * HQ * 4));
  nsa::AttnBwdParams p = make_params(pr, cu, total, q.dev, k.dev, v.dev, o, lse, bi);
  unsigned char* flags = nullptr;  // the selected walk's width per group of tokens, as the library default
  if (const size_t fb = nsa::sel_group_flags_bytes(p)) BENCH_CHECK(cudaMalloc(&flags, fb));
  p.sel_group_flags = flags;
  BENCH_STATUS(nsa::sparse_attn_fwd_cuda(p, nsa::DType::kBFloat16, nullptr));
  BENCH_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::to_host_float(o, total * HQ * pr.D);
  std::vector<float> ref(total * HQ * pr.D), ref_lse(total * HQ);
  nsa::AttnParams ph = make_params(pr, cu_h.data(), total, q.host.data(), k.host.data(), v.host.data(), ref.data(),
                                   ref_lse.data(), idx.data());
  nsa::cpu::attn_fwd<float>(ph);
  double max_err = 0, max_ref = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite &= std::isfinite(got[i]);
    max_err = std::max(max_err, static_cast<double>(std::fabs(got[i] - ref[i])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(ref[i])));
  }
  // P is rounded to bf16 before P V and o is rounded on output: allow a few bf16 ulps.
  const bool ok = finite && max_err <= 4 * std::ldexp(max_ref, -8) + 1e-3;
  std::printf("[%s] check %-8s fwd, packed ragged batch (%lld tokens, G=%d): max|err| %.3e (max|o| %.3e)\n",
              ok ? "OK" : "FAIL", name, static_cast<long long>(total), pr.G, max_err, max_ref);
  cudaFree(cu); cudaFree(bi); cudaFree(o); cudaFree(lse);
  if (flags) cudaFree(flags);
  return ok;
}

void time_one(const Problem& pr, const char* name) {
  const index_t T = pr.lens[0];
  const int HQ = pr.H * pr.G;
  bench::Bf16Buffer q(T * HQ * pr.D, 1.f, 21), k(T * pr.H * pr.D, 1.f, 22), v(T * pr.H * pr.D, 1.f, 23);
  bench::Bf16Buffer dout(T * HQ * pr.D, 1.f, 24);
  const std::vector<int> idx = pr.mode == nsa::AttnMode::kSelected ? make_block_idx(pr.lens, pr.H, pr.n, pr.lp, 25)
                                                                    : std::vector<int>(1, -1);
  const double flops = 2.0 * attended_keys(pr, idx) * pr.G * (2 * pr.D);
  int *cu, *bi;
  const int cu_h[2] = {0, static_cast<int>(T)};
  __nv_bfloat16 *o, *dq, *dk, *dv;
  float *lse, *delta;
  BENCH_CHECK(cudaMalloc(&cu, sizeof(cu_h)));
  BENCH_CHECK(cudaMemcpy(cu, cu_h, sizeof(cu_h), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMalloc(&bi, idx.size() * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(bi, idx.data(), idx.size() * sizeof(int), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMalloc(&o, T * HQ * pr.D * 2));
  BENCH_CHECK(cudaMalloc(&dq, T * HQ * pr.D * 2));
  BENCH_CHECK(cudaMalloc(&dk, T * pr.H * pr.D * 2));
  BENCH_CHECK(cudaMalloc(&dv, T * pr.H * pr.D * 2));
  BENCH_CHECK(cudaMalloc(&lse, T * HQ * 4));
  BENCH_CHECK(cudaMalloc(&delta, T * HQ * 4));
  BENCH_CHECK(cudaMemset(delta, 0, T * HQ * 4));
  nsa::AttnBwdParams p = make_params(pr, cu, T, q.dev, k.dev, v.dev, o, lse, bi);
  p.dout = dout.dev;  p.dout_stride = p.q_stride;
  p.dq = dq;  p.dq_stride = p.q_stride;
  p.dk = dk;  p.dk_stride = p.k_stride;
  p.dv = dv;  p.dv_stride = p.k_stride;
  p.delta = delta;
  void* ws = nullptr;
  const size_t ws_bytes = nsa::sparse_attn_bwd_workspace_bytes(p);
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&ws, ws_bytes));
  p.workspace = ws;
  unsigned char* flags = nullptr;  // the selected walk's width per group of tokens, as the library default
  if (const size_t fb = nsa::sel_group_flags_bytes(p)) BENCH_CHECK(cudaMalloc(&flags, fb));
  p.sel_group_flags = flags;
  const float fwd = bench::median_ms([&] { BENCH_STATUS(nsa::sparse_attn_fwd_cuda(p, nsa::DType::kBFloat16, nullptr)); }, 2, 5, 1);
  const float bwd = bench::median_ms([&] { BENCH_STATUS(nsa::sparse_attn_bwd_cuda(p, nsa::DType::kBFloat16, nullptr)); }, 1, 3, 1);
  std::printf("[OK] sparse_attn %-8s T=%6lld HQ=%d H=%d D=%d  fwd %8.3f ms %6.1f TFLOP/s | bwd %8.3f ms %6.1f TFLOP/s\n",
              name, static_cast<long long>(T), HQ, pr.H, pr.D, fwd, flops / (fwd * 1e9), bwd, 2.5 * flops / (bwd * 1e9));
  cudaFree(cu); cudaFree(bi); cudaFree(o); cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(lse); cudaFree(delta);
  if (ws) cudaFree(ws);
  if (flags) cudaFree(flags);
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int> Ts = bench::lengths_from_args(argc, argv, {8192, 65536});
  std::printf("device: %s\n", bench::device_name().c_str());
  bool ok = true;
  const std::vector<int> ragged = {1, 37, 300, 5, 129};
  ok &= check({ragged, 2, 4, 128, 4, 64, 64, nsa::AttnMode::kSelected}, "selected");
  ok &= check({ragged, 2, 16, 128, 4, 64, 64, nsa::AttnMode::kSelected}, "selected");
  ok &= check({ragged, 2, 4, 128, 4, 64, 33, nsa::AttnMode::kWindow}, "window");
  for (int T : Ts)
    for (int G : {16, 4}) {
      time_one({{T}, 4, G, 128, 16, 64, 512, nsa::AttnMode::kSelected}, "selected");
      time_one({{T}, 4, G, 128, 16, 64, 512, nsa::AttnMode::kWindow}, "window");
    }
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
