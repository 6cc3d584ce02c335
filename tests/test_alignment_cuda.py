"""Inputs whose data pointer is not 16-byte aligned (a contiguous view at an odd element offset)
are copied by the CUDA ops, never read with misaligned vector loads: results equal those of
aligned copies bit for bit."""
import pytest
import torch

import nsa_cuda
from helpers import requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]


def misaligned(x):
    flat = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
    view = flat[1:].view_as(x)
    view.copy_(x)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def test_misaligned_contiguous_views():
    torch.manual_seed(0)
    B, T, H, G, D = 2, 300, 2, 4, 64
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(B, T, H * G, D), mk(B, T, H, D), mk(B, T, H, D)
    gates = [torch.rand(B, T, H * G, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    kc, vc = nsa_cuda.compress(k), nsa_cuda.compress(v)
    want = [nsa_cuda.compress(k), *nsa_cuda.compressed_attention(q, kc, vc), *nsa_cuda.window_attention(q, k, v, window=64)]
    got = [nsa_cuda.compress(misaligned(k)), *nsa_cuda.compressed_attention(misaligned(q), misaligned(kc), vc),
           *nsa_cuda.window_attention(misaligned(q), k, misaligned(v), window=64)]
    _, lse = nsa_cuda.compressed_attention(q, kc, vc)
    idx = nsa_cuda.select_blocks(q, kc, lse)
    want += [idx, *nsa_cuda.selected_attention(q, k, v, idx)]
    got += [nsa_cuda.select_blocks(misaligned(q), misaligned(kc), misaligned(lse)),
            *nsa_cuda.selected_attention(misaligned(q), misaligned(k), v, misaligned(idx))]
    want.append(nsa_cuda.nsa_attention(q, k, v, *gates))
    got.append(nsa_cuda.nsa_attention(misaligned(q), misaligned(k), misaligned(v), *[misaligned(g) for g in gates]))
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs for misaligned inputs"
