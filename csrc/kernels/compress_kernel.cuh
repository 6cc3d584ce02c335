// Kernel bodies of the compression family (see compress.h for the math and layouts).
//
// mean mode is a pure streaming reduction: one thread per (output row, head, 8-wide chunk).
// linear mode is a small GEMM per KV head over overlapping windows of x, run on the tensor
// cores with WMMA (sm_80+) on 64x64x32 tiles; its backward is two more GEMMs (dA = dy W^T,
// dW = A^T dy) plus deterministic gathers (dx = overlap-add of dA, dpe = column sums of dA).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "compress.h"

namespace nsa {
namespace compress_detail {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kVec = 8;  // 16-bit elements per 16-byte access

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[kVec]) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < kVec; ++j) f[j] = to_float<T>(e[j]);
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[kVec]) {
  uint4 v;
  T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int j = 0; j < kVec; ++j) e[j] = from_float<T>(f[j]);
  return v;
}

// Output row r (of the y row space) -> element offset of its window start in x, or -1 when the
// row belongs to no compressed token (packed gap row, or past the end).
__device__ __forceinline__ index_t window_offset(const CompressParams& p, index_t r) {
  if (p.cu_seqlens == nullptr) {
    const int nc = num_compressed(p.seqlen, p.block, p.stride);
    if (nc == 0 || r >= static_cast<index_t>(p.batch) * nc) return -1;
    const index_t b = r / nc, i = r % nc;
    return b * p.x_batch_stride + i * p.stride * p.x_row_stride;
  }
  // Largest b whose compressed rows start at or before r (later sequences of equal start are
  // the non-empty ones: an earlier sequence sharing the start has Nc = 0).
  int lo = 0, hi = p.batch - 1, b = -1;
  while (lo <= hi) {
    const int mid = (lo + hi) >> 1;
    if (compressed_row_begin(p.cu_seqlens, mid, p.total_rows, p.stride) <= r) { b = mid; lo = mid + 1; } else { hi = mid - 1; }
  }
  if (b < 0) return -1;
  const SeqGeom g = seq_geom(p.cu_seqlens, b, 0, p.total_rows);
  const index_t i = r - compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.stride);
  if (i >= num_compressed(g.len, p.block, p.stride)) return -1;
  return (g.row_begin + i * p.stride) * p.x_row_stride;
}

// x row (of the dx row space: B*T padded rows, or the packed rows) -> (row of y for window 0
// of this sequence, position t, Nc of the sequence); returns false for rows of no sequence.
struct XRow { index_t y_row0; int t; int nc; };
__device__ __forceinline__ bool resolve_x_row(const CompressParams& p, index_t row, XRow& out) {
  if (p.cu_seqlens == nullptr) {
    if (p.seqlen <= 0) return false;
    const index_t b = row / p.seqlen;
    if (b >= p.batch) return false;
    out.nc = num_compressed(p.seqlen, p.block, p.stride);
    out.t = static_cast<int>(row % p.seqlen);
    out.y_row0 = b * out.nc;
    return true;
  }
  const int b = find_sequence(p.cu_seqlens, p.batch, row);
  if (b < 0) return false;
  const SeqGeom g = seq_geom(p.cu_seqlens, b, 0, p.total_rows);
  if (row < g.row_begin || row >= g.row_begin + g.len) return false;
  out.nc = num_compressed(g.len, p.block, p.stride);
  out.t = static_cast<int>(row - g.row_begin);
  out.y_row0 = compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.stride);
  return true;
}

// ---------------------------------------------------------------------------------------------
// mean mode
// A thread block owns kMeanTileRows consecutive output rows of one head; thread (c, j) sums
// the first stride-long segment of row j's window for 8 channels. Window j is m = l/d segments,
// and its k-th segment is row (j+k)'s first one whenever that row starts k*d rows later in
// memory (same sequence), so each x row is read about once instead of l/d times; segments past
// the tile (or past a sequence end) are summed directly.
constexpr int kMeanTileRows = 16;
constexpr int kMaxChunks = 32;  // head dims up to 256

template <typename T>
__device__ __forceinline__ void add_rows(const T* src, int nrows, index_t row_stride, float (&acc)[kVec]) {
  int j = 0;
  for (; j + 8 <= nrows; j += 8) {  // eight 16-byte loads in flight before the first use
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldg(reinterpret_cast<const uint4*>(src + (j + u) * row_stride));
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      float f[kVec];
      unpack8<T>(v[u], f);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += f[e];
    }
  }
  for (; j < nrows; ++j) {
    float f[kVec];
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(src + j * row_stride)), f);
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += f[e];
  }
}

template <typename T>
__global__ void __launch_bounds__(kMeanTileRows * kMaxChunks) compress_mean_fwd_kernel(const CompressParams p) {
  __shared__ index_t row_off[kMeanTileRows];
  __shared__ float seg[kMeanTileRows][kMaxChunks][kVec];
  const int c = threadIdx.x, j = threadIdx.y;
  const int h = blockIdx.y;
  const index_t r0 = static_cast<index_t>(blockIdx.x) * kMeanTileRows;
  const index_t rows = p.out_rows();
  if (c == 0) row_off[j] = r0 + j < rows ? window_offset(p, r0 + j) : -1;
  __syncthreads();
  const index_t off = row_off[j];
  const T* x = static_cast<const T*>(p.x) + h * p.x_head_stride + c * kVec;
  const index_t seg_stride = static_cast<index_t>(p.stride) * p.x_row_stride;
  float acc[kVec] = {};
  if (off >= 0) add_rows<T>(x + off, p.stride, p.x_row_stride, acc);
#pragma unroll
  for (int e = 0; e < kVec; ++e) seg[j][c][e] = acc[e];
  __syncthreads();
  if (r0 + j >= rows) return;
  if (off >= 0) {
    const int m = p.block / p.stride;
    for (int k = 1; k < m; ++k) {
      const index_t want = off + k * seg_stride;
      if (j + k < kMeanTileRows && row_off[j + k] == want) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += seg[j + k][c][e];
      } else {
        add_rows<T>(x + want, p.stride, p.x_row_stride, acc);
      }
    }
    const float inv_l = 1.f / p.block;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] *= inv_l;
  }
  *reinterpret_cast<uint4*>(static_cast<T*>(p.y) + ((r0 + j) * p.heads + h) * p.out_dim + c * kVec) = pack8<T>(acc);
}

// dx[t] = (1/l) * sum of dy[i] over the windows i that contain t (at most l/d of them).
template <typename T>
__global__ void __launch_bounds__(256) compress_mean_bwd_kernel(const CompressBwdParams p) {
  const int chunks = p.head_dim / kVec;
  const index_t x_rows = p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
  const index_t n = x_rows * p.heads * chunks;
  const float inv_l = 1.f / p.block;
  const T* dy = static_cast<const T*>(p.dy);
  for (index_t idx = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % chunks);
    const index_t rh = idx / chunks;
    const int h = static_cast<int>(rh % p.heads);
    const index_t row = rh / p.heads;
    float acc[kVec] = {};
    XRow xr;
    if (resolve_x_row(p, row, xr) && xr.nc > 0) {
      // windows i with i*d <= t <= i*d + l - 1
      const int i_hi = min(xr.nc - 1, xr.t / p.stride);
      const int i_lo = xr.t - p.block + 1 <= 0 ? 0 : (xr.t - p.block + p.stride) / p.stride;
      for (int i = i_lo; i <= i_hi; ++i) {
        float f[kVec];
        unpack8<T>(__ldg(reinterpret_cast<const uint4*>(dy + ((xr.y_row0 + i) * p.heads + h) * p.head_dim + c * kVec)), f);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += f[e];
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] *= inv_l;
    }
    *reinterpret_cast<uint4*>(static_cast<T*>(p.dx) + rh * p.head_dim + c * kVec) = pack8<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// linear mode: 64x64x32 WMMA tiles, 4 warps each owning a 32x32 quarter. Operand tiles are
// fetched into registers one k-step ahead (so global latency overlaps the MMAs) and committed
// to shared memory in canonical row-major form; each problem supplies the fetch/commit pair
// that maps its operands (windows of x, W, W^T, dy) onto that form.
constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kPadA = 8, kPadB = 8, kPadC = 4;

template <typename T>
struct alignas(128) GemmSmem {
  T a[kBM][kBK + kPadA];
  T b[kBK][kBN + kPadB];
  float c[kBM][kBN + kPadC];
};

// Each thread moves two 16-byte vectors of A and two of B per k-step.
struct TileRegs { uint4 a[2]; uint4 b[2]; };

template <typename T, class Problem>
__global__ void __launch_bounds__(kThreads) compress_gemm_kernel(const Problem prob) {
  using namespace nvcuda;
  __shared__ GemmSmem<T> sm;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const index_t m0 = static_cast<index_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const int h = blockIdx.z;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  typename Problem::Cache cache;
  prob.init(cache, m0, h, tid);
  const index_t K = prob.k_extent();
  TileRegs regs;
  if (K > 0) prob.fetch(regs, cache, m0, n0, 0, h, tid);
  for (index_t k0 = 0; k0 < K; k0 += kBK) {
    prob.commit(sm, regs, tid);
    __syncthreads();
    if (k0 + kBK < K) prob.fetch(regs, cache, m0, n0, k0 + kBK, h, tid);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.a[wm + i * 16][kk], kBK + kPadA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.b[kk][wn + j * 16], kBN + kPadB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.c[wm + i * 16][wn + j * 16], acc[i][j], kBN + kPadC, wmma::mem_row_major);
  __syncthreads();
  prob.store(sm, cache, m0, n0, h, tid);
}

// Shared bits of the problems: A-row geometry of a 64-row tile of compressed tokens.
struct RowCache { index_t off[2]; };  // per thread: window offsets of the rows it fetches

template <typename T>
__device__ __forceinline__ uint4 load_window_vec(const CompressParams& p, index_t off, int h, int k) {
  // k indexes flatten(window) = r*D + c; D is a multiple of 32 so a vector never crosses r.
  if (off < 0) return make_uint4(0, 0, 0, 0);
  const int r = k / p.head_dim, c = k - r * p.head_dim;
  const T* x = static_cast<const T*>(p.x);
  uint4 v = __ldg(reinterpret_cast<const uint4*>(x + off + r * p.x_row_stride + h * p.x_head_stride + c));
  if (p.pe != nullptr) {
    const T* pe = static_cast<const T*>(p.pe) + (static_cast<index_t>(h) * p.block + r) * p.head_dim + c;
    float a[kVec], b[kVec];
    unpack8<T>(v, a);
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(pe)), b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) a[e] += b[e];
    v = pack8<T>(a);
  }
  return v;
}

// y = window(x) @ W[h]:  M = output rows, N = Dout, K = l*D.
template <typename T>
struct LinearFwdProblem {
  CompressParams p;
  struct Cache { index_t off[2]; };
  __device__ index_t k_extent() const { return static_cast<index_t>(p.block) * p.head_dim; }
  __device__ void init(Cache& c, index_t m0, int, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) c.off[u] = window_offset(p, m0 + (tid + u * kThreads) / 4);
  }
  __device__ void fetch(TileRegs& r, const Cache& c, index_t, int n0, index_t k0, int h, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kThreads;
      r.a[u] = load_window_vec<T>(p, c.off[u], h, static_cast<int>(k0) + (v % 4) * kVec);
      const int kk = v / 8, nc = (v % 8) * kVec;
      const T* w = static_cast<const T*>(p.w) + (static_cast<index_t>(h) * k_extent() + k0 + kk) * p.out_dim + n0 + nc;
      r.b[u] = __ldg(reinterpret_cast<const uint4*>(w));
    }
  }
  __device__ void commit(GemmSmem<T>& sm, const TileRegs& r, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kThreads;
      *reinterpret_cast<uint4*>(&sm.a[v / 4][(v % 4) * kVec]) = r.a[u];
      *reinterpret_cast<uint4*>(&sm.b[v / 8][(v % 8) * kVec]) = r.b[u];
    }
  }
  __device__ void store(const GemmSmem<T>& sm, const Cache&, index_t m0, int n0, int h, int tid) const {
    const index_t rows = p.out_rows();
    for (int v = tid; v < kBM * kBN / kVec; v += kThreads) {
      const int mm = v / (kBN / kVec), nc = (v % (kBN / kVec)) * kVec;
      const index_t m = m0 + mm;
      if (m >= rows) continue;
      float f[kVec];
      const bool valid = window_offset(p, m) >= 0;
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] = valid ? sm.c[mm][nc + e] : 0.f;
      *reinterpret_cast<uint4*>(static_cast<T*>(p.y) + (m * p.heads + h) * p.out_dim + n0 + nc) = pack8<T>(f);
    }
  }
};

// dA = dy @ W[h]^T (fp32 scratch [rows, H, l*D]):  M = output rows, N = l*D, K = Dout.
// Gap rows of dy are read as zero, so dA is zero there and the gathers below need no test.
template <typename T>
struct LinearBwdDAProblem {
  CompressBwdParams p;
  struct Cache { bool valid[2]; };
  __device__ index_t k_extent() const { return p.out_dim; }
  __device__ void init(Cache& c, index_t m0, int, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) c.valid[u] = window_offset(p, m0 + (tid + u * kThreads) / 4) >= 0;
  }
  __device__ void fetch(TileRegs& r, const Cache& c, index_t m0, int n0, index_t k0, int h, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kThreads;
      const index_t m = m0 + v / 4;
      r.a[u] = c.valid[u] ? __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.dy) + (m * p.heads + h) * p.out_dim + k0 + (v % 4) * kVec))
                          : make_uint4(0, 0, 0, 0);
      // B[k][n] = W[h][n][k]: read along k (contiguous in W), transpose on commit.
      const int nn = v / 4, kc = (v % 4) * kVec;
      const T* w = static_cast<const T*>(p.w) + (static_cast<index_t>(h) * p.block * p.head_dim + n0 + nn) * p.out_dim + k0 + kc;
      r.b[u] = __ldg(reinterpret_cast<const uint4*>(w));
    }
  }
  __device__ void commit(GemmSmem<T>& sm, const TileRegs& r, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kThreads;
      *reinterpret_cast<uint4*>(&sm.a[v / 4][(v % 4) * kVec]) = r.a[u];
      const T* e = reinterpret_cast<const T*>(&r.b[u]);
      const int nn = v / 4, kc = (v % 4) * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) sm.b[kc + j][nn] = e[j];
    }
  }
  __device__ void store(const GemmSmem<T>& sm, const Cache&, index_t m0, int n0, int h, int tid) const {
    const index_t rows = p.out_rows();
    const index_t ld = static_cast<index_t>(p.block) * p.head_dim;
    float* dA = static_cast<float*>(p.workspace);
    for (int v = tid; v < kBM * kBN / 4; v += kThreads) {
      const int mm = v / (kBN / 4), nc = (v % (kBN / 4)) * 4;
      const index_t m = m0 + mm;
      if (m >= rows) continue;
      *reinterpret_cast<float4*>(dA + (m * p.heads + h) * ld + n0 + nc) =
          make_float4(sm.c[mm][nc], sm.c[mm][nc + 1], sm.c[mm][nc + 2], sm.c[mm][nc + 3]);
    }
  }
};

// dW[h] = window(x)^T @ dy:  M = l*D, N = Dout, K = output rows (all of them, in order: the
// reduction runs inside one thread block, so it is deterministic).
template <typename T>
struct LinearBwdDWProblem {
  CompressBwdParams p;
  struct Cache {};
  __device__ index_t k_extent() const { return p.out_rows(); }
  __device__ void init(Cache&, index_t, int, int) const {}
  __device__ void fetch(TileRegs& r, const Cache&, index_t m0, int n0, index_t k0, int h, int tid) const {
    const index_t rows = p.out_rows();
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kThreads;
      const int kk = v / 8, c8 = (v % 8) * kVec;
      const index_t row = k0 + kk;
      const index_t off = row < rows ? window_offset(p, row) : -1;
      // A[m][k] = window(x)[row k][m]: read along m, transpose on commit.
      r.a[u] = load_window_vec<T>(p, off, h, static_cast<int>(m0) + c8);
      r.b[u] = off >= 0 ? __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.dy) + (row * p.heads + h) * p.out_dim + n0 + c8))
                        : make_uint4(0, 0, 0, 0);
    }
  }
  __device__ void commit(GemmSmem<T>& sm, const TileRegs& r, int tid) const {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int v = tid + u * kThreads;
      const int kk = v / 8, c8 = (v % 8) * kVec;
      const T* e = reinterpret_cast<const T*>(&r.a[u]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sm.a[c8 + j][kk] = e[j];
      *reinterpret_cast<uint4*>(&sm.b[kk][c8]) = r.b[u];
    }
  }
  __device__ void store(const GemmSmem<T>& sm, const Cache&, index_t m0, int n0, int h, int tid) const {
    T* dw = static_cast<T*>(p.dw);
    const index_t ld_k = static_cast<index_t>(p.block) * p.head_dim;
    for (int v = tid; v < kBM * kBN / kVec; v += kThreads) {
      const int mm = v / (kBN / kVec), nc = (v % (kBN / kVec)) * kVec;
      float f[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] = sm.c[mm][nc + e];
      *reinterpret_cast<uint4*>(dw + (static_cast<index_t>(h) * ld_k + m0 + mm) * p.out_dim + n0 + nc) = pack8<T>(f);
    }
  }
};

// dx[t] = sum over windows i containing t of dA[i][(t - i*d)*D + c]  (overlap-add, no atomics).
template <typename T>
__global__ void __launch_bounds__(256) compress_linear_dx_kernel(const CompressBwdParams p) {
  const int chunks = p.head_dim / kVec;
  const index_t x_rows = p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
  const index_t n = x_rows * p.heads * chunks;
  const index_t ld = static_cast<index_t>(p.block) * p.head_dim;
  const float* dA = static_cast<const float*>(p.workspace);
  for (index_t idx = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % chunks) * kVec;
    const index_t rh = idx / chunks;
    const int h = static_cast<int>(rh % p.heads);
    const index_t row = rh / p.heads;
    float acc[kVec] = {};
    XRow xr;
    if (resolve_x_row(p, row, xr) && xr.nc > 0) {
      const int i_hi = min(xr.nc - 1, xr.t / p.stride);
      const int i_lo = xr.t - p.block + 1 <= 0 ? 0 : (xr.t - p.block + p.stride) / p.stride;
      for (int i = i_lo; i <= i_hi; ++i) {
        const float* src = dA + ((xr.y_row0 + i) * p.heads + h) * ld + static_cast<index_t>(xr.t - i * p.stride) * p.head_dim + c;
        const float4 a = __ldg(reinterpret_cast<const float4*>(src));
        const float4 b = __ldg(reinterpret_cast<const float4*>(src + 4));
        acc[0] += a.x; acc[1] += a.y; acc[2] += a.z; acc[3] += a.w;
        acc[4] += b.x; acc[5] += b.y; acc[6] += b.z; acc[7] += b.w;
      }
    }
    *reinterpret_cast<uint4*>(static_cast<T*>(p.dx) + rh * p.head_dim + c) = pack8<T>(acc);
  }
}

// dpe[h][r][c] = sum over rows of dA[row][h][r*D + c]: fixed-size row chunks into fp32 partials,
// then a second pass adds the partials in chunk order (deterministic, no atomics).
constexpr int kPeRowsPerChunk = kCompressPeRowsPerChunk;

// static: each instantiation file launches its own copy (the kernel does not depend on T).
static __global__ void __launch_bounds__(256) compress_dpe_partial_kernel(const CompressBwdParams p, float* partial) {
  const index_t ld = static_cast<index_t>(p.block) * p.head_dim;
  const index_t cols = ld * p.heads;  // (h, r, c) flattened == dA's row layout
  const index_t col = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  const index_t rows = p.out_rows();
  const index_t r0 = static_cast<index_t>(blockIdx.y) * kPeRowsPerChunk;
  const index_t r1 = min(rows, r0 + kPeRowsPerChunk);
  const float* dA = static_cast<const float*>(p.workspace);
  float s = 0.f;
  for (index_t r = r0; r < r1; ++r) s += __ldg(dA + r * cols + col);
  partial[static_cast<index_t>(blockIdx.y) * cols + col] = s;
}

template <typename T>
__global__ void __launch_bounds__(256) compress_dpe_reduce_kernel(const CompressBwdParams p, const float* partial, int num_chunks) {
  const index_t cols = static_cast<index_t>(p.block) * p.head_dim * p.heads;
  const index_t col = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  if (col >= cols) return;
  float s = 0.f;
  for (int k = 0; k < num_chunks; ++k) s += partial[k * cols + col];
  static_cast<T*>(p.dpe)[col] = from_float<T>(s);
}

}  // namespace compress_detail
}  // namespace nsa
