"""The headline benchmark (issue 5, DESIGN.md §4): the full NSA forward and forward+backward
(compression + selection + the three branches + gates, `nsa_cuda.nsa_attention`) against causal
full attention (SDPA with the cuDNN and flash backends) in the same process, at
T in {8k, 16k, 32k, 64k, 128k}: headline config (HQ = 64, H = 4, D = 128, bf16, l = 32, d = 16,
l' = 64, n = 16, w = 512), also G = 4 (HQ = 16) and Dk = 192 / Dv = 128.

Until every CUDA kernel has landed, `nsa_attention` raises NotImplementedError on CUDA: the
benchmark then says which op is missing and times the parts that exist (compression of k and v,
selected and window attention with selection-like block lists), so their share of the budget
is visible. Writes a dated markdown table (and a PNG plot when matplotlib is there) to
bench/results/."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_sparse_attn import make_block_idx  # noqa: E402

import nsa_cuda  # noqa: E402

CONFIGS = {  # name: (HQ, H, Dk, Dv)
    "headline": (64, 4, 128, 128),
    "G=4": (16, 4, 128, 128),
    "Dk=192": (64, 4, 192, 128),
}
HP = dict(cmp_block=32, cmp_stride=16, sel_block=64, top_n=16, init_blocks=1, local_blocks=2, window=512)


def nsa_flops(T: int, HQ: int, Dk: int, Dv: int) -> float:
    """Forward FLOPs actually needed (DESIGN §5): compressed attention (causal-like over T/16
    compressed keys) + its score recompute for selection + selected (n*l' keys) + window (w keys)."""
    l, d, lp, n, w = HP["cmp_block"], HP["cmp_stride"], HP["sel_block"], HP["top_n"], HP["window"]
    cmp_keys = sum(max(0, min((t - l + 1) // d + 1, (T - l) // d + 1)) for t in range(0, T, 64)) * 64
    sel_keys = sum(min(n * lp, t + 1) for t in range(0, T, 64)) * 64
    win_keys = sum(min(w, t + 1) for t in range(0, T, 64)) * 64
    return 2.0 * HQ * (cmp_keys * (Dk + Dv) + cmp_keys * Dk + (sel_keys + win_keys) * (Dk + Dv))


def run_config(name: str, T: int, backward: bool):
    HQ, H, Dk, Dv = CONFIGS[name]
    dt = torch.bfloat16
    q = torch.randn(1, T, HQ, Dk, device="cuda", dtype=dt, requires_grad=backward)
    k = torch.randn(1, T, H, Dk, device="cuda", dtype=dt, requires_grad=backward)
    v = torch.randn(1, T, H, Dv, device="cuda", dtype=dt, requires_grad=backward)
    gates = [torch.rand(1, T, HQ, device="cuda", dtype=dt, requires_grad=backward) for _ in range(3)]
    w_k = (torch.randn(H, 32 * Dk, Dk, device="cuda", dtype=dt) / (32 * Dk) ** 0.5).requires_grad_(backward)
    w_v = (torch.randn(H, 32 * Dv, Dv, device="cuda", dtype=dt) / (32 * Dv) ** 0.5).requires_grad_(backward)
    do = torch.randn(1, T, HQ, Dv, device="cuda", dtype=dt)
    leaves = [q, k, v, *gates, w_k, w_v]

    def full_nsa():
        o = nsa_cuda.nsa_attention(q, k, v, *gates, w_k=w_k, w_v=w_v, **HP)
        if backward:
            torch.autograd.grad(o, leaves, do)

    try:
        return common.median_ms(full_nsa, 2, 5), None
    except NotImplementedError as e:
        missing = str(e).split(":")[0]
    # Parts that exist on CUDA today: compression of k and v, selected and window branches.
    idx = make_block_idx(T, H, HP["top_n"], HP["sel_block"])

    def parts():
        kc = nsa_cuda.compress(k, w_k, block=32, stride=16)
        vc = nsa_cuda.compress(v, w_v, block=32, stride=16)
        o_s, _ = nsa_cuda.selected_attention(q, k, v, idx, sel_block=HP["sel_block"])
        o_w, _ = nsa_cuda.window_attention(q, k, v, window=HP["window"])
        if backward:
            torch.autograd.grad((kc.float().sum() + vc.float().sum(), o_s, o_w),
                                [k, v, w_k, w_v, q], (None, do, do), allow_unused=True)

    return None, (common.median_ms(parts, 2, 5), missing)


def main() -> None:
    ap = argparse.ArgumentParser()
    default_T = [int(t) for t in (os.environ.get("NSA_BENCH_T") or "8192 16384 32768 65536 131072").split()]
    ap.add_argument("--T", type=int, nargs="*", default=default_T)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    rows, notes_missing = [], set()
    for T in args.T:
        for name in args.configs:
            HQ, H, Dk, Dv = CONFIGS[name]
            for backward in (False, True):
                cudnn = common.full_attention("cudnn", T, HQ, H, Dk, backward=backward, iters=5) if Dk == Dv else None
                flash = common.full_attention("flash", T, HQ, H, Dk, backward=backward, iters=5) if Dk == Dv else None
                nsa_ms, partial = run_config(name, T, backward)
                fl = nsa_flops(T, HQ, Dk, Dv) * (3.5 if backward else 1.0)
                if nsa_ms is not None:
                    cells = [f"{nsa_ms:.2f}", f"{fl / nsa_ms / 1e9:.0f}", "-"]
                    ratio_ms = nsa_ms
                else:
                    parts_ms, missing = partial
                    notes_missing.add(missing)
                    cells = ["-", "-", f"{parts_ms:.2f}"]
                    ratio_ms = None
                base = cudnn if cudnn is not None else flash
                rows.append([T, name, "fwd+bwd" if backward else "fwd", *cells,
                             "-" if cudnn is None else f"{cudnn:.2f}", "-" if flash is None else f"{flash:.2f}",
                             "-" if (base is None or ratio_ms is None) else f"{base / ratio_ms:.1f}x"])
    notes = {
        "config": "bf16, l=32, d=16, l'=64, n=16, w=512; headline HQ=64 H=4 D=128; G=4: HQ=16; Dk=192/Dv=128",
        "NSA FLOPs": "compressed attention + its selection recompute + selected (n*l' keys) + window (w keys)",
        "full attention": "SDPA causal, GQA expanded to HQ heads, cuDNN and flash backends, same process",
        "timing": "median of 5 CUDA-event timings after 2 warm-ups",
    }
    if notes_missing:
        notes["not yet on CUDA"] = (", ".join(sorted(notes_missing)) + ": the full NSA column is empty; 'parts' "
                                    "times compression (k, v) + selected + window attention only")
    common.write_table("nsa", ["T", "config", "pass", "NSA ms", "NSA TFLOP/s", "parts ms", "cuDNN ms", "flash ms",
                               "speedup vs full"], rows, notes)


if __name__ == "__main__":
    main()
