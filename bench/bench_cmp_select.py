"""Compressed attention (DESIGN.md §1.2) forward and forward+backward, and fused block scoring +
top-n selection (§1.3-1.4), against causal full attention (cuDNN SDPA) of the same T in one
process. Headline config: HQ = 64, H = 4, D = 128, bf16, l = 32, d = 16, l' = 64, n = 16.

FLOPs count only the (query, compressed key) pairs a query may see: 2 * pairs * (Dk + Dv) for
the attention, 2 * pairs * Dk for the selection's score recompute."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nsa_cuda  # noqa: E402

L, D_STRIDE, LP, N = 32, 16, 64, 16


def visible_pairs(T: int) -> int:
    """Sum over tokens t of the compressed keys i with i*d + l - 1 <= t."""
    nc = (T - L) // D_STRIDE + 1 if T >= L else 0
    t = torch.arange(T, dtype=torch.int64)
    return int(((t - L + 1).div(D_STRIDE, rounding_mode="floor") + 1).clamp(min=0, max=nc).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    default_T = [int(t) for t in (os.environ.get("NSA_BENCH_T") or "8192 16384 32768 65536 131072").split()]
    ap.add_argument("--T", type=int, nargs="*", default=default_T)
    args = ap.parse_args()
    D, H = 128, 4
    rows = []
    for T in args.T:
        full = common.full_attention("cudnn", T, 64, H, D)
        full_fb = common.full_attention("cudnn", T, 64, H, D, backward=True, iters=5)
        for HQ in (64, 16):
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            kc = nsa_cuda.compress(k, block=L, stride=D_STRIDE).requires_grad_(True)
            vc = nsa_cuda.compress(v, block=L, stride=D_STRIDE).requires_grad_(True)
            do = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                o, lse = nsa_cuda.compressed_attention(q, kc, vc, block=L, stride=D_STRIDE)
            pairs = visible_pairs(T) * HQ
            fl_attn, fl_sel = 2.0 * pairs * (D + D), 2.0 * pairs * D

            def fwd():
                with torch.no_grad():
                    return nsa_cuda.compressed_attention(q, kc, vc, block=L, stride=D_STRIDE)

            def sel():
                return nsa_cuda.select_blocks(q.detach(), kc.detach(), lse, cmp_block=L, cmp_stride=D_STRIDE,
                                              sel_block=LP, top_n=N)

            def fwd_bwd():
                o2, _ = nsa_cuda.compressed_attention(q, kc, vc, block=L, stride=D_STRIDE)
                torch.autograd.grad(o2, (q, kc, vc), do)

            t_fwd = common.median_ms(fwd, 3, 10)
            t_sel = common.median_ms(sel, 3, 10)
            t_fb = common.median_ms(fwd_bwd, 2, 5)
            scratch = torch.cuda.max_memory_allocated()
            for what, ms, fl, base in (("cmp fwd", t_fwd, fl_attn, full), ("select", t_sel, fl_sel, full),
                                       ("cmp fwd + select", t_fwd + t_sel, fl_attn + fl_sel, full),
                                       ("cmp fwd+bwd", t_fb, 3.5 * fl_attn, full_fb)):
                rows.append([T, HQ // H, what, f"{ms:.3f}", f"{fl / ms / 1e9:.0f}",
                             "-" if base is None else f"{base:.2f}",
                             "-" if base is None else f"1/{base / ms:.1f}"])
            del q, k, v, kc, vc, do, o, lse
            torch.cuda.empty_cache()
    common.write_table("cmp_select", ["T", "G", "op", "ms", "TFLOP/s", "cuDNN full ms", "ratio"], rows, {
        "config": f"H=4, D=128, bf16, l={L}, d={D_STRIDE}, l'={LP}, n={N}; G=16: HQ=64, G=4: HQ=16",
        "baseline": "cuDNN causal SDPA with HQ=64 (fwd rows: forward; fwd+bwd rows: forward+backward)",
        "FLOPs": "visible (query, compressed key) pairs only; fwd+bwd counted as 3.5x forward",
        "targets (issue 4)": "cmp fwd + select <= 1/12 of full fwd; cmp fwd+bwd <= 1/12 of full fwd+bwd",
        "timing": "median of CUDA-event samples after warm-up, eager launches",
    })


if __name__ == "__main__":
    main()
