"""Grouped sparse attention forward (selected and window branches, DESIGN.md §1.5-1.6) against
causal full attention (cuDNN SDPA) of the same T, in one process. Headline config: HQ = 64,
H = 4, D = 128, bf16, l' = 64, n = 16, w = 512; also G = 4 (HQ = 16).

Block lists: blocks 0, t//64 - 1 and t//64 forced (as selection does), the other 13 drawn at
random from the valid blocks, redrawn every 16 tokens (neighbouring tokens share most of their
selection, as real NSA selections do). FLOPs count only the keys actually attended:
2 * keys * (Dk + Dv) per (token, query head)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nsa_cuda  # noqa: E402


def make_block_idx(T: int, H: int, n: int, sel_block: int, redraw: int = 16) -> torch.Tensor:
    t = torch.arange(T, device="cuda")
    cur = t // sel_block  # the block holding t
    groups = (T + redraw - 1) // redraw
    u = torch.rand(groups, H, n - 3, device="cuda").repeat_interleave(redraw, dim=0)[:T]
    rnd = (u * (cur[:, None, None] + 1).float()).long()  # uniform over valid blocks 0..cur
    forced = torch.stack([torch.zeros_like(cur), (cur - 1).clamp(min=0), cur], -1)[:, None, :].expand(T, H, 3)
    idx = torch.cat([forced, rnd], -1).sort(-1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
    idx = torch.where(dup, 1 << 30, idx).sort(-1).values  # unique blocks first, ascending
    return torch.where(idx == 1 << 30, -1, idx).int()[None]


def attended_keys_selected(block_idx: torch.Tensor, sel_block: int) -> float:
    T = block_idx.shape[1]
    t = torch.arange(T, device="cuda")[:, None, None]
    j = block_idx[0].long()
    keys = (t + 1 - j * sel_block).clamp(min=0, max=sel_block) * (j >= 0)
    return keys.sum().item()  # summed over tokens and KV heads


def main() -> None:
    ap = argparse.ArgumentParser()
    default_T = [int(t) for t in (os.environ.get("NSA_BENCH_T") or "8192 16384 32768 65536 131072").split()]
    ap.add_argument("--T", type=int, nargs="*", default=default_T)
    args = ap.parse_args()
    D, H, n, lp, w = 128, 4, 16, 64, 512
    rows = []
    g4_g16 = {}
    for T in args.T:
        full = common.full_attention("cudnn", T, 64, H, D)
        full_fb = common.full_attention("cudnn", T, 64, H, D, backward=True, iters=5)
        for HQ in (64, 16):
            G = HQ // H
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            idx = make_block_idx(T, H, n, lp)
            sel_ms = common.median_ms(lambda: nsa_cuda.selected_attention(q, k, v, idx, sel_block=lp), 3, 10)
            win_ms = common.median_ms(lambda: nsa_cuda.window_attention(q, k, v, window=w), 3, 10)
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            do = torch.randn_like(q)

            def fwd_bwd(fn):
                o, _ = fn(qg, kg, vg)
                torch.autograd.grad(o, (qg, kg, vg), do)

            sel_fb = common.median_ms(lambda: fwd_bwd(lambda a, b, c: nsa_cuda.selected_attention(
                a, b, c, idx, sel_block=lp)), 2, 5)
            win_fb = common.median_ms(lambda: fwd_bwd(lambda a, b, c: nsa_cuda.window_attention(a, b, c, window=w)),
                                      2, 5)
            sel_flops = 2.0 * attended_keys_selected(idx, lp) * G * (D + D)
            win_keys = sum(min(w, t + 1) for t in range(T)) * HQ
            win_flops = 2.0 * win_keys * (D + D)
            full_ref = full if HQ == 64 else None
            full_fb_ref = full_fb if HQ == 64 else None
            for name, ms, fb, fl in (("selected", sel_ms, sel_fb, sel_flops), ("window", win_ms, win_fb, win_flops)):
                tf = fl / ms / 1e9
                if T == 65536:
                    g4_g16[(name, G)] = tf
                rows.append([T, f"G={G} (HQ={HQ})", name, f"{ms:.3f}", f"{tf:.1f}",
                             "-" if full_ref is None else f"{full_ref:.2f}",
                             "-" if full_ref is None else f"1/{full_ref / ms:.1f}",
                             f"{fb:.3f}", f"{3.5 * fl / fb / 1e9:.1f}",
                             "-" if full_fb_ref is None else f"{full_fb_ref:.2f}",
                             "-" if full_fb_ref is None else f"1/{full_fb_ref / fb:.1f}"])
    notes = {
        "shape": f"q [1, T, HQ, {D}], k/v [1, T, {H}, {D}] bf16, l'={lp}, n={n}, w={w}",
        "fwd+bwd FLOPs": "3.5 x forward FLOPs (FlashAttention's convention: backward = 2.5 x forward)",
        "block lists": "0, t//64-1, t//64 forced + 13 random valid blocks redrawn every 16 tokens",
        "FLOPs": "2 * attended keys * (Dk + Dv) per (token, query head)",
        "full attention": "cuDNN SDPA, causal, HQ=64 (GQA expanded), same T",
        "timing": "median of 10 (fwd) / 5 (fwd+bwd) CUDA-event timings after warm-up",
    }
    for name in ("selected", "window"):
        if (name, 4) in g4_g16 and (name, 16) in g4_g16:
            notes[f"G=4 / G=16 TFLOP/s at 64k ({name})"] = f"{g4_g16[(name, 4)] / g4_g16[(name, 16)]:.2f}"
    common.write_table("sparse_attn", ["T", "group", "branch", "fwd ms", "fwd TFLOP/s", "full fwd ms",
                                       "fwd sparse/full", "fwd+bwd ms", "fwd+bwd TFLOP/s", "full fwd+bwd ms",
                                       "fwd+bwd sparse/full"], rows, notes)


if __name__ == "__main__":
    main()
