#include "compress_cpu.h"

#include <vector>

namespace nsa {
namespace cpu {
namespace {

// Visits every compressed token as (row of y, element offset of its window start in x).
template <class F>
void for_each_window(const CompressParams& p, F&& f) {
  for (int b = 0; b < p.batch; ++b) {
    const SeqGeom g = seq_geom(p.cu_seqlens, b, p.seqlen, p.total_rows);
    const int nc = num_compressed(g.len, p.block, p.stride);
    const index_t y0 = p.cu_seqlens ? compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.stride)
                                    : static_cast<index_t>(b) * nc;
    const index_t x0 = p.cu_seqlens ? g.row_begin * p.x_row_stride : b * p.x_batch_stride;
    for (int i = 0; i < nc; ++i) f(y0 + i, x0 + static_cast<index_t>(i) * p.stride * p.x_row_stride, b, i);
  }
}

}  // namespace

template <typename T>
void compress_fwd(const CompressParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* pe = static_cast<const T*>(p.pe);
  T* y = static_cast<T*>(p.y);
  const int D = p.head_dim, Do = p.out_dim, L = p.block;
  const index_t rows = p.out_rows();
  for (index_t i = 0; i < rows * p.heads * Do; ++i) y[i] = T(0);  // gap rows stay zero
  std::vector<double> win(static_cast<size_t>(L) * D), acc(Do);
  for_each_window(p, [&](index_t yrow, index_t xoff, int, int) {
    for (int h = 0; h < p.heads; ++h) {
      for (int r = 0; r < L; ++r)
        for (int c = 0; c < D; ++c) {
          double v = x[xoff + r * p.x_row_stride + h * p.x_head_stride + c];
          if (pe) v += pe[(static_cast<index_t>(h) * L + r) * D + c];
          win[static_cast<size_t>(r) * D + c] = v;
        }
      if (!w) {  // mean
        for (int c = 0; c < D; ++c) {
          double s = 0;
          for (int r = 0; r < L; ++r) s += win[static_cast<size_t>(r) * D + c];
          acc[c] = s / L;
        }
      } else {
        const T* wh = w + static_cast<index_t>(h) * L * D * Do;
        for (int n = 0; n < Do; ++n) acc[n] = 0;
        for (index_t k = 0; k < static_cast<index_t>(L) * D; ++k) {
          const double a = win[k];
          for (int n = 0; n < Do; ++n) acc[n] += a * static_cast<double>(wh[k * Do + n]);
        }
      }
      for (int n = 0; n < Do; ++n) y[(yrow * p.heads + h) * Do + n] = static_cast<T>(acc[n]);
    }
  });
}

template <typename T>
void compress_bwd(const CompressBwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* pe = static_cast<const T*>(p.pe);
  const T* dy = static_cast<const T*>(p.dy);
  const int D = p.head_dim, Do = p.out_dim, L = p.block, H = p.heads;
  const index_t x_rows = p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
  const index_t LD = static_cast<index_t>(L) * D;
  std::vector<double> dx(static_cast<size_t>(x_rows) * H * D, 0.0);
  std::vector<double> dw(w ? static_cast<size_t>(H) * LD * Do : 0, 0.0);
  std::vector<double> dpe(pe ? static_cast<size_t>(H) * LD : 0, 0.0);
  std::vector<double> da(LD);
  for_each_window(p, [&](index_t yrow, index_t xoff, int b, int i) {
    // row of the window start in the (contiguous) dx row space
    const index_t xrow0 = (p.cu_seqlens ? seq_geom(p.cu_seqlens, b, 0, p.total_rows).row_begin
                                        : static_cast<index_t>(b) * p.seqlen) +
                          static_cast<index_t>(i) * p.stride;
    for (int h = 0; h < H; ++h) {
      const T* g = dy + (yrow * H + h) * Do;
      if (!w) {
        for (int r = 0; r < L; ++r)
          for (int c = 0; c < D; ++c) da[static_cast<size_t>(r) * D + c] = static_cast<double>(g[c]) / L;
      } else {
        const T* wh = w + static_cast<index_t>(h) * LD * Do;
        for (index_t k = 0; k < LD; ++k) {
          double s = 0;
          for (int n = 0; n < Do; ++n) s += static_cast<double>(wh[k * Do + n]) * g[n];
          da[k] = s;
        }
        double* dwh = dw.data() + static_cast<size_t>(h) * LD * Do;
        for (int r = 0; r < L; ++r)
          for (int c = 0; c < D; ++c) {
            double a = x[xoff + r * p.x_row_stride + h * p.x_head_stride + c];
            if (pe) a += pe[(static_cast<index_t>(h) * L + r) * D + c];
            const index_t k = static_cast<index_t>(r) * D + c;
            for (int n = 0; n < Do; ++n) dwh[k * Do + n] += a * g[n];
          }
        if (pe)
          for (index_t k = 0; k < LD; ++k) dpe[static_cast<size_t>(h) * LD + k] += da[k];
      }
      for (int r = 0; r < L; ++r)
        for (int c = 0; c < D; ++c) dx[((xrow0 + r) * H + h) * D + c] += da[static_cast<size_t>(r) * D + c];
    }
  });
  T* dxo = static_cast<T*>(p.dx);
  for (size_t k = 0; k < dx.size(); ++k) dxo[k] = static_cast<T>(dx[k]);
  if (w && p.dw) {
    T* o = static_cast<T*>(p.dw);
    for (size_t k = 0; k < dw.size(); ++k) o[k] = static_cast<T>(dw[k]);
  }
  if (pe && p.dpe) {
    T* o = static_cast<T*>(p.dpe);
    for (size_t k = 0; k < dpe.size(); ++k) o[k] = static_cast<T>(dpe[k]);
  }
}

template void compress_fwd<float>(const CompressParams&);
template void compress_fwd<double>(const CompressParams&);
template void compress_bwd<float>(const CompressBwdParams&);
template void compress_bwd<double>(const CompressBwdParams&);

}  // namespace cpu
}  // namespace nsa
