"""nsa_cuda.nsa_attention and nsa_cuda.NativeSparseAttention on the CPU path: values and
gradients against nsa_cuda.reference (float64), layouts (padded / packed / attention_mask),
torch.compile(fullgraph=True), determinism, activation checkpointing and bf16 autocast."""
import math

import pytest
import torch
import torch.nn.functional as F

import nsa_cuda
from nsa_cuda import reference as R
from nsa_cuda.module import packed_positions

F64 = torch.float64
HP = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, init_blocks=1, local_blocks=2, window=20)
LENS = [1, 37, 70, 5, 130]  # ragged packed batch: T = 1, T < l, T not a multiple of any block


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def layouts():
    yield "padded", (2, 150), None
    yield "packed", (sum(LENS),), cu_of(LENS)


def leaf(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def assert_grads_match(out, ref, inputs, ref_inputs, atol=1e-9, rtol=1e-7, names=None):
    go = torch.randn_like(ref)
    live = [i for i, t in enumerate(inputs) if t is not None]
    got = torch.autograd.grad(out, [inputs[i] for i in live], go, allow_unused=True)
    want = torch.autograd.grad(ref, [ref_inputs[i] for i in live], go, allow_unused=True)
    for i, g, w in zip(live, got, want):
        name = names[i] if names else str(i)
        assert g is not None, f"no gradient for {name}"
        w = torch.zeros_like(g) if w is None else w
        assert g.abs().sum() > 0 or w.abs().sum() == 0 or name == "pe_k", name  # see test_pe_k_has_no_effect
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------------------------------------
# nsa_attention vs reference.nsa_attention (float64)


def nsa_inputs(shape, G, mode, H=2, Dk=16, Dv=8, dtype=F64, l=HP["cmp_block"]):
    HQ = H * G
    q = torch.randn(*shape, HQ, Dk, dtype=dtype)
    k = torch.randn(*shape, H, Dk, dtype=dtype)
    v = torch.randn(*shape, H, Dv, dtype=dtype)
    gates = [torch.rand(*shape, HQ, dtype=dtype) for _ in range(3)]
    w_k = w_v = pe_k = pe_v = None
    if mode != "mean":
        w_k = torch.randn(H, l * Dk, Dk, dtype=dtype) / math.sqrt(l * Dk)
        w_v = torch.randn(H, l * Dv, Dv, dtype=dtype) / math.sqrt(l * Dv)
    if mode == "linear_pe":
        pe_k = torch.randn(H, l, Dk, dtype=dtype)
        pe_v = torch.randn(H, l, Dv, dtype=dtype)
    if mode == "linear_k_only":
        w_v = None
    return [q, k, v, *gates, w_k, w_v, pe_k, pe_v]


NAMES = ["q", "k", "v", "g_cmp", "g_slc", "g_win", "w_k", "w_v", "pe_k", "pe_v"]


def call(fn, ts, cu, **extra):
    q, k, v, gc, gs, gw, w_k, w_v, pe_k, pe_v = ts
    return fn(q, k, v, gc, gs, gw, w_k=w_k, w_v=w_v, pe_k=pe_k, pe_v=pe_v, cu_seqlens=cu, **HP, **extra)


@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe", "linear_k_only"])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("layout,shape,cu", list(layouts()))
def test_nsa_attention_matches_reference(mode, G, layout, shape, cu):
    ts = nsa_inputs(shape, G, mode)
    a, b = leaf(*ts), leaf(*ts)
    o, idx = call(nsa_cuda.nsa_attention, a, cu, return_block_idx=True)
    o_r, idx_r = call(R.nsa_attention, b, cu, return_block_idx=True)
    assert o.dtype == F64 and o.shape == (*shape, 2 * G, 8)
    assert idx.dtype == torch.int32 and idx.shape == (*shape, 2, HP["top_n"])
    assert torch.equal(idx, idx_r), f"{(idx != idx_r).sum()} block indices differ"
    assert (idx == -1).any() and (idx > 2).any(), "the test should see both padding and real selection"
    torch.testing.assert_close(o, o_r, atol=1e-10, rtol=1e-10)
    assert_grads_match(o, o_r, a, b, names=NAMES)


def test_nsa_attention_gradcheck():
    hp = dict(HP, cmp_block=8, cmp_stride=4, sel_block=8, top_n=2, window=6)
    ts = [t.requires_grad_(True) for t in nsa_inputs((1, 40), 2, "linear_pe", H=2, Dk=4, Dv=3, l=8)]

    def fn(q, k, v, gc, gs, gw, w_k, w_v, pe_k, pe_v):
        return nsa_cuda.nsa_attention(q, k, v, gc, gs, gw, w_k=w_k, w_v=w_v, pe_k=pe_k, pe_v=pe_v, **hp)

    assert torch.autograd.gradcheck(fn, tuple(ts), fast_mode=True)


def test_nsa_attention_defaults_and_scale():
    # paper hyper-parameters by default; a custom scale reaches every branch
    q, k, v, gc, gs, gw = nsa_inputs((1, 200), 2, "mean")[:6]
    torch.testing.assert_close(nsa_cuda.nsa_attention(q, k, v, gc, gs, gw),
                               R.nsa_attention(q, k, v, gc, gs, gw), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(nsa_cuda.nsa_attention(q, k, v, gc, gs, gw, scale=0.3, **HP),
                               R.nsa_attention(q, k, v, gc, gs, gw, scale=0.3, **HP), atol=1e-10, rtol=1e-10)
    cu = cu_of([200])
    o = nsa_cuda.nsa_attention(q[0], k[0], v[0], gc[0], gs[0], gw[0], cu_seqlens=cu, max_seqlen=200, **HP)
    torch.testing.assert_close(o, R.nsa_attention(q, k, v, gc, gs, gw, **HP)[0], atol=1e-10, rtol=1e-10)


def raises(exc, arg):
    return pytest.raises(exc, match=f"'{arg}'")


def test_nsa_attention_bad_arguments():
    q, k, v, gc, gs, gw, w_k, w_v, pe_k, pe_v = nsa_inputs((1, 40), 2, "linear_pe", dtype=torch.float32)
    f = nsa_cuda.nsa_attention
    with raises(ValueError, "g_slc"):
        f(q, k, v, gc, gs[:, :-1], gw, **HP)
    with raises(ValueError, "g_win"):
        f(q, k, v, gc, gs, gw[..., None], **HP)
    with raises(TypeError, "g_cmp"):
        f(q, k, v, gc.double(), gs, gw, **HP)
    with raises(TypeError, "k"):
        f(q, k.double(), v, gc, gs, gw, **HP)
    with raises(ValueError, "v"):
        f(q, k, v[:, :-1], gc, gs, gw, **HP)
    with raises(ValueError, "q"):
        f(q, k, v, gc, gs, gw, cu_seqlens=cu_of([40]), **HP)  # padded q with cu_seqlens
    with raises(ValueError, "w_k"):
        f(q, k, v, gc, gs, gw, w_k=w_k[:, :-1], **HP)
    with raises(ValueError, "w_v"):
        f(q, k, v, gc, gs, gw, w_v=w_k, **HP)  # Dk-shaped weight for the values
    with raises(ValueError, "pe_k"):
        f(q, k, v, gc, gs, gw, pe_k=pe_k, **HP)  # pe without w
    with raises(ValueError, "pe_v"):
        f(q, k, v, gc, gs, gw, w_v=w_v, pe_v=pe_v[:, 1:], **HP)
    with raises(TypeError, "w_k"):
        f(q, k, v, gc, gs, gw, w_k=w_k.double(), **HP)
    with raises(ValueError, "cmp_stride"):
        f(q, k, v, gc, gs, gw, **dict(HP, cmp_stride=5))
    with raises(ValueError, "cmp_stride"):
        f(q, k, v, gc, gs, gw, **dict(HP, sel_block=20))
    with raises(ValueError, "top_n"):
        f(q, k, v, gc, gs, gw, **dict(HP, top_n=0))
    with raises(ValueError, "window"):
        f(q, k, v, gc, gs, gw, **dict(HP, window=0))
    with raises(ValueError, "max_seqlen"):
        f(q, k, v, gc, gs, gw, max_seqlen=40, **HP)
    with raises(ValueError, "scale"):
        f(q, k, v, gc, gs, gw, scale=-1.0, **HP)
    with pytest.raises(ValueError, match="multiple"):
        f(q[:, :, :3], k, v, gc[..., :3], gs[..., :3], gw[..., :3], **HP)


# ---------------------------------------------------------------------------------------------
# NativeSparseAttention vs an independent pure-reference computation with the same weights


def make_module(G=2, compression="linear", bias=False, rope_theta=10000.0, dtype=F64, v_head_dim=8, H=2):
    m = nsa_cuda.NativeSparseAttention(64, H * G, H, 16, v_head_dim, compression=compression, bias=bias,
                                       rope_theta=rope_theta, **HP)
    with torch.no_grad():  # move every parameter off its init (pe starts at zero, w at mean pooling)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.05))
    return m.to(dtype)


def rope_ref(x, theta):
    """x [T, heads, D]: pair (x[i], x[i + D/2]) rotated by position * theta^(-2i/D) (complex form)."""
    if theta is None:
        return x
    T, _, D = x.shape
    angle = torch.arange(T, dtype=F64)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=F64) / D)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(angle),
                                                                                          angle)[:, None, :]
    return torch.cat((z.real, z.imag), -1).to(x.dtype)


def ref_module(m, x, cu_seqlens=None, attention_mask=None):
    """What NativeSparseAttention computes, one sequence at a time, with nsa_cuda.reference."""
    HQ, H, Dk, Dv = m.num_heads, m.num_kv_heads, m.head_dim, m.v_head_dim
    comp = {}
    if m.compression == "linear":
        comp = dict(w_k=m.w_k, w_v=m.w_v, pe_k=m.pe_k, pe_v=m.pe_v)

    def one(xs):  # xs [T, C]
        T = xs.shape[0]
        q = rope_ref(F.linear(xs, m.q_proj.weight, m.q_proj.bias).view(T, HQ, Dk), m.rope_theta)
        k = rope_ref(F.linear(xs, m.k_proj.weight, m.k_proj.bias).view(T, H, Dk), m.rope_theta)
        v = F.linear(xs, m.v_proj.weight, m.v_proj.bias).view(T, H, Dv)
        g = torch.sigmoid(F.linear(xs, m.g_proj.weight, m.g_proj.bias))
        gates = [g[:, i * HQ:(i + 1) * HQ][None] for i in range(3)]
        o = R.nsa_attention(q[None], k[None], v[None], *gates, **comp, **HP)[0]
        return F.linear(o.reshape(T, HQ * Dv), m.o_proj.weight, m.o_proj.bias)

    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        return torch.cat([one(x[a:b]) for a, b in zip(cu, cu[1:])])
    if attention_mask is None:
        return torch.stack([one(xs) for xs in x])
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        rows = attention_mask[b].bool().nonzero().squeeze(1)
        if rows.numel():
            out[b, rows] = one(x[b, rows])
    return out


def right_padded_mask(lens, T):
    return torch.arange(T)[None, :] < torch.tensor(lens)[:, None]


def module_grads_match(m, run, run_ref, x, atol=1e-9, rtol=1e-7):
    params = [p for _, p in m.named_parameters()]
    names = [n for n, _ in m.named_parameters()] + ["x"]
    xa, xb = leaf(x, x)
    y, y_r = run(xa), run_ref(xb)
    torch.testing.assert_close(y, y_r, atol=1e-10, rtol=1e-10)
    go = torch.randn_like(y_r)
    got = torch.autograd.grad(y, params + [xa], go)
    want = torch.autograd.grad(y_r, params + [xb], go)
    for name, g, w in zip(names, got, want):
        assert g.abs().sum() > 0 or name == "pe_k", f"zero gradient for {name}"  # see test_pe_k_has_no_effect
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda s: f"grad of {name}: {s}")


@pytest.mark.parametrize("compression,G,bias", [("linear", 2, False), ("linear", 1, True), ("mean", 4, False)])
@pytest.mark.parametrize("layout", ["padded", "packed", "masked"])
def test_module_matches_reference(compression, G, bias, layout):
    m = make_module(G, compression, bias)
    if layout == "padded":
        x, kw = torch.randn(2, 150, 64, dtype=F64), {}
    elif layout == "packed":
        x, kw = torch.randn(sum(LENS), 64, dtype=F64), dict(cu_seqlens=cu_of(LENS))
    else:
        x, kw = torch.randn(4, 130, 64, dtype=F64), dict(attention_mask=right_padded_mask([130, 37, 5, 0], 130))
    module_grads_match(m, lambda x: m(x, **kw), lambda x: ref_module(m, x, **kw), x)


@pytest.mark.parametrize("layout", ["padded", "packed", "masked"])
def test_reference_forward_matches_reference(layout):
    m = make_module(2, "linear", rope_theta=500.0)
    x = torch.randn(3, 90, 64, dtype=F64)
    kw = {}
    if layout == "packed":
        x, kw = x.reshape(-1, 64), dict(cu_seqlens=cu_of([90, 100, 80]))
    elif layout == "masked":
        kw = dict(attention_mask=right_padded_mask([90, 17, 60], 90))
    torch.testing.assert_close(m.reference_forward(x, **kw), ref_module(m, x, **kw), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m(x, **kw), m.reference_forward(x, **kw), atol=1e-10, rtol=1e-10)


def test_module_no_rope_dk_eq_dv():
    m = make_module(2, "linear", rope_theta=None, v_head_dim=None)
    assert m.v_head_dim == 16 and m.w_v.shape == (2, 16 * 16, 16)
    x = torch.randn(2, 70, 64, dtype=F64)
    module_grads_match(m, m, lambda x: ref_module(m, x), x)


def test_pe_k_has_no_effect():
    # pe_k adds the same vector flatten(pe_k[h]) @ w_k[h] to every compressed key of head h; the
    # compressed softmax (and with it o_cmp and the selection scores p = exp(s - lse)) is
    # invariant to that, so pe_k changes nothing and its gradient is zero up to rounding.
    # pe_v is not inert (it shifts o_cmp wherever a compressed token is visible).
    ts = nsa_inputs((2, 100), 2, "linear_pe")
    o = call(nsa_cuda.nsa_attention, ts, None)
    ts[8] = ts[8] + torch.randn_like(ts[8])
    torch.testing.assert_close(call(nsa_cuda.nsa_attention, ts, None), o, atol=1e-12, rtol=1e-12)
    ts[9] = ts[9] + torch.randn_like(ts[9])
    assert not torch.allclose(call(nsa_cuda.nsa_attention, ts, None), o)


def test_varlen_equals_padded():
    m = make_module(2, "linear", dtype=torch.float32)
    x = torch.randn(3, 100, 64)
    xa, xb = leaf(x, x)
    y = m(xa)
    y_packed = m(xb.reshape(300, 64), cu_seqlens=cu_of([100, 100, 100]), max_seqlen=100).view(3, 100, 64)
    torch.testing.assert_close(y_packed, y, atol=1e-6, rtol=1e-6)
    go = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y_packed, xb, go)[0], torch.autograd.grad(y, xa, go)[0],
                               atol=1e-6, rtol=1e-6)


def test_attention_mask_equals_each_sequence_alone():
    m = make_module(2, "linear", dtype=torch.float32)
    lens, T = [120, 37, 1, 0, 64], 120
    x = torch.randn(len(lens), T, 64)
    mask = right_padded_mask(lens, T)
    y = m(x, attention_mask=mask.int())  # 0/1 masks work like bool ones
    for b, n in enumerate(lens):
        if n:
            torch.testing.assert_close(y[b, :n], m(x[b:b + 1, :n])[0], atol=1e-6, rtol=1e-6)
        assert torch.all(y[b, n:] == 0), "padding positions must be zero"
    # left padding: the unmasked tokens of each row form its sequence
    left = mask.flip(1)
    x_left = torch.zeros_like(x)
    for b, n in enumerate(lens):
        x_left[b, T - n:] = x[b, :n]
    y_left = m(x_left, attention_mask=left)
    for b, n in enumerate(lens):
        torch.testing.assert_close(y_left[b, T - n:], y[b, :n], atol=1e-6, rtol=1e-6)


def test_packed_positions():
    cu = cu_of([3, 0, 1, 4])
    assert packed_positions(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# torch.compile, determinism, checkpointing, autocast


def test_compile_fullgraph_packed_forward_backward():
    torch._dynamo.reset()
    m = make_module(2, "linear", dtype=torch.float32)
    cu = cu_of(LENS)
    x = torch.randn(sum(LENS), 64)
    params = list(m.parameters())
    xa, xb = leaf(x, x)
    y = m(xa, cu_seqlens=cu)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y_c = compiled(xb, cu_seqlens=cu)
    torch.testing.assert_close(y_c, y, atol=1e-6, rtol=1e-6)
    go = torch.randn_like(y)
    for g, g_c in zip(torch.autograd.grad(y, params + [xa], go), torch.autograd.grad(y_c, params + [xb], go)):
        torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_attention_mask():
    # packing from a mask has a data-dependent shape (nonzero); PyTorch 2.14 traces it
    torch._dynamo.reset()
    m = make_module(2, "linear", dtype=torch.float32)
    x = torch.randn(3, 100, 64)
    params = list(m.parameters())
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for lens in ([100, 40, 7], [60, 0, 99]):
        mask = right_padded_mask(lens, 100)
        xa, xb = leaf(x, x)
        y, y_c = m(xa, attention_mask=mask), compiled(xb, attention_mask=mask)
        torch.testing.assert_close(y_c, y, atol=1e-6, rtol=1e-6)
        go = torch.randn_like(y)
        for g, g_c in zip(torch.autograd.grad(y, params + [xa], go), torch.autograd.grad(y_c, params + [xb], go)):
            torch.testing.assert_close(g_c, g, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_functional():
    torch._dynamo.reset()
    ts = nsa_inputs((2, 100), 2, "linear_pe", dtype=torch.float32)
    a, b = leaf(*ts), leaf(*ts)

    def fn(*ts):
        return call(nsa_cuda.nsa_attention, ts, None, return_block_idx=True)

    o, idx = fn(*a)
    o_c, idx_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(*b)
    assert torch.equal(idx_c, idx)
    torch.testing.assert_close(o_c, o)
    go = torch.randn_like(o)
    for g, g_c in zip(torch.autograd.grad(o, a, go), torch.autograd.grad(o_c, b, go)):
        torch.testing.assert_close(g_c, g)


def test_determinism():
    m = make_module(2, "linear", dtype=torch.float32)
    x = torch.randn(sum(LENS), 64)
    cu = cu_of(LENS)
    go = torch.randn(sum(LENS), 64)
    runs = []
    for _ in range(2):
        xa = leaf(x)[0]
        y = m(xa, cu_seqlens=cu)
        runs.append([y] + list(torch.autograd.grad(y, list(m.parameters()) + [xa], go)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_same_grads(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    m = make_module(2, "linear", dtype=torch.float32)
    x = torch.randn(2, 100, 64)
    go = torch.randn(2, 100, 64)
    runs = []
    for ck in (False, True):
        m.zero_grad(set_to_none=True)
        xa = leaf(x)[0]
        y = checkpoint(m, xa, use_reentrant=use_reentrant) if ck else m(xa)
        y.backward(go)  # (reentrant checkpointing does not support autograd.grad)
        runs.append([y.detach()] + [p.grad for p in m.parameters()] + [xa.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_autocast_bf16_close_to_fp32():
    m = make_module(2, "linear", dtype=torch.float32)
    x = torch.randn(2, 100, 64)
    y32 = m(x)
    g32 = torch.autograd.grad(y32.square().sum(), list(m.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y32) < 3e-2, rel_err(y16, y32)
    g16 = torch.autograd.grad(y16.float().square().sum(), list(m.parameters()))
    for (name, p), a, b in zip(m.named_parameters(), g16, g32):
        assert a.dtype == p.dtype == torch.float32, name
        assert torch.isfinite(a).all(), name
        if name != "pe_k":  # its gradient is rounding noise (test_pe_k_has_no_effect)
            assert rel_err(a, b) < 1e-1, (name, rel_err(a, b))
    # packed input under autocast too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16p = m(x.reshape(200, 64), cu_seqlens=cu_of([100, 100]))
    assert rel_err(y16p.view(2, 100, 64), y32) < 3e-2


def test_module_in_bf16():
    m = make_module(2, "linear", dtype=torch.bfloat16)
    x = torch.randn(1, 80, 64, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in m.parameters())
    y32 = m.float()(x.detach().float())
    assert rel_err(y, y32) < 5e-2


# ---------------------------------------------------------------------------------------------
# construction


def test_module_init_is_mean_pooling_plus_noise():
    torch.manual_seed(1)
    m = nsa_cuda.NativeSparseAttention(64, 4, 2, **HP)
    assert m.head_dim == 16 and m.v_head_dim == 16
    assert m.w_k.shape == (2, 16 * 16, 16) and m.pe_k.shape == (2, 16, 16)
    assert torch.all(m.pe_k == 0) and torch.all(m.pe_v == 0)
    k = torch.randn(1, 64, 2, 16)
    mean = nsa_cuda.compress(k, block=16, stride=8)
    lin = nsa_cuda.compress(k, m.w_k.detach(), m.pe_k.detach(), block=16, stride=8)
    assert rel_err(lin, mean) < 0.2
    assert not torch.equal(m.w_k[0], m.w_k[1]), "noise breaks the symmetry between heads"
    names = {n for n, _ in m.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight", "o_proj.weight",
                     "w_k", "w_v", "pe_k", "pe_v"}
    m_mean = nsa_cuda.NativeSparseAttention(64, 4, compression="mean", bias=True, **HP)
    assert m_mean.num_kv_heads == 4 and m_mean.w_k is None
    assert {n for n, _ in m_mean.named_parameters()} == {f"{p}_proj.{w}" for p in "qkvgo" for w in ("weight", "bias")}


def test_module_bad_arguments():
    NSA = nsa_cuda.NativeSparseAttention
    with raises(ValueError, "compression"):
        NSA(64, 4, compression="conv")
    with raises(ValueError, "num_heads"):
        NSA(64, 4, 3)
    with raises(ValueError, "head_dim"):
        NSA(64, 4, head_dim=15)  # RoPE needs an even head dim
    NSA(64, 4, head_dim=15, rope_theta=None, **HP)
    with raises(ValueError, "cmp_stride"):
        NSA(64, 4, cmp_block=16, cmp_stride=6)
    m = NSA(64, 4, 2, **HP)
    x = torch.randn(2, 30, 64)
    with raises(ValueError, "x"):
        m(x[..., :32])
    with raises(ValueError, "x"):
        m(x.reshape(60, 64))  # packed without cu_seqlens
    with raises(ValueError, "x"):
        m(x, cu_seqlens=cu_of([30, 30]))  # padded with cu_seqlens
    with raises(ValueError, "cu_seqlens"):
        m(x.reshape(60, 64), cu_seqlens=cu_of([30, 30]).long())
    with raises(ValueError, "attention_mask"):
        m(x, attention_mask=torch.ones(2, 29, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        m(x, cu_seqlens=cu_of([30, 30]), attention_mask=torch.ones(2, 30, dtype=torch.bool))
