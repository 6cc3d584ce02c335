"""Per-kernel device time of one whole NSA call (nsa_cuda.nsa_attention, forward or
forward+backward) on random inputs, headline config: where the end-to-end time goes.

    python tools/profile_nsa.py [--T 65536] [--HQ 64] [--backward] [--corr R] [--decode B]

--corr R makes neighbouring tokens' queries correlated (q_t = mix of a shared per-R-token
direction and noise), as in trained models whose adjacent tokens select similar blocks; the
default (0) is i.i.d. random queries, whose selections are nearly independent per token.
--decode B profiles one decoding step of B sequences at context T instead (nsa_cuda.decode).
Prints a table of CUDA kernels sorted by total time (torch.profiler)."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import nsa_cuda

HP = dict(cmp_block=32, cmp_stride=16, sel_block=64, top_n=16, init_blocks=1, local_blocks=2, window=512)


def _device_us(ev) -> float:
    """Self device time of a profiler event in us (the attribute's name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(ev, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_decode(B: int, T: int, HQ: int, H: int, D: int) -> None:
    dt = torch.bfloat16
    k = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    v = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    kc = nsa_cuda.compress(k, block=HP["cmp_block"], stride=HP["cmp_stride"])
    vc = nsa_cuda.compress(v, block=HP["cmp_block"], stride=HP["cmp_stride"])
    q = torch.randn(B, HQ, D, device="cuda", dtype=dt)
    gates = [torch.rand(B, HQ, device="cuda", dtype=dt) for _ in range(3)]
    lens = torch.full((B,), T, dtype=torch.int32, device="cuda")

    def step():
        return nsa_cuda.decode(q, k, v, kc, vc, lens, *gates, **HP)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(f"decode B={B} T={T} HQ={HQ} H={H} D={D} (10 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
    # One line per kernel: device us per step (the table's columns are too wide to grep).
    total = 0.0
    for ev in sorted(prof.key_averages(), key=lambda e: -_device_us(e)):
        us = _device_us(ev) / 10
        if us > 0:
            total += us
            print(f"  per step {us:9.1f} us  {ev.key[:90]}")
    print(f"  per step {total:9.1f} us  (all kernels)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--HQ", type=int, default=64)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--corr", type=int, default=0, help="tokens sharing a query direction (0: i.i.d.)")
    ap.add_argument("--decode", type=int, default=0, help="profile a decode step of this batch size")
    args = ap.parse_args()
    T, HQ, H, D = args.T, args.HQ, args.H, args.D
    dt = torch.bfloat16
    if args.decode:
        profile_decode(args.decode, T, HQ, H, D)
        return
    torch.manual_seed(0)
    q = torch.randn(1, T, HQ, D, device="cuda", dtype=dt)
    if args.corr > 1:
        groups = (T + args.corr - 1) // args.corr
        base = torch.randn(1, groups, HQ, D, device="cuda", dtype=dt).repeat_interleave(args.corr, 1)[:, :T]
        q = (0.9 * base + 0.45 * q).to(dt)
    k = torch.randn(1, T, H, D, device="cuda", dtype=dt)
    v = torch.randn(1, T, H, D, device="cuda", dtype=dt)
    gates = [torch.rand(1, T, HQ, device="cuda", dtype=dt) for _ in range(3)]
    leaves = [q, k, v, *gates]
    for t in leaves:
        t.requires_grad_(args.backward)
    do = torch.randn(1, T, HQ, D, device="cuda", dtype=dt)

    def call():
        o, idx = nsa_cuda.nsa_attention(q, k, v, *gates, return_block_idx=True, **HP)
        if args.backward:
            torch.autograd.grad(o, leaves, do)
        return idx

    idx = call()
    torch.cuda.synchronize()
    # How much neighbouring tokens share their selections: blocks in the union of 4 consecutive
    # tokens' lists per KV head, over n (1.0: identical lists; 4.0: disjoint).
    blk = idx[0, : (T // 4) * 4].view(T // 4, 4, H, -1).permute(0, 2, 1, 3).reshape(T // 4, H, -1)
    s = blk.sort(-1).values
    uniq = ((s[..., 1:] != s[..., :-1]) & (s[..., 1:] >= 0)).sum(-1) + (s[..., 0] >= 0).long()
    print(f"T={T} HQ={HQ} H={H} D={D} corr={args.corr}: union of 4 tokens' blocks / n = "
          f"{uniq.float().mean().item() / HP['top_n']:.2f}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
