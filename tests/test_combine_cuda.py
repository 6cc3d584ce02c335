"""The fused gated branch sum (combine_fwd / combine_bwd) on the GPU against the fp32 reference."""
import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R
from helpers import poison_cuda_cache, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


def inputs(lead, HQ, Dv, dtype, strided=False):
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    if strided:  # every tensor a non-contiguous view
        os_ = [mk(*lead, HQ, 2 * Dv)[..., ::2] for _ in range(3)]
        gs = [torch.rand(*lead, 2 * HQ, device="cuda", dtype=dtype)[..., 1::2] for _ in range(3)]
    else:
        os_ = [mk(*lead, HQ, Dv) for _ in range(3)]
        gs = [torch.rand(*lead, HQ, device="cuda", dtype=dtype) for _ in range(3)]
    return os_, gs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Dv", [64, 128, 256, 24, 12])  # 12: not a multiple of 8 (ATen fallback)
@pytest.mark.parametrize("strided", [False, True])
def test_combine_cuda(dtype, Dv, strided):
    lead, HQ = (2, 77), 6
    os_, gs = inputs(lead, HQ, Dv, dtype, strided)
    leaves = [t.detach().requires_grad_(True) for t in os_ + gs]
    poison_cuda_cache(((*lead, HQ, Dv), dtype))
    out = nsa_cuda.combine(*leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in os_ + gs]
    ref = R.combine(*ref_leaves)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(out.double(), ref, **tol)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        gt = dict(tol) if i < 3 else dict(atol=tol["atol"] * Dv ** 0.5, rtol=tol["rtol"])  # dg sums Dv products
        torch.testing.assert_close(g.double(), r, **gt, msg=lambda m: f"grad {i}: {m}")
    again = torch.autograd.grad(nsa_cuda.combine(*leaves), leaves, do)
    assert torch.equal(nsa_cuda.combine(*leaves), out), "forward must be deterministic"
    for a, b in zip(grads, again):
        assert torch.equal(a, b), "backward must be bitwise reproducible"


def test_combine_cuda_empty():
    os_, gs = inputs((0,), 4, 64, torch.bfloat16)
    assert nsa_cuda.combine(*os_, *gs).shape == (0, 4, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Dv", [64, 128, 256])
def test_combine_bwd_dg_fp32_cuda(dtype, Dv):
    # dg_fp32: the fp32 row sums nsa_fwd's backward uses as the branches' delta; dout_b unchanged.
    lead, HQ = (2, 77), 6
    os_, gs = inputs(lead, HQ, Dv, dtype)
    do = torch.randn_like(os_[0])
    lo = torch.ops.nsa_cuda.combine_bwd(do, *os_, *gs)
    hi = torch.ops.nsa_cuda.combine_bwd(do, *os_, *gs, True)
    for a, b in zip(lo[:3], hi[:3]):
        assert torch.equal(a, b)
    for b, (a, x) in enumerate(zip(lo[3:], hi[3:])):
        assert x.dtype == torch.float32 and a.dtype == dtype
        exact = (do.double() * os_[b].double()).sum(-1)
        torch.testing.assert_close(x.double(), exact, rtol=1e-4, atol=1e-4)
        assert torch.equal(a, x.to(dtype))


def ragged_qkv(packed, HQ, H=2, D=128, dt=torch.bfloat16):
    """Sequences of 300, 1 and 700 tokens, packed (cu_seqlens) or as one padded row of 1001:
    (cu_seqlens or None, the leading shape, q, k, v)."""
    T = 1001
    cu = torch.tensor([0, 300, 301, T], dtype=torch.int32, device="cuda") if packed else None
    shp = (T,) if packed else (1, T)
    q, k, v = (torch.randn(*shp, h, D, device="cuda", dtype=dt) for h in (HQ, H, H))
    return cu, shp, q, k, v


@pytest.mark.parametrize("packed", [False, True])
def test_nsa_fwd_node_matches_per_step_ops_cuda(packed, monkeypatch):
    monkeypatch.setattr(nsa_cuda.functional, "ONE_NODE", True)
    # nsa_attention's one-node path (ops.nsa_fwd: delta from the combine backward) against the
    # per-step ops, each with its own autograd and delta kernel.
    torch.manual_seed(7)
    dt, HQ = torch.bfloat16, 32
    cu, shp, q, k, v = ragged_qkv(packed, HQ)
    gs = [torch.rand(*shp, HQ, device="cuda", dtype=dt) for _ in range(3)]
    leaves = [t.requires_grad_(True) for t in (q, k, v, *gs)]
    o, idx = nsa_cuda.nsa_attention(q, k, v, *gs, cu_seqlens=cu, return_block_idx=True)
    assert o.grad_fn.name().startswith("GeneratedBackwardFor_nsa_cuda_nsa_fwd")
    kc, vc = nsa_cuda.compress(k, cu_seqlens=cu), nsa_cuda.compress(v, cu_seqlens=cu)
    o_c, lse_c = nsa_cuda.compressed_attention(q, kc, vc, cu_seqlens=cu)
    idx2 = nsa_cuda.select_blocks(q.detach(), kc.detach(), lse_c.detach(), cu_seqlens=cu)
    o_s, _ = nsa_cuda.selected_attention(q, k, v, idx2, cu_seqlens=cu)
    o_w, _ = nsa_cuda.window_attention(q, k, v, cu_seqlens=cu)
    o2 = nsa_cuda.combine(o_c, o_s, o_w, *gs)
    assert torch.equal(idx, idx2) and torch.equal(o, o2)
    do = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, leaves, do), torch.autograd.grad(o2, leaves, do)):
        scale = b.float().abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, (a - b).abs().max()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("HQ", [32, 8])  # G = 16 (the split dQ walk), G = 4
@pytest.mark.parametrize("kernels", ["default", "sm80"])  # sm80: NSA_DISABLE_WGMMA (mma.sync dQ kernels)
def test_bwd_dq_acc_cuda(packed, HQ, kernels, monkeypatch):
    if kernels == "sm80":
        monkeypatch.setenv("NSA_DISABLE_WGMMA", "1")
    # dq_acc (nsa_fwd's backward chains the three branches' dq through it): every dq kernel returns
    # dq_acc + its dq, rounded once; dk / dv untouched; bitwise the same run to run; a dq_acc with
    # strided rows is read through its strides; one strided in its last dimension is refused (as q).
    torch.manual_seed(11)
    dt, D = torch.bfloat16, 128
    cu, shp, q, k, v = ragged_qkv(packed, HQ, D=D)
    do = torch.randn(*shp, HQ, D, device="cuda", dtype=dt)
    acc = torch.randn(*shp, HQ, 2 * D, device="cuda", dtype=dt)[..., D:]  # rows strided, last dim contiguous
    ops = torch.ops.nsa_cuda
    kc, vc = nsa_cuda.compress(k, cu_seqlens=cu), nsa_cuda.compress(v, cu_seqlens=cu)
    o_c, l_c = ops.cmp_attn_fwd(q, kc, vc, D ** -0.5, 32, 16, cu)
    idx = nsa_cuda.select_blocks(q, kc, l_c, cu_seqlens=cu)
    o_s, l_s = ops.sel_attn_fwd(q, k, v, idx, D ** -0.5, 64, cu)
    o_w, l_w = ops.win_attn_fwd(q, k, v, D ** -0.5, 512, cu)
    calls = {
        "cmp": lambda *x: ops.cmp_attn_bwd(do, None, q, kc, vc, o_c, l_c, D ** -0.5, 32, 16, cu, *x),
        "sel": lambda *x: ops.sel_attn_bwd(do, None, q, k, v, o_s, l_s, idx, D ** -0.5, 64, cu, *x),
        "win": lambda *x: ops.win_attn_bwd(do, None, q, k, v, o_w, l_w, D ** -0.5, 512, cu, *x),
    }
    for name, call in calls.items():
        ref = call()
        got = call(None, acc)
        again = call(None, acc.contiguous())
        assert all(torch.equal(a, b) for a, b in zip(got, again)), name
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]), name
        want = ref[0].float() + acc.float()  # ref[0] is already rounded once: within 1 ulp of the sum
        err = (got[0].float() - want).abs()
        bound = 2.0 ** -7 * (ref[0].float().abs() + acc.float().abs()) + 1e-6
        assert (err <= bound).all(), (name, err.max().item())
        assert (got[0].float() - ref[0].float()).abs().max().item() > 0.5, name  # acc was added
        with pytest.raises(ValueError, match="dq_acc"):
            call(None, torch.randn(*shp, HQ, 2 * D, device="cuda", dtype=dt)[..., ::2])
