"""Compression benchmark (DESIGN.md §1.1) at the headline shape: H = 4 KV heads, D = 128, bf16,
l = 32, d = 16. Times forward and forward+backward of mean and linear compression of k at
T in {8k .. 128k}, reports GB/s against the measured copy bandwidth, and puts causal full
attention (HQ = 64, cuDNN / flash SDPA) of the same T beside it."""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nsa_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention columns")
    args = ap.parse_args()
    H, HQ, D, l, d = 4, 64, 128, 32, 16
    copy = common.copy_bandwidth_gbs()
    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for T in args.T:
        # Rotate through enough copies of x that one pass over them is > 2x the L2 size: the
        # timings then come from DRAM even where one x would fit in the cache.
        nbytes_x = T * H * D * 2
        xs_all = [torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
                  for _ in range(max(1, min(20, -(-2 * l2 // nbytes_x))))]
        x = xs_all[0]
        rot = itertools.cycle(xs_all)
        w = (torch.randn(H, l * D, D, device="cuda", dtype=torch.bfloat16) / (l * D) ** 0.5)
        pe = torch.randn(H, l, D, device="cuda", dtype=torch.bfloat16)
        full = None if args.no_full else common.full_attention("cudnn", T, HQ, H, D)
        for mode, ww, pp in (("mean", None, None), ("linear", w, None), ("linear+pe", w, pe)):
            y = nsa_cuda.compress(x, ww, pp)
            fwd = common.graph_ms(lambda: nsa_cuda.compress(next(rot), ww, pp))
            xs = [t.detach().requires_grad_(True) for t in (x, ww, pp) if t is not None]
            dy = torch.randn_like(y)

            def fwd_bwd():
                out = nsa_cuda.compress(*xs) if len(xs) == 1 else nsa_cuda.compress(
                    xs[0], xs[1], xs[2] if len(xs) > 2 else None)
                torch.autograd.grad(out, xs, dy)

            fb = common.graph_ms(fwd_bwd)
            nbytes = (x.numel() + y.numel()) * 2 + (w.numel() * 2 if ww is not None else 0)
            gbs = nbytes / (fwd * 1e6)
            flops = 2.0 * y.shape[1] * H * l * D * D if ww is not None else float(y.shape[1] * H * l * D)
            rows.append([T, mode, f"{fwd:.4f}", f"{gbs:.0f}", f"{100 * gbs / copy:.0f}%", f"{flops / fwd / 1e9:.1f}",
                         f"{fb:.4f}", "-" if full is None else f"{full:.3f}",
                         "-" if full is None else f"{full / fwd:.0f}x"])
    common.write_table(
        "compress", ["T", "mode", "fwd ms", "fwd GB/s", "% of copy BW", "fwd TFLOP/s", "fwd+bwd ms",
                     "full attn fwd ms (cuDNN)", "full / compress fwd"], rows,
        {"shape": f"k [1, T, {H}, {D}] bf16, l={l}, d={d}; full attention: HQ={HQ}, causal",
         "bytes": "read x (+ W) + write y", "measured copy bandwidth": f"{copy:.0f} GB/s (read+write)",
         "timing": "forward rotates over copies of x totalling > 2x L2; compression: 20 calls captured in a CUDA graph, median of 20 replays / 20; full attention: median of 10 eager calls"})


if __name__ == "__main__":
    main()
