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
