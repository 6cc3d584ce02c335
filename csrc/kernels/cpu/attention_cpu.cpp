#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace nsa {
namespace cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

inline double scale_of(float s, double s64) { return s64 != 0.0 ? s64 : static_cast<double>(s); }

template <typename T>
inline double dot(const T* a, const T* b, int n) {
  double s = 0;
  for (int c = 0; c < n; ++c) s += static_cast<double>(a[c]) * static_cast<double>(b[c]);
  return s;
}

// ------------------------------------------------------------------------------------------
// Key sets: lists of key-row ranges [begin, end) inside one sequence's key rows.

struct KeyRange {
  index_t begin, end;
};

inline index_t count_keys(const std::vector<KeyRange>& r) {
  index_t n = 0;
  for (const auto& x : r) n += x.end - x.begin;
  return n;
}

// §1.2: compressed tokens i with i*d + l - 1 <= t (i.e. i < Nc(t+1)), at most n_keys of them.
inline void compressed_keys(int t, int l, int d, index_t n_keys, std::vector<KeyRange>& out) {
  out.clear();
  const index_t n = std::min<index_t>(num_compressed(t + 1, l, d), n_keys);
  if (n > 0) out.push_back({0, n});
}

// §1.6: keys max(0, t-w+1) .. t.
inline void window_keys(int t, int w, std::vector<KeyRange>& out) {
  out.clear();
  const index_t lo = std::max<index_t>(0, static_cast<index_t>(t) - w + 1);
  if (w >= 1) out.push_back({lo, static_cast<index_t>(t) + 1});
}

// §1.5: union of the blocks idx[0..n) (-1 and out-of-range entries skipped, duplicates counted
// once), cut at t (causal inside the current block). seqlen bounds the readable key rows.
inline void selected_keys(const int* idx, int n, int t, int seqlen, int sel_block, std::vector<index_t>& tmp,
                          std::vector<KeyRange>& out) {
  out.clear();
  tmp.clear();
  for (int k = 0; k < n; ++k) {
    const index_t j = idx[k];
    if (j < 0) continue;
    const index_t s = j * sel_block;
    if (s > t || s >= seqlen) continue;  // block after the query (empty once cut) or past the end
    tmp.push_back(j);
  }
  std::sort(tmp.begin(), tmp.end());
  tmp.erase(std::unique(tmp.begin(), tmp.end()), tmp.end());
  for (const index_t j : tmp)
    out.push_back({j * sel_block, std::min<index_t>((j + 1) * sel_block, static_cast<index_t>(t) + 1)});
}

// ------------------------------------------------------------------------------------------
// Per-row primitives shared by prefill and decode.

// Softmax attention of one query row over the key set. k / v point at key row 0 of the
// sequence and head; out receives Dv values (zeros for an empty set). Returns the lse
// (natural log), -inf for an empty set.
template <typename T>
double attend_row(const T* q, const T* k, index_t k_row_stride, const T* v, index_t v_row_stride, int Dk, int Dv,
                  double scale, const std::vector<KeyRange>& keys, std::vector<double>& scores, double* out) {
  for (int c = 0; c < Dv; ++c) out[c] = 0.0;
  const index_t n = count_keys(keys);
  if (n == 0) return -kInf;
  if (static_cast<index_t>(scores.size()) < n) scores.resize(static_cast<size_t>(n));
  double m = -kInf;
  index_t pos = 0;
  for (const auto& r : keys)
    for (index_t s = r.begin; s < r.end; ++s) {
      const double x = scale * dot(q, k + s * k_row_stride, Dk);
      scores[static_cast<size_t>(pos++)] = x;
      m = std::max(m, x);
    }
  double sum = 0.0;
  pos = 0;
  for (const auto& r : keys)
    for (index_t s = r.begin; s < r.end; ++s) {
      const double e = std::exp(scores[static_cast<size_t>(pos++)] - m);
      sum += e;
      const T* vr = v + s * v_row_stride;
      for (int c = 0; c < Dv; ++c) out[c] += e * static_cast<double>(vr[c]);
    }
  for (int c = 0; c < Dv; ++c) out[c] /= sum;
  return m + std::log(sum);
}

// Backward of attend_row for one query row (FlashAttention formulas):
//   P = exp(scale*q.k - lse), dS = P*(dout.v - Dt), dq += scale*dS*k, dk += scale*dS*q, dv += P*dout.
// The given lse (fp32, rounded) only stabilises the exponentials: P is renormalised to sum to
// one over the key set, so fp64 inputs get fp64-accurate gradients. A row whose P underflows
// entirely (lse far off) contributes nothing. dk_acc / dv_acc point at key row 0 of the
// sequence and head of double accumulators.
template <typename T>
void attend_row_bwd(const T* q, const T* k, index_t k_row_stride, const T* v, index_t v_row_stride, int Dk, int Dv,
                    double scale, const std::vector<KeyRange>& keys, double lse, const T* dout, double Dt, double* dq,
                    double* dk_acc, index_t dk_row_stride, double* dv_acc, index_t dv_row_stride,
                    std::vector<double>& scratch) {
  const index_t n = count_keys(keys);
  if (n == 0) return;
  if (static_cast<index_t>(scratch.size()) < n) scratch.resize(static_cast<size_t>(n));
  double sum = 0.0;
  index_t pos = 0;
  for (const auto& r : keys)
    for (index_t s = r.begin; s < r.end; ++s) {
      const double e = std::exp(scale * dot(q, k + s * k_row_stride, Dk) - lse);
      scratch[static_cast<size_t>(pos++)] = e;
      sum += e;
    }
  if (!(sum > 0.0) || !std::isfinite(sum)) return;
  pos = 0;
  for (const auto& r : keys)
    for (index_t s = r.begin; s < r.end; ++s) {
      const T* kr = k + s * k_row_stride;
      const T* vr = v + s * v_row_stride;
      const double P = scratch[static_cast<size_t>(pos++)] / sum;
      const double dS = P * (dot(dout, vr, Dv) - Dt);
      double* dkr = dk_acc + s * dk_row_stride;
      double* dvr = dv_acc + s * dv_row_stride;
      for (int c = 0; c < Dk; ++c) {
        dq[c] += scale * dS * static_cast<double>(kr[c]);
        dkr[c] += scale * dS * static_cast<double>(q[c]);
      }
      for (int c = 0; c < Dv; ++c) dvr[c] += P * static_cast<double>(dout[c]);
    }
}

struct SelectHyper {
  int cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks;
};

// §1.3-§1.4 for one (token t, KV head): q points at the first of the group's G query heads
// (head stride q_head_stride), lse at their G (contiguous) lse values, kc at compressed key
// row 0 of the sequence and KV head; n_vis visible compressed tokens. Writes top_n indices to
// out, ascending, -1 padded. Memory O(number of blocks) in `score` / `order`.
template <typename T>
void select_row(const T* q, index_t q_head_stride, int G, const float* lse, const T* kc, index_t kc_row_stride,
                int n_vis, int t, int Dk, double scale, const SelectHyper& hp, std::vector<double>& score,
                std::vector<int>& order, int* out) {
  const int n_valid = t / hp.sel_block + 1;  // blocks j with j*l' <= t
  score.assign(static_cast<size_t>(n_valid), 0.0);
  const index_t l = hp.cmp_block, d = hp.cmp_stride, ls = hp.sel_block;
  for (int i = 0; i < n_vis; ++i) {
    const T* kr = kc + static_cast<index_t>(i) * kc_row_stride;
    double P = 0.0;
    for (int h = 0; h < G; ++h) {
      const double L = lse[h];
      if (L == -kInf) continue;  // no visible key for this head: p = 0
      P += std::exp(scale * dot(q + h * q_head_stride, kr, Dk) - L);
    }
    if (P == 0.0) continue;
    const index_t a = i * d, e = a + l;  // [i*d, i*d + l)
    for (index_t j = a / ls; j < n_valid && j * ls < e; ++j) {
      const index_t overlap = std::min(e, (j + 1) * ls) - std::max(a, j * ls);
      score[static_cast<size_t>(j)] += P * static_cast<double>(overlap / d);  // d | overlap (d | l, d | l')
    }
  }
  for (int j = 0; j < std::min(hp.init_blocks, n_valid); ++j) score[static_cast<size_t>(j)] = kInf;
  const int cur = t / hp.sel_block;
  for (int j = std::max(0, cur - hp.local_blocks + 1); j <= cur && hp.local_blocks > 0; ++j)
    score[static_cast<size_t>(j)] = kInf;
  for (auto& s : score)
    if (std::isnan(s)) s = -kInf;  // keep the ordering strict-weak on garbage input
  const int n = std::min(hp.top_n, n_valid);
  order.resize(static_cast<size_t>(n_valid));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + n, order.end(), [&](int x, int y) {
    const double sx = score[static_cast<size_t>(x)], sy = score[static_cast<size_t>(y)];
    return sx > sy || (sx == sy && x < y);  // larger score first, ties to the lower index
  });
  std::sort(order.begin(), order.begin() + n);
  for (int k = 0; k < n; ++k) out[k] = order[static_cast<size_t>(k)];
  for (int k = n; k < hp.top_n; ++k) out[k] = -1;
}

// ------------------------------------------------------------------------------------------
// Prefill geometry.

// Element offset of row `row` of sequence b in a [B, T, ...] / packed [total, ...] tensor.
inline index_t seq_offset(const Strides3& s, bool packed, index_t row_begin, int b) {
  return packed ? row_begin * s.row : static_cast<index_t>(b) * s.batch;
}

// Key rows of sequence b: where they start in the key row space and how many there are.
struct KeySpan {
  index_t row_begin;  // packed: first key row; padded: 0 (batch stride used instead)
  index_t rows;       // readable key rows of this sequence
};

inline index_t key_rows_per_item(const AttnParams& p) {
  return p.mode == AttnMode::kCompressed ? p.seqlen_k_cmp : p.seqlen;
}

// Rows of the whole k tensor (padded: batch * rows per item).
inline index_t key_rows_total(const AttnParams& p) {
  if (p.cu_seqlens) return p.mode == AttnMode::kCompressed ? p.total_rows / p.cmp_stride : p.total_rows;
  return static_cast<index_t>(p.batch) * key_rows_per_item(p);
}

inline KeySpan key_span(const AttnParams& p, int b, const SeqGeom& g) {
  if (p.mode != AttnMode::kCompressed) return {p.cu_seqlens ? g.row_begin : 0, g.len};
  const index_t nc = num_compressed(g.len, p.cmp_block, p.cmp_stride);
  if (!p.cu_seqlens) return {0, std::min<index_t>(nc, p.seqlen_k_cmp)};
  const index_t begin = compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.cmp_stride);
  return {begin, std::max<index_t>(0, std::min<index_t>(nc, p.total_rows / p.cmp_stride - begin))};
}

// Key set of query row t (of a sequence of length seqlen), KV head kvh.
inline void key_set(const AttnParams& p, const KeySpan& ks, int t, int seqlen, const int* block_idx_row,
                    std::vector<index_t>& tmp, std::vector<KeyRange>& out) {
  switch (p.mode) {
    case AttnMode::kCompressed: compressed_keys(t, p.cmp_block, p.cmp_stride, ks.rows, out); break;
    case AttnMode::kSelected: selected_keys(block_idx_row, p.top_n, t, seqlen, p.sel_block, tmp, out); break;
    case AttnMode::kWindow: window_keys(t, p.window, out); break;
  }
}

// Calls f(b, geometry, key span) for every sequence.
template <class F>
void for_each_sequence(const AttnParams& p, F&& f) {
  for (int b = 0; b < p.batch; ++b) {
    const SeqGeom g = seq_geom(p.cu_seqlens, b, p.seqlen, p.total_rows);
    f(b, g, key_span(p, b, g));
  }
}

inline index_t query_rows_total(const AttnParams& p) {
  return p.cu_seqlens ? p.total_rows : static_cast<index_t>(p.batch) * p.seqlen;
}

// Element offset of flat row r of a padded ([B*rows_per_item]) or packed row space.
inline index_t flat_row_offset(const Strides3& s, bool packed, index_t r, index_t rows_per_item) {
  if (packed || rows_per_item == 0) return r * s.row;
  return (r / rows_per_item) * s.batch + (r % rows_per_item) * s.row;
}

}  // namespace

// ------------------------------------------------------------------------------------------

template <typename T>
void attn_fwd(const AttnParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* o = static_cast<T*>(p.o);
  const int HQ = p.heads_q, H = p.heads_kv, Dk = p.head_dim_qk, Dv = p.head_dim_v;
  if (H <= 0 || HQ <= 0 || HQ % H != 0) return;
  const int G = HQ / H;
  const double scale = scale_of(p.scale, p.scale_fp64);
  const bool packed = p.cu_seqlens != nullptr;
  if (packed) {  // rows owned by no sequence (malformed cu_seqlens only) still get defined values
    for (index_t r = 0; r < p.total_rows; ++r)
      for (int h = 0; h < HQ; ++h) {
        T* orow = o + r * p.o_stride.row + h * p.o_stride.head;
        for (int c = 0; c < Dv; ++c) orow[c] = T(0);
        p.lse[r * p.lse_row_stride + h] = -std::numeric_limits<float>::infinity();
      }
  }
  std::vector<double> scores, acc(static_cast<size_t>(Dv));
  std::vector<KeyRange> keys;
  std::vector<index_t> tmp;
  for_each_sequence(p, [&](int b, const SeqGeom& g, const KeySpan& ks) {
    const T* qb = q + seq_offset(p.q_stride, packed, g.row_begin, b);
    T* ob = o + seq_offset(p.o_stride, packed, g.row_begin, b);
    float* lb = p.lse + (packed ? g.row_begin * p.lse_row_stride : b * p.lse_batch_stride);
    const T* kb = k + seq_offset(p.k_stride, packed, ks.row_begin, b);
    const T* vb = v + seq_offset(p.v_stride, packed, ks.row_begin, b);
    const int* ib = p.block_idx ? p.block_idx + seq_offset(p.block_idx_stride, packed, g.row_begin, b) : nullptr;
    for (int t = 0; t < g.len; ++t)
      for (int kvh = 0; kvh < H; ++kvh) {
        key_set(p, ks, t, g.len, ib ? ib + t * p.block_idx_stride.row + kvh * p.block_idx_stride.head : nullptr,
                tmp, keys);
        for (int hh = 0; hh < G; ++hh) {
          const int h = kvh * G + hh;
          const double lse =
              attend_row(qb + t * p.q_stride.row + h * p.q_stride.head, kb + kvh * p.k_stride.head, p.k_stride.row,
                         vb + kvh * p.v_stride.head, p.v_stride.row, Dk, Dv, scale, keys, scores, acc.data());
          T* orow = ob + t * p.o_stride.row + h * p.o_stride.head;
          for (int c = 0; c < Dv; ++c) orow[c] = static_cast<T>(acc[static_cast<size_t>(c)]);
          lb[t * p.lse_row_stride + h] = static_cast<float>(lse);
        }
      }
  });
}

template <typename T>
void attn_bwd(const AttnBwdParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* o = static_cast<const T*>(p.o);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const int HQ = p.heads_q, H = p.heads_kv, Dk = p.head_dim_qk, Dv = p.head_dim_v;
  if (H <= 0 || HQ <= 0 || HQ % H != 0) return;
  const int G = HQ / H;
  const double scale = scale_of(p.scale, p.scale_fp64);
  const bool packed = p.cu_seqlens != nullptr;
  const index_t krows = key_rows_total(p), krows_item = key_rows_per_item(p);
  // dk / dv accumulated in double over the whole key row space ([rows, H, D], row-major).
  std::vector<double> dk_acc(static_cast<size_t>(krows * H * Dk), 0.0), dv_acc(static_cast<size_t>(krows * H * Dv), 0.0);
  if (packed) {
    for (index_t r = 0; r < p.total_rows; ++r)
      for (int h = 0; h < HQ; ++h) {
        T* row = dq + r * p.dq_stride.row + h * p.dq_stride.head;
        for (int c = 0; c < Dk; ++c) row[c] = T(0);
      }
  }
  std::vector<double> dqr(static_cast<size_t>(Dk)), scores;
  std::vector<KeyRange> keys;
  std::vector<index_t> tmp;
  for_each_sequence(p, [&](int b, const SeqGeom& g, const KeySpan& ks) {
    const T* qb = q + seq_offset(p.q_stride, packed, g.row_begin, b);
    const T* ob = o + seq_offset(p.o_stride, packed, g.row_begin, b);
    const T* dob = dout + seq_offset(p.dout_stride, packed, g.row_begin, b);
    T* dqb = dq + seq_offset(p.dq_stride, packed, g.row_begin, b);
    const index_t lse_off = packed ? g.row_begin * p.lse_row_stride : b * p.lse_batch_stride;
    const float* lb = p.lse + lse_off;
    const float* dlb = p.dlse ? p.dlse + lse_off : nullptr;
    const T* kb = k + seq_offset(p.k_stride, packed, ks.row_begin, b);
    const T* vb = v + seq_offset(p.v_stride, packed, ks.row_begin, b);
    const index_t kflat = packed ? ks.row_begin : b * krows_item;  // first key row in the accumulators
    double* dkb = dk_acc.data() + kflat * H * Dk;
    double* dvb = dv_acc.data() + kflat * H * Dv;
    const int* ib = p.block_idx ? p.block_idx + seq_offset(p.block_idx_stride, packed, g.row_begin, b) : nullptr;
    for (int t = 0; t < g.len; ++t)
      for (int kvh = 0; kvh < H; ++kvh) {
        key_set(p, ks, t, g.len, ib ? ib + t * p.block_idx_stride.row + kvh * p.block_idx_stride.head : nullptr,
                tmp, keys);
        for (int hh = 0; hh < G; ++hh) {
          const int h = kvh * G + hh;
          std::fill(dqr.begin(), dqr.end(), 0.0);
          const double lse = lb[t * p.lse_row_stride + h];
          if (lse != -kInf && count_keys(keys) > 0) {
            const T* dorow = dob + t * p.dout_stride.row + h * p.dout_stride.head;
            // delta = rowsum(dout * out), given (p.delta, layout of lse) or computed here.
            const double rs = p.delta ? static_cast<double>(p.delta[lse_off + t * p.lse_row_stride + h])
                                      : dot(dorow, ob + t * p.o_stride.row + h * p.o_stride.head, Dv);
            const double Dt = rs - (dlb ? static_cast<double>(dlb[t * p.lse_row_stride + h]) : 0.0);
            attend_row_bwd(qb + t * p.q_stride.row + h * p.q_stride.head, kb + kvh * p.k_stride.head, p.k_stride.row,
                           vb + kvh * p.v_stride.head, p.v_stride.row, Dk, Dv, scale, keys, lse, dorow, Dt,
                           dqr.data(), dkb + kvh * Dk, static_cast<index_t>(H) * Dk, dvb + kvh * Dv,
                           static_cast<index_t>(H) * Dv, scores);
          }
          T* dqrow = dqb + t * p.dq_stride.row + h * p.dq_stride.head;
          for (int c = 0; c < Dk; ++c) dqrow[c] = static_cast<T>(dqr[static_cast<size_t>(c)]);
        }
      }
  });
  for (index_t r = 0; r < krows; ++r) {
    const index_t dko = flat_row_offset(p.dk_stride, packed, r, krows_item);
    const index_t dvo = flat_row_offset(p.dv_stride, packed, r, krows_item);
    for (int h = 0; h < H; ++h) {
      T* dkr = dk + dko + h * p.dk_stride.head;
      T* dvr = dv + dvo + h * p.dv_stride.head;
      const double* ak = dk_acc.data() + (r * H + h) * Dk;
      const double* av = dv_acc.data() + (r * H + h) * Dv;
      for (int c = 0; c < Dk; ++c) dkr[c] = static_cast<T>(ak[c]);
      for (int c = 0; c < Dv; ++c) dvr[c] = static_cast<T>(av[c]);
    }
  }
}

template <typename T>
void select_blocks(const SelectParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k_cmp);
  const int HQ = p.heads_q, H = p.heads_kv, Dk = p.head_dim_qk, n = p.top_n;
  if (H <= 0 || HQ <= 0 || HQ % H != 0 || n <= 0) return;
  const int G = HQ / H;
  const double scale = scale_of(p.scale, p.scale_fp64);
  const bool packed = p.cu_seqlens != nullptr;
  const SelectHyper hp{p.cmp_block, p.cmp_stride, p.sel_block, p.top_n, p.init_blocks, p.local_blocks};
  if (packed) {
    for (index_t r = 0; r < p.total_rows; ++r)
      for (int h = 0; h < H; ++h)
        for (int k = 0; k < n; ++k) p.block_idx[r * p.block_idx_stride.row + h * p.block_idx_stride.head + k] = -1;
  }
  std::vector<double> score;
  std::vector<int> order;
  for (int b = 0; b < p.batch; ++b) {
    const SeqGeom g = seq_geom(p.cu_seqlens, b, p.seqlen, p.total_rows);
    const index_t nc = num_compressed(g.len, p.cmp_block, p.cmp_stride);
    index_t kc_begin = 0, kc_rows;
    if (packed) {
      kc_begin = compressed_row_begin(p.cu_seqlens, b, p.total_rows, p.cmp_stride);
      kc_rows = std::max<index_t>(0, std::min<index_t>(nc, p.total_rows / p.cmp_stride - kc_begin));
    } else {
      kc_rows = std::min<index_t>(nc, p.seqlen_k_cmp);
    }
    const T* qb = q + seq_offset(p.q_stride, packed, g.row_begin, b);
    const T* kb = kc + seq_offset(p.k_stride, packed, kc_begin, b);
    const float* lb = p.lse + (packed ? g.row_begin * p.lse_row_stride : b * p.lse_batch_stride);
    int* ib = p.block_idx + seq_offset(p.block_idx_stride, packed, g.row_begin, b);
    for (int t = 0; t < g.len; ++t) {
      const int n_vis = static_cast<int>(std::min<index_t>(num_compressed(t + 1, p.cmp_block, p.cmp_stride), kc_rows));
      for (int kvh = 0; kvh < H; ++kvh)
        select_row(qb + t * p.q_stride.row + static_cast<index_t>(kvh) * G * p.q_stride.head, p.q_stride.head, G,
                   lb + t * p.lse_row_stride + kvh * G, kb + kvh * p.k_stride.head, p.k_stride.row, n_vis, t, Dk,
                   scale, hp, score, order, ib + t * p.block_idx_stride.row + kvh * p.block_idx_stride.head);
    }
  }
}

template <typename T>
void decode_fwd(const DecodeParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* kcache = static_cast<const T*>(p.k_cache);
  const T* vcache = static_cast<const T*>(p.v_cache);
  const T* kcmp = static_cast<const T*>(p.k_cmp);
  const T* vcmp = static_cast<const T*>(p.v_cmp);
  const T* gc = static_cast<const T*>(p.g_cmp);
  const T* gs = static_cast<const T*>(p.g_slc);
  const T* gw = static_cast<const T*>(p.g_win);
  T* o = static_cast<T*>(p.o);
  const int HQ = p.heads_q, H = p.heads_kv, Dk = p.head_dim_qk, Dv = p.head_dim_v;
  if (H <= 0 || HQ <= 0 || HQ % H != 0) return;
  const int G = HQ / H;
  const double scale = scale_of(p.scale, p.scale_fp64);
  const SelectHyper hp{p.cmp_block, p.cmp_stride, p.sel_block, p.top_n, p.init_blocks, p.local_blocks};
  std::vector<double> scores, score, o_cmp(static_cast<size_t>(G) * Dv), o_slc(static_cast<size_t>(Dv)),
      o_win(static_cast<size_t>(Dv));
  std::vector<float> lse(static_cast<size_t>(G));
  std::vector<int> order, sel(static_cast<size_t>(std::max(p.top_n, 0)));
  std::vector<KeyRange> keys, sel_keys, win_keys;
  std::vector<index_t> tmp;
  for (int b = 0; b < p.batch; ++b) {
    const int len = std::min(p.cache_seqlens[b], p.cache_len);  // tokens including the new one
    T* ob = o + b * p.o_batch_stride;
    if (len <= 0) {
      for (int h = 0; h < HQ; ++h)
        for (int c = 0; c < Dv; ++c) ob[h * p.o_head_stride + c] = T(0);
      continue;
    }
    const int t = len - 1;
    const T* qb = q + b * p.q_batch_stride;
    const T* kb = kcache + b * p.k_stride.batch;
    const T* vb = vcache + b * p.v_stride.batch;
    const T* kcb = kcmp + b * p.kc_stride.batch;
    const T* vcb = vcmp + b * p.vc_stride.batch;
    const int n_vis =
        static_cast<int>(std::min<index_t>(num_compressed(len, p.cmp_block, p.cmp_stride), p.cache_len_cmp));
    for (int kvh = 0; kvh < H; ++kvh) {
      // compressed branch for the G heads of the group; lse rounded to fp32 as prefill stores it
      compressed_keys(t, p.cmp_block, p.cmp_stride, n_vis, keys);
      for (int hh = 0; hh < G; ++hh) {
        const int h = kvh * G + hh;
        lse[static_cast<size_t>(hh)] = static_cast<float>(
            attend_row(qb + h * p.q_head_stride, kcb + kvh * p.kc_stride.head, p.kc_stride.row,
                       vcb + kvh * p.vc_stride.head, p.vc_stride.row, Dk, Dv, scale, keys, scores,
                       o_cmp.data() + static_cast<size_t>(hh) * Dv));
      }
      // selection of the group, then the selected and window branches
      if (p.top_n > 0)
        select_row(qb + static_cast<index_t>(kvh) * G * p.q_head_stride, p.q_head_stride, G, lse.data(),
                   kcb + kvh * p.kc_stride.head, p.kc_stride.row, n_vis, t, Dk, scale, hp, score, order, sel.data());
      selected_keys(sel.data(), std::max(p.top_n, 0), t, len, p.sel_block, tmp, sel_keys);
      window_keys(t, p.window, win_keys);
      for (int hh = 0; hh < G; ++hh) {
        const int h = kvh * G + hh;
        const T* qh = qb + h * p.q_head_stride;
        attend_row(qh, kb + kvh * p.k_stride.head, p.k_stride.row, vb + kvh * p.v_stride.head, p.v_stride.row, Dk, Dv,
                   scale, sel_keys, scores, o_slc.data());
        attend_row(qh, kb + kvh * p.k_stride.head, p.k_stride.row, vb + kvh * p.v_stride.head, p.v_stride.row, Dk, Dv,
                   scale, win_keys, scores, o_win.data());
        const index_t go = b * p.g_batch_stride + h;
        const double wc = static_cast<double>(gc[go]), ws = static_cast<double>(gs[go]),
                     ww = static_cast<double>(gw[go]);
        T* orow = ob + h * p.o_head_stride;
        for (int c = 0; c < Dv; ++c)
          orow[c] = static_cast<T>(wc * o_cmp[static_cast<size_t>(hh) * Dv + c] + ws * o_slc[static_cast<size_t>(c)] +
                                   ww * o_win[static_cast<size_t>(c)]);
      }
    }
  }
}

template void attn_fwd<float>(const AttnParams&);
template void attn_fwd<double>(const AttnParams&);
template void attn_bwd<float>(const AttnBwdParams&);
template void attn_bwd<double>(const AttnBwdParams&);
template void select_blocks<float>(const SelectParams&);
template void select_blocks<double>(const SelectParams&);
template void decode_fwd<float>(const DecodeParams&);
template void decode_fwd<double>(const DecodeParams&);

}  // namespace cpu
}  // namespace nsa
