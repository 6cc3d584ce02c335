// C++ benchmark of the compression family (DESIGN.md §1.1): checks the CUDA kernels against the
// CPU implementation on a small ragged batch, then times the headline shape (H = 4, D = 128,
// l = 32, d = 16) at several T. Prints [OK]/[FAIL], ms, GB/s (bytes = read x + write y) and
// TFLOP/s (linear mode), and the device copy bandwidth for scale.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "bench_util.h"
#include "kernels/compress.h"
#include "kernels/cpu/compress_cpu.h"

using nsa::index_t;

namespace {

struct Mode { const char* name; bool linear; bool pe; };
constexpr Mode kModes[] = {{"mean", false, false}, {"linear", true, false}, {"linear+pe", true, true}};

nsa::CompressParams make_params(const bench::Bf16Buffer& x, const bench::Bf16Buffer* w, const bench::Bf16Buffer* pe,
                                void* y, int batch, int T, const int* cu, index_t total, int H, int D) {
  nsa::CompressParams p;
  p.x = x.dev;
  p.x_row_stride = static_cast<index_t>(H) * D;
  p.x_head_stride = D;
  p.x_batch_stride = cu ? 0 : static_cast<index_t>(T) * H * D;
  p.w = w ? w->dev : nullptr;
  p.pe = pe ? pe->dev : nullptr;
  p.y = y;
  p.cu_seqlens = cu;
  p.batch = batch;
  p.seqlen = T;
  p.total_rows = cu ? total : T;
  p.heads = H;
  p.head_dim = D;
  p.out_dim = D;
  p.block = 32;
  p.stride = 16;
  return p;
}

// Correctness on a packed ragged batch against the CPU implementation (same params).
bool check_mode(const Mode& m) {
  const int H = 4, D = 128;
  const std::vector<int> lens = {1, 37, 700, 5, 333, 1024};
  std::vector<int> cu_host(1, 0);
  for (int l : lens) cu_host.push_back(cu_host.back() + l);
  const index_t total = cu_host.back();
  bench::Bf16Buffer x(total * H * D, 1.f, 1);
  bench::Bf16Buffer w(static_cast<size_t>(H) * 32 * D * D, 1.f / 64, 2);
  bench::Bf16Buffer pe(static_cast<size_t>(H) * 32 * D, 0.5f, 3);
  int* cu = nullptr;
  BENCH_CHECK(cudaMalloc(&cu, cu_host.size() * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(cu, cu_host.data(), cu_host.size() * sizeof(int), cudaMemcpyHostToDevice));
  const index_t rows = total / 16;
  __nv_bfloat16* y = nullptr;
  BENCH_CHECK(cudaMalloc(&y, rows * H * D * sizeof(__nv_bfloat16)));
  BENCH_CHECK(cudaMemset(y, 0xff, rows * H * D * sizeof(__nv_bfloat16)));  // NaN poison
  nsa::CompressParams p = make_params(x, m.linear ? &w : nullptr, m.pe ? &pe : nullptr, y,
                                      static_cast<int>(lens.size()), 0, cu, total, H, D);
  BENCH_STATUS(nsa::compress_fwd_cuda(p, nsa::DType::kBFloat16, nullptr));
  BENCH_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::to_host_float(y, rows * H * D);

  nsa::CompressParams ph = p;
  ph.x = x.host.data();
  ph.w = m.linear ? w.host.data() : nullptr;
  ph.pe = m.pe ? pe.host.data() : nullptr;
  ph.cu_seqlens = cu_host.data();
  std::vector<float> ref(rows * H * D);
  ph.y = ref.data();
  nsa::cpu::compress_fwd<float>(ph);
  double max_err = 0, max_ref = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite &= std::isfinite(got[i]);
    max_err = std::max(max_err, static_cast<double>(std::fabs(got[i] - ref[i])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(ref[i])));
  }
  // bf16 output rounding is 2^-8 relative; allow two roundings of the largest value.
  const bool ok = finite && max_err <= 2 * std::ldexp(max_ref, -8) + 1e-6;
  std::printf("[%s] check %-10s packed ragged batch (%lld tokens): max|err| %.3e (max|ref| %.3e)\n", ok ? "OK" : "FAIL",
              m.name, static_cast<long long>(total), max_err, max_ref);
  cudaFree(y);
  cudaFree(cu);
  return ok;
}

void time_mode(const Mode& m, int T, double copy_gbs) {
  const int H = 4, D = 128;
  const index_t n = static_cast<index_t>(T) * H * D;
  bench::Bf16Buffer x(n, 1.f, 7);
  bench::Bf16Buffer w(static_cast<size_t>(H) * 32 * D * D, 1.f / 64, 8);
  bench::Bf16Buffer pe(static_cast<size_t>(H) * 32 * D, 0.5f, 9);
  const int nc = nsa::num_compressed(T, 32, 16);
  const index_t ny = static_cast<index_t>(nc) * H * D;
  __nv_bfloat16 *y, *dy, *dx, *dw, *dpe;
  BENCH_CHECK(cudaMalloc(&y, ny * 2));
  BENCH_CHECK(cudaMalloc(&dy, ny * 2));
  BENCH_CHECK(cudaMemset(dy, 0, ny * 2));
  BENCH_CHECK(cudaMalloc(&dx, n * 2));
  BENCH_CHECK(cudaMalloc(&dw, w.n * 2));
  BENCH_CHECK(cudaMalloc(&dpe, pe.n * 2));
  nsa::CompressBwdParams p;
  static_cast<nsa::CompressParams&>(p) = make_params(x, m.linear ? &w : nullptr, m.pe ? &pe : nullptr, y, 1, T, nullptr, T, H, D);
  p.dy = dy;
  p.dx = dx;
  p.dw = m.linear ? dw : nullptr;
  p.dpe = m.pe ? dpe : nullptr;
  void* ws = nullptr;
  const size_t ws_bytes = nsa::compress_bwd_workspace_bytes(p);
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&ws, ws_bytes));
  p.workspace = ws;
  const float fwd = bench::median_ms([&] { BENCH_STATUS(nsa::compress_fwd_cuda(p, nsa::DType::kBFloat16, nullptr)); });
  const float bwd = bench::median_ms([&] { BENCH_STATUS(nsa::compress_bwd_cuda(p, nsa::DType::kBFloat16, nullptr)); });
  const double bytes = 2.0 * (n + ny) + (m.linear ? 2.0 * w.n : 0.0);
  const double gbs = bytes / (fwd * 1e6);
  const double flops = m.linear ? 2.0 * nc * H * (32.0 * D) * D : static_cast<double>(nc) * H * 32 * D;
  std::printf("[OK] compress_fwd %-10s T=%6d H=%d D=%d  fwd %8.4f ms  %7.1f GB/s (%4.1f%% of copy)  %6.1f TFLOP/s | bwd %8.4f ms\n",
              m.name, T, H, D, fwd, gbs, 100.0 * gbs / copy_gbs, flops / (fwd * 1e9), bwd);
  cudaFree(y); cudaFree(dy); cudaFree(dx); cudaFree(dw); cudaFree(dpe);
  if (ws) cudaFree(ws);
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int> Ts = bench::lengths_from_args(argc, argv, {8192, 65536, 131072});
  std::printf("device: %s\n", bench::device_name().c_str());
  const double copy_gbs = bench::copy_bandwidth_gbs();
  std::printf("device copy bandwidth (read+write): %.1f GB/s\n", copy_gbs);
  bool ok = true;
  for (const Mode& m : kModes) ok &= check_mode(m);
  for (const Mode& m : kModes)
    for (int T : Ts) time_mode(m, T, copy_gbs);
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
