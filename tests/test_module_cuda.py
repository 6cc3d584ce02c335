"""NativeSparseAttention on CUDA (issue 5, item 5): the bf16 module on the GPU against the same
weights run through the pure-PyTorch reference (`reference_forward`, fp32), gradients of every
parameter and of the input; packed vs padded; attention_mask vs each sequence alone;
torch.compile(fullgraph=True); bitwise determinism."""
import pytest
import torch

import nsa_cuda
from helpers import requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

HP = dict(cmp_block=32, cmp_stride=16, sel_block=64, top_n=4, init_blocks=1, local_blocks=2, window=96)
LENS = [300, 1, 77, 0, 190]


def cu_of(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def make_module(G=4, H=2, compression="linear", dtype=torch.bfloat16):
    torch.manual_seed(0)
    m = nsa_cuda.NativeSparseAttention(128, H * G, H, 64, compression=compression, **HP)
    with torch.no_grad():  # move every parameter off its init (pe starts at zero, w at mean pooling)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.02))
    return m.to(device="cuda", dtype=dtype)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("G,compression", [(1, "linear"), (4, "linear"), (16, "mean")])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_module_cuda_matches_reference(G, compression, layout):
    m = make_module(G, compression=compression)
    ref = make_module(G, compression=compression, dtype=torch.float32)  # same weights, fp32
    if layout == "padded":
        x, kw = torch.randn(2, 260, 128, device="cuda"), {}
    else:
        x, kw = torch.randn(sum(LENS), 128, device="cuda"), dict(cu_seqlens=cu_of(LENS))
    xb = x.to(torch.bfloat16).requires_grad_(True)
    xf = xb.detach().float().requires_grad_(True)
    y = m(xb, **kw)
    y_ref = ref.reference_forward(xf, **kw)
    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert rel(y, y_ref) < 3e-2, f"output: relative error {rel(y, y_ref):.3e}"
    go = torch.randn_like(y_ref)
    names = [n for n, _ in m.named_parameters()]
    g = torch.autograd.grad(y.float(), list(m.parameters()) + [xb], go)
    g_ref = torch.autograd.grad(y_ref, list(ref.parameters()) + [xf], go, allow_unused=True)
    for name, a, r in zip(names + ["x"], g, g_ref):
        if r is None or name == "pe_k":  # pe_k has no effect: its gradient is rounding noise
            continue                      # (test_module_cpu.test_pe_k_has_no_effect)
        assert rel(a, r) < 6e-2, f"grad of {name}: relative error {rel(a, r):.3e}"


def test_module_cuda_packed_equals_padded():
    m = make_module(4)
    x = torch.randn(3, 200, 128, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    y_packed = m(x.reshape(600, 128), cu_seqlens=cu_of([200, 200, 200])).view(3, 200, 128)
    torch.testing.assert_close(y_packed, y, atol=2e-2, rtol=2e-2)


def test_module_cuda_attention_mask_equals_each_sequence_alone():
    m = make_module(4)
    lens, T = [150, 37, 1, 0, 64], 150
    x = torch.randn(len(lens), T, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.arange(T, device="cuda")[None, :] < torch.tensor(lens, device="cuda")[:, None]
    y = m(x, attention_mask=mask)
    for b, n in enumerate(lens):
        if n:
            torch.testing.assert_close(y[b, :n], m(x[b:b + 1, :n])[0], atol=2e-2, rtol=2e-2)
        assert torch.all(y[b, n:] == 0), "padding positions must be zero"


def test_module_cuda_compile_fullgraph():
    torch._dynamo.reset()
    m = make_module(4)
    cu = cu_of(LENS)
    x = torch.randn(sum(LENS), 128, device="cuda", dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = m(xa, cu_seqlens=cu)
    y_c = torch.compile(m, fullgraph=True)(xb, cu_seqlens=cu)
    torch.testing.assert_close(y_c, y, atol=2e-2, rtol=2e-2)
    go = torch.randn_like(y)
    names, params = zip(*m.named_parameters())
    grads = torch.autograd.grad(y, [*params, xa], go)
    grads_c = torch.autograd.grad(y_c, [*params, xb], go)
    for name, a, b in zip([*names, "x"], grads, grads_c):
        if name == "pe_k":  # no effect on the output: both gradients are rounding noise
            continue
        assert rel(b, a) < 2e-2, f"grad of {name}: compiled vs eager relative error {rel(b, a):.3e}"


def test_module_cuda_determinism():
    m = make_module(4)
    cu = cu_of(LENS)
    x = torch.randn(sum(LENS), 128, device="cuda", dtype=torch.bfloat16)
    go = torch.randn_like(x)
    runs = []
    for _ in range(2):
        xa = x.clone().requires_grad_(True)
        y = m(xa, cu_seqlens=cu)
        runs.append([y, *torch.autograd.grad(y, list(m.parameters()) + [xa], go)])
    for a, b in zip(*runs):
        assert torch.equal(a, b), "forward / backward must be bitwise reproducible"
