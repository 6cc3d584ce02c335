"""Property-based fuzzing (hypothesis) of shapes and hyper-parameters, issue 7 item 5.

CPU path of every op (float64) against the naive per-token loops of tests/naive.py: exact
``block_idx``, values to ~1e-9, gradients against nsa_cuda.reference's autograd. Invariants checked
on the same draws: outputs finite, rows that see no key give ``o = 0`` / ``lse = -inf`` / zero
gradient, forward and backward bitwise identical across two runs, a packed batch equals its
sequences run one by one as padded batches (bitwise), rows of a packed compressed tensor that belong
to no sequence ("gap rows", here filled with NaN) and cache rows past ``cache_seqlens`` are never
read, NaN injected into one sequence of a packed batch leaves the other sequences bitwise unchanged
(and neither hangs nor crashes).

The CUDA variant fuzzes nsa_cuda.compress (bf16, head dims 64 / 128) against the reference with the
FlashAttention-style bound of tests/helpers.py, a fixed budget of 25 cases, skipped without a GPU.

Every test is ``derandomize=True`` with no example database, so CI runs the same cases every time.
"""
import importlib.util
import math
import pathlib
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsa_cuda
from nsa_cuda import reference as R
from helpers import HAS_CUDA

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name, path):  # same loading as tests/test_reference.py (shares the module object)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


naive = _load("nsa_naive", ROOT / "tests" / "naive.py")


pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64
TOL = 1e-9  # float64 op vs float64 loops
LSE_TOL = 1e-6  # lse is stored in fp32


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------
# The drawn problem: layout, heads, head dims, compression / selection geometry, a seed.


class Problem:
    def __init__(self, lens, B, T, H, G, Dk, Dv, l, d, sel, scale, seed):
        self.packed = lens is not None
        self.lens = list(lens) if self.packed else [T] * B
        self.B, self.T = B, T
        self.H, self.G, self.HQ = H, G, H * G
        self.Dk, self.Dv, self.l, self.d, self.sel, self.scale = Dk, Dv, l, d, sel, scale
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.starts = [sum(self.lens[:b]) for b in range(len(self.lens))] if self.packed else [0] * B

    def __repr__(self):
        lay = f"lens={self.lens}" if self.packed else f"B={self.B}, T={self.T}"
        return (f"Problem({lay}, H={self.H}, G={self.G}, Dk={self.Dk}, Dv={self.Dv}, l={self.l}, d={self.d}, "
                f"sel={self.sel}, scale={self.scale}, seed={self.seed})")

    @property
    def nseq(self):
        return len(self.lens)

    @property
    def total(self):
        return sum(self.lens)

    @property
    def lead(self):
        return (self.total,) if self.packed else (self.B, self.T)

    @property
    def cu(self):
        if not self.packed:
            return None
        return torch.tensor([0] + [sum(self.lens[:b + 1]) for b in range(self.nseq)], dtype=torch.int32)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=F64)

    def tokens(self, *tail):
        return self.randn(*self.lead, *tail)

    def rows(self, b):
        """Index of sequence b's token rows in a [B, T, ...] / [total, ...] tensor."""
        return slice(self.starts[b], self.starts[b] + self.lens[b]) if self.packed else b

    def seq(self, x, b):
        return x[self.rows(b)]

    # compressed tokens ---------------------------------------------------------------------
    def nc(self, T):
        return naive.num_compressed(T, self.l, self.d)

    def cmp_rows(self, b):
        if not self.packed:
            return b
        s = self.starts[b] // self.d
        return slice(s, s + self.nc(self.lens[b]))

    def cmp_shape(self, heads, dim):
        if self.packed:
            return (self.total // self.d, heads, dim)
        return (self.B, self.nc(self.T), heads, dim)

    def gap_mask(self):
        """Rows of a packed compressed tensor owned by no sequence (always False when padded)."""
        n = self.total // self.d if self.packed else 0
        mask = torch.ones(n, dtype=torch.bool)
        if self.packed:
            for b in range(self.nseq):
                mask[self.cmp_rows(b)] = False
        return mask

    def compressed(self, heads, dim, gap_value=math.nan):
        x = self.randn(*self.cmp_shape(heads, dim))
        if self.packed:
            x[self.gap_mask()] = gap_value
        return x

    def nblocks(self, T):
        return -(-T // self.sel)


def _length(l, lo=0):
    edges = [t for t in (0, 1, l - 1, l, l + 1, 2 * l) if t >= lo]
    return st.one_of(st.sampled_from(edges), st.integers(lo, 100), st.integers(max(lo, 40), 100))


@st.composite
def problems(draw, packed=None, min_seqs=1, max_tokens=200):
    l = draw(st.sampled_from([8, 16, 32]))
    d = draw(st.sampled_from([x for x in (1, 2, 4, 8, 16, 32) if l % x == 0]))
    sel = draw(st.sampled_from([m * d for m in range(1, 65) if 8 <= m * d <= 64]))
    packed = draw(st.booleans()) if packed is None else packed
    H = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 4]))
    # keep the naive loops quick: fewer tokens with many heads or many compressed tokens (small d)
    max_tokens = min(max_tokens, 1000 // (H * G))
    if d < 4:
        max_tokens //= 2
    lens = B = T = None
    if packed:
        lens = draw(st.lists(_length(l), min_size=min_seqs, max_size=4))
        if sum(lens) > max_tokens:
            s = sum(lens)
            lens = [x * max_tokens // s for x in lens]
    else:
        B = draw(st.integers(1, 3))
        T = min(draw(_length(l, lo=1)), max_tokens)
        B = max(1, min(B, max_tokens // T))
    Dk = draw(st.integers(1, 8))
    Dv = draw(st.integers(1, 8))
    scale = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return Problem(lens, B, T, H, G, Dk, Dv, l, d, sel, scale, seed)


# ---------------------------------------------------------------------------------------------
# helpers


def close(actual, expected, tol=TOL, msg=""):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol,
                               msg=lambda m: f"{msg}: {m}" if msg else m)


def leaf(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def grads(outs, inputs, gos):
    """d(sum outs*gos)/d(inputs); None (unused / no input) becomes zeros."""
    live = [t for t in inputs if t is not None]
    pairs = [(o, g) for o, g in zip(outs, gos) if g is not None]
    got = torch.autograd.grad([o for o, _ in pairs], live, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(live, got)]


def assert_bitwise(a, b, what):
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}[{i}]: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)) and torch.equal(x.isnan(), y.isnan()), \
            f"{what}[{i}] differs"


def finite(*ts):
    for t in ts:
        assert torch.isfinite(t).all(), "non-finite output on finite input"


def assert_no_key_rows(o, lse, lse_naive, dq=None):
    """Rows where the naive loops find no visible key: o = 0, lse = -inf, zero dq."""
    empty = torch.isneginf(lse_naive)
    assert torch.equal(torch.isneginf(lse), empty), "lse = -inf exactly on the rows without keys"
    assert (o[empty] == 0).all(), "rows without keys must give o = 0"
    if dq is not None:
        assert (dq[empty] == 0).all(), "rows without keys must give a zero dq"


def assert_block_idx_well_formed(idx, p, top_n):
    """Each row: ascending valid block indices of its own sequence, then -1 padding."""
    for b in range(p.nseq):
        rows = p.seq(idx, b)
        T = p.lens[b]
        if T == 0:
            continue
        t = torch.arange(T).view(T, 1, 1)
        valid = rows >= 0
        assert (rows >= -1).all()
        assert (rows[valid] < p.nblocks(T)).all(), "a block past the end of its sequence"
        assert (torch.where(valid, rows * p.sel, 0) <= t).all(), "a selected block starts after its query"
        # valid entries first, then padding; strictly ascending among the valid ones
        assert (valid[..., 1:] <= valid[..., :-1]).all(), "-1 padding must be at the end"
        both = valid[..., 1:] & valid[..., :-1]
        assert (rows[..., 1:] > rows[..., :-1])[both].all(), "indices must be strictly ascending"
        assert (valid.sum(-1) == torch.clamp(t.view(T, 1) // p.sel + 1, max=top_n)).all(), \
            "min(top_n, number of valid blocks) entries per row"


def rand_block_idx(p, n):
    """Random block_idx [.., H, n]: entries -1 or a block of the row's own sequence (in any order,
    duplicates allowed: a union), never past the sequence."""
    idx = torch.full((*p.lead, p.H, n), -1, dtype=torch.int32)
    for b in range(p.nseq):
        T = p.lens[b]
        if T == 0:
            continue
        vals = torch.randint(-1, p.nblocks(T), (T, p.H, n), generator=p.gen, dtype=torch.int32)
        idx[p.rows(b)] = vals
    return idx


# ---------------------------------------------------------------------------------------------
# every op against the naive loops (+ gradients against the reference, determinism, finiteness)


@fuzz(250)
@given(p=problems(), mode=st.sampled_from(["mean", "linear", "linear_pe"]), dout=st.integers(1, 6))
def test_compress_vs_naive(p, mode, dout):
    x = p.tokens(p.H, p.Dk)
    w = p.randn(p.H, p.l * p.Dk, dout) if mode != "mean" else None
    pe = p.randn(p.H, p.l, p.Dk) if mode == "linear_pe" else None
    kw = dict(block=p.l, stride=p.d, cu_seqlens=p.cu)
    out_shape = p.cmp_shape(p.H, dout if w is not None else p.Dk)
    go = p.randn(*out_shape)

    def run(fn):
        a = leaf(x, w, pe)
        y = fn(*a, **kw)
        return y.detach(), grads([y], a, [go])

    y, g = run(nsa_cuda.compress)
    y2, g2 = run(nsa_cuda.compress)
    assert_bitwise([y, *g], [y2, *g2], "compress fwd/bwd across runs")
    assert tuple(y.shape) == out_shape
    close(y, naive.compress(x, w, pe, **kw), msg="y vs naive")
    finite(y, *g)
    if p.packed:
        assert (y[p.gap_mask()] == 0).all(), "gap rows of the packed output are zero"
    y_r, g_r = run(R.compress)
    for name, a, b in zip(("dx", "dw", "dpe"), g, g_r):
        close(a, b, msg=f"{name} vs reference")


@fuzz(250)
@given(p=problems())
def test_compressed_attention_vs_naive(p):
    q = p.tokens(p.HQ, p.Dk)
    kc, vc = p.compressed(p.H, p.Dk), p.compressed(p.H, p.Dv)  # gap rows NaN: must be ignored
    kw = dict(scale=p.scale, block=p.l, stride=p.d, cu_seqlens=p.cu)
    go, gl = p.tokens(p.HQ, p.Dv), p.tokens(p.HQ).float()

    def run(fn):
        a = leaf(q, kc, vc)
        o, lse = fn(*a, **kw)
        return o.detach(), lse.detach(), grads([o, lse], a, [go, gl.to(lse.dtype).masked_fill(torch.isinf(lse), 0)])

    o, lse, g = run(nsa_cuda.compressed_attention)
    o2, lse2, g2 = run(nsa_cuda.compressed_attention)
    assert_bitwise([o, lse, *g], [o2, lse2, *g2], "compressed_attention fwd/bwd across runs")
    assert lse.dtype == torch.float32
    o_n, lse_n = naive.compressed_attention(q, kc, vc, **kw)
    close(o, o_n, msg="o vs naive")
    close(lse, lse_n, LSE_TOL, msg="lse vs naive")
    assert_no_key_rows(o, lse, lse_n, g[0])
    finite(o, *g)
    if p.packed:
        assert (g[1][p.gap_mask()] == 0).all() and (g[2][p.gap_mask()] == 0).all(), "gap rows get no gradient"
    _, _, g_r = run(R.compressed_attention)
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), g, g_r):
        close(a, b, msg=f"{name} vs reference")


@fuzz(250)
@given(p=problems(), top_n=st.integers(1, 6), init_blocks=st.integers(0, 2), local_blocks=st.integers(0, 3))
def test_select_blocks_vs_naive(p, top_n, init_blocks, local_blocks):
    q = p.tokens(p.HQ, p.Dk)
    kc = p.compressed(p.H, p.Dk)
    _, lse = nsa_cuda.compressed_attention(q, kc, kc, scale=p.scale, block=p.l, stride=p.d, cu_seqlens=p.cu)
    kw = dict(scale=p.scale, cmp_block=p.l, cmp_stride=p.d, sel_block=p.sel, top_n=top_n, init_blocks=init_blocks,
              local_blocks=local_blocks, cu_seqlens=p.cu)
    idx = nsa_cuda.select_blocks(q, kc, lse, **kw)
    assert_bitwise(idx, nsa_cuda.select_blocks(q, kc, lse, **kw), "select_blocks across runs")
    assert idx.dtype == torch.int32 and tuple(idx.shape) == (*p.lead, p.H, top_n)
    idx_n = naive.select_blocks(q, kc, lse, **kw)
    bad = (idx != idx_n).any(-1)
    assert not bad.any(), f"{int(bad.sum())} rows differ from naive, first at {bad.nonzero()[0].tolist()}"
    assert_block_idx_well_formed(idx, p, top_n)


@fuzz(250)
@given(p=problems(), n=st.integers(1, 5))
def test_selected_attention_vs_naive(p, n):
    q, k, v = p.tokens(p.HQ, p.Dk), p.tokens(p.H, p.Dk), p.tokens(p.H, p.Dv)
    idx = rand_block_idx(p, n)
    kw = dict(scale=p.scale, sel_block=p.sel, cu_seqlens=p.cu)
    go, gl = p.tokens(p.HQ, p.Dv), p.tokens(p.HQ).float()

    def run(fn):
        a = leaf(q, k, v)
        o, lse = fn(*a, idx, **kw)
        return o.detach(), lse.detach(), grads([o, lse], a, [go, gl.to(lse.dtype).masked_fill(torch.isinf(lse), 0)])

    o, lse, g = run(nsa_cuda.selected_attention)
    o2, lse2, g2 = run(nsa_cuda.selected_attention)
    assert_bitwise([o, lse, *g], [o2, lse2, *g2], "selected_attention fwd/bwd across runs")
    o_n, lse_n = naive.selected_attention(q, k, v, idx, **kw)
    close(o, o_n, msg="o vs naive")
    close(lse, lse_n, LSE_TOL, msg="lse vs naive")
    assert_no_key_rows(o, lse, lse_n, g[0])
    finite(o, *g)
    _, _, g_r = run(R.selected_attention)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        close(a, b, msg=f"{name} vs reference")


@fuzz(250)
@given(p=problems(), window=st.one_of(st.sampled_from([1, 2]), st.integers(1, 80)))
def test_window_attention_vs_naive(p, window):
    q, k, v = p.tokens(p.HQ, p.Dk), p.tokens(p.H, p.Dk), p.tokens(p.H, p.Dv)
    kw = dict(window=window, scale=p.scale, cu_seqlens=p.cu)
    go, gl = p.tokens(p.HQ, p.Dv), p.tokens(p.HQ).float()

    def run(fn):
        a = leaf(q, k, v)
        o, lse = fn(*a, **kw)
        return o.detach(), lse.detach(), grads([o, lse], a, [go, gl.to(lse.dtype)])

    o, lse, g = run(nsa_cuda.window_attention)
    o2, lse2, g2 = run(nsa_cuda.window_attention)
    assert_bitwise([o, lse, *g], [o2, lse2, *g2], "window_attention fwd/bwd across runs")
    o_n, lse_n = naive.window_attention(q, k, v, **kw)
    close(o, o_n, msg="o vs naive")
    close(lse, lse_n, LSE_TOL, msg="lse vs naive")
    assert torch.isfinite(lse).all(), "every query sees at least itself"
    finite(o, *g)
    _, _, g_r = run(R.window_attention)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        close(a, b, msg=f"{name} vs reference")


@fuzz(60)
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=3), HQ=st.integers(1, 8), Dv=st.integers(1, 8),
       seed=st.integers(0, 2 ** 31 - 1))
def test_combine_vs_naive(lead, HQ, Dv, seed):
    gen = torch.Generator().manual_seed(seed)
    os_ = [torch.randn(*lead, HQ, Dv, generator=gen, dtype=F64) for _ in range(3)]
    gs = [torch.rand(*lead, HQ, generator=gen, dtype=F64) for _ in range(3)]
    go = torch.randn(*lead, HQ, Dv, generator=gen, dtype=F64)

    def run(fn):
        a = leaf(*os_, *gs)
        out = fn(*a)
        return out.detach(), grads([out], a, [go])

    out, g = run(nsa_cuda.combine)
    out2, g2 = run(nsa_cuda.combine)
    assert_bitwise([out, *g], [out2, *g2], "combine fwd/bwd across runs")
    close(out, naive.combine(*os_, *gs), msg="combine vs naive")
    _, g_r = run(R.combine)
    for a, b in zip(g, g_r):
        close(a, b, msg="combine grads vs reference")


@st.composite
def decode_problems(draw):
    p = draw(problems(packed=False))
    B = draw(st.integers(1, 3))
    S = draw(st.integers(1, 96))
    seqlens = draw(st.lists(st.one_of(st.sampled_from([0, 1, S, p.l - 1, p.l, p.sel, p.sel + 1]),
                                      st.integers(0, S)), min_size=B, max_size=B))
    seqlens = [min(s, S) for s in seqlens]
    hp = dict(top_n=draw(st.integers(1, 5)), init_blocks=draw(st.integers(0, 2)),
              local_blocks=draw(st.integers(0, 3)), window=draw(st.integers(1, 100)))
    extra = draw(st.integers(0, 3))  # spare compressed-cache rows
    return p, S, seqlens, hp, extra


@fuzz(250)
@given(case=decode_problems())
def test_decode_vs_naive(case):
    # cache_seqlens 0 is accepted by the op (o = 0, like the naive loops); the reference rejects it.
    p, S, seqlens, hp, extra = case
    B = len(seqlens)
    Sc = max(p.nc(s) for s in seqlens) + extra
    k_cache, v_cache = p.randn(B, S, p.H, p.Dk), p.randn(B, S, p.H, p.Dv)
    kc_cache, vc_cache = p.randn(B, Sc, p.H, p.Dk), p.randn(B, Sc, p.H, p.Dv)
    for b, s in enumerate(seqlens):  # everything past the valid rows is ignored
        k_cache[b, s:] = math.nan
        v_cache[b, s:] = math.nan
        kc_cache[b, p.nc(s):] = math.nan
        vc_cache[b, p.nc(s):] = math.nan
    q = p.randn(B, p.HQ, p.Dk)
    gates = [torch.rand(B, p.HQ, generator=p.gen, dtype=F64) for _ in range(3)]
    cs = torch.tensor(seqlens, dtype=torch.int32)
    kw = dict(scale=p.scale, cmp_block=p.l, cmp_stride=p.d, sel_block=p.sel, **hp)
    o = nsa_cuda.decode(q, k_cache, v_cache, kc_cache, vc_cache, cs, *gates, **kw)
    assert_bitwise(o, nsa_cuda.decode(q, k_cache, v_cache, kc_cache, vc_cache, cs, *gates, **kw), "decode across runs")
    finite(o)
    close(o, naive.decode(q, k_cache, v_cache, kc_cache, vc_cache, cs, *gates, **kw), msg="decode vs naive")
    for b, s in enumerate(seqlens):
        if s == 0:
            assert (o[b] == 0).all()


# ---------------------------------------------------------------------------------------------
# a packed batch equals its sequences run one at a time as padded batches [1, T_b, ...]

VARLEN_OPS = ["compress", "compressed_attention", "select_blocks", "selected_attention", "window_attention"]


def _run_op(name, p, t, packed_view, top_n=3, window=9):
    """Run op `name` on inputs t (dict) -> (outputs, grads wrt the float inputs)."""
    cu = p.cu if packed_view else None
    if name == "compress":
        a = leaf(t["x"], t["w"])
        y = nsa_cuda.compress(*a, block=p.l, stride=p.d, cu_seqlens=cu)
        return [y.detach()], grads([y], a, [t["gy"]])
    if name == "compressed_attention":
        a = leaf(t["q"], t["kc"], t["vc"])
        o, lse = nsa_cuda.compressed_attention(*a, scale=p.scale, block=p.l, stride=p.d, cu_seqlens=cu)
        return [o.detach(), lse.detach()], grads([o], a, [t["go"]])
    if name == "select_blocks":
        idx = nsa_cuda.select_blocks(t["q"], t["kc"], t["lse"], scale=p.scale, cmp_block=p.l, cmp_stride=p.d,
                                     sel_block=p.sel, top_n=top_n, init_blocks=1, local_blocks=1, cu_seqlens=cu)
        return [idx], []
    if name == "selected_attention":
        a = leaf(t["q"], t["k"], t["v"])
        o, lse = nsa_cuda.selected_attention(*a, t["idx"], scale=p.scale, sel_block=p.sel, cu_seqlens=cu)
        return [o.detach(), lse.detach()], grads([o], a, [t["go"]])
    a = leaf(t["q"], t["k"], t["v"])
    o, lse = nsa_cuda.window_attention(*a, window=window, scale=p.scale, cu_seqlens=cu)
    return [o.detach(), lse.detach()], grads([o], a, [t["go"]])


def _inputs(p):
    t = dict(q=p.tokens(p.HQ, p.Dk), k=p.tokens(p.H, p.Dk), v=p.tokens(p.H, p.Dv), x=p.tokens(p.H, p.Dk),
             w=p.randn(p.H, p.l * p.Dk, 3) if p.seed % 2 else None, go=p.tokens(p.HQ, p.Dv),
             kc=p.compressed(p.H, p.Dk, 0.0), vc=p.compressed(p.H, p.Dv, 0.0), idx=rand_block_idx(p, 3))
    t["gy"] = p.randn(*p.cmp_shape(p.H, 3 if t["w"] is not None else p.Dk))
    _, t["lse"] = nsa_cuda.compressed_attention(t["q"], t["kc"], t["kc"], scale=p.scale, block=p.l, stride=p.d,
                                                cu_seqlens=p.cu)
    return t


# which inputs are token-indexed, compressed-indexed or shared
_TOKEN_KEYS = ("q", "k", "v", "x", "go", "idx", "lse")
_CMP_KEYS = ("kc", "vc", "gy")


@pytest.mark.parametrize("name", VARLEN_OPS)
@fuzz(50)
@given(p=problems(packed=True))
def test_varlen_equals_padded(name, p):
    t = _inputs(p)
    outs, gs = _run_op(name, p, t, True)
    grad_keys = {"compress": ("x", "w"), "compressed_attention": ("q", "kc", "vc")}.get(name, ("q", "k", "v"))
    grad_keys = [k for k in grad_keys if t[k] is not None]
    for b in range(p.nseq):
        one = dict(t)
        for key in _TOKEN_KEYS:
            one[key] = p.seq(t[key], b).unsqueeze(0)
        for key in _CMP_KEYS:
            one[key] = t[key][p.cmp_rows(b)].unsqueeze(0)
        o_b, g_b = _run_op(name, p, one, False)
        if name == "compress":
            assert_bitwise(o_b[0][0], outs[0][p.cmp_rows(b)], f"{name}: sequence {b} output")
        else:
            assert_bitwise([x[0] for x in o_b], [p.seq(x, b) for x in outs], f"{name}: sequence {b} outputs")
        for key, packed_g, seq_g in zip(grad_keys, gs, g_b):
            if key == "w":
                continue  # shared parameter: the packed gradient sums over sequences
            rows = p.cmp_rows(b) if key in _CMP_KEYS else p.rows(b)
            assert_bitwise(seq_g[0], packed_g[rows], f"{name}: sequence {b} d{key}")


# ---------------------------------------------------------------------------------------------
# NaN in one sequence of a packed batch never reaches the others (and never hangs or crashes)

NAN_OPS = VARLEN_OPS + ["combine", "decode"]


@pytest.mark.parametrize("name", NAN_OPS)
@fuzz(50)
@given(p=problems(packed=True, min_seqs=2), pick=st.integers(0, 2 ** 20), value=st.sampled_from(
    [math.nan, math.inf, -math.inf]))
def test_nan_stays_in_its_sequence(name, p, pick, value):
    nonempty = [b for b in range(p.nseq) if p.lens[b] > 0]
    if not nonempty:
        return
    victim = nonempty[pick % len(nonempty)]
    row = p.starts[victim] + (pick // 7) % p.lens[victim]
    others = [b for b in range(p.nseq) if b != victim]

    if name == "combine":
        os_ = [p.tokens(p.HQ, p.Dv) for _ in range(3)]
        gs = [torch.rand(p.total, p.HQ, generator=p.gen, dtype=F64) for _ in range(3)]
        bad = [x.clone() for x in os_]
        bad[pick % 3][row] = value
        clean, dirty = nsa_cuda.combine(*os_, *gs), nsa_cuda.combine(*bad, *gs)
        for b in others:
            assert_bitwise(p.seq(dirty, b), p.seq(clean, b), f"combine: sequence {b}")
        return

    if name == "decode":
        B = p.nseq
        S = max(p.lens)
        k = p.randn(B, S, p.H, p.Dk)
        v = p.randn(B, S, p.H, p.Dv)
        Sc = max(1, p.nc(S))
        kc, vc = p.randn(B, Sc, p.H, p.Dk), p.randn(B, Sc, p.H, p.Dv)
        q = p.randn(B, p.HQ, p.Dk)
        gates = [torch.rand(B, p.HQ, generator=p.gen, dtype=F64) for _ in range(3)]
        cs = torch.tensor(p.lens, dtype=torch.int32)
        kw = dict(scale=p.scale, cmp_block=p.l, cmp_stride=p.d, sel_block=p.sel, top_n=3, window=9)
        clean = nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **kw)
        which = pick % 3
        bk, bv, bq = k.clone(), v.clone(), q.clone()
        (bk[victim, row - p.starts[victim]] if which == 0 else bv[victim, row - p.starts[victim]]
         if which == 1 else bq[victim]).fill_(value)
        dirty = nsa_cuda.decode(bq, bk, bv, kc, vc, cs, *gates, **kw)
        for b in others:
            assert_bitwise(dirty[b], clean[b], f"decode: sequence {b}")
        return

    t = _inputs(p)
    keys = {"compress": ["x"], "compressed_attention": ["q", "kc", "vc"], "select_blocks": ["q", "kc", "lse"],
            "selected_attention": ["q", "k", "v"], "window_attention": ["q", "k", "v"]}[name]
    key = keys[pick % len(keys)]
    bad = dict(t)
    bad[key] = t[key].clone()
    if key in _CMP_KEYS:
        rows = p.cmp_rows(victim)
        n = rows.stop - rows.start
        if n == 0:
            return
        bad[key][rows.start + (pick // 7) % n] = value
    else:
        bad[key][row] = value
    clean_o, clean_g = _run_op(name, p, t, True)
    dirty_o, dirty_g = _run_op(name, p, bad, True)
    grad_keys = {"compress": ("x", "w"), "compressed_attention": ("q", "kc", "vc")}.get(name, ("q", "k", "v"))
    grad_keys = [k for k in grad_keys if t[k] is not None]
    for b in others:
        if name == "compress":
            assert_bitwise(dirty_o[0][p.cmp_rows(b)], clean_o[0][p.cmp_rows(b)], f"{name}: sequence {b}")
        else:
            assert_bitwise([p.seq(x, b) for x in dirty_o], [p.seq(x, b) for x in clean_o], f"{name}: sequence {b}")
        for gk, cg, dg in zip(grad_keys, clean_g, dirty_g):
            if gk == "w":
                continue  # shared parameter: NaN reaches it legitimately
            rows = p.cmp_rows(b) if gk in _CMP_KEYS else p.rows(b)
            assert_bitwise(dg[rows], cg[rows], f"{name}: sequence {b} d{gk}")
    if name == "select_blocks":  # garbage scores still give a well-formed selection
        assert_block_idx_well_formed(dirty_o[0], p, 3)
    if name == "window_attention" and key == "q" and value != value:  # NaN query: its own row is NaN
        assert dirty_o[0][row].isnan().all()


# ---------------------------------------------------------------------------------------------
# CUDA: compression kernels (bf16, head dims 64 / 128) against the reference, fixed budget


@st.composite
def cuda_compress_cases(draw):
    l = draw(st.sampled_from([8, 16, 32, 64]))
    d = draw(st.sampled_from([x for x in (4, 8, 16, 32, 64) if l % x == 0]))
    D = draw(st.sampled_from([64, 128]))
    mode = draw(st.sampled_from(["mean", "linear", "linear_pe"]))
    Dout = draw(st.sampled_from([64, D])) if mode != "mean" else D
    H = draw(st.integers(1, 4))
    if draw(st.booleans()):
        lens = draw(st.lists(st.one_of(st.sampled_from([0, 1, l - 1, l, l + 1]), st.integers(0, 300)),
                             min_size=1, max_size=5))
        shape, cu = None, lens
    else:
        shape = (draw(st.integers(1, 3)), draw(st.one_of(st.sampled_from([1, l - 1, l, l + 1]), st.integers(1, 400))))
        cu = None
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return l, d, D, Dout, mode, H, shape, cu, seed


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.cuda
@requires_cuda
@fuzz(25)
@given(case=cuda_compress_cases())
def test_compress_cuda_fuzz(case):
    # check_forward_backward (tests/test_compress_cuda.py): y, dx, dw, dpe against the fp32 reference
    # with assert_fa_close (tests/helpers.py), each within 2x the error of the same computation done by
    # PyTorch in bf16 (compress_lowp); outputs poisoned with NaN beforehand; backward bitwise reproducible.
    from test_compress_cuda import check_forward_backward, make_inputs

    l, d, D, Dout, mode, H, shape, lens, seed = case
    torch.manual_seed(seed)
    cu = None
    if lens is not None:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        shape = (sum(lens),)
    x, w, pe = make_inputs(mode, shape, H, D, Dout, torch.bfloat16, l)
    check_forward_backward(x, w, pe, l, d, cu)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", ["linear", "linear_pe"])
def test_compress_cuda_empty_packed_batch_param_grads_are_zero(mode):
    from helpers import poison_cuda_cache
    from test_compress_cuda import make_inputs

    cu = torch.zeros(3, dtype=torch.int32, device="cuda")  # two sequences, both empty: total = 0
    x, w, pe = make_inputs(mode, (0,), 2, 64, 64, torch.bfloat16, 32)
    params = [t.requires_grad_(True) for t in (x, w, pe) if t is not None]
    y = nsa_cuda.compress(x, w, pe, block=32, stride=16, cu_seqlens=cu)
    assert y.shape == (0, 2, 64)
    dy = torch.zeros_like(y)
    torch.cuda.empty_cache()  # so that dW / dpe land in the poisoned blocks
    poison_cuda_cache(*[(tuple(t.shape), t.dtype) for t in params[1:]])
    grads = torch.autograd.grad(y, params, dy)
    for name, g in zip(("dx", "dw", "dpe"), grads):
        assert torch.equal(g, torch.zeros_like(g)), f"{name} must be zero when there are no tokens (CPU path: zero)"
