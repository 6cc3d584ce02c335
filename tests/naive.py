"""A deliberately naive implementation of DESIGN.md section 1, for testing reference.py.

Independent of nsa_cuda/reference.py (do not import it here): explicit Python loops per
sequence, per token, per head and per key, float64 math on Python floats, key lists built
one by one, overlap weights found by counting positions, top-n by repeatedly picking the
maximum. Same names, signatures and layouts as the reference (see its module docstring);
results are float64 tensors (block_idx int32). Tiny shapes only: it is slow on purpose.
"""

import functools
import math

import torch

NEG_INF = float("-inf")
POS_INF = float("inf")


# ----------------------------------------------------------------------------- helpers


def _lists(x):
    return None if x is None else x.detach().to(torch.float64).cpu().tolist()


def _dot(a, b):
    total = 0.0
    for x, y in zip(a, b):
        total += x * y
    return total


def _sequences(lead_shape, cu_seqlens):
    """[(b, start, end)]: padded -> start/end are None (use index b)."""
    if cu_seqlens is None:
        return [(b, None, None) for b in range(lead_shape[0])], False
    cu = [int(c) for c in cu_seqlens.tolist()]
    return [(b, cu[b], cu[b + 1]) for b in range(len(cu) - 1)], True


def _rows(xl, b, start, end, varlen):
    """Token rows of sequence b from a nested list."""
    return xl[start:end] if varlen else xl[b]


def num_compressed(T, block, stride):
    count = 0
    i = 0
    while i * stride + block <= T:  # block [i*d, i*d + l) lies inside the sequence
        count += 1
        i += 1
    return count


def _check(block, stride, sel_block=None):
    if block % stride != 0 or (sel_block is not None and sel_block % stride != 0):
        raise ValueError("stride must divide block and sel_block")


def _softmax_attend(q_vec, key_list, keys, values, scale, dv):
    """q_vec [Dk]; key_list = positions; keys/values indexable by position -> [D] lists."""
    if not key_list:
        return [0.0] * dv, NEG_INF
    scores = [scale * _dot(q_vec, keys[s]) for s in key_list]
    m = max(scores)
    weights = [math.exp(x - m) for x in scores]
    z = sum(weights)
    out = [0.0] * dv
    for wgt, s in zip(weights, key_list):
        for e in range(dv):
            out[e] += wgt / z * values[s][e]
    return out, m + math.log(z)


def _to_tensor(x):
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------- compression


def _compress_one(x, w, pe, block, stride):
    """x: [T][H][D] lists -> [Nc][H][Dout] lists."""
    T = len(x)
    nc = num_compressed(T, block, stride)
    out = []
    for i in range(nc):
        row = []
        H = len(x[0])
        for h in range(H):
            D = len(x[0][h])
            if w is None:
                vec = []
                for e in range(D):
                    total = 0.0
                    for j in range(block):
                        total += x[i * stride + j][h][e]
                    vec.append(total / block)
            else:
                flat = []
                for j in range(block):
                    for e in range(D):
                        val = x[i * stride + j][h][e]
                        if pe is not None:
                            val += pe[h][j][e]
                        flat.append(val)
                d_out = len(w[h][0])
                vec = []
                for o in range(d_out):
                    total = 0.0
                    for kk in range(len(flat)):
                        total += flat[kk] * w[h][kk][o]
                    vec.append(total)
            row.append(vec)
        out.append(row)
    return out


def compress(x, w=None, pe=None, *, block=32, stride=16, cu_seqlens=None):
    _check(block, stride)
    if w is None and pe is not None:
        raise ValueError("pe needs w")
    xl, wl, pel = _lists(x), _lists(w), _lists(pe)
    H = x.shape[-2]
    d_out = x.shape[-1] if w is None else w.shape[-1]
    seqs, varlen = _sequences(x.shape, cu_seqlens)
    if not varlen:
        return _to_tensor([_compress_one(xl[b], wl, pel, block, stride) for b, _, _ in seqs]).reshape(
            x.shape[0], num_compressed(x.shape[1], block, stride), H, d_out
        )
    out = torch.zeros(x.shape[0] // stride, H, d_out, dtype=torch.float64)
    for b, start, end in seqs:
        comp = _compress_one(xl[start:end], wl, pel, block, stride)
        for i, row in enumerate(comp):
            out[start // stride + i] = _to_tensor(row)
    return out


def _compressed_rows(kcl, b, start, end, varlen, T, block, stride):
    nc = num_compressed(T, block, stride)
    if varlen:
        return kcl[start // stride : start // stride + nc]
    return kcl[b]


# ----------------------------------------------------------------------------- compressed attention


def _cmp_attention_row(qt, t, kc, vc, G, scale, block, stride, dv):
    """All heads of query t: returns ([HQ][Dv], [HQ])."""
    outs, lses = [], []
    for h in range(len(qt)):
        g = h // G
        visible = []
        for i in range(len(kc)):
            if i * stride + block - 1 <= t:
                visible.append(i)
        keys = {i: kc[i][g] for i in visible}
        vals = {i: vc[i][g] for i in visible}
        o, lse = _softmax_attend(qt[h], visible, keys, vals, scale, dv)
        outs.append(o)
        lses.append(lse)
    return outs, lses


def compressed_attention(q, k_c, v_c, *, scale=None, block=32, stride=16, cu_seqlens=None):
    _check(block, stride)
    HQ, Dk = q.shape[-2], q.shape[-1]
    G = HQ // k_c.shape[-2]
    dv = v_c.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    ql, kcl, vcl = _lists(q), _lists(k_c), _lists(v_c)
    seqs, varlen = _sequences(q.shape, cu_seqlens)
    o = torch.zeros(*q.shape[:-1], dv, dtype=torch.float64)
    lse = torch.zeros(*q.shape[:-1], dtype=torch.float64)
    for b, start, end in seqs:
        qs = _rows(ql, b, start, end, varlen)
        T = len(qs)
        kc = _compressed_rows(kcl, b, start, end, varlen, T, block, stride)
        vc = _compressed_rows(vcl, b, start, end, varlen, T, block, stride)
        for t in range(T):
            outs, lses = _cmp_attention_row(qs[t], t, kc, vc, G, scale, block, stride, dv)
            row = (start + t,) if varlen else (b, t)
            o[row] = _to_tensor(outs)
            lse[row] = _to_tensor(lses)
    return o, lse


# ----------------------------------------------------------------------------- scores and selection


@functools.lru_cache(maxsize=None)
def _overlap(i, j, block, stride, sel_block):
    """Number of positions shared by [i*d, i*d + l) and [j*l', (j+1)*l')."""
    count = 0
    for p in range(i * stride, i * stride + block):
        if j * sel_block <= p < (j + 1) * sel_block:
            count += 1
    return count


def _scores_row(qt, t, lse_t, kc, G, H, scale, block, stride, sel_block, n_sel):
    """Block scores of query t: [H][n_sel]."""
    result = []
    for g in range(H):
        # P[i] = sum over the heads of group g of p[t, h, i]
        P = []
        for i in range(len(kc)):
            total = 0.0
            if i * stride + block - 1 <= t:
                for h in range(g * G, g * G + G):
                    if lse_t[h] != NEG_INF:
                        total += math.exp(scale * _dot(qt[h], kc[i][g]) - lse_t[h])
            P.append(total)
        row = []
        for j in range(n_sel):
            score = 0.0
            for i in range(len(kc)):
                score += P[i] * (_overlap(i, j, block, stride, sel_block) / stride)
            row.append(score)
        result.append(row)
    return result


def _pick(scores, t, sel_block, top_n, init_blocks, local_blocks):
    """Top-n of one (t, g): list of top_n ints."""
    cur = t // sel_block
    candidates = []
    for j in range(len(scores)):
        if j * sel_block <= t:
            forced = j < init_blocks or (max(0, cur - local_blocks + 1) <= j <= cur)
            candidates.append((j, POS_INF if forced else scores[j]))
    chosen = []
    for _ in range(top_n):
        best = None
        for j, s in candidates:  # ascending j: strict '>' keeps the lower index on ties
            if j in chosen:
                continue
            if best is None or s > best[1]:
                best = (j, s)
        if best is None:
            break
        chosen.append(best[0])
    chosen.sort()
    return chosen + [-1] * (top_n - len(chosen))


def block_scores(q, k_c, lse, *, scale=None, block=32, stride=16, sel_block=64, cu_seqlens=None):
    _check(block, stride, sel_block)
    HQ, Dk = q.shape[-2], q.shape[-1]
    H = k_c.shape[-2]
    G = HQ // H
    scale = Dk ** -0.5 if scale is None else scale
    ql, kcl, lsel = _lists(q), _lists(k_c), _lists(lse)
    seqs, varlen = _sequences(q.shape, cu_seqlens)
    result = []
    for b, start, end in seqs:
        qs = _rows(ql, b, start, end, varlen)
        ls = _rows(lsel, b, start, end, varlen)
        T = len(qs)
        n_sel = (T + sel_block - 1) // sel_block
        kc = _compressed_rows(kcl, b, start, end, varlen, T, block, stride)
        rows = [_scores_row(qs[t], t, ls[t], kc, G, H, scale, block, stride, sel_block, n_sel) for t in range(T)]
        result.append(torch.tensor(rows, dtype=torch.float64).reshape(T, H, n_sel))
    return result if varlen else torch.stack(result)


def select_blocks(q, k_c, lse, *, scale=None, cmp_block=32, cmp_stride=16, sel_block=64, top_n=16,
                  init_blocks=1, local_blocks=2, cu_seqlens=None):
    _check(cmp_block, cmp_stride, sel_block)
    HQ, Dk = q.shape[-2], q.shape[-1]
    H = k_c.shape[-2]
    G = HQ // H
    scale = Dk ** -0.5 if scale is None else scale
    ql, kcl, lsel = _lists(q), _lists(k_c), _lists(lse)
    seqs, varlen = _sequences(q.shape, cu_seqlens)
    out = torch.full((*q.shape[:-2], H, top_n), -1, dtype=torch.int32)
    for b, start, end in seqs:
        qs = _rows(ql, b, start, end, varlen)
        ls = _rows(lsel, b, start, end, varlen)
        T = len(qs)
        n_sel = (T + sel_block - 1) // sel_block
        kc = _compressed_rows(kcl, b, start, end, varlen, T, cmp_block, cmp_stride)
        for t in range(T):
            scores = _scores_row(qs[t], t, ls[t], kc, G, H, scale, cmp_block, cmp_stride, sel_block, n_sel)
            for g in range(H):
                row = (start + t, g) if varlen else (b, t, g)
                out[row] = torch.tensor(
                    _pick(scores[g], t, sel_block, top_n, init_blocks, local_blocks), dtype=torch.int32
                )
    return out


# ----------------------------------------------------------------------------- selected / window attention


def _selected_row(qt, t, ks, vs, idx_t, G, scale, sel_block, dv):
    outs, lses = [], []
    for h in range(len(qt)):
        g = h // G
        blocks = [j for j in idx_t[g] if j >= 0]
        key_list = []
        for s in range(t + 1):  # causal: s <= t
            if s // sel_block in blocks:
                key_list.append(s)
        keys = {s: ks[s][g] for s in key_list}
        vals = {s: vs[s][g] for s in key_list}
        o, lse = _softmax_attend(qt[h], key_list, keys, vals, scale, dv)
        outs.append(o)
        lses.append(lse)
    return outs, lses


def _window_row(qt, t, ks, vs, G, scale, window, dv):
    outs, lses = [], []
    for h in range(len(qt)):
        g = h // G
        key_list = []
        s = t
        while s >= 0 and s > t - window:
            key_list.insert(0, s)
            s -= 1
        keys = {s: ks[s][g] for s in key_list}
        vals = {s: vs[s][g] for s in key_list}
        o, lse = _softmax_attend(qt[h], key_list, keys, vals, scale, dv)
        outs.append(o)
        lses.append(lse)
    return outs, lses


def selected_attention(q, k, v, block_idx, *, scale=None, sel_block=64, cu_seqlens=None):
    HQ, Dk = q.shape[-2], q.shape[-1]
    G = HQ // k.shape[-2]
    dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    ql, kl, vl = _lists(q), _lists(k), _lists(v)
    il = block_idx.tolist()
    seqs, varlen = _sequences(q.shape, cu_seqlens)
    o = torch.zeros(*q.shape[:-1], dv, dtype=torch.float64)
    lse = torch.zeros(*q.shape[:-1], dtype=torch.float64)
    for b, start, end in seqs:
        qs, ks, vs = (_rows(x, b, start, end, varlen) for x in (ql, kl, vl))
        idx = _rows(il, b, start, end, varlen)
        for t in range(len(qs)):
            outs, lses = _selected_row(qs[t], t, ks, vs, idx[t], G, scale, sel_block, dv)
            row = (start + t,) if varlen else (b, t)
            o[row] = _to_tensor(outs)
            lse[row] = _to_tensor(lses)
    return o, lse


def window_attention(q, k, v, *, window=512, scale=None, cu_seqlens=None):
    HQ, Dk = q.shape[-2], q.shape[-1]
    G = HQ // k.shape[-2]
    dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    ql, kl, vl = _lists(q), _lists(k), _lists(v)
    seqs, varlen = _sequences(q.shape, cu_seqlens)
    o = torch.zeros(*q.shape[:-1], dv, dtype=torch.float64)
    lse = torch.zeros(*q.shape[:-1], dtype=torch.float64)
    for b, start, end in seqs:
        qs, ks, vs = (_rows(x, b, start, end, varlen) for x in (ql, kl, vl))
        for t in range(len(qs)):
            outs, lses = _window_row(qs[t], t, ks, vs, G, scale, window, dv)
            row = (start + t,) if varlen else (b, t)
            o[row] = _to_tensor(outs)
            lse[row] = _to_tensor(lses)
    return o, lse


def combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
    oc, os_, ow = _lists(o_cmp), _lists(o_slc), _lists(o_win)
    gc, gs, gw = _lists(g_cmp), _lists(g_slc), _lists(g_win)

    def rec(a, b_, c, x, y, z):
        if isinstance(x, list):
            return [rec(a[i], b_[i], c[i], x[i], y[i], z[i]) for i in range(len(x))]
        return [x * a[e] + y * b_[e] + z * c[e] for e in range(len(a))]

    return _to_tensor(rec(oc, os_, ow, gc, gs, gw)).reshape(o_cmp.shape)


# ----------------------------------------------------------------------------- whole NSA


def nsa_attention(q, k, v, g_cmp, g_slc, g_win, *, w_k=None, w_v=None, pe_k=None, pe_v=None,
                  cmp_block=32, cmp_stride=16, sel_block=64, top_n=16, init_blocks=1, local_blocks=2,
                  window=512, scale=None, cu_seqlens=None, return_block_idx=False):
    _check(cmp_block, cmp_stride, sel_block)
    k_c = compress(k, w_k, pe_k, block=cmp_block, stride=cmp_stride, cu_seqlens=cu_seqlens)
    v_c = compress(v, w_v, pe_v, block=cmp_block, stride=cmp_stride, cu_seqlens=cu_seqlens)
    o_cmp, lse = compressed_attention(q, k_c, v_c, scale=scale, block=cmp_block, stride=cmp_stride,
                                      cu_seqlens=cu_seqlens)
    idx = select_blocks(q, k_c, lse, scale=scale, cmp_block=cmp_block, cmp_stride=cmp_stride,
                        sel_block=sel_block, top_n=top_n, init_blocks=init_blocks,
                        local_blocks=local_blocks, cu_seqlens=cu_seqlens)
    o_slc, _ = selected_attention(q, k, v, idx, scale=scale, sel_block=sel_block, cu_seqlens=cu_seqlens)
    o_win, _ = window_attention(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens)
    o = combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    return (o, idx) if return_block_idx else o


def decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win, *,
           scale=None, cmp_block=32, cmp_stride=16, sel_block=64, top_n=16, init_blocks=1,
           local_blocks=2, window=512):
    _check(cmp_block, cmp_stride, sel_block)
    B, HQ, Dk = q.shape
    H = k_cache.shape[2]
    G = HQ // H
    dv = v_cache.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    ql, kl, vl, kcl, vcl = (_lists(x) for x in (q, k_cache, v_cache, k_cmp_cache, v_cmp_cache))
    gc, gs, gw = _lists(g_cmp), _lists(g_slc), _lists(g_win)
    out = torch.zeros(B, HQ, dv, dtype=torch.float64)
    for b in range(B):
        T = int(cache_seqlens[b])
        t = T - 1
        nc = num_compressed(T, cmp_block, cmp_stride)
        ks, vs = kl[b][:T], vl[b][:T]
        kc, vc = kcl[b][:nc], vcl[b][:nc]
        o_c, lse = _cmp_attention_row(ql[b], t, kc, vc, G, scale, cmp_block, cmp_stride, dv)
        n_sel = (T + sel_block - 1) // sel_block
        scores = _scores_row(ql[b], t, lse, kc, G, H, scale, cmp_block, cmp_stride, sel_block, n_sel)
        idx_t = [_pick(scores[g], t, sel_block, top_n, init_blocks, local_blocks) for g in range(H)]
        o_s, _ = _selected_row(ql[b], t, ks, vs, idx_t, G, scale, sel_block, dv)
        o_w, _ = _window_row(ql[b], t, ks, vs, G, scale, window, dv)
        for h in range(HQ):
            for e in range(dv):
                out[b, h, e] = gc[b][h] * o_c[h][e] + gs[b][h] * o_s[h][e] + gw[b][h] * o_w[h][e]
    return out
