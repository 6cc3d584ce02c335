"""Compression kernels (DESIGN.md §1.1) on the GPU against nsa_cuda.reference."""
import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R
from helpers import assert_fa_close, poison_cuda_cache, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

DTYPES = [torch.bfloat16, torch.float16]


def compress_lowp(x, w, pe, block, stride, cu_seqlens):
    """The same computation done by PyTorch in the input precision (the error yardstick)."""
    def one(xs):  # xs [T, H, D]
        T = xs.shape[0]
        nc = R.num_compressed(T, block, stride)
        if nc == 0:
            return xs.new_zeros(0, xs.shape[1], w.shape[2] if w is not None else xs.shape[2])
        win = xs.unfold(0, block, stride)[:nc].permute(0, 1, 3, 2)  # [nc, H, l, D]
        if w is None:
            return win.mean(dim=2)
        if pe is not None:
            win = win + pe
        return torch.einsum("nhk,hko->nho", win.reshape(nc, win.shape[1], -1), w)

    if cu_seqlens is None:
        return torch.stack([one(x[b]) for b in range(x.shape[0])])
    H, Dout = x.shape[1], (w.shape[2] if w is not None else x.shape[2])
    out = x.new_zeros(x.shape[0] // stride, H, Dout)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        y = one(x[cu[b]:cu[b + 1]])
        out[cu[b] // stride: cu[b] // stride + y.shape[0]] = y
    return out


def make_inputs(mode, shape, H, D, Dout, dtype, block, cu=None):
    x = torch.randn(*shape, H, D, device="cuda", dtype=dtype)
    w = pe = None
    if mode != "mean":
        w = (torch.randn(H, block * D, Dout, device="cuda", dtype=dtype) / (block * D) ** 0.5)
    if mode == "linear_pe":
        pe = torch.randn(H, block, D, device="cuda", dtype=dtype) * 0.5
    return x, w, pe


def check_forward_backward(x, w, pe, block, stride, cu):
    params = [t for t in (x, w, pe) if t is not None]
    for t in params:
        t.requires_grad_(True)
    out_shape = R.compress(x.detach().float(), None if w is None else w.detach().float(), None if pe is None else
                           pe.detach().float(), block=block, stride=stride, cu_seqlens=cu).shape
    poison_cuda_cache((tuple(out_shape), x.dtype), (tuple(x.shape), x.dtype))
    y = nsa_cuda.compress(x, w, pe, block=block, stride=stride, cu_seqlens=cu)
    fp = [t.detach().float().requires_grad_(True) for t in params]
    it = iter(fp)
    xf = next(it)
    wf = next(it) if w is not None else None
    pef = next(it) if pe is not None else None
    y_ref = R.compress(xf, wf, pef, block=block, stride=stride, cu_seqlens=cu)
    lp = [t.detach().clone().requires_grad_(True) for t in params]
    it = iter(lp)
    xl = next(it)
    wl = next(it) if w is not None else None
    pel = next(it) if pe is not None else None
    y_pt = compress_lowp(xl, wl, pel, block, stride, cu)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert not torch.isnan(y).any(), "unwritten (poisoned) output elements"
    assert_fa_close(y, y_ref, y_pt, "y")

    dy = torch.randn_like(y)  # gap rows of a packed batch get gradient too: it must be ignored
    poison_cuda_cache((tuple(x.shape), x.dtype))
    grads = torch.autograd.grad(y, params, dy)
    if y_ref.numel() == 0 or not (y_ref.requires_grad and y_pt.requires_grad):  # no compressed token (every T < l; a packed
        # batch may still have gap rows): the gradient is exactly zero
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))
        return
    grads_ref = torch.autograd.grad(y_ref, fp, dy.float())
    grads_pt = torch.autograd.grad(y_pt, lp, dy)
    for name, g, gr, gp in zip(("dx", "dw", "dpe"), grads, grads_ref, grads_pt):
        assert not torch.isnan(g).any(), f"{name}: unwritten (poisoned) elements"
        assert_fa_close(g, gr, gp, name)
    # Deterministic backward: a second run is bitwise equal.
    grads2 = torch.autograd.grad(nsa_cuda.compress(x, w, pe, block=block, stride=stride, cu_seqlens=cu), params, dy)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2), "backward is not bitwise reproducible"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe"])
@pytest.mark.parametrize("D", [64, 128, 192, 256])
def test_compress_padded(dtype, mode, D):
    B, T, H, block, stride = 2, 333, 3, 32, 16
    x, w, pe = make_inputs(mode, (B, T), H, D, D, dtype, block)
    check_forward_backward(x, w, pe, block, stride, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean", "linear_pe"])
@pytest.mark.parametrize("T", [1, 31, 32, 33, 48, 100])
def test_compress_short_sequences(dtype, mode, T):
    x, w, pe = make_inputs(mode, (3, T), 2, 64, 64, dtype, 32)
    check_forward_backward(x, w, pe, 32, 16, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe"])
@pytest.mark.parametrize("block,stride", [(32, 16), (16, 8), (64, 16), (32, 32)])
def test_compress_varlen(dtype, mode, block, stride):
    lens = [1, 37, 70, 5, 200, 0, 129]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    x, w, pe = make_inputs(mode, (sum(lens),), 4, 128, 128, dtype, block)
    check_forward_backward(x, w, pe, block, stride, cu)


@pytest.mark.parametrize("mode", ["mean", "linear_pe"])
def test_compress_dout_differs(mode):
    # Dk = 192 keys compressed to a 64-wide output.
    x, w, pe = make_inputs(mode, (2, 160), 2, 192, 64 if mode != "mean" else 192, torch.bfloat16, 32)
    check_forward_backward(x, w, pe, 32, 16, None)


def test_compress_strided_input():
    # k sliced out of a fused qkv tensor: non-contiguous head/row strides are read in place.
    qkv = torch.randn(2, 300, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, :, 1]
    assert not k.is_contiguous()
    y = nsa_cuda.compress(k)
    torch.testing.assert_close(y, nsa_cuda.compress(k.contiguous()), rtol=0, atol=0)


def test_compress_padded_equals_varlen():
    T, H, D = 300, 4, 128
    x = torch.randn(3, T, H, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(H, 32 * D, D, device="cuda", dtype=torch.bfloat16) / 64
    cu = torch.arange(0, 4 * T, T, dtype=torch.int32, device="cuda")
    y_pad = nsa_cuda.compress(x, w)
    y_var = nsa_cuda.compress(x.reshape(3 * T, H, D), w, cu_seqlens=cu)
    nc = y_pad.shape[1]
    for b in range(3):
        start = b * T // 16
        torch.testing.assert_close(y_var[start:start + nc], y_pad[b], rtol=0, atol=0)


def test_compress_64k_headline():
    # Headline shape of the benchmark: 64k tokens, H = 4, D = 128.
    x = torch.randn(1, 65536, 4, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 32 * 128, 128, device="cuda", dtype=torch.bfloat16) / 64
    for ww in (None, w):
        y = nsa_cuda.compress(x, ww)
        y_ref = R.compress(x.float(), None if ww is None else ww.float())
        y_pt = compress_lowp(x, ww, None, 32, 16, None)
        assert_fa_close(y, y_ref, y_pt, "y@64k")


def test_compress_rejects_bad_cuda_input():
    x = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(TypeError, match="'x'"):
        nsa_cuda.compress(x)
    x = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 32 * 64, 64, dtype=torch.bfloat16)  # on the CPU
    with pytest.raises(ValueError, match="'w'"):
        nsa_cuda.compress(x, w)
    with pytest.raises(ValueError, match="head dim"):
        nsa_cuda.compress(torch.randn(1, 64, 2, 12, device="cuda", dtype=torch.bfloat16))
