"""Determinism (issue 7 item 4): forward and backward of every op, of nsa_attention and of the
module's generation path are bitwise identical across two runs with the same inputs, on the CPU
(at the default number of intra-op threads: test_fuzz.py checks it single-threaded) and on CUDA
(bf16, head dim 64; skipped without a GPU). Ragged packed batch with an empty and a 1-token
sequence, several selection blocks per sequence."""
import pytest
import torch

import nsa_cuda
from helpers import requires_cuda

LENS = [300, 0, 1, 77, 190]
L, D, SEL, TOP_N, WIN = 32, 16, 64, 4, 96
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda])]


def setup(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(11)
    total, H, G, Dh = sum(LENS), 2, 4, 64
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    t = dict(q=r(total, H * G, Dh), k=r(total, H, Dh), v=r(total, H, Dh), g_cmp=u(total, H * G),
             g_slc=u(total, H * G), g_win=u(total, H * G), w_k=r(H, L * Dh, Dh) / 40, w_v=r(H, L * Dh, Dh) / 40,
             pe_k=r(H, L, Dh), pe_v=r(H, L, Dh))
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return t, cu


def run_twice(fn, leaves, seed=5):
    """fn(*leaves) -> list of outputs; returns two runs of [outputs..., grads of every leaf]."""
    runs = []
    for _ in range(2):
        a = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves]
        outs = fn(*a)
        diff = [o for o in outs if o.requires_grad]
        g = torch.Generator().manual_seed(seed)
        gos = [torch.randn(o.shape, generator=g).to(o) for o in diff]
        live = [x for x in a if x.requires_grad]
        grads = torch.autograd.grad(diff, live, gos, allow_unused=True) if diff else []
        runs.append([o.detach() for o in outs] + [x for x in grads if x is not None])
    return runs


def assert_identical(runs, what):
    a, b = runs
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and torch.equal(x.nan_to_num(3.0), y.nan_to_num(3.0)) and \
            torch.equal(x.isnan(), y.isnan()), f"{what}: output / gradient {i} differs between two runs"


OPS = ["compress_mean", "compress_linear_pe", "compressed_attention", "select_blocks", "selected_attention",
       "window_attention", "combine", "nsa_attention"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_forward_backward_bitwise_reproducible(op, device):
    t, cu = setup(device)
    pk = dict(cu_seqlens=cu)
    kc = nsa_cuda.compress(t["k"], t["w_k"], t["pe_k"], block=L, stride=D, **pk)
    vc = nsa_cuda.compress(t["v"], t["w_v"], t["pe_v"], block=L, stride=D, **pk)
    _, lse = nsa_cuda.compressed_attention(t["q"], kc, vc, block=L, stride=D, **pk)
    idx = nsa_cuda.select_blocks(t["q"], kc, lse, cmp_block=L, cmp_stride=D, sel_block=SEL, top_n=TOP_N, **pk)
    assert (idx >= 0).sum() > len(LENS) * 2, "several blocks selected"
    if op == "compress_mean":
        runs = run_twice(lambda x: [nsa_cuda.compress(x, block=L, stride=D, **pk)], [t["k"]])
    elif op == "compress_linear_pe":
        runs = run_twice(lambda x, w, pe: [nsa_cuda.compress(x, w, pe, block=L, stride=D, **pk)],
                         [t["k"], t["w_k"], t["pe_k"]])
    elif op == "compressed_attention":
        runs = run_twice(lambda q, a, b: list(nsa_cuda.compressed_attention(q, a, b, block=L, stride=D, **pk)),
                         [t["q"], kc, vc])
    elif op == "select_blocks":
        runs = run_twice(lambda q, a, s: [nsa_cuda.select_blocks(q, a, s, cmp_block=L, cmp_stride=D, sel_block=SEL,
                                                                 top_n=TOP_N, **pk)], [t["q"], kc, lse])
    elif op == "selected_attention":
        runs = run_twice(lambda q, k, v: list(nsa_cuda.selected_attention(q, k, v, idx, sel_block=SEL, **pk)),
                         [t["q"], t["k"], t["v"]])
    elif op == "window_attention":
        runs = run_twice(lambda q, k, v: list(nsa_cuda.window_attention(q, k, v, window=WIN, **pk)),
                         [t["q"], t["k"], t["v"]])
    elif op == "combine":
        o = [torch.randn(t["q"].shape, generator=torch.Generator().manual_seed(i)).to(t["q"]) for i in range(3)]
        runs = run_twice(lambda *a: [nsa_cuda.combine(*a)], o + [t["g_cmp"], t["g_slc"], t["g_win"]])
    else:
        names = ["q", "k", "v", "g_cmp", "g_slc", "g_win", "w_k", "w_v", "pe_k", "pe_v"]

        def nsa(q, k, v, gc, gs, gw, wk, wv, pek, pev):
            o, bi = nsa_cuda.nsa_attention(q, k, v, gc, gs, gw, w_k=wk, w_v=wv, pe_k=pek, pe_v=pev, cmp_block=L,
                                           cmp_stride=D, sel_block=SEL, top_n=TOP_N, window=WIN,
                                           return_block_idx=True, **pk)
            return [o, bi]
        runs = run_twice(nsa, [t[n] for n in names])
    assert_identical(runs, op)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_and_generation_bitwise_reproducible(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    m = nsa_cuda.NativeSparseAttention(256, 8, 2, 64, cmp_block=L, cmp_stride=D, sel_block=SEL, top_n=TOP_N,
                                       window=WIN).to(device=device, dtype=dtype)
    B, P, steps = 3, 150, 40
    x = torch.randn(B, P, 256, device=device, dtype=dtype)
    mask = torch.arange(P, device=device)[None, :] < torch.tensor([150, 1, 97], device=device)[:, None]
    new = torch.randn(steps, B, 1, 256, device=device, dtype=dtype)

    def generate():
        cache = nsa_cuda.NSACache.for_layers([m], B, P + steps)
        with torch.no_grad():
            outs = [m(x, attention_mask=mask, cache=cache)]
            cache.advance()
            for s in range(steps):
                outs.append(m(new[s], cache=cache))
                cache.advance()
            k, v, kc, vc = cache.layer(0)
            q = torch.randn(B, 8, 64, generator=torch.Generator().manual_seed(1)).to(k)
            gates = [torch.rand(B, 8, generator=torch.Generator().manual_seed(i)).to(k) for i in range(3)]
            outs.append(nsa_cuda.decode(q, k, v, kc, vc, cache.cache_seqlens, *gates, cmp_block=L, cmp_stride=D,
                                        sel_block=SEL, top_n=TOP_N, window=WIN))
        return outs

    assert_identical([generate(), generate()], "generation")
