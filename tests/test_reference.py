"""nsa_cuda/reference.py (the oracle) against tests/naive.py (loops), DESIGN.md section 1.

Both modules are loaded by file path, so these tests run without the compiled extension
(nsa_cuda/__init__.py imports it).
"""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load("nsa_reference", ROOT / "nsa_cuda" / "reference.py")
naive = _load("nsa_naive", ROOT / "tests" / "naive.py")

F64, F32 = torch.float64, torch.float32


# ----------------------------------------------------------------------------- helpers


def randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def gates(*shape, dtype=F64):
    return torch.sigmoid(randn(*shape)).to(dtype)


def close(actual, expected, dtype=F64):
    """float64 vs float64: ~1e-10; fp32 reference vs float64 naive: ~1e-5 relative."""
    tol = 1e-10 if dtype == F64 else 2e-5
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol)


def cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def nsa_inputs(B, T, HQ, H, Dk, Dv, dtype=F64, mode="mean", block=32):
    q, k, v = randn(B, T, HQ, Dk, dtype=dtype), randn(B, T, H, Dk, dtype=dtype), randn(B, T, H, Dv, dtype=dtype)
    g = [gates(B, T, HQ, dtype=dtype) for _ in range(3)]
    extra = {}
    if mode != "mean":
        extra["w_k"] = (randn(H, block * Dk, Dk) / math.sqrt(block * Dk)).to(dtype)
        extra["w_v"] = (randn(H, block * Dv, Dv) / math.sqrt(block * Dv)).to(dtype)
        if mode == "linear_pe":
            extra["pe_k"] = randn(H, block, Dk, dtype=dtype)
            extra["pe_v"] = randn(H, block, Dv, dtype=dtype)
    return q, k, v, g, extra


# ----------------------------------------------------------------------------- compression


def test_num_compressed_and_offsets():
    assert ref.num_compressed(0, 32, 16) == 0
    assert ref.num_compressed(31, 32, 16) == 0
    assert ref.num_compressed(32, 32, 16) == 1
    assert ref.num_compressed(47, 32, 16) == 1
    assert ref.num_compressed(48, 32, 16) == 2
    assert ref.num_compressed(70, 32, 16) == 3
    for T in range(0, 100):
        for l, d in [(32, 16), (16, 8), (8, 8), (12, 4)]:
            assert ref.num_compressed(T, l, d) == naive.num_compressed(T, l, d)
    c = cu([1, 37, 70, 5])
    off = ref.compressed_offsets(c, 16)
    assert off.tolist() == [0, 0, 2, 6]
    assert off.dtype == torch.int32


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe"])
@pytest.mark.parametrize("T,l,d", [(1, 32, 16), (31, 32, 16), (32, 32, 16), (33, 32, 16), (70, 32, 16), (37, 16, 8), (21, 8, 8)])
def test_compress(T, l, d, mode, dtype):
    torch.manual_seed(1000 + T + l)
    B, H, D, Dout = 2, 2, 6, 5
    x = randn(B, T, H, D, dtype=dtype)
    w = pe = None
    if mode != "mean":
        w = randn(H, l * D, Dout, dtype=dtype)
        if mode == "linear_pe":
            pe = randn(H, l, D, dtype=dtype)
    got = ref.compress(x, w, pe, block=l, stride=d)
    want = naive.compress(x, w, pe, block=l, stride=d)
    nc = ref.num_compressed(T, l, d)
    assert got.shape == (B, nc, H, D if w is None else Dout)
    assert got.dtype == dtype
    close(got, want, dtype)
    if mode == "mean" and nc:
        close(got[:, 0], x[:, :l].mean(1), dtype)  # the literal rule for token 0


@pytest.mark.parametrize("mode", ["mean", "linear_pe"])
def test_compress_varlen_layout(mode):
    torch.manual_seed(7)
    lengths, l, d, H, D = [1, 37, 70, 5], 32, 16, 2, 4
    c = cu(lengths)
    x = randn(sum(lengths), H, D)
    w = randn(H, l * D, D) if mode != "mean" else None
    pe = randn(H, l, D) if mode == "linear_pe" else None
    got = ref.compress(x, w, pe, block=l, stride=d, cu_seqlens=c)
    assert got.shape == (sum(lengths) // d, H, D)
    close(got, naive.compress(x, w, pe, block=l, stride=d, cu_seqlens=c))
    used = torch.zeros(got.shape[0], dtype=torch.bool)
    for b, (start, T) in enumerate(zip(c[:-1].tolist(), lengths)):
        row, nc = start // d, ref.num_compressed(T, l, d)
        assert not used[row : row + nc].any()  # per-sequence ranges never overlap
        used[row : row + nc] = True
        close(got[row : row + nc], ref.compress(x[None, start : start + T], w, pe, block=l, stride=d)[0])
    assert used.sum() == 4  # 0 + 1 + 3 + 0 compressed tokens
    assert (got[~used] == 0).all()  # gap rows are zero


def test_compress_rejects_pe_without_w():
    with pytest.raises(ValueError):
        ref.compress(randn(1, 40, 1, 4), None, randn(1, 32, 4))


# ----------------------------------------------------------------------------- compressed attention


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(
    "G,H,Dk,Dv,T,l,d",
    [
        (1, 2, 16, 16, 70, 32, 16),
        (2, 2, 24, 16, 33, 32, 16),
        (4, 1, 8, 12, 31, 32, 16),  # T < l: nothing visible anywhere
        (16, 1, 8, 8, 45, 16, 8),
        (2, 3, 8, 8, 32, 32, 16),  # T == l
    ],
)
def test_compressed_attention(G, H, Dk, Dv, T, l, d, dtype):
    torch.manual_seed(2000 + T * G)
    B, HQ = 2, G * H
    nc = ref.num_compressed(T, l, d)
    q, kc, vc = randn(B, T, HQ, Dk, dtype=dtype), randn(B, nc, H, Dk, dtype=dtype), randn(B, nc, H, Dv, dtype=dtype)
    o, lse = ref.compressed_attention(q, kc, vc, block=l, stride=d)
    o_n, lse_n = naive.compressed_attention(q, kc, vc, block=l, stride=d)
    assert o.shape == (B, T, HQ, Dv) and lse.shape == (B, T, HQ)
    assert o.dtype == dtype and lse.dtype == dtype
    close(o, o_n, dtype)
    close(lse, lse_n, dtype)
    first = min(T, l - 1)  # t < l - 1 sees no compressed token
    assert (o[:, :first] == 0).all()
    assert torch.isneginf(lse[:, :first]).all()
    assert torch.isfinite(lse[:, first:]).all()


def test_compressed_attention_custom_scale():
    torch.manual_seed(3)
    q, kc, vc = randn(1, 50, 2, 8), randn(1, 2, 1, 8), randn(1, 2, 1, 8)
    for scale in (0.1, 1.7):
        o, lse = ref.compressed_attention(q, kc, vc, scale=scale)
        o_n, lse_n = naive.compressed_attention(q, kc, vc, scale=scale)
        close(o, o_n)
        close(lse, lse_n)


# ----------------------------------------------------------------------------- block scores


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(
    "l,d,ls,T,G",
    [(32, 16, 64, 150, 2), (16, 8, 32, 77, 1), (32, 16, 32, 70, 4), (32, 16, 16, 50, 1), (8, 4, 12, 40, 2), (16, 16, 48, 100, 2)],
)
def test_block_scores(l, d, ls, T, G, dtype):
    torch.manual_seed(3000 + T + l + ls)
    B, H, Dk, Dv = 2, 2, 8, 8
    HQ = G * H
    nc = ref.num_compressed(T, l, d)
    q, kc, vc = randn(B, T, HQ, Dk, dtype=dtype), randn(B, nc, H, Dk, dtype=dtype), randn(B, nc, H, Dv, dtype=dtype)
    _, lse = ref.compressed_attention(q, kc, vc, block=l, stride=d)
    S = ref.block_scores(q, kc, lse, block=l, stride=d, sel_block=ls)
    assert S.shape == (B, T, H, -(-T // ls)) and S.dtype == dtype
    close(S, naive.block_scores(q, kc, lse, block=l, stride=d, sel_block=ls), dtype)


def test_block_scores_paper_weights():
    """DESIGN 1.3 for 32/16/64: S[j] = P[4j-1] + 2P[4j] + 2P[4j+1] + 2P[4j+2] + P[4j+3]."""
    torch.manual_seed(4)
    T, HQ, H, D = 300, 4, 2, 8
    nc = ref.num_compressed(T, 32, 16)
    q, kc, vc = randn(1, T, HQ, D), randn(1, nc, H, D), randn(1, nc, H, D)
    _, lse = ref.compressed_attention(q, kc, vc)
    S = ref.block_scores(q, kc, lse)[0]
    s = torch.einsum("thd,ihd->thi", q[0], kc[0].repeat_interleave(2, 1)) * D ** -0.5
    vis = (torch.arange(nc) * 16 + 31)[None, :] <= torch.arange(T)[:, None]
    p = torch.where(vis[:, None], torch.exp(s - lse[0][..., None]), torch.zeros(()))
    P = p.reshape(T, H, 2, nc).sum(2)
    Pz = lambda i: P[..., i] if 0 <= i < nc else torch.zeros(T, H, dtype=F64)
    for j in range(S.shape[-1]):
        want = Pz(4 * j - 1) + 2 * Pz(4 * j) + 2 * Pz(4 * j + 1) + 2 * Pz(4 * j + 2) + Pz(4 * j + 3)
        close(S[..., j], want)


# ----------------------------------------------------------------------------- selection


SELECT_CONFIGS = [
    # l, d, l', n, init, local, T, G
    (32, 16, 64, 16, 1, 2, 200, 2),  # paper defaults (fewer blocks than n: -1 padding)
    (32, 16, 64, 3, 1, 2, 300, 2),
    (16, 8, 32, 3, 0, 1, 150, 1),
    (16, 8, 32, 3, 1, 1, 150, 4),
    (16, 8, 32, 3, 2, 3, 150, 2),  # more forced blocks than n
    (16, 8, 32, 1, 0, 0, 100, 2),
    (8, 4, 12, 2, 1, 1, 61, 2),  # l' not a multiple of l
    (32, 16, 16, 4, 1, 2, 90, 1),  # l' < l
]


@pytest.mark.parametrize("l,d,ls,n,init,local,T,G", SELECT_CONFIGS)
def test_select_blocks(l, d, ls, n, init, local, T, G):
    torch.manual_seed(4000 + T + n + init + local)
    B, H, Dk = 2, 2, 8
    HQ = G * H
    nc = ref.num_compressed(T, l, d)
    q, kc, vc = randn(B, T, HQ, Dk), randn(B, nc, H, Dk), randn(B, nc, H, Dk)
    _, lse = ref.compressed_attention(q, kc, vc, block=l, stride=d)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=ls, top_n=n, init_blocks=init, local_blocks=local)
    idx = ref.select_blocks(q, kc, lse, **kw)
    assert idx.dtype == torch.int32 and idx.shape == (B, T, H, n)
    assert torch.equal(idx, naive.select_blocks(q, kc, lse, **kw))
    # structural properties of DESIGN 1.4
    for t in range(T):
        cur = t // ls
        n_valid = cur + 1
        row = idx[:, t]
        k = min(n, n_valid)
        assert (row[..., k:] == -1).all()
        head = row[..., :k]
        assert (head >= 0).all() and (head <= cur).all()
        assert (head[..., 1:] > head[..., :-1]).all()  # strictly ascending, no duplicates
        forced = sorted(set(range(min(init, n_valid))) | set(range(max(0, cur - local + 1), cur + 1)))
        for j in forced[:n]:  # forced blocks win (lowest indices first if more than n)
            assert (head == j).any(-1).all()


@pytest.mark.parametrize("construction", ["q_zero", "kc_identical"])
def test_select_ties_lower_index(construction):
    """Equal scores: the lower block index wins (DESIGN 1.4)."""
    torch.manual_seed(5)
    l, d, ls, T, H, G, D = 16, 8, 32, 200, 2, 2, 8
    nc = ref.num_compressed(T, l, d)
    q, kc, vc = randn(1, T, H * G, D), randn(1, nc, H, D), randn(1, nc, H, D)
    if construction == "q_zero":
        q = torch.zeros_like(q)
    else:  # identical rows with small integer entries: every dot product is exact
        q = torch.randint(-3, 4, q.shape).to(F64)
        kc = torch.randint(-3, 4, (1, 1, H, D)).to(F64).expand(1, nc, H, D).contiguous()
    _, lse = ref.compressed_attention(q, kc, vc, block=l, stride=d)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=ls, top_n=3, init_blocks=1, local_blocks=1)
    idx = ref.select_blocks(q, kc, lse, **kw)
    assert torch.equal(idx, naive.select_blocks(q, kc, lse, **kw))
    S = ref.block_scores(q, kc, lse, block=l, stride=d, sel_block=ls)
    # interior blocks 1..5 are covered by 5 fully visible compressed tokens with weights
    # 1,2,2,2,1 of equal p: exactly equal scores (ties), larger than block 0 (weights 2,2,2,1)
    t = 199
    interior = S[0, t, :, 1:6]
    assert (interior == interior[:, :1]).all()
    assert (S[0, t, :, 0] < interior[:, 0]).all()
    # forced: block 0 (init) and block 6 (local); the free slot goes to block 1, the lowest tie
    assert idx[0, t].tolist() == [[0, 1, 6]] * H
    # t < l - 1: no compressed token, all scores 0: the free slots go to the lowest blocks
    idx_early = ref.select_blocks(q, kc, lse, **{**kw, "top_n": 1, "init_blocks": 0, "local_blocks": 0})
    assert idx_early[0, :l - 1].eq(0).all()


def test_select_blocks_forced_and_padding():
    torch.manual_seed(6)
    T = 64 * 20 + 5
    nc = ref.num_compressed(T, 32, 16)
    q, kc, vc = randn(1, T, 2, 8), randn(1, nc, 1, 8), randn(1, nc, 1, 8)
    _, lse = ref.compressed_attention(q, kc, vc)
    idx = ref.select_blocks(q, kc, lse)  # paper defaults, n = 16
    assert idx[0, 0, 0].tolist() == [0] + [-1] * 15
    assert idx[0, 64, 0].tolist() == [0, 1] + [-1] * 14
    assert idx[0, 200, 0].tolist() == [0, 1, 2, 3] + [-1] * 12
    last = idx[0, T - 1, 0].tolist()  # 21 valid blocks: 16 chosen, including 0, 19, 20
    assert -1 not in last and {0, 19, 20} <= set(last) and last == sorted(last)


# ----------------------------------------------------------------------------- selected / window attention


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("G,H,Dk,Dv,T,ls", [(1, 2, 8, 8, 70, 16), (2, 2, 24, 16, 45, 8), (4, 1, 8, 8, 33, 32), (16, 1, 8, 8, 30, 8)])
def test_selected_attention_random_blocks(G, H, Dk, Dv, T, ls, dtype):
    """Arbitrary block lists: -1 entries, duplicates, blocks in the future, empty rows."""
    torch.manual_seed(6000 + T + G)
    B, HQ, n = 2, G * H, 3
    n_sel = -(-T // ls)
    q, k, v = randn(B, T, HQ, Dk, dtype=dtype), randn(B, T, H, Dk, dtype=dtype), randn(B, T, H, Dv, dtype=dtype)
    idx = torch.randint(-1, n_sel, (B, T, H, n), dtype=torch.int32)
    idx[0, -1] = -1  # no keys at all
    idx[1, 0] = 0  # t = 0 sees key 0 only
    o, lse = ref.selected_attention(q, k, v, idx, sel_block=ls)
    o_n, lse_n = naive.selected_attention(q, k, v, idx, sel_block=ls)
    assert o.shape == (B, T, HQ, Dv) and o.dtype == dtype
    close(o, o_n, dtype)
    close(lse, lse_n, dtype)
    assert (o[0, -1] == 0).all() and torch.isneginf(lse[0, -1]).all()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("window,T,G", [(1, 20, 2), (7, 45, 4), (512, 70, 1), (16, 16, 16)])
def test_window_attention(window, T, G, dtype):
    torch.manual_seed(7000 + window + T)
    B, H, Dk, Dv = 2, 1 if G == 16 else 2, 12, 8
    HQ = G * H
    q, k, v = randn(B, T, HQ, Dk, dtype=dtype), randn(B, T, H, Dk, dtype=dtype), randn(B, T, H, Dv, dtype=dtype)
    o, lse = ref.window_attention(q, k, v, window=window)
    o_n, lse_n = naive.window_attention(q, k, v, window=window)
    close(o, o_n, dtype)
    close(lse, lse_n, dtype)
    if window == 1:  # one key: o is v itself
        close(o, v.repeat_interleave(G, 2), dtype)


def test_combine():
    torch.manual_seed(8)
    shape = (2, 9, 4, 6)
    o = [randn(*shape) for _ in range(3)]
    g = [gates(*shape[:-1]) for _ in range(3)]
    close(ref.combine(*o, *g), naive.combine(*o, *g))
    assert ref.combine(*[x.float() for x in o], *[x.float() for x in g]).dtype == F32


# ----------------------------------------------------------------------------- whole NSA


NSA_CONFIGS = [
    # G, H, Dk, Dv, T, mode, hyper-parameters
    (1, 2, 16, 16, 70, "mean", dict()),
    (2, 2, 24, 16, 100, "linear", dict(sel_block=32, top_n=3, local_blocks=1, window=7)),
    (4, 1, 8, 8, 31, "mean", dict()),  # T < l
    (2, 1, 8, 8, 32, "linear_pe", dict(window=1)),  # T == l
    (2, 2, 8, 8, 83, "linear_pe", dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, init_blocks=0, local_blocks=1, window=7)),
    (1, 2, 8, 8, 83, "mean", dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=6, init_blocks=2, local_blocks=3, window=1)),
    (16, 1, 8, 8, 40, "mean", dict(cmp_block=16, cmp_stride=8, sel_block=8, top_n=3, local_blocks=1, window=5)),
]


@pytest.mark.parametrize("G,H,Dk,Dv,T,mode,hp", NSA_CONFIGS)
def test_nsa_attention_f64(G, H, Dk, Dv, T, mode, hp):
    torch.manual_seed(9000 + T + G)
    l = hp.get("cmp_block", 32)
    q, k, v, g, extra = nsa_inputs(2, T, G * H, H, Dk, Dv, mode=mode, block=l)
    o, idx = ref.nsa_attention(q, k, v, *g, **extra, **hp, return_block_idx=True)
    o_n, idx_n = naive.nsa_attention(q, k, v, *g, **extra, **hp, return_block_idx=True)
    assert o.shape == (2, T, G * H, Dv) and o.dtype == F64
    assert torch.equal(idx, idx_n)
    close(o, o_n)


@pytest.mark.parametrize("G,H,Dk,Dv,T,mode,hp", [NSA_CONFIGS[1], NSA_CONFIGS[4]])
def test_nsa_attention_f32(G, H, Dk, Dv, T, mode, hp):
    torch.manual_seed(9500 + T + G)
    l = hp.get("cmp_block", 32)
    q, k, v, g, extra = nsa_inputs(2, T, G * H, H, Dk, Dv, mode=mode, block=l)
    o_n, idx_n = naive.nsa_attention(q, k, v, *g, **extra, **hp, return_block_idx=True)
    f32 = lambda x: x.float()
    o, idx = ref.nsa_attention(
        f32(q), f32(k), f32(v), *map(f32, g), **{n: f32(x) for n, x in extra.items()}, **hp, return_block_idx=True
    )
    assert o.dtype == F32
    assert torch.equal(idx, idx_n)
    close(o, o_n, F32)


def test_nsa_attention_bf16_input_computes_in_fp32():
    torch.manual_seed(10)
    q, k, v, g, _ = nsa_inputs(1, 40, 2, 1, 8, 8, dtype=torch.bfloat16)
    o = ref.nsa_attention(q, k, v, *g, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=5)
    assert o.dtype == F32
    o_n = naive.nsa_attention(q, k, v, *g, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=5)
    close(o, o_n, F32)


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("mode", ["mean", "linear_pe"])
def test_varlen_equals_padded(mode):
    torch.manual_seed(11)
    lengths, HQ, H, Dk, Dv = [1, 37, 70, 5], 4, 2, 8, 16
    hp = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, local_blocks=1, window=9)
    cmp = dict(block=16, stride=8)
    c = cu(lengths)
    total = sum(lengths)
    q, k, v, g, extra = nsa_inputs(1, total, HQ, H, Dk, Dv, mode=mode, block=16)
    q, k, v, g = q[0], k[0], v[0], [x[0] for x in g]
    o, idx = ref.nsa_attention(q, k, v, *g, **extra, **hp, cu_seqlens=c, return_block_idx=True)
    assert o.shape == (total, HQ, Dv) and idx.shape == (total, H, 3)
    o_n, idx_n = naive.nsa_attention(q, k, v, *g, **extra, **hp, cu_seqlens=c, return_block_idx=True)
    assert torch.equal(idx, idx_n)
    close(o, o_n)
    # each sequence alone, as a padded batch of one
    kc = ref.compress(k, extra.get("w_k"), extra.get("pe_k"), **cmp, cu_seqlens=c)
    vc = ref.compress(v, extra.get("w_v"), extra.get("pe_v"), **cmp, cu_seqlens=c)
    oc, lse = ref.compressed_attention(q, kc, vc, **cmp, cu_seqlens=c)
    S = ref.block_scores(q, kc, lse, **cmp, sel_block=16, cu_seqlens=c)
    osl, lsel = ref.selected_attention(q, k, v, idx, sel_block=16, cu_seqlens=c)
    ow, lsew = ref.window_attention(q, k, v, window=9, cu_seqlens=c)
    for b, (s, T) in enumerate(zip(c[:-1].tolist(), lengths)):
        r = slice(s, s + T)
        one = lambda x: x[None, r]
        o1, idx1 = ref.nsa_attention(
            *map(one, (q, k, v)), *map(one, g), **extra, **hp, return_block_idx=True
        )
        close(o[r], o1[0])
        assert torch.equal(idx[r], idx1[0])
        kc1 = ref.compress(one(k), extra.get("w_k"), extra.get("pe_k"), **cmp)
        vc1 = ref.compress(one(v), extra.get("w_v"), extra.get("pe_v"), **cmp)
        oc1, lse1 = ref.compressed_attention(one(q), kc1, vc1, **cmp)
        close(oc[r], oc1[0])
        close(lse[r], lse1[0])
        close(S[b], ref.block_scores(one(q), kc1, lse1, **cmp, sel_block=16)[0])
        osl1, lsel1 = ref.selected_attention(one(q), one(k), one(v), idx1, sel_block=16)
        close(osl[r], osl1[0])
        close(lsel[r], lsel1[0])
        ow1, lsew1 = ref.window_attention(one(q), one(k), one(v), window=9)
        close(ow[r], ow1[0])
        close(lsew[r], lsew1[0])


def test_varlen_gap_rows_are_ignored():
    """Rows of the compact compressed layout that belong to no sequence are ignored in inputs."""
    torch.manual_seed(23)
    lengths, d = [1, 37, 70, 5], 16
    c = cu(lengths)
    q = randn(sum(lengths), 4, 8)
    kc, vc = randn(sum(lengths) // d, 2, 8), randn(sum(lengths) // d, 2, 8)
    o, lse = ref.compressed_attention(q, kc, vc, cu_seqlens=c)
    close(o, naive.compressed_attention(q, kc, vc, cu_seqlens=c)[0])
    gap = torch.tensor([1, 5, 6])  # rows 0 and 2..4 hold the 1 + 3 compressed tokens
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[gap] = float("nan")
    vc2[gap] = 1e30
    o2, lse2 = ref.compressed_attention(q, kc2, vc2, cu_seqlens=c)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    S, S2 = ref.block_scores(q, kc, lse, cu_seqlens=c), ref.block_scores(q, kc2, lse, cu_seqlens=c)
    assert all(torch.equal(a, b) for a, b in zip(S, S2))


def test_varlen_empty_sequence():
    torch.manual_seed(12)
    lengths = [0, 40, 0, 3]
    c = cu(lengths)
    q, k, v, g, _ = nsa_inputs(1, sum(lengths), 2, 1, 8, 8)
    q, k, v, g = q[0], k[0], v[0], [x[0] for x in g]
    hp = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=5)
    o = ref.nsa_attention(q, k, v, *g, **hp, cu_seqlens=c)
    close(o, naive.nsa_attention(q, k, v, *g, **hp, cu_seqlens=c))


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("mode", ["mean", "linear_pe"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(sel_block=32, top_n=3, local_blocks=1, window=20),
        dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=4, init_blocks=2, local_blocks=1, window=7),
    ],
)
def test_decode_equals_prefill(mode, hp):
    torch.manual_seed(13)
    B, S_max, HQ, H, Dk, Dv = 3, 100, 4, 2, 8, 16
    l, d = hp.get("cmp_block", 32), hp.get("cmp_stride", 16)
    q_all, k_all, v_all, g_all, extra = nsa_inputs(B, S_max, HQ, H, Dk, Dv, mode=mode, block=l)
    sc_max = ref.num_compressed(S_max, l, d) + 2
    for ts in ([0, 31, 99], [30, 47, 64], [95, 1, 72]):
        seqlens = torch.tensor([t + 1 for t in ts], dtype=torch.int32)
        k_cache, v_cache = k_all.clone(), v_all.clone()
        kc_cache, vc_cache = randn(B, sc_max, H, Dk), randn(B, sc_max, H, Dv)  # junk past the end
        q = torch.stack([q_all[b, t] for b, t in enumerate(ts)])
        gt = [torch.stack([x[b, t] for b, t in enumerate(ts)]) for x in g_all]
        want = []
        for b, t in enumerate(ts):
            k_cache[b, t + 1 :] = randn(S_max - t - 1, H, Dk)  # junk past t
            v_cache[b, t + 1 :] = randn(S_max - t - 1, H, Dv)
            kc = ref.compress(k_all[b : b + 1, : t + 1], extra.get("w_k"), extra.get("pe_k"), block=l, stride=d)
            vc = ref.compress(v_all[b : b + 1, : t + 1], extra.get("w_v"), extra.get("pe_v"), block=l, stride=d)
            kc_cache[b, : kc.shape[1]] = kc[0]
            vc_cache[b, : vc.shape[1]] = vc[0]
            o = ref.nsa_attention(
                q_all[b : b + 1, : t + 1], k_all[b : b + 1, : t + 1], v_all[b : b + 1, : t + 1],
                *[x[b : b + 1, : t + 1] for x in g_all], **extra, **hp,
            )
            want.append(o[0, t])
        kw = {n: x for n, x in hp.items()}
        got = ref.decode(q, k_cache, v_cache, kc_cache, vc_cache, seqlens, *gt, **kw)
        assert got.shape == (B, HQ, Dv)
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)
        close(got, naive.decode(q, k_cache, v_cache, kc_cache, vc_cache, seqlens, *gt, **kw))


def test_decode_every_position():
    """Decode equals prefill (DESIGN 1.8) for every position of one sequence."""
    torch.manual_seed(14)
    T, HQ, H, D = 90, 2, 1, 8
    hp = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, init_blocks=1, local_blocks=1, window=6)
    q, k, v, g, _ = nsa_inputs(1, T, HQ, H, D, D)
    o = ref.nsa_attention(q, k, v, *g, **hp)
    kc = ref.compress(k, block=16, stride=8)
    vc = ref.compress(v, block=16, stride=8)
    qs = q[0]  # [T, HQ, D]: token t decoded as sequence t
    rep = lambda x: x.expand(T, *x.shape[1:])
    got = ref.decode(
        qs, rep(k), rep(v), rep(kc), rep(vc), torch.arange(1, T + 1, dtype=torch.int32), *[x[0] for x in g], **hp
    )
    torch.testing.assert_close(got, o[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- gradients


def test_gradients_finite_and_zero_without_compressed_tokens():
    torch.manual_seed(15)
    T, HQ, H, D, l, d = 45, 4, 2, 8, 16, 8
    q, k, v, g, extra = nsa_inputs(2, T, HQ, H, D, D, dtype=F32, mode="linear_pe", block=l)
    leaves = [q, k, v, *g, *extra.values()]
    for x in leaves:
        x.requires_grad_(True)
    hp = dict(cmp_block=l, cmp_stride=d, sel_block=16, top_n=2, window=5)
    o = ref.nsa_attention(q, k, v, *g, **extra, **hp)
    (o * randn(*o.shape, dtype=F32)).sum().backward()
    for x in leaves:
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0
    # the compressed branch alone: no gradient into rows t < l - 1, none through lse = -inf
    q2 = q.detach().clone().requires_grad_(True)
    kc = ref.compress(k, extra["w_k"], extra["pe_k"], block=l, stride=d)
    vc = ref.compress(v, extra["w_v"], extra["pe_v"], block=l, stride=d)
    oc, lse = ref.compressed_attention(q2, kc, vc, block=l, stride=d)
    assert torch.isneginf(lse[:, : l - 1]).all()
    loss = (oc * randn(*oc.shape, dtype=F32)).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    loss.backward()
    assert torch.isfinite(q2.grad).all()
    assert (q2.grad[:, : l - 1] == 0).all()
    assert (q2.grad[:, l - 1 :].abs().sum((-1, -2)) > 0).all()
    # the gate of the compressed branch gets no gradient where o_cmp = 0
    assert (g[0].grad[:, : l - 1] == 0).all()


def test_gradients_when_no_compressed_token_at_all():
    torch.manual_seed(16)
    q, k, v = randn(1, 10, 2, 4), randn(1, 10, 1, 4), randn(1, 10, 1, 4)
    w = randn(1, 32 * 4, 4)
    for x in (q, k, w):
        x.requires_grad_(True)
    kc = ref.compress(k, w)
    oc, lse = ref.compressed_attention(q, kc, ref.compress(v))
    gq, gk, gw = torch.autograd.grad(oc.sum(), (q, k, w))
    assert (gq == 0).all() and (gk == 0).all() and (gw == 0).all()


def _finite_lse(fn):
    def wrapped(*args):
        o, lse = fn(*args)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))

    return wrapped


def _leaf(*shape):
    return randn(*shape).requires_grad_(True)


def test_gradcheck_compress_linear_pe():
    torch.manual_seed(17)
    x, w, pe = _leaf(2, 11, 2, 3), _leaf(2, 4 * 3, 2), _leaf(2, 4, 3)
    assert torch.autograd.gradcheck(lambda x, w, pe: ref.compress(x, w, pe, block=4, stride=2), (x, w, pe))
    c = cu([3, 8])
    xv = _leaf(11, 2, 3)
    assert torch.autograd.gradcheck(lambda x, w, pe: ref.compress(x, w, pe, block=4, stride=2, cu_seqlens=c), (xv, w, pe))
    assert torch.autograd.gradcheck(lambda x: ref.compress(x, block=4, stride=2), (x,))


def test_gradcheck_compressed_attention():
    torch.manual_seed(18)
    T, l, d = 12, 4, 2
    nc = ref.num_compressed(T, l, d)
    q, kc, vc = _leaf(1, T, 4, 3), _leaf(1, nc, 2, 3), _leaf(1, nc, 2, 2)
    fn = _finite_lse(lambda q, kc, vc: ref.compressed_attention(q, kc, vc, block=l, stride=d))
    assert torch.autograd.gradcheck(fn, (q, kc, vc))


def test_gradcheck_selected_attention():
    torch.manual_seed(19)
    T, ls = 12, 4
    q, k, v = _leaf(1, T, 4, 3), _leaf(1, T, 2, 3), _leaf(1, T, 2, 2)
    idx = torch.randint(-1, 3, (1, T, 2, 2), dtype=torch.int32)
    fn = _finite_lse(lambda q, k, v: ref.selected_attention(q, k, v, idx, sel_block=ls))
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_window_attention():
    torch.manual_seed(20)
    q, k, v = _leaf(1, 9, 2, 3), _leaf(1, 9, 1, 3), _leaf(1, 9, 1, 2)
    assert torch.autograd.gradcheck(lambda q, k, v: ref.window_attention(q, k, v, window=3), (q, k, v))


def test_gradcheck_combine():
    torch.manual_seed(21)
    o = [_leaf(2, 3, 2, 3) for _ in range(3)]
    g = [_leaf(2, 3, 2) for _ in range(3)]
    assert torch.autograd.gradcheck(ref.combine, (*o, *g))


def test_gradcheck_nsa_attention():
    torch.manual_seed(22)
    T, HQ, H, D = 14, 2, 1, 3
    q, k, v = _leaf(1, T, HQ, D), _leaf(1, T, H, D), _leaf(1, T, H, D)
    g = [_leaf(1, T, HQ) for _ in range(3)]
    w_k, pe_k = _leaf(H, 4 * D, D), _leaf(H, 4, D)
    hp = dict(cmp_block=4, cmp_stride=2, sel_block=4, top_n=2, local_blocks=1, window=3)
    # selection is piecewise constant: gradcheck holds away from score ties (random inputs)
    fn = lambda q, k, v, a, b, c, w, pe: ref.nsa_attention(q, k, v, a, b, c, w_k=w, pe_k=pe, **hp)
    assert torch.autograd.gradcheck(fn, (q, k, v, *g, w_k, pe_k))


# ----------------------------------------------------------------------------- validation


def test_rejects_bad_hyper_parameters():
    q, k, v, g, _ = nsa_inputs(1, 40, 2, 1, 8, 8)
    bad = [
        dict(cmp_block=32, cmp_stride=12),  # d does not divide l
        dict(cmp_block=32, cmp_stride=16, sel_block=40),  # d does not divide l'
        dict(top_n=0),
        dict(window=0),
        dict(init_blocks=-1),
        dict(local_blocks=-1),
        dict(cmp_stride=0),
        dict(sel_block=0),
    ]
    for hp in bad:
        with pytest.raises(ValueError):
            ref.nsa_attention(q, k, v, *g, **hp)
    with pytest.raises(ValueError):
        ref.compress(k, block=32, stride=12)
    with pytest.raises(ValueError):
        ref.select_blocks(q, randn(1, 1, 1, 8), randn(1, 40, 2), top_n=0)
    with pytest.raises(ValueError):
        ref.window_attention(q, k, v, window=0)


def test_rejects_bad_shapes():
    q, k, v, g, _ = nsa_inputs(1, 40, 3, 2, 8, 8)  # 3 query heads, 2 KV heads
    with pytest.raises(ValueError):
        ref.window_attention(q, k, v)
    q, k, v, g, _ = nsa_inputs(1, 40, 2, 1, 8, 8)
    with pytest.raises(ValueError):  # wrong number of compressed tokens
        ref.compressed_attention(q, randn(1, 3, 1, 8), randn(1, 3, 1, 8))
    with pytest.raises(ValueError):  # cu_seqlens not ending at total
        ref.window_attention(q[0], k[0], v[0], cu_seqlens=cu([10, 20]))
    with pytest.raises(ValueError):  # block index out of range
        ref.selected_attention(q, k, v, torch.full((1, 40, 1, 2), 5, dtype=torch.int32))
    with pytest.raises(ValueError):  # gates of the wrong shape
        ref.nsa_attention(q, k, v, g[0][..., :1], g[1], g[2])
