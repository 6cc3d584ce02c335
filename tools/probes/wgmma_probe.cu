// Probe of the sm_90a warpgroup MMA (wgmma) conventions a Hopper attention kernel needs, checked
// against the CPU: one warpgroup computes S = Q K^T (64 x 64, head dim 128; both operands K-major
// in shared memory, 128-byte swizzle, descriptors advanced along K inside and across the 64-column
// swizzle atoms) and O = P V (P = bf16(S * 0.05) from the S accumulators as register A
// fragments; V [keys][128] row-major in shared memory, i.e. an MN-major B operand with the
// transpose bit). Prints the max errors and PASS / FAIL; exit code 0 on PASS.
//
//   nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a tools/probes/wgmma_probe.cu -o /tmp/wgmma_probe
//   /tmp/wgmma_probe
//
// Written without a GPU (session 8) as the first step towards wgmma kernels: the layouts below
// are the ones the kernels would use, so a PASS fixes them and a FAIL says which half is wrong.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 2;                                                                           \
    }                                                                                     \
  } while (0)

constexpr int kM = 64, kN = 64, kD = 128;  // query rows, keys, head dim
constexpr float kPScale = 0.05f;

// Byte offset of element (r, c) of a [rows][128] bf16 tile stored K-major with the 128-byte
// swizzle: two column chunks of 64 (an atom is 8 rows x 128 bytes), chunk-major; inside an atom
// the 16-byte unit index is XORed with the row index mod 8.
__host__ __device__ constexpr uint32_t k_major_offset(int r, int c, int rows) {
  const uint32_t a = (c / 64) * rows * 128 + r * 128 + (c % 64) * 2;
  return a ^ (((a >> 7) & 7) << 4);
}

// Byte offset of V element (key s, column c) stored MN-major with the 128-byte swizzle: atoms of
// 64 columns x 8 keys (1024 bytes), the two column atoms of 8 keys side by side, then the next 8
// keys (LBO = 1024 bytes between column atoms, SBO = 2048 bytes between 8-key groups).
__host__ __device__ constexpr uint32_t mn_major_offset(int s, int c) {
  const uint32_t a = ((c / 64) + 2 * (s / 8)) * 1024 + (s % 8) * 128 + (c % 64) * 2;
  return a ^ (((a >> 7) & 7) << 4);
}

__device__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((smem_addr >> 4) & 0x3FFF);
  d |= static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // SWIZZLE_128B
  return d;
}

__device__ void wgmma_ss_m64n64k16(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db));
}

__device__ void wgmma_rs_m64n128k16_tb(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}

__device__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// m64nN fp32 accumulators -> row-major [64][N]: warp w holds rows 16w + g and 16w + g + 8,
// n8 block j the columns 8j + 2t, 8j + 2t + 1 (g = lane / 4, t = lane % 4).
template <int kRegs>
__device__ void store_acc(const float (&d)[kRegs], float* out, int tid) {
  constexpr int N = kRegs * 2;
  const int w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < N / 8; ++j) {
    const int r0 = 16 * w + g, c0 = 8 * j + 2 * t;
    out[r0 * N + c0] = d[4 * j + 0];
    out[r0 * N + c0 + 1] = d[4 * j + 1];
    out[(r0 + 8) * N + c0] = d[4 * j + 2];
    out[(r0 + 8) * N + c0 + 1] = d[4 * j + 3];
  }
}

__global__ void __launch_bounds__(128) probe_kernel(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                    const __nv_bfloat16* v, float* s_out, float* o_out) {
  extern __shared__ unsigned char smem_raw[];
  // 1024-byte alignment: the swizzle is applied to absolute address bits
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sQ = smem;
  unsigned char* sK = smem + kM * kD * 2;
  unsigned char* sV = sK + kN * kD * 2;
  const int tid = threadIdx.x;
  // 16-byte chunks: (row, 8-column group)
  for (int i = tid; i < kM * kD / 8; i += 128) {
    const int r = i / (kD / 8), c = (i % (kD / 8)) * 8;
    *reinterpret_cast<uint4*>(sQ + k_major_offset(r, c, kM)) = *reinterpret_cast<const uint4*>(q + r * kD + c);
  }
  for (int i = tid; i < kN * kD / 8; i += 128) {
    const int r = i / (kD / 8), c = (i % (kD / 8)) * 8;
    *reinterpret_cast<uint4*>(sK + k_major_offset(r, c, kN)) = *reinterpret_cast<const uint4*>(k + r * kD + c);
    *reinterpret_cast<uint4*>(sV + mn_major_offset(r, c)) = *reinterpret_cast<const uint4*>(v + r * kD + c);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic-proxy writes -> wgmma reads
  __syncthreads();

  const uint32_t q_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sQ));
  const uint32_t k_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sK));
  const uint32_t v_addr = static_cast<uint32_t>(__cvta_generic_to_shared(sV));

  float s[32];
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {  // 16 columns = 32 bytes; column atom kk / 4
    const uint32_t off_q = (kk / 4) * kM * 128 + (kk % 4) * 32;
    const uint32_t off_k = (kk / 4) * kN * 128 + (kk % 4) * 32;
    wgmma_ss_m64n64k16(s, make_desc(q_addr + off_q, 16, 1024), make_desc(k_addr + off_k, 16, 1024));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");

  store_acc(s, s_out, tid);

  float o[64];
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {  // keys 16kk .. 16kk + 15: n8 blocks 2kk, 2kk + 1 of S
    const int j0 = 2 * kk, j1 = 2 * kk + 1;
    const uint32_t a[4] = {pack_bf16(s[4 * j0] * kPScale, s[4 * j0 + 1] * kPScale),
                           pack_bf16(s[4 * j0 + 2] * kPScale, s[4 * j0 + 3] * kPScale),
                           pack_bf16(s[4 * j1] * kPScale, s[4 * j1 + 1] * kPScale),
                           pack_bf16(s[4 * j1 + 2] * kPScale, s[4 * j1 + 3] * kPScale)};
    wgmma_rs_m64n128k16_tb(o, a, make_desc(v_addr + kk * 2 * 2048, 1024, 2048));
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  store_acc(o, o_out, tid);
}

int main() {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<__nv_bfloat16> hq(kM * kD), hk(kN * kD), hv(kN * kD);
  for (auto* vec : {&hq, &hk, &hv})
    for (auto& x : *vec) x = __float2bfloat16(nd(gen));
  __nv_bfloat16 *dq, *dk, *dv;
  float *ds, *dout;
  CHECK(cudaMalloc(&dq, hq.size() * 2));
  CHECK(cudaMalloc(&dk, hk.size() * 2));
  CHECK(cudaMalloc(&dv, hv.size() * 2));
  CHECK(cudaMalloc(&ds, kM * kN * 4));
  CHECK(cudaMalloc(&dout, kM * kD * 4));
  CHECK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(ds, 0xff, kM * kN * 4));
  CHECK(cudaMemset(dout, 0xff, kM * kD * 4));
  const size_t smem = (kM + 2 * kN) * kD * 2 + 1024;
  CHECK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  probe_kernel<<<1, 128, smem>>>(dq, dk, dv, ds, dout);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> s(kM * kN), o(kM * kD);
  CHECK(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));

  double s_err = 0, s_max = 0, o_err = 0, o_max = 0;
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kN; ++c) {
      double acc = 0;
      for (int d = 0; d < kD; ++d) acc += double(__bfloat162float(hq[r * kD + d])) * __bfloat162float(hk[c * kD + d]);
      s_err = std::fmax(s_err, std::fabs(acc - s[r * kN + c]));
      s_max = std::fmax(s_max, std::fabs(acc));
    }
  // O from the GPU's own S, rounded as the kernel rounds P: isolates the P V product
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kD; ++c) {
      double acc = 0;
      for (int j = 0; j < kN; ++j)
        acc += double(__bfloat162float(__float2bfloat16(s[r * kN + j] * kPScale))) * __bfloat162float(hv[j * kD + c]);
      o_err = std::fmax(o_err, std::fabs(acc - o[r * kD + c]));
      o_max = std::fmax(o_max, std::fabs(acc));
    }
  const bool s_ok = std::isfinite(s_err) && s_err <= 1e-3 * s_max + 1e-3;
  const bool o_ok = std::isfinite(o_err) && o_err <= 1e-3 * o_max + 1e-3;
  std::printf("[%s] S = Q K^T (SS, K-major, SW128): max |err| %.3e of max |S| %.3e\n", s_ok ? "PASS" : "FAIL", s_err, s_max);
  std::printf("[%s] O = P V (RS, B MN-major, SW128): max |err| %.3e of max |O| %.3e\n", o_ok ? "PASS" : "FAIL", o_err, o_max);
  return s_ok && o_ok ? 0 : 1;
}
