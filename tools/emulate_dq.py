"""CPU emulation of the CTA-level dQ kernels (csrc/kernels/attn_bwd_dq.cuh, attn_cta_walk.cuh).

Two parts, both transliterated line by line from the CUDA code (C integer semantics where it
matters; every division here has non-negative operands):

1. Walk level: the grid (dq_ctas x heads_kv * chunks), group_of / next_pass / warp_pass per
   row group and column half, RangeKeys + range_tile_loop (compressed, window) and
   SelBlockWalk (selected: cta_next through the s_next slots, set_tiles, the two buffer sets),
   the row masks (tile_offset), dq_tile's math per 16-row group on fp64 tiles (zero-filled
   rows as cp.async leaves them) and the epilogue's addressing. Checks: the pipeline multiplies
   exactly the tile it loaded into each slot, every (token, head, column) of dq is written
   exactly once, gap / padding rows never, and dq equals a dense reference
   scale * sum_{s in K(t)} P (dP - delta) k_s with P = exp(scale q.k - lse) (0 where lse = -inf).
2. Lane level: dq_tile on 32 emulated lanes (ldmatrix / ldmatrix.trans fragments, m16n8k16
   register layouts, the C -> A repack of dS) including the column half col0 of D = 256.

Run: python3 tools/emulate_dq.py   (numpy only; no GPU, no torch)
"""
import itertools
import math
import random

import numpy as np

kBlockN, kRows = 32, 16
INT_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Configuration (DqConfig)
class Cfg:
    def __init__(self, D, DV):
        self.D, self.DV = D, DV
        self.kRowGroups = 4
        self.kColSplit = 2 if D > 192 else 1
        self.kWarps = self.kRowGroups * self.kColSplit
        self.kDqCols = D // self.kColSplit
        self.kLdQK, self.kLdV = D + 8, DV + 8
        self.kRowElems = self.kRowGroups * kRows * (self.kLdQK + self.kLdV)
        self.kTileElems = kBlockN * (self.kLdQK + self.kLdV)
        self.kRangeSmemBytes = (self.kRowElems + 2 * self.kTileElems) * 2
        sel2 = (self.kRowElems + 4 * self.kTileElems) * 2 + 2 * self.kWarps * 4
        self.kSelTilesPerSet = 2 if sel2 <= 80 * 1024 else 1
        self.kSelSmemBytes = (self.kRowElems + 2 * self.kSelTilesPerSet * self.kTileElems) * 2 + 2 * self.kWarps * 4


def check_smem_layout(cfg):
    """sQ / sdO of every row group, the stages or buffer sets and s_next: disjoint, in bounds, 16-byte aligned."""
    for sel in (False, True):
        regions = []
        for rg in range(cfg.kRowGroups):
            regions.append((rg * kRows * cfg.kLdQK * 2, kRows * cfg.kLdQK * 2))
            regions.append(((cfg.kRowGroups * kRows * cfg.kLdQK + rg * kRows * cfg.kLdV) * 2, kRows * cfg.kLdV * 2))
        nslots = 2 * cfg.kSelTilesPerSet if sel else 2
        for s in range(nslots):
            base = (cfg.kRowElems + s * cfg.kTileElems) * 2
            regions.append((base, kBlockN * cfg.kLdQK * 2))
            regions.append((base + kBlockN * cfg.kLdQK * 2, kBlockN * cfg.kLdV * 2))
        total = cfg.kSelSmemBytes if sel else cfg.kRangeSmemBytes
        if sel:
            regions.append(((cfg.kRowElems + nslots * cfg.kTileElems) * 2, 2 * cfg.kWarps * 4))
        regions.sort()
        for (a, n), (b, _) in zip(regions, regions[1:]):
            assert a + n <= b, "overlapping shared-memory regions"
        assert regions[-1][0] + regions[-1][1] <= total
        for a, n in regions[:-1] if sel else regions:
            assert a % 16 == 0, "ldmatrix / cp.async need 16-byte aligned rows"
        assert total <= 227 * 1024


# ----------------------------------------------------------------------------------------------
# Geometry (nsa_common.h, sparse_attn_common.cuh)
def num_compressed(T, l, d):
    return 0 if T < l else (T - l) // d + 1


def num_visible(t, nc, l, d):
    if t + 1 < l:
        return 0
    v = (t - l + 1) // d + 1
    return min(v, nc)


def seq_geom(p, b):
    if p.cu is None:
        return 0, p.seqlen
    s, e = p.cu[b], p.cu[b + 1]
    s = min(max(s, 0), p.total_rows)
    e = min(max(e, s), p.total_rows)
    return s, e - s


def compressed_row_begin(p, b, stride):
    if p.cu is None:
        return 0
    s = min(max(p.cu[b], 0), p.total_rows)
    return s // stride


def find_sequence(p, row):
    lo, hi, ans = 0, p.batch - 1, -1
    while lo <= hi:
        mid = (lo + hi) >> 1
        if p.cu[mid] <= row:
            ans, lo = mid, mid + 1
        else:
            hi = mid - 1
    if ans >= 0 and row >= p.cu[ans + 1]:
        return -1
    return ans


def query_row_map(p, by):
    G = p.HQ // p.H
    chunks = (G + kRows - 1) // kRows if G >= kRows else 1
    chunk = by % chunks
    g = by // chunks
    tokens = 1 if G >= kRows else kRows // G
    head0 = g * G + chunk * kRows
    heads = min(kRows, G - chunk * kRows) if G >= kRows else G
    return dict(g=g, tokens=tokens, heads=heads, head0=head0)


def group_of(p, tokens, item):
    if p.cu is None:
        if p.seqlen <= 0:
            return None
        groups = (p.seqlen + tokens - 1) // tokens
        if item >= groups * p.batch:
            return None
        return dict(b=item // groups, row0=(item % groups) * tokens)
    row0 = item * tokens
    return dict(b=0, row0=row0) if row0 < p.total_rows else None


def next_pass(p, tokens, gr, p_begin):
    if p_begin >= tokens:
        return None
    if p.cu is None:
        b, row_begin, seq_len = gr["b"], 0, p.seqlen
    else:
        b = find_sequence(p, gr["row0"] + p_begin)
        if b < 0:
            return None
        row_begin, seq_len = seq_geom(p, b)
    t0 = gr["row0"] - row_begin
    p_end = tokens
    if t0 + p_end > seq_len:
        p_end = seq_len - t0
    if p_end <= p_begin:
        return None
    return dict(b=b, row_begin=row_begin, seq_len=seq_len, t0=t0, p_begin=p_begin, p_end=p_end)


def warp_pass(cps, warp, P):
    w = dict(cps)
    w["t0"] = cps["t0"] + warp * P
    w["p_begin"] = max(cps["p_begin"] - warp * P, 0)
    w["p_end"] = min(cps["p_end"] - warp * P, P)
    if w["p_begin"] >= w["p_end"]:
        w["p_begin"] = w["p_end"] = 0
    return w


def tile_offset(x, s0):
    r = x - s0
    return -1 if r < -1 else (kBlockN + 1 if r > kBlockN + 1 else r)


def dq_ctas(p, row_groups):
    G = p.HQ // p.H
    tokens = (1 if G >= kRows else kRows // G) * row_groups
    if p.cu is not None:
        return (p.total_rows + tokens - 1) // tokens
    return p.batch * ((p.seqlen + tokens - 1) // tokens)


# ----------------------------------------------------------------------------------------------
# Problem and dense reference
class Problem:
    def __init__(self, rng, mode, D, DV, HQ, H, lens=None, batch=None, seqlen=None, window=7, l=32, d=16,
                 sel_block=32, top_n=3, neg_inf_rows=0):
        self.mode, self.D, self.DV, self.HQ, self.H = mode, D, DV, HQ, H
        self.window, self.l, self.d, self.sel_block, self.top_n = window, l, d, sel_block, top_n
        if lens is not None:
            self.cu = [0] + list(itertools.accumulate(lens))
            self.batch, self.total_rows, self.seqlen = len(lens), self.cu[-1], 0
            seqs = [(self.cu[b], lens[b]) for b in range(self.batch)]
        else:
            self.cu, self.batch, self.seqlen, self.total_rows = None, batch, seqlen, seqlen
            seqs = [(b * seqlen, seqlen) for b in range(batch)]
        self.seqs = seqs
        nrows = sum(n for _, n in seqs)
        self.nrows = nrows
        self.scale = 1.0 / math.sqrt(D)
        # Rows of q / dout / lse / delta / dq: padded batch b, position t -> b * seqlen + t.
        self.q = rng.standard_normal((nrows, HQ, D))
        self.dout = rng.standard_normal((nrows, HQ, DV))
        self.delta = rng.standard_normal((nrows, HQ))
        if mode == "cmp":
            # Packed compressed keys: sequence b at rows cu[b] // d (gap rows NaN: must never be read).
            if self.cu is not None:
                nk_rows = self.total_rows // d + 1
                self.k = np.full((nk_rows, H, D), np.nan)
                self.v = np.full((nk_rows, H, DV), np.nan)
                for b, (s, n) in enumerate(seqs):
                    nc = num_compressed(n, l, d)
                    r0 = compressed_row_begin(self, b, d)
                    self.k[r0:r0 + nc] = rng.standard_normal((nc, H, D))
                    self.v[r0:r0 + nc] = rng.standard_normal((nc, H, DV))
            else:
                nc = num_compressed(seqlen, l, d)
                self.k = rng.standard_normal((batch * max(nc, 1), H, D))
                self.v = rng.standard_normal((batch * max(nc, 1), H, DV))
                self.seqlen_k = nc
        else:
            self.k = rng.standard_normal((nrows, H, D))
            self.v = rng.standard_normal((nrows, H, DV))
        if mode == "sel":
            # Unsorted, duplicates, -1, negative, past the sequence's blocks, non-causal blocks.
            self.block_idx = np.zeros((nrows, H, top_n), dtype=np.int64)
            for b, (s, n) in enumerate(seqs):
                nb = (n + sel_block - 1) // sel_block
                for t in range(n):
                    for g in range(H):
                        lst = [rng.integers(-2, nb + 2) for _ in range(top_n)]
                        if top_n >= 2 and rng.random() < 0.3:
                            lst[1] = lst[0]
                        self.block_idx[s + t, g] = lst
        self.G = HQ // H
        self.lse = np.zeros((nrows, HQ))
        for b, (s, n) in enumerate(seqs):
            for t in range(n):
                for hq in range(HQ):
                    keys = self.keys_of(b, t, hq // self.G)
                    if not keys:
                        self.lse[s + t, hq] = -np.inf
                        continue
                    kr = self.key_rows(b, keys)
                    sc = self.scale * self.k[kr, hq // self.G] @ self.q[s + t, hq]
                    m = sc.max()
                    self.lse[s + t, hq] = m + math.log(np.exp(sc - m).sum())
        # Rows with lse = -inf although they have keys contribute nothing.
        for _ in range(neg_inf_rows):
            self.lse[rng.integers(0, nrows), rng.integers(0, HQ)] = -np.inf

    def keys_of(self, b, t, g):
        n = self.seqs[b][1]
        if self.mode == "win":
            return list(range(max(0, t - self.window + 1), t + 1))
        if self.mode == "cmp":
            return list(range(num_visible(t, num_compressed(n, self.l, self.d), self.l, self.d)))
        nb = (n + self.sel_block - 1) // self.sel_block
        blocks = sorted({int(j) for j in self.block_idx[self.seqs[b][0] + t, g] if 0 <= j < nb})
        return [s for j in blocks for s in range(j * self.sel_block, min((j + 1) * self.sel_block, t + 1, n))]

    def key_rows(self, b, keys):
        if self.mode == "cmp":
            r0 = compressed_row_begin(self, b, self.d) if self.cu is not None else b * self.seqlen_k
        else:
            r0 = self.seqs[b][0]
        return [r0 + s for s in keys]

    def reference_dq(self):
        dq = np.zeros((self.nrows, self.HQ, self.D))
        for b, (s, n) in enumerate(self.seqs):
            for t in range(n):
                for hq in range(self.HQ):
                    g = hq // self.G
                    keys = self.keys_of(b, t, g)
                    if not keys or self.lse[s + t, hq] == -np.inf:
                        continue
                    kr = self.key_rows(b, keys)
                    P = np.exp(self.scale * self.k[kr, g] @ self.q[s + t, hq] - self.lse[s + t, hq])
                    dP = self.v[kr, g] @ self.dout[s + t, hq]
                    dq[s + t, hq] = self.scale * ((P * (dP - self.delta[s + t, hq])) @ self.k[kr, g])
        return dq


# ----------------------------------------------------------------------------------------------
# The kernels
class Emu:
    def __init__(self, p, cfg):
        self.p, self.cfg = p, cfg
        self.dq = np.full((p.nrows, p.HQ, p.D), np.nan)
        self.writes = np.zeros((p.nrows, p.HQ, p.D), dtype=np.int64)
        self.tiles_loaded = 0

    # Rows of q / dout / lse: packed -> row; padded -> b * seqlen + row (the batch stride).
    def qrow(self, ps, t):
        return (0 if self.p.cu is not None else ps["b"] * self.p.seqlen) + ps["row_begin"] + t

    def kv_tile(self, kv_row_begin, s0, n_keys, b, g):
        """load_rows_cta: rows outside [0, n_keys) zero-filled, never read."""
        p = self.p
        K = np.zeros((kBlockN, p.D))
        V = np.zeros((kBlockN, p.DV))
        off = 0
        if p.cu is None:
            off = b * (p.seqlen_k if p.mode == "cmp" else p.seqlen)
        for r in range(kBlockN):
            s = s0 + r
            if 0 <= s < n_keys:
                K[r] = p.k[off + kv_row_begin + s, g]
                V[r] = p.v[off + kv_row_begin + s, g]
                assert not np.isnan(K[r]).any(), "read a gap row"
        self.tiles_loaded += 1
        return K, V

    def dq_rows(self, rm, wps, gid):
        p = self.p
        rw = dict(tok=[0, 0], on=[False, False], lse_l2=[math.inf] * 2, delta=[0.0] * 2)
        for ri in range(2):
            r = gid + ri * 8
            rw["tok"][ri] = r // rm["heads"]
            rw["on"][ri] = r < rm["tokens"] * rm["heads"] and wps["p_begin"] <= rw["tok"][ri] < wps["p_end"]
            if rw["on"][ri]:
                row = self.qrow(wps, wps["t0"] + rw["tok"][ri])
                l = p.lse[row, rm["head0"] + r % rm["heads"]]
                rw["lse_l2"][ri] = math.inf if l == -math.inf else l * math.log2(math.e)
                rw["delta"][ri] = p.delta[row, rm["head0"] + r % rm["heads"]]
        return rw

    def group_rows(self, rm, wps):
        """Q and dO of the row group as load_query_rows_async leaves them (16 rows; off rows zero)."""
        p = self.p
        Q = np.zeros((kRows, p.D))
        dO = np.zeros((kRows, p.DV))
        for r in range(kRows):
            tok, hh = r // rm["heads"], r % rm["heads"]
            if wps["p_begin"] <= tok < wps["p_end"] and r < rm["tokens"] * rm["heads"]:
                row = self.qrow(wps, wps["t0"] + tok)
                Q[r] = p.q[row, rm["head0"] + hh]
                dO[r] = p.dout[row, rm["head0"] + hh]
        return Q, dO

    def dq_tile(self, Q, dO, K, V, col0, rws, acc, keep):
        """Per 16-row group: rows gid, gid + 8 of thread (gid, *) use rws[gid]."""
        cfg, p = self.cfg, self.p
        S = Q @ K.T
        dP = dO @ V.T
        dS = np.zeros((kRows, kBlockN))
        sl2 = p.scale * math.log2(math.e)
        for gid in range(8):
            rw = rws[gid]
            for ri in range(2):
                r = gid + 8 * ri
                for kk in range(kBlockN):
                    pr = 2.0 ** (S[r, kk] * sl2 - rw["lse_l2"][ri]) if keep(gid, ri, kk) else 0.0
                    dS[r, kk] = pr * (dP[r, kk] - rw["delta"][ri])
        acc += dS @ K[:, col0:col0 + cfg.kDqCols]

    def epilogue(self, rm, wps, rws, col0, acc):
        p, cfg = self.p, self.cfg
        for gid in range(8):
            rw = rws[gid]
            for ri in range(2):
                if not rw["on"][ri]:
                    continue
                r = gid + 8 * ri
                row = self.qrow(wps, wps["t0"] + rw["tok"][ri])
                hq = rm["head0"] + r % rm["heads"]
                self.dq[row, hq, col0:col0 + cfg.kDqCols] = acc[r] * p.scale
                self.writes[row, hq, col0:col0 + cfg.kDqCols] += 1

    def run(self):
        p, cfg = self.p, self.cfg
        G = p.HQ // p.H
        chunks = (G + kRows - 1) // kRows if G >= kRows else 1
        for by in range(p.H * chunks):
            for bx in range(dq_ctas(p, cfg.kRowGroups)):
                (self.range_cta if p.mode in ("win", "cmp") else self.sel_cta)(bx, by)

    def warps(self, rm, ps):
        P = rm["tokens"]
        for warp in range(self.cfg.kWarps):
            rgrp, half = warp % self.cfg.kRowGroups, warp // self.cfg.kRowGroups
            yield warp, rgrp, half * self.cfg.kDqCols, warp_pass(ps, rgrp, P)

    def range_cta(self, bx, by):
        p, cfg = self.p, self.cfg
        rm = query_row_map(p, by)
        P = rm["tokens"]
        cta_tokens = P * cfg.kRowGroups
        gr = group_of(p, cta_tokens, bx)
        if gr is None:
            return
        pb = 0
        while True:
            ps = next_pass(p, cta_tokens, gr, pb)
            if ps is None:
                break
            comp = p.mode == "cmp"
            nc = num_compressed(ps["seq_len"], p.l, p.d) if comp else 0
            kv_row_begin = (compressed_row_begin(p, ps["b"], p.d) if p.cu is not None else 0) if comp else ps["row_begin"]
            n_keys = nc if comp else ps["seq_len"]

            def tiles_of(t_first, t_last):
                if comp:
                    return 0, num_visible(t_last, nc, p.l, p.d)
                lo = t_first - p.window + 1
                lo = 0 if lo < 0 else (lo // kBlockN) * kBlockN
                return lo, t_last + 1

            def row_keys(t, on):
                lo = 0 if comp else t - p.window + 1
                hi = 0 if not on else (num_visible(t, nc, p.l, p.d) if comp else t + 1)
                return lo, hi

            lo, hi = tiles_of(ps["t0"] + ps["p_begin"], ps["t0"] + ps["p_end"] - 1)
            n_tiles = (hi - lo + kBlockN - 1) // kBlockN if hi > lo else 0
            state = []
            for warp, rgrp, col0, wps in self.warps(rm, ps):
                warp_on = wps["p_begin"] < wps["p_end"]
                w_lo, w_hi = tiles_of(wps["t0"] + wps["p_begin"], wps["t0"] + wps["p_end"] - 1) if warp_on else (0, 0)
                rws = [self.dq_rows(rm, wps, gid) for gid in range(8)]
                bounds = [[row_keys(wps["t0"] + rw["tok"][ri], rw["on"][ri]) for ri in range(2)] for rw in rws]
                Q, dO = self.group_rows(rm, wps)
                state.append(dict(wps=wps, on=warp_on, w=(w_lo, w_hi), rws=rws, bounds=bounds, Q=Q, dO=dO, col0=col0,
                                  acc=np.zeros((kRows, cfg.kDqCols))))
            stages = [None, None]
            if n_tiles > 0:
                stages[0] = (lo,) + self.kv_tile(kv_row_begin, lo, n_keys, ps["b"], rm["g"])
            for it in range(n_tiles):
                if it + 1 < n_tiles:
                    s1 = lo + (it + 1) * kBlockN
                    stages[(it + 1) & 1] = (s1,) + self.kv_tile(kv_row_begin, s1, n_keys, ps["b"], rm["g"])
                s0 = lo + it * kBlockN
                st = stages[it & 1]
                assert st[0] == s0, "stage holds another tile"
                for w in state:
                    if w["on"] and s0 < w["w"][1] and s0 + kBlockN > w["w"][0]:
                        b = w["bounds"]
                        keep = lambda gid, ri, kk: tile_offset(b[gid][ri][0], s0) <= kk < tile_offset(b[gid][ri][1], s0)
                        self.dq_tile(w["Q"], w["dO"], st[1], st[2], w["col0"], w["rws"], w["acc"], keep)
            for w in state:
                self.epilogue(rm, w["wps"], w["rws"], w["col0"], w["acc"])
            pb = ps["p_end"]

    def sel_cta(self, bx, by):
        p, cfg = self.p, self.cfg
        rm = query_row_map(p, by)
        P = rm["tokens"]
        cta_tokens = P * cfg.kRowGroups
        gr = group_of(p, cta_tokens, bx)
        if gr is None:
            return
        kTPS = cfg.kSelTilesPerSet
        pb = 0
        while True:
            ps = next_pass(p, cta_tokens, gr, pb)
            if ps is None:
                break
            lp = p.sel_block
            tiles_per_block = lp // kBlockN
            seq_len = ps["seq_len"]
            t_last_cta = ps["t0"] + ps["p_end"] - 1
            n_blocks_seq = (seq_len + lp - 1) // lp
            state = []
            for warp, rgrp, col0, wps in self.warps(rm, ps):
                lists = {}
                for lane in range(32):
                    if wps["p_begin"] <= lane < wps["p_end"]:
                        lists[lane] = [int(x) for x in p.block_idx[self.qrow(ps, wps["t0"] + lane), rm["g"]]]
                rws = [self.dq_rows(rm, wps, gid) for gid in range(8)]
                Q, dO = self.group_rows(rm, wps)
                state.append(dict(wps=wps, lists=lists, rws=rws, Q=Q, dO=dO, col0=col0,
                                  acc=np.zeros((kRows, cfg.kDqCols))))
            s_next = [None] * (2 * cfg.kWarps)
            parity = [0]

            def cta_next(last):
                # every warp: its lanes' minimum, lane 0 writes the slot; barrier; all read all slots
                mines = []
                for warp, w in enumerate(state):
                    mine = {}
                    for lane, lst in w["lists"].items():
                        m = INT_MAX
                        for j in lst:
                            if last < j < m and j < n_blocks_seq:
                                m = j
                        mine[lane] = m
                    jw = min(mine.values(), default=INT_MAX)
                    s_next[parity[0] * cfg.kWarps + warp] = jw
                    mines.append(mine)
                j = min(s_next[parity[0] * cfg.kWarps + w] for w in range(cfg.kWarps))
                parity[0] ^= 1
                masks = [sum(1 << lane for lane, m in mine.items() if m == j) for mine in mines]
                return j, masks

            def set_tiles(j, sub):
                s0 = j * lp + sub * kBlockN
                n = min(kTPS, tiles_per_block - sub)
                end = min(seq_len, t_last_cta + 1)
                while n > 0 and s0 + (n - 1) * kBlockN >= end:
                    n -= 1
                return n

            buf = {}

            def load_set(st, j, sub, n):
                for x in range(n):
                    s0 = j * lp + (sub + x) * kBlockN
                    buf[st * kTPS + x] = (s0,) + self.kv_tile(ps["row_begin"], s0, seq_len, ps["b"], rm["g"])

            j, mask = cta_next(-1)
            sub, st = 0, 0
            n = 0 if j == INT_MAX else set_tiles(j, 0)
            while j != INT_MAX and n == 0:
                j, mask = cta_next(j)
                n = 0 if j == INT_MAX else set_tiles(j, 0)
            if n > 0:
                load_set(st, j, sub, n)
            while n > 0:
                nj, nsub, nn = j, sub + kTPS, 0
                nmask = mask
                if nsub < tiles_per_block:
                    nn = set_tiles(nj, nsub)
                while nn == 0:
                    nj, nmask = cta_next(nj)
                    if nj == INT_MAX:
                        break
                    nsub = 0
                    nn = set_tiles(nj, 0)
                if nn > 0:
                    pending = dict(buf)
                    load_set(st ^ 1, nj, nsub, nn)
                    for x in range(n):  # the prefetch must not touch the set being multiplied
                        assert buf[st * kTPS + x] is pending[st * kTPS + x]
                for warp, w in enumerate(state):
                    m = mask[warp]
                    # column halves of one row group see one mask: they skip or multiply together
                    assert m == mask[warp % cfg.kRowGroups]
                    if m == 0:
                        continue
                    for x in range(n):
                        s0 = j * lp + (sub + x) * kBlockN
                        tile = buf[st * kTPS + x]
                        assert tile[0] == s0, "buffer slot holds another tile"
                        wps = w["wps"]
                        hi_rel = []
                        for rw in w["rws"]:
                            h = []
                            for ri in range(2):
                                t = wps["t0"] + rw["tok"][ri]
                                sel = rw["on"][ri] and ((m >> rw["tok"][ri]) & 1)
                                h.append(tile_offset(min(t + 1, seq_len), s0) if sel else 0)
                            hi_rel.append(h)
                        keep = lambda gid, ri, kk: kk < hi_rel[gid][ri]
                        self.dq_tile(w["Q"], w["dO"], tile[1], tile[2], w["col0"], w["rws"], w["acc"], keep)
                j, sub, n, mask = nj, nsub, nn, nmask
                st ^= 1
            for w in state:
                self.epilogue(rm, w["wps"], w["rws"], w["col0"], w["acc"])
            pb = ps["p_end"]


def check_walk(p, cfg):
    e = Emu(p, cfg)
    e.run()
    ref = p.reference_dq()
    valid = np.zeros(p.nrows, dtype=bool)
    for s, n in p.seqs:
        valid[s:s + n] = True
    assert (e.writes[valid] == 1).all(), f"dq elements written {e.writes[valid].min()}..{e.writes[valid].max()} times"
    assert (e.writes[~valid] == 0).all()
    err = np.abs(e.dq[valid] - ref[valid]).max() if valid.any() else 0.0
    assert err < 1e-9, f"dq differs from the reference by {err}"
    return e.tiles_loaded


# ----------------------------------------------------------------------------------------------
# Lane level: dq_tile on 32 lanes
def to_bf16(x):
    """Round fp64 -> bf16 -> value (round to nearest even on the fp32 bits)."""
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def ldmatrix_x4(smem, addrs, trans=False):
    """addrs[lane]: row address (flat index) of row lane % 8 of matrix lane / 8. Returns r[lane][i] = (lo, hi)."""
    out = [[None] * 4 for _ in range(32)]
    for i in range(4):
        M = np.array([smem[addrs[8 * i + r8]:addrs[8 * i + r8] + 8] for r8 in range(8)])
        if trans:
            M = M.T
        for lane in range(32):
            out[lane][i] = (M[lane // 4, 2 * (lane % 4)], M[lane // 4, 2 * (lane % 4) + 1])
    return out


def mma(c, a, b):
    """c[lane][4] += A(16x16) B(16x8) with the register layouts of mma_sm80.cuh."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for reg, (r, cc) in enumerate([(gid, 2 * tig), (gid + 8, 2 * tig), (gid, 2 * tig + 8), (gid + 8, 2 * tig + 8)]):
            A[r, cc], A[r, cc + 1] = a[lane][reg]
        for reg, kr in enumerate([2 * tig, 2 * tig + 8]):
            B[kr, gid], B[kr + 1, gid] = b[lane][reg]
    C = A @ B
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        c[lane][0] += C[gid, 2 * tig]
        c[lane][1] += C[gid, 2 * tig + 1]
        c[lane][2] += C[gid + 8, 2 * tig]
        c[lane][3] += C[gid + 8, 2 * tig + 1]


def gemm_16x32_nt(smem, sA, lda, sB, ldb, kDim):
    acc = [[[0.0] * 4 for _ in range(4)] for _ in range(32)]
    for k0 in range(0, kDim, 16):
        a_addr = [sA + (((l >> 3) & 1) * 8 + (l & 7)) * lda + ((l >> 3) >> 1) * 8 + k0 for l in range(32)]
        a = ldmatrix_x4(smem, a_addr)
        for np_ in range(2):
            b_addr = [sB + (((l >> 3) >> 1) * 8 + (l & 7)) * ldb + ((l >> 3) & 1) * 8 + np_ * 16 * ldb + k0
                      for l in range(32)]
            bq = ldmatrix_x4(smem, b_addr)
            for nn, regs in ((2 * np_, (0, 1)), (2 * np_ + 1, (2, 3))):
                c = [acc[l][nn] for l in range(32)]
                mma(c, a, [[bq[l][regs[0]], bq[l][regs[1]]] for l in range(32)])
    return acc


def gemm_16x32_regs_nn(acc, pf, smem, sB, ldb, kDimOut):
    for kk in range(2):
        a = [[(to_bf16(pf[l][2 * kk][0]), to_bf16(pf[l][2 * kk][1])), (to_bf16(pf[l][2 * kk][2]), to_bf16(pf[l][2 * kk][3])),
              (to_bf16(pf[l][2 * kk + 1][0]), to_bf16(pf[l][2 * kk + 1][1])),
              (to_bf16(pf[l][2 * kk + 1][2]), to_bf16(pf[l][2 * kk + 1][3]))] for l in range(32)]
        for np_ in range(kDimOut // 16):
            b_addr = [sB + (((l >> 3) & 1) * 8 + (l & 7)) * ldb + ((l >> 3) >> 1) * 8 + kk * 16 * ldb + np_ * 16
                      for l in range(32)]
            bq = ldmatrix_x4(smem, b_addr, trans=True)
            for nn, regs in ((2 * np_, (0, 1)), (2 * np_ + 1, (2, 3))):
                c = [acc[l][nn] for l in range(32)]
                mma(c, a, [[bq[l][regs[0]], bq[l][regs[1]]] for l in range(32)])


def check_lanes(rng, D, DV, col0, kDqCols):
    ldq, ldv = D + 8, DV + 8
    # smem: [sQ 16 x ldq][sdO 16 x ldv][sK 32 x ldq][sV 32 x ldv]; padding columns hold garbage
    sQ, sdO = 0, 16 * ldq
    sK = sdO + 16 * ldv
    sV = sK + 32 * ldq
    smem = rng.standard_normal(sV + 32 * ldv) * 1e6
    Q, dO, K, V = (to_bf16(rng.standard_normal(s)) for s in ((16, D), (16, DV), (32, D), (32, DV)))
    for base, M, ld in ((sQ, Q, ldq), (sdO, dO, ldv), (sK, K, ldq), (sV, V, ldv)):
        for r in range(M.shape[0]):
            smem[base + r * ld:base + r * ld + M.shape[1]] = M[r]
    scale_log2 = 0.125 * math.log2(math.e)
    lse_l2 = rng.standard_normal(16) + 2.0
    lse_l2[3] = math.inf  # a row with no key
    delta = rng.standard_normal(16)
    lo = rng.integers(-1, 20, 16)
    hi = rng.integers(0, 34, 16)
    keep = lambda r, kk: lo[r] <= kk < hi[r]
    # the kernel
    s_acc = gemm_16x32_nt(smem, sQ, ldq, sK, ldq, D)
    dp_acc = gemm_16x32_nt(smem, sdO, ldv, sV, ldv, DV)
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for ri in range(2):
            for n in range(4):
                for e in range(2):
                    r = gid + 8 * ri
                    x = s_acc[lane][n][ri * 2 + e]
                    pr = 2.0 ** (x * scale_log2 - lse_l2[r]) if keep(r, n * 8 + 2 * tig + e) else 0.0
                    s_acc[lane][n][ri * 2 + e] = pr * (dp_acc[lane][n][ri * 2 + e] - delta[r])
    acc = [[[0.0] * 4 for _ in range(kDqCols // 8)] for _ in range(32)]
    gemm_16x32_regs_nn(acc, s_acc, smem, sK + col0, ldq, kDqCols)
    got = np.zeros((16, kDqCols))
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for n in range(kDqCols // 8):
            got[gid, n * 8 + 2 * tig:n * 8 + 2 * tig + 2] = acc[lane][n][0:2]
            got[gid + 8, n * 8 + 2 * tig:n * 8 + 2 * tig + 2] = acc[lane][n][2:4]
    # plain matrices
    S, dP = Q @ K.T, dO @ V.T
    mask = np.array([[keep(r, kk) for kk in range(32)] for r in range(16)])
    P = np.where(mask, 2.0 ** (S * scale_log2 - lse_l2[:, None]), 0.0)
    dS = to_bf16(P * (dP - delta[:, None]))
    want = dS @ K[:, col0:col0 + kDqCols]
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < 1e-12, err


def main():
    rng = np.random.default_rng(0)
    random.seed(0)
    dims = [(64, 64), (128, 128), (192, 128), (256, 256)]
    for D, DV in dims:
        cfg = Cfg(D, DV)
        check_smem_layout(cfg)
        print(f"D={D}/{DV}: warps {cfg.kWarps}, col split {cfg.kColSplit}, range smem {cfg.kRangeSmemBytes} B, "
              f"selected {cfg.kSelTilesPerSet} tile(s)/set, {cfg.kSelSmemBytes} B")
    # lane level, both column halves of D = 256 and the full width of the others
    for D, DV in dims:
        cfg = Cfg(D, DV)
        for half in range(cfg.kColSplit):
            check_lanes(rng, D, DV, half * cfg.kDqCols, cfg.kDqCols)
    print("lane-level dq_tile: ok (all head dims, both column halves of D = 256)")

    # walk level: small head dims keep the fp64 products cheap; D = 256 exercises the column split
    cases = []
    lens_sets = [[5, 0, 37, 1, 70, 0, 33], [1], [0, 0, 3], [64, 31, 129]]
    for mode in ("win", "cmp", "sel"):
        for (D, DV) in ((16, 16), (256, 256)):
            for HQ, H in ((2, 2), (4, 2), (6, 2), (16, 2), (16, 1), (32, 1), (20, 1), (3, 1)):
                if D == 256 and (HQ, H) not in ((4, 2), (32, 1)):
                    continue
                for lens in lens_sets[:2 if D == 256 else 4]:
                    cases.append(dict(mode=mode, D=D, DV=DV, HQ=HQ, H=H, lens=lens))
                cases.append(dict(mode=mode, D=D, DV=DV, HQ=HQ, H=H, batch=2, seqlen=45))
    n_tiles = 0
    for i, c in enumerate(cases):
        kw = dict(c)
        mode, D, DV = kw.pop("mode"), kw.pop("D"), kw.pop("DV")
        extra = {}
        if mode == "win":
            extra["window"] = [1, 7, 40, 512][i % 4]
        if mode == "cmp":
            extra["l"], extra["d"] = [(32, 16), (16, 8), (8, 8), (32, 32)][i % 4]
        if mode == "sel":
            extra["sel_block"] = [32, 64, 96][i % 3]
            extra["top_n"] = [1, 3, 5][i % 3]
        p = Problem(rng, mode, D, DV, neg_inf_rows=2, **kw, **extra)
        cfg = Cfg(D, DV)
        if D == 16:  # the walk does not depend on the head dim: D = 16, both buffer-set sizes
            cfg.kColSplit, cfg.kWarps, cfg.kDqCols = 1, 4, 16
            cfg.kSelTilesPerSet = 1 + i % 2
        n_tiles += check_walk(p, cfg)
    print(f"walk-level dq: ok ({len(cases)} cases, {n_tiles} K/V tiles loaded)")


if __name__ == "__main__":
    main()
