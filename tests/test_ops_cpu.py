"""Every op on the CPU path against nsa_cuda.reference, plus gradcheck (float64), opcheck and
torch.compile(fullgraph=True). Runs everywhere (CI has no GPU)."""
import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R

ops = torch.ops.nsa_cuda
F64 = torch.float64

# (lens of a ragged packed batch, padded (B, T))
LENS = [1, 37, 70, 5, 130]


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def qkv(shape, HQ, H, Dk, Dv, dtype=F64):
    q = torch.randn(*shape, HQ, Dk, dtype=dtype)
    k = torch.randn(*shape, H, Dk, dtype=dtype)
    v = torch.randn(*shape, H, Dv, dtype=dtype)
    return q, k, v


def layouts():
    yield "padded", (2, 150), None
    yield "packed", (sum(LENS),), cu_of(LENS)


def assert_grads_match(out, ref_out, inputs, ref_inputs, atol=1e-9, rtol=1e-7):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    gos = [torch.randn_like(r) for r in refs if r.dtype.is_floating_point]
    gos = [g.masked_fill(~torch.isfinite(r), 0) for g, r in zip(gos, refs)]
    got = torch.autograd.grad([o for o in outs if o.dtype.is_floating_point], inputs, gos, allow_unused=True)
    want = torch.autograd.grad([r for r in refs if r.dtype.is_floating_point], ref_inputs, gos, allow_unused=True)
    for i, (g, w) in enumerate(zip(got, want)):
        w = torch.zeros_like(ref_inputs[i]) if w is None else w
        g = torch.zeros_like(inputs[i]) if g is None else g
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"grad {i}: {m}")


def leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ---------------------------------------------------------------------------------------------
# op values and gradients vs the reference (float64: agreement to rounding)


@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe"])
@pytest.mark.parametrize("layout,shape,cu", list(layouts()))
def test_compress_matches_reference(mode, layout, shape, cu):
    H, D, Do, l, d = 2, 8, 6 if mode != "mean" else 8, 16, 8
    x = torch.randn(*shape, H, D, dtype=F64)
    w = torch.randn(H, l * D, Do, dtype=F64) if mode != "mean" else None
    pe = torch.randn(H, l, D, dtype=F64) if mode == "linear_pe" else None
    args = [t for t in (x, w, pe) if t is not None]
    a, b = leaf(*args), leaf(*args)

    def split(ts):
        return ts[0], (ts[1] if w is not None else None), (ts[2] if pe is not None else None)

    out = nsa_cuda.compress(*split(a), block=l, stride=d, cu_seqlens=cu)
    ref = R.compress(*split(b), block=l, stride=d, cu_seqlens=cu)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert_grads_match(out, ref, a, b)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("layout,shape,cu", list(layouts()))
def test_compressed_attention_matches_reference(G, layout, shape, cu):
    H, Dk, Dv, l, d = 2, 12, 8, 16, 8
    q, k, v = qkv(shape, H * G, H, Dk, Dv)
    kc = R.compress(k, block=l, stride=d, cu_seqlens=cu)
    vc = R.compress(v, block=l, stride=d, cu_seqlens=cu)
    a, b = leaf(q, kc, vc), leaf(q, kc, vc)
    o, lse = nsa_cuda.compressed_attention(*a, block=l, stride=d, cu_seqlens=cu)
    o_r, lse_r = R.compressed_attention(*b, block=l, stride=d, cu_seqlens=cu)
    torch.testing.assert_close(o, o_r, atol=1e-10, rtol=1e-10)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), lse_r, atol=1e-5, rtol=1e-6)
    assert torch.isneginf(lse).sum() > 0, "the first tokens see no compressed token"
    assert_grads_match((o,), (o_r,), a, b)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("layout,shape,cu", list(layouts()))
def test_select_blocks_matches_reference(G, layout, shape, cu):
    H, Dk, l, d, lp = 2, 12, 16, 8, 16
    q, k, _ = qkv(shape, H * G, H, Dk, Dk)
    kc = R.compress(k, block=l, stride=d, cu_seqlens=cu)
    _, lse = R.compressed_attention(q, kc, kc, block=l, stride=d, cu_seqlens=cu)
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=lp, top_n=3, init_blocks=1, local_blocks=1, cu_seqlens=cu)
    idx = nsa_cuda.select_blocks(q, kc, lse.float(), **kw)
    idx_r = R.select_blocks(q, kc, lse.float(), **kw)
    assert idx.dtype == torch.int32
    assert torch.equal(idx, idx_r)


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("layout,shape,cu", list(layouts()))
def test_selected_attention_matches_reference(G, layout, shape, cu):
    H, Dk, Dv, lp = 2, 12, 8, 16
    q, k, v = qkv(shape, H * G, H, Dk, Dv)
    kc = R.compress(k, block=16, stride=8, cu_seqlens=cu)
    _, lse = R.compressed_attention(q, kc, kc, block=16, stride=8, cu_seqlens=cu)
    idx = R.select_blocks(q, kc, lse, cmp_block=16, cmp_stride=8, sel_block=lp, top_n=3, cu_seqlens=cu)
    a, b = leaf(q, k, v), leaf(q, k, v)
    o, lse_s = nsa_cuda.selected_attention(*a, idx, sel_block=lp, cu_seqlens=cu)
    o_r, lse_sr = R.selected_attention(*b, idx, sel_block=lp, cu_seqlens=cu)
    torch.testing.assert_close(o, o_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse_s.double(), lse_sr, atol=1e-5, rtol=1e-6)
    assert_grads_match((o,), (o_r,), a, b)


@pytest.mark.parametrize("window", [1, 7, 64])
@pytest.mark.parametrize("layout,shape,cu", list(layouts()))
def test_window_attention_matches_reference(window, layout, shape, cu):
    q, k, v = qkv(shape, 4, 2, 12, 8)
    a, b = leaf(q, k, v), leaf(q, k, v)
    o, lse = nsa_cuda.window_attention(*a, window=window, cu_seqlens=cu)
    o_r, lse_r = R.window_attention(*b, window=window, cu_seqlens=cu)
    torch.testing.assert_close(o, o_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse.double(), lse_r, atol=1e-5, rtol=1e-6)
    assert_grads_match((o,), (o_r,), a, b)


def test_combine_matches_reference():
    o3 = [torch.randn(2, 9, 4, 8, dtype=F64) for _ in range(3)]
    g3 = [torch.rand(2, 9, 4, dtype=F64) for _ in range(3)]
    a, b = leaf(*o3, *g3), leaf(*o3, *g3)
    out = nsa_cuda.combine(*a)
    ref = R.combine(*b)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert_grads_match(out, ref, a, b)


@pytest.mark.parametrize("G", [1, 4])
def test_decode_matches_reference(G):
    B, S, H, Dk, Dv, l, d = 3, 200, 2, 12, 8, 16, 8
    kw = dict(cmp_block=l, cmp_stride=d, sel_block=16, top_n=3, init_blocks=1, local_blocks=1, window=20)
    k = torch.randn(B, S, H, Dk, dtype=F64)
    v = torch.randn(B, S, H, Dv, dtype=F64)
    seqlens = torch.tensor([1, 57, 200], dtype=torch.int32)
    kc = R.compress(k, block=l, stride=d)
    vc = R.compress(v, block=l, stride=d)
    q = torch.randn(B, H * G, Dk, dtype=F64)
    gates = [torch.rand(B, H * G, dtype=F64) for _ in range(3)]
    out = nsa_cuda.decode(q, k, v, kc, vc, seqlens, *gates, **kw)
    ref = R.decode(q, k, v, kc, vc, seqlens, *gates, **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    # The CPU path computes in fp32 and returns the input dtype.
    q, k, v = qkv((2, 80), 4, 2, 16, 16, dtype)
    o, lse = nsa_cuda.window_attention(q, k, v, window=16)
    o_r, _ = R.window_attention(q, k, v, window=16)
    assert o.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(o.float(), o_r.float(), atol=tol, rtol=tol)
    y = nsa_cuda.compress(k)
    torch.testing.assert_close(y.float(), R.compress(k).float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) through the registered autograd formulas


def test_gradcheck_compress():
    x = torch.randn(1, 40, 2, 4, dtype=F64, requires_grad=True)
    w = torch.randn(2, 16 * 4, 3, dtype=F64, requires_grad=True)
    pe = torch.randn(2, 16, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, pe: nsa_cuda.compress(x, w, pe, block=16, stride=8), (x, w, pe))
    xp = torch.randn(45, 2, 4, dtype=F64, requires_grad=True)
    cu = cu_of([20, 25])
    assert torch.autograd.gradcheck(lambda x: nsa_cuda.compress(x, block=16, stride=8, cu_seqlens=cu), (xp,))


def test_gradcheck_attention_branches():
    q, k, v = [t.requires_grad_(True) for t in qkv((1, 40), 4, 2, 4, 3)]
    kc = R.compress(k.detach(), block=8, stride=4).requires_grad_(True)
    vc = R.compress(v.detach(), block=8, stride=4).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, kc, vc: nsa_cuda.compressed_attention(q, kc, vc, block=8, stride=4)[0], (q, kc, vc))
    _, lse = R.compressed_attention(q.detach(), kc.detach(), vc.detach(), block=8, stride=4)
    idx = R.select_blocks(q.detach(), kc.detach(), lse, cmp_block=8, cmp_stride=4, sel_block=8, top_n=2)
    assert torch.autograd.gradcheck(lambda q, k, v: nsa_cuda.selected_attention(q, k, v, idx, sel_block=8)[0],
                                    (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: nsa_cuda.window_attention(q, k, v, window=5)[0], (q, k, v))


@pytest.mark.parametrize("branch", ["cmp", "sel", "win"])
def test_lse_gradient(branch):
    # lse is fp32 even for fp64 inputs (so no gradcheck): its gradient (the dlse input of the
    # backward ops) is compared with the reference's autograd instead.
    q, k, v = qkv((1, 60), 4, 2, 8, 8)
    kc = R.compress(k, block=8, stride=4)
    _, lse_c = R.compressed_attention(q, kc, kc, block=8, stride=4)
    idx = R.select_blocks(q, kc, lse_c, cmp_block=8, cmp_stride=4, sel_block=8, top_n=3)
    fns = {
        "cmp": (lambda q, k, v: nsa_cuda.compressed_attention(q, k, v, block=8, stride=4),
                lambda q, k, v: R.compressed_attention(q, k, v, block=8, stride=4), (q, kc, kc)),
        "sel": (lambda q, k, v: nsa_cuda.selected_attention(q, k, v, idx, sel_block=8),
                lambda q, k, v: R.selected_attention(q, k, v, idx, sel_block=8), (q, k, v)),
        "win": (lambda q, k, v: nsa_cuda.window_attention(q, k, v, window=9),
                lambda q, k, v: R.window_attention(q, k, v, window=9), (q, k, v)),
    }
    fn, ref_fn, args = fns[branch]
    a, b = leaf(*args), leaf(*args)
    o, lse = fn(*a)
    o_r, lse_r = ref_fn(*b)
    go = torch.randn_like(o_r)
    gl = torch.randn_like(lse_r).masked_fill(torch.isinf(lse_r), 0)
    got = torch.autograd.grad((o, lse), a, (go, gl.float()))
    want = torch.autograd.grad((o_r, lse_r), b, (go, gl))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_gradcheck_combine():
    ts = [torch.randn(1, 5, 2, 3, dtype=F64, requires_grad=True) for _ in range(3)]
    gs = [torch.rand(1, 5, 2, dtype=F64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(nsa_cuda.combine, (*ts, *gs))


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, autograd registration, AOT dispatch) for every op


def _opcheck_cases():
    torch.manual_seed(1)
    q, k, v = qkv((1, 48), 4, 2, 8, 8, torch.float32)
    cu = cu_of([20, 28])
    qp, kp, vp = qkv((48,), 4, 2, 8, 8, torch.float32)
    w = torch.randn(2, 16 * 8, 8)
    pe = torch.randn(2, 16, 8)
    kc = R.compress(k, block=16, stride=8).float()
    o_c, lse_c = R.compressed_attention(q, kc, kc, block=16, stride=8)
    idx = R.select_blocks(q, kc, lse_c.float(), cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    o_s, lse_s = R.selected_attention(q, k, v, idx, sel_block=16)
    o_w, lse_w = R.window_attention(q, k, v, window=8)
    do = torch.randn_like(q)
    g = [torch.rand(1, 48, 4) for _ in range(3)]
    kcache = torch.randn(2, 40, 2, 8)
    kcc = R.compress(kcache, block=16, stride=8).float()
    seq = torch.tensor([17, 40], dtype=torch.int32)
    qd = torch.randn(2, 4, 8)
    gd = [torch.rand(2, 4) for _ in range(3)]
    f = lambda t: t.float()  # noqa: E731
    return {
        "compress_fwd": [(k, w, pe, 16, 8, None), (kp, None, None, 16, 8, cu)],
        "compress_bwd": [(torch.randn(1, 5, 2, 8), k, w, pe, 16, 8, None)],
        "cmp_attn_fwd": [(q, kc, kc, 0.3, 16, 8, None)],
        "cmp_attn_bwd": [(do, None, q, kc, kc, f(o_c), f(lse_c), 0.3, 16, 8, None),
                         (do, None, q, kc, kc, f(o_c), f(lse_c), 0.3, 16, 8, None, (do * f(o_c)).sum(-1))],
        "select_blocks": [(q, kc, f(lse_c), 0.3, 16, 8, 16, 2, 1, 1, None)],
        "sel_attn_fwd": [(q, k, v, idx, 0.3, 16, None)],
        "sel_attn_bwd": [(do, torch.randn(1, 48, 4), q, k, v, f(o_s), f(lse_s), idx, 0.3, 16, None),
                         (do, None, q, k, v, f(o_s), f(lse_s), idx, 0.3, 16, None, None, torch.randn_like(q))],
        "win_attn_fwd": [(q, k, v, 0.3, 8, None), (qp, kp, vp, 0.3, 8, cu)],
        "win_attn_bwd": [(do, None, q, k, v, f(o_w), f(lse_w), 0.3, 8, None),
                         (do, torch.randn(1, 48, 4), q, k, v, f(o_w), f(lse_w), 0.3, 8, None, (do * f(o_w)).sum(-1))],
        "combine_fwd": [(f(o_c), f(o_s), f(o_w), *g)],
        "combine_bwd": [(do, f(o_c), f(o_s), f(o_w), *g), (do, f(o_c), f(o_s), f(o_w), *g, True)],
        "nsa_fwd": [(q, k, v, kc, kc, *g, 0.3, 16, 8, 16, 2, 1, 1, 8, None)],
        "decode_fwd": [(qd, kcache, kcache, kcc, kcc, seq, *gd, 0.3, 16, 8, 16, 2, 1, 1, 8)],
    }


def test_bwd_given_delta_matches_computed():
    # delta = rowsum(dout * out) handed in (nsa_fwd's backward does) gives the same gradients as
    # the op computing it; dlse is still subtracted; a wrong delta changes dq and dk, not dv.
    torch.manual_seed(3)
    q, k, v = qkv((1, 40), 4, 2, 8, 8, torch.float32)
    do = torch.randn_like(q)
    dlse = torch.randn(1, 40, 4)
    o, lse = ops.win_attn_fwd(q, k, v, 0.3, 8, None)
    delta = (do * o).sum(-1)
    for dl in (None, dlse):
        ref = ops.win_attn_bwd(do, dl, q, k, v, o, lse, 0.3, 8, None)
        got = ops.win_attn_bwd(do, dl, q, k, v, o, lse, 0.3, 8, None, delta)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    off = ops.win_attn_bwd(do, None, q, k, v, o, lse, 0.3, 8, None, delta + 1.0)
    assert (off[0] - ref[0]).abs().max() > 1e-3 and (off[1] - ref[1]).abs().max() > 1e-3
    torch.testing.assert_close(off[2], ops.win_attn_bwd(do, None, q, k, v, o, lse, 0.3, 8, None)[2])
    with pytest.raises(ValueError, match="delta"):
        ops.win_attn_bwd(do, None, q, k, v, o, lse, 0.3, 8, None, delta[:, :-1])


def test_bwd_dq_acc_adds_to_dq():
    # dq_acc (nsa_fwd's backward chains the branches' dq through it): dq = dq_acc + the op's dq,
    # dk / dv unchanged; a bad shape or dtype raises naming the argument.
    torch.manual_seed(13)
    q, k, v = qkv((1, 48), 4, 2, 8, 8, torch.float32)
    do = torch.randn_like(q)
    acc = torch.randn_like(q)
    kc = ops.compress_fwd(k, None, None, 16, 8, None)
    idx = torch.randint(-1, 3, (1, 48, 2, 2)).clamp_max((torch.arange(48) // 16).view(1, 48, 1, 1)).int()
    o_c, l_c = ops.cmp_attn_fwd(q, kc, kc, 0.3, 16, 8, None)
    o_s, l_s = ops.sel_attn_fwd(q, k, v, idx, 0.3, 16, None)
    o_w, l_w = ops.win_attn_fwd(q, k, v, 0.3, 8, None)
    calls = {
        "cmp": lambda *extra: ops.cmp_attn_bwd(do, None, q, kc, kc, o_c, l_c, 0.3, 16, 8, None, *extra),
        "sel": lambda *extra: ops.sel_attn_bwd(do, None, q, k, v, o_s, l_s, idx, 0.3, 16, None, *extra),
        "win": lambda *extra: ops.win_attn_bwd(do, None, q, k, v, o_w, l_w, 0.3, 8, None, *extra),
    }
    for name, call in calls.items():
        ref = call()
        got = call(None, acc)
        torch.testing.assert_close(got[0], ref[0] + acc, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]), name
        with pytest.raises(ValueError, match="dq_acc"):
            call(None, acc[:, :-1])
        with pytest.raises((ValueError, TypeError), match="dq_acc"):
            call(None, acc.double())
    # bf16: the sum is rounded once (fp32 dq + dq_acc), not the rounded dq plus dq_acc
    qb, kb, vb, dob, accb = (t.bfloat16() for t in (q, k, v, do, acc))
    o_b, l_b = ops.win_attn_fwd(qb, kb, vb, 0.3, 8, None)
    got = ops.win_attn_bwd(dob, None, qb, kb, vb, o_b, l_b, 0.3, 8, None, None, accb)[0]
    exact = ops.win_attn_bwd(*(t.float() for t in (dob,)), None, q.bfloat16().float(), kb.float(), vb.float(),
                             o_b.float(), l_b, 0.3, 8, None)[0] + accb.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=1e-2, atol=1e-2)


def test_combine_bwd_dg_fp32():
    torch.manual_seed(4)
    ts = [torch.randn(1, 6, 2, 8, dtype=torch.bfloat16) for _ in range(4)]
    gs = [torch.rand(1, 6, 2, dtype=torch.bfloat16) for _ in range(3)]
    lo = ops.combine_bwd(*ts, *gs)
    hi = ops.combine_bwd(*ts, *gs, True)
    for a, b in zip(lo[:3], hi[:3]):
        assert torch.equal(a, b)
    for b, (a, x) in enumerate(zip(lo[3:], hi[3:])):
        assert x.dtype == torch.float32 and a.dtype == torch.bfloat16
        exact = (ts[0].double() * ts[1 + b].double()).sum(-1)
        torch.testing.assert_close(x.double(), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, x.to(torch.bfloat16))


@pytest.fixture
def one_node(monkeypatch):
    monkeypatch.setattr(nsa_cuda.functional, "ONE_NODE", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nsa_fwd_node_matches_per_step_ops(dtype, one_node):
    # nsa_attention's one-node path (ops.nsa_fwd) against the per-step ops and their own autograd.
    torch.manual_seed(5)
    q, k, v = qkv((1, 90), 8, 2, 16, 16, dtype)
    gs = [torch.rand(1, 90, 8, dtype=dtype) for _ in range(3)]
    leaves = [t.requires_grad_(True) for t in (q, k, v, *gs)]
    kw = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, window=24)
    o, idx = nsa_cuda.nsa_attention(q, k, v, *gs, return_block_idx=True, **kw)
    assert o.grad_fn.name().startswith("GeneratedBackwardFor_nsa_cuda_nsa_fwd")
    kc, vc = nsa_cuda.compress(k, block=16, stride=8), nsa_cuda.compress(v, block=16, stride=8)
    o_c, lse_c = nsa_cuda.compressed_attention(q, kc, vc, block=16, stride=8)
    idx2 = nsa_cuda.select_blocks(q.detach(), kc.detach(), lse_c.detach(), cmp_block=16, cmp_stride=8, sel_block=16,
                                  top_n=3)
    o_s, _ = nsa_cuda.selected_attention(q, k, v, idx2, sel_block=16)
    o_w, _ = nsa_cuda.window_attention(q, k, v, window=24)
    o2 = nsa_cuda.combine(o_c, o_s, o_w, *gs)
    assert torch.equal(idx, idx2) and torch.equal(o, o2)
    do = torch.randn_like(o)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(torch.autograd.grad(o, leaves, do), torch.autograd.grad(o2, leaves, do)):
        torch.testing.assert_close(a, b, **tol)


def test_nsa_attention_per_step_switch(monkeypatch):
    # NSA_ONE_NODE=0's path: nsa_attention as separate ops and nodes, same values as the node.
    torch.manual_seed(6)
    q, k, v = qkv((1, 70), 8, 2, 16, 16, torch.float32)
    gs = [torch.rand(1, 70, 8) for _ in range(3)]
    leaves = [t.requires_grad_(True) for t in (q, k, v, *gs)]
    kw = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, window=24)
    res = {}
    for node in (False, True):
        monkeypatch.setattr(nsa_cuda.functional, "ONE_NODE", node)
        o = nsa_cuda.nsa_attention(q, k, v, *gs, **kw)
        assert o.grad_fn.name().startswith("GeneratedBackwardFor_nsa_cuda_nsa_fwd") == node
        res[node] = (o, torch.autograd.grad(o, leaves, torch.ones_like(o)))
    assert torch.equal(res[False][0], res[True][0])
    for a, b in zip(res[False][1], res[True][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_nsa_fwd_backward_hands_delta_to_every_branch(one_node):
    # The point of the one node: with only o used, each branch backward gets its delta (no zero
    # gradients materialised for the unused outputs, which would also cost the delta).
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name.startswith("nsa_cuda::") and name.endswith("_attn_bwd"):
                at = 10 if name.startswith("nsa_cuda::win") else 11  # delta, then dq_acc
                calls[name] = (args[at] if len(args) > at else None, args[at + 1] if len(args) > at + 1 else None)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(8)
    q, k, v = qkv((1, 64), 4, 2, 8, 8, torch.bfloat16)
    gs = [torch.rand(1, 64, 4, dtype=torch.bfloat16) for _ in range(3)]
    leaves = [t.requires_grad_(True) for t in (q, k, v, *gs)]
    o = nsa_cuda.nsa_attention(q, k, v, *gs, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)
    with Record():
        torch.autograd.grad(o, leaves, torch.randn_like(o))
    assert set(calls) == {"nsa_cuda::cmp_attn_bwd", "nsa_cuda::sel_attn_bwd", "nsa_cuda::win_attn_bwd"}, calls
    for name, (delta, dq_acc) in calls.items():
        assert isinstance(delta, torch.Tensor) and delta.dtype == torch.float32 and delta.shape == (1, 64, 4), name
        # the first branch starts dq; the others add theirs to it inside the op
        if name == "nsa_cuda::cmp_attn_bwd":
            assert dq_acc is None
        else:
            assert isinstance(dq_acc, torch.Tensor) and dq_acc.shape == q.shape and dq_acc.dtype == q.dtype, name


def test_nsa_fwd_node_compiles_fullgraph(one_node):
    torch._dynamo.reset()
    torch.manual_seed(9)
    q, k, v = qkv((1, 64), 4, 2, 8, 8, torch.float32)
    gs = [torch.rand(1, 64, 4) for _ in range(3)]
    leaves = [t.requires_grad_(True) for t in (q, k, v, *gs)]
    fn = lambda *a: nsa_cuda.nsa_attention(*a, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)  # noqa: E731
    eager = fn(*leaves)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled, eager)
    do = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(compiled, leaves, do), torch.autograd.grad(eager, leaves, do)):
        torch.testing.assert_close(a, b)


def test_nsa_fwd_extra_outputs_get_gradients():
    # The branch outputs nsa_fwd also returns are differentiable: gradients reaching them add to
    # the combine's (the branch then computes its own delta).
    torch.manual_seed(6)
    q, k, v = qkv((1, 40), 4, 2, 8, 8, torch.float64)
    kc = R.compress(k, block=16, stride=8)
    gs = [torch.rand(1, 40, 4, dtype=torch.float64) for _ in range(3)]
    args = [t.requires_grad_(True) for t in (q, k, v, kc, kc.clone(), *gs)]

    def f(*a):
        o, _, o_c, _, o_s, _, o_w, _ = ops.nsa_fwd(*a, 0.3, 16, 8, 16, 2, 1, 1, 8, None)
        return o.sum() + (o_c * o_s).sum() + o_w.pow(2).sum()  # (lse is fp32: too coarse for gradcheck)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck(name):
    for args in _opcheck_cases()[name]:
        args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.dtype.is_floating_point
                and name.endswith(("_fwd",)) and name != "decode_fwd" else a for a in args]
        torch.library.opcheck(getattr(ops, name).default, tuple(args))


def test_every_schema_is_opchecked():
    registered = {name for name in dir(ops) if not name.startswith("_") and hasattr(getattr(ops, name), "default")}
    assert registered == set(_opcheck_cases()), registered ^ set(_opcheck_cases())


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)


@pytest.mark.parametrize("name", ["compress", "compressed_attention", "selected_attention", "window_attention",
                                  "combine", "select_blocks", "decode"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    q, k, v = qkv((1, 48), 4, 2, 8, 8, torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    kc = R.compress(k.detach(), block=16, stride=8).float()
    _, lse = R.compressed_attention(q.detach(), kc, kc, block=16, stride=8)
    idx = R.select_blocks(q.detach(), kc, lse.float(), cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    g = [torch.rand(1, 48, 4, requires_grad=True) for _ in range(3)]
    kcache = torch.randn(2, 40, 2, 8)
    kcc = R.compress(kcache, block=16, stride=8).float()
    seq = torch.tensor([17, 40], dtype=torch.int32)
    qd = torch.randn(2, 4, 8)
    gd = [torch.rand(2, 4) for _ in range(3)]
    fns = {
        "compress": lambda: nsa_cuda.compress(k, block=16, stride=8).sum(),
        "compressed_attention": lambda: nsa_cuda.compressed_attention(q, kc.requires_grad_(True), kc, block=16,
                                                                      stride=8)[0].sum(),
        "selected_attention": lambda: nsa_cuda.selected_attention(q, k, v, idx, sel_block=16)[0].sum(),
        "window_attention": lambda: nsa_cuda.window_attention(q, k, v, window=8)[0].sum(),
        "combine": lambda: nsa_cuda.combine(q, q * 2, q * 3, *g).sum(),
        "select_blocks": lambda: nsa_cuda.select_blocks(q.detach(), kc.detach(), lse.float(), cmp_block=16,
                                                        cmp_stride=8, sel_block=16, top_n=2),
        "decode": lambda: nsa_cuda.decode(qd, kcache, kcache, kcc, kcc, seq, *gd, cmp_block=16, cmp_stride=8,
                                          sel_block=16, top_n=2, init_blocks=1, local_blocks=1, window=8),
    }
    fn = fns[name]
    eager = fn()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(compiled, eager)
    if compiled.requires_grad:
        leaves = [t for t in (q, k, v, kc, *g) if t.requires_grad]
        ge = torch.autograd.grad(eager, leaves, allow_unused=True)
        gc = torch.autograd.grad(compiled, leaves, allow_unused=True)
        for a, b in zip(ge, gc):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


def test_compile_inductor_compress_train_step():
    # One end-to-end inductor compile (C++ codegen on the CPU) around the custom ops.
    torch._dynamo.reset()
    x = torch.randn(1, 64, 2, 8, requires_grad=True)
    w = torch.randn(2, 16 * 8, 8, requires_grad=True)

    def step(x, w):
        return (nsa_cuda.compress(x * 2, w, block=16, stride=8).tanh() ** 2).sum()

    eager = step(x, w)
    ge = torch.autograd.grad(eager, (x, w))
    out = torch.compile(step, fullgraph=True)(x, w)
    gc = torch.autograd.grad(out, (x, w))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_build_info():
    info = nsa_cuda.build_info()
    assert set(info) == {"cuda", "archs", "dtypes", "head_dims"}
    assert set(info["dtypes"]) <= {"bf16", "fp16"} and info["dtypes"]
    assert set(info["head_dims"]) <= {64, 128, 192, 256} and info["head_dims"]
    if info["cuda"]:
        assert info["archs"], "a CUDA build lists its archs"
