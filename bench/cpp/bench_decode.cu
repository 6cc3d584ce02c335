// C++ benchmark of one NSA decoding step (DESIGN.md §1.8, decode.h): checks the CUDA step
// against the CPU implementation on a small ragged batch (empty, short and long caches, G = 1, 4,
// 16), then times the headline shape (HQ = 64, H = 4, D = 128, l = 32, d = 16, l' = 64, n = 16,
// w = 512, every sequence at the full context) at batch 1 and 64. Prints [OK]/[FAIL], the step
// time and the K/V bytes the step must read per second of it. Full-attention decode is compared
// in bench/bench_decode.py (SDPA in the same process).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_util.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/decode.h"
#include "kernels/nsa_common.h"

using nsa::index_t;

namespace {

constexpr int kL = 32, kD = 16, kLp = 64, kN = 16, kW = 512;

// Deterministic pseudo-random bf16 in [-1, 1) written on the device: the timing caches
// (gigabytes at batch 64) would take minutes to draw on the host.
__global__ void fill_bf16(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    h ^= h >> 16;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16(static_cast<float>(h & 0xFFFF) / 32768.f - 1.f);
  }
}

struct Shape {
  int B, S, HQ, H, Dk, Dv;
};

int num_cmp(int S) { return nsa::num_compressed(S, kL, kD); }

// Params of contiguous [B, HQ, Dk] q, [B, S, H, D] caches, [B, Sc, H, D] compressed caches,
// [B, HQ] gates and o.
nsa::DecodeParams make_params(const Shape& s, const void* q, const void* k, const void* v, const void* kc,
                              const void* vc, const int* lens, const void* gc, const void* gs, const void* gw, void* o) {
  const int Sc = num_cmp(s.S);
  nsa::DecodeParams p;
  p.q = q;  p.q_batch_stride = static_cast<index_t>(s.HQ) * s.Dk;  p.q_head_stride = s.Dk;
  p.k_cache = k;  p.k_stride = {static_cast<index_t>(s.S) * s.H * s.Dk, static_cast<index_t>(s.H) * s.Dk, s.Dk};
  p.v_cache = v;  p.v_stride = {static_cast<index_t>(s.S) * s.H * s.Dv, static_cast<index_t>(s.H) * s.Dv, s.Dv};
  p.k_cmp = kc;  p.kc_stride = {static_cast<index_t>(Sc) * s.H * s.Dk, static_cast<index_t>(s.H) * s.Dk, s.Dk};
  p.v_cmp = vc;  p.vc_stride = {static_cast<index_t>(Sc) * s.H * s.Dv, static_cast<index_t>(s.H) * s.Dv, s.Dv};
  p.cache_seqlens = lens;
  p.g_cmp = gc;  p.g_slc = gs;  p.g_win = gw;  p.g_batch_stride = s.HQ;
  p.o = o;  p.o_batch_stride = static_cast<index_t>(s.HQ) * s.Dv;  p.o_head_stride = s.Dv;
  p.batch = s.B;  p.cache_len = s.S;  p.cache_len_cmp = Sc;
  p.heads_q = s.HQ;  p.heads_kv = s.H;  p.head_dim_qk = s.Dk;  p.head_dim_v = s.Dv;
  p.scale_fp64 = 1.0 / std::sqrt(static_cast<double>(s.Dk));
  p.scale = static_cast<float>(p.scale_fp64);
  p.cmp_block = kL;  p.cmp_stride = kD;  p.sel_block = kLp;  p.top_n = kN;  p.init_blocks = 1;  p.local_blocks = 2;
  p.window = kW;
  return p;
}

// One step against the CPU implementation. The top-n can differ from the CPU's (double) where
// two block scores tie within fp32 rounding; such a (sequence, head) row then differs by far
// more than rounding, so the check allows at most 1% of the rows outside the bound.
bool check(const std::vector<int>& lens_h, int S, int HQ, int H, int D) {
  const Shape s{static_cast<int>(lens_h.size()), S, HQ, H, D, D};
  const int Sc = num_cmp(S);
  const size_t nq = static_cast<size_t>(s.B) * HQ * D, nkv = static_cast<size_t>(s.B) * S * H * D,
               nc = static_cast<size_t>(s.B) * Sc * H * D, ng = static_cast<size_t>(s.B) * HQ;
  bench::Bf16Buffer q(nq, 1.f, 31), k(nkv, 1.f, 32), v(nkv, 1.f, 33), kc(nc, 1.f, 34), vc(nc, 1.f, 35);
  bench::Bf16Buffer gc(ng, 0.5f, 36), gs(ng, 0.5f, 37), gw(ng, 0.5f, 38);
  int* lens;
  __nv_bfloat16* o;
  BENCH_CHECK(cudaMalloc(&lens, lens_h.size() * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(lens, lens_h.data(), lens_h.size() * sizeof(int), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMalloc(&o, nq * 2));
  BENCH_CHECK(cudaMemset(o, 0xff, nq * 2));  // NaN poison
  nsa::DecodeParams p = make_params(s, q.dev, k.dev, v.dev, kc.dev, vc.dev, lens, gc.dev, gs.dev, gw.dev, o);
  const size_t ws_bytes = nsa::decode_workspace_bytes(p);
  void* ws = nullptr;
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&ws, ws_bytes));
  BENCH_STATUS(nsa::decode_fwd_cuda(p, nsa::DType::kBFloat16, ws, ws_bytes, nullptr));
  BENCH_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = bench::to_host_float(o, nq);
  std::vector<float> ref(nq);
  nsa::DecodeParams ph = make_params(s, q.host.data(), k.host.data(), v.host.data(), kc.host.data(), vc.host.data(),
                                     lens_h.data(), gc.host.data(), gs.host.data(), gw.host.data(), ref.data());
  nsa::cpu::decode_fwd<float>(ph);
  int bad_rows = 0;
  double max_err = 0, max_ref = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) max_ref = std::max(max_ref, static_cast<double>(std::fabs(ref[i])));
  // o is rounded to bf16 and P to bf16 before P V: a few bf16 ulps of the largest output.
  const double tol = 4 * std::ldexp(max_ref, -8) + 1e-3;
  for (size_t row = 0; row < nq / D; ++row) {
    double row_err = 0;
    for (int c = 0; c < D; ++c) {
      const size_t i = row * D + c;
      finite &= std::isfinite(got[i]);
      row_err = std::max(row_err, static_cast<double>(std::fabs(got[i] - ref[i])));
    }
    max_err = std::max(max_err, row_err);
    bad_rows += row_err > tol;
  }
  const bool ok = finite && bad_rows * 100 <= static_cast<int>(nq / D);
  std::printf("[%s] check decode B=%d S=%d HQ=%d H=%d D=%d: %d of %zu rows beyond %.2e (max|err| %.3e, max|o| %.3e)\n",
              ok ? "OK" : "FAIL", s.B, S, HQ, H, D, bad_rows, nq / D, tol, max_err, max_ref);
  cudaFree(lens); cudaFree(o);
  if (ws) cudaFree(ws);
  return ok;
}

void time_one(int B, int T) {
  const Shape s{B, T, 64, 4, 128, 128};
  const int Sc = num_cmp(T);
  const size_t nq = static_cast<size_t>(B) * s.HQ * s.Dk, nkv = static_cast<size_t>(B) * T * s.H * s.Dk,
               nc = static_cast<size_t>(B) * Sc * s.H * s.Dk, ng = static_cast<size_t>(B) * s.HQ;
  size_t free_b = 0, total_b = 0;
  BENCH_CHECK(cudaMemGetInfo(&free_b, &total_b));
  if ((2 * nkv + 2 * nc) * 2 > free_b * 0.8) {
    std::printf("[SKIP] decode B=%d T=%d: caches do not fit\n", B, T);
    return;
  }
  __nv_bfloat16 *buf[8], *o;
  const size_t sizes[8] = {nq, nkv, nkv, nc, nc, ng, ng, ng};
  for (int i = 0; i < 8; ++i) {
    BENCH_CHECK(cudaMalloc(&buf[i], sizes[i] * 2));
    fill_bf16<<<1024, 256>>>(buf[i], sizes[i], 1234u + i);
  }
  BENCH_CHECK(cudaGetLastError());
  BENCH_CHECK(cudaMalloc(&o, nq * 2));
  int* lens;
  std::vector<int> lens_h(B, T);
  BENCH_CHECK(cudaMalloc(&lens, B * sizeof(int)));
  BENCH_CHECK(cudaMemcpy(lens, lens_h.data(), B * sizeof(int), cudaMemcpyHostToDevice));
  nsa::DecodeParams p = make_params(s, buf[0], buf[1], buf[2], buf[3], buf[4], lens, buf[5], buf[6], buf[7], o);
  const size_t ws_bytes = nsa::decode_workspace_bytes(p);
  void* ws = nullptr;
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&ws, ws_bytes));
  const float ms = bench::median_ms([&] { BENCH_STATUS(nsa::decode_fwd_cuda(p, nsa::DType::kBFloat16, ws, ws_bytes, nullptr)); });
  // K/V rows the step must read: visible compressed tokens + n l' selected keys + the window.
  const double row_bytes = 2.0 * s.H * s.Dk * 2;
  const double keys = Sc + std::min(kN * kLp, T) + std::min(kW, T);
  const double bytes = B * keys * row_bytes;
  std::printf("[OK] decode B=%3d T=%7d HQ=%d H=%d D=%d  step %8.1f us  %7.1f GB/s of K/V (%.1f MB)\n", B, T, s.HQ, s.H,
              s.Dk, ms * 1e3, bytes / (ms * 1e6), bytes / 1e6);
  for (int i = 0; i < 8; ++i) cudaFree(buf[i]);
  cudaFree(o); cudaFree(lens);
  if (ws) cudaFree(ws);
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<int> Ts = bench::lengths_from_args(argc, argv, {8192, 65536, 131072});
  std::printf("device: %s\n", bench::device_name().c_str());
  bool ok = true;
  // Ragged caches: empty, one token, shorter than l, fewer blocks than n, more (top-n runs).
  const std::vector<int> lens = {0, 1, 20, 700, 3000};
  for (int G : {1, 4, 16}) ok &= check(lens, 3072, 2 * G, 2, 128);
  ok &= check(lens, 3072, 8, 2, 64);
  for (int B : {1, 64})
    for (int T : Ts) time_one(B, T);
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
