"""`make bench` without a GPU: a small NSA forward/backward on the CPU path of every op, each
checked against nsa_cuda.reference. (On a GPU, `make bench` runs the CUDA benchmarks.)"""
import time

import torch

import nsa_cuda
from nsa_cuda import reference as R


def main() -> None:
    torch.manual_seed(0)
    B, T, HQ, H, D = 1, 512, 8, 2, 32
    kw = dict(cmp_block=32, cmp_stride=16, sel_block=64, top_n=4, init_blocks=1, local_blocks=2)
    q = torch.randn(B, T, HQ, D, requires_grad=True)
    k = torch.randn(B, T, H, D, requires_grad=True)
    v = torch.randn(B, T, H, D, requires_grad=True)
    w_k = (torch.randn(H, 32 * D, D) / (32 * D) ** 0.5).requires_grad_(True)
    gates = [torch.rand(B, T, HQ, requires_grad=True) for _ in range(3)]
    t0 = time.perf_counter()
    k_c = nsa_cuda.compress(k, w_k, block=32, stride=16)
    v_c = nsa_cuda.compress(v, block=32, stride=16)
    o_cmp, lse = nsa_cuda.compressed_attention(q, k_c, v_c, block=32, stride=16)
    idx = nsa_cuda.select_blocks(q.detach(), k_c.detach(), lse.detach(), **kw)
    o_slc, _ = nsa_cuda.selected_attention(q, k, v, idx, sel_block=64)
    o_win, _ = nsa_cuda.window_attention(q, k, v, window=128)
    o = nsa_cuda.combine(o_cmp, o_slc, o_win, *gates)
    o.square().mean().backward()
    ms = (time.perf_counter() - t0) * 1e3
    ref = R.nsa_attention(q, k, v, *gates, w_k=w_k, window=128, **kw)
    err = (o - ref).abs().max().item()
    idx_ref = R.select_blocks(q, R.compress(k, w_k), R.compressed_attention(q, R.compress(k, w_k),
                                                                             R.compress(v))[1], **kw)
    print(f"nsa_cuda {nsa_cuda.__version__} build: {nsa_cuda.build_info()}")
    print(f"CPU path, T={T} HQ={HQ} H={H} D={D}: forward+backward {ms:.0f} ms; "
          f"max |o - reference| = {err:.2e}; block_idx equal to reference: {torch.equal(idx, idx_ref)}")
    assert err < 1e-4 and torch.equal(idx, idx_ref)
    print("[OK] CPU demo (run on a CUDA machine for the GPU benchmarks)")


if __name__ == "__main__":
    main()
