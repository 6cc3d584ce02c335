"""The headline benchmark (issue 5, DESIGN.md §4): the full NSA forward and forward+backward
(compression + selection + the three branches + gates, `nsa_cuda.nsa_attention`) against causal
full attention (SDPA with the cuDNN and flash backends) in the same process, at
T in {8k, 16k, 32k, 64k, 128k}: headline config (HQ = 64, H = 4, D = 128, bf16, l = 32, d = 16,
l' = 64, n = 16, w = 512), also G = 4 (HQ = 16) and Dk = 192 / Dv = 128.

Also measures the peak device memory of one call beyond the inputs (NSA and cuDNN).
--query-corr R (default 0: i.i.d. queries) makes the queries of each run of R consecutive tokens
share a direction (q_t = 0.9 u_{t // R} + 0.45 z_t), so that neighbours select overlapping blocks
as in trained models (DESIGN §5's "neighbouring tokens pick similar blocks"); i.i.d. random
queries give every token its own blocks. The table names the setting.
Writes a dated markdown table and a plot (SVG; also PNG when matplotlib is installed) to
bench/results/."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

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


def peak_extra_bytes(fn) -> int:
    """Peak device memory allocated by one call of fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def make_queries(T: int, HQ: int, Dk: int, corr: int) -> torch.Tensor:
    q = torch.randn(1, T, HQ, Dk, device="cuda", dtype=torch.bfloat16)
    if corr > 1:
        base = torch.randn(1, (T + corr - 1) // corr, HQ, Dk, device="cuda", dtype=torch.bfloat16)
        q = (0.9 * base.repeat_interleave(corr, 1)[:, :T] + 0.45 * q).to(torch.bfloat16)
    return q


def make_call(name: str, T: int, backward: bool, corr: int = 0):
    """The benchmarked call on random inputs of config `name`: (call, leaves, dO); call() runs the
    whole NSA (learned compression w_k / w_v) and, with `backward`, the gradients of every leaf."""
    HQ, H, Dk, Dv = CONFIGS[name]
    dt = torch.bfloat16
    q = make_queries(T, HQ, Dk, corr).requires_grad_(backward)
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

    return full_nsa, leaves, do


def run_config(name: str, T: int, backward: bool, corr: int = 0):
    """(median ms, peak extra bytes, input bytes) of the whole NSA, or None if this build lacks
    a kernel it needs (a partial NSA_CUDA_DTYPES / NSA_CUDA_HEADDIMS build)."""
    full_nsa, leaves, do = make_call(name, T, backward, corr)
    inputs = sum(t.numel() * t.element_size() for t in leaves + ([do] if backward else []))

    try:
        ms = common.median_ms(full_nsa, 2, 5)
    except NotImplementedError:
        return None
    return ms, peak_extra_bytes(full_nsa), inputs


def full_attention_peak(T: int, HQ: int, H: int, D: int, backward: bool) -> int:
    """Peak extra bytes of cuDNN causal SDPA on the same shapes (K/V expanded to HQ heads, as
    the timing does; the expansion is counted as input, not as extra)."""
    import torch.nn.functional as F  # noqa: N812
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    v = torch.randn(1, HQ, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    do = torch.randn_like(q)

    def run():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                torch.autograd.grad(o, (q, k, v), do)

    try:
        run()
        return peak_extra_bytes(run)
    except RuntimeError:
        return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    default_T = [int(t) for t in (os.environ.get("NSA_BENCH_T") or "8192 16384 32768 65536 131072").split()]
    ap.add_argument("--T", type=int, nargs="*", default=default_T)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--query-corr", type=int, default=0, help="tokens sharing a query direction (0: i.i.d.)")
    args = ap.parse_args()
    tag = f" (corr {args.query_corr})" if args.query_corr > 1 else ""
    rows, missing = [], []
    series = {}  # plot: (config, pass, who) -> [(T, ms)]
    for T in args.T:
        for name in args.configs:
            HQ, H, Dk, Dv = CONFIGS[name]
            for backward in (False, True):
                pass_ = "fwd+bwd" if backward else "fwd"
                cudnn = common.full_attention("cudnn", T, HQ, H, Dk, backward=backward, iters=5) if Dk == Dv else None
                flash = common.full_attention("flash", T, HQ, H, Dk, backward=backward, iters=5) if Dk == Dv else None
                res = run_config(name, T, backward, args.query_corr)
                if res is None:
                    missing.append(f"{name} T={T} {pass_}")
                    continue
                nsa_ms, peak, inputs = res
                full_peak = full_attention_peak(T, HQ, H, Dk, backward) if Dk == Dv else -1
                fl = nsa_flops(T, HQ, Dk, Dv) * (3.5 if backward else 1.0)
                base = cudnn if cudnn is not None else flash
                rows.append([T, name + tag, pass_, f"{nsa_ms:.2f}", f"{fl / nsa_ms / 1e9:.0f}",
                             "-" if cudnn is None else f"{cudnn:.2f}", "-" if flash is None else f"{flash:.2f}",
                             "-" if base is None else f"{base / nsa_ms:.2f}x",
                             f"{peak / 2**30:.2f} GiB ({peak / inputs:.1f}x inputs)",
                             "-" if full_peak < 0 else f"{full_peak / 2**30:.2f} GiB"])
                series.setdefault((name + tag, pass_, "NSA"), []).append((T, nsa_ms))
                if cudnn is not None:
                    series.setdefault((name, pass_, "cuDNN full"), []).append((T, cudnn))
                torch.cuda.empty_cache()
    notes = {
        "config": "bf16, l=32, d=16, l'=64, n=16, w=512; headline HQ=64 H=4 D=128; G=4: HQ=16; Dk=192/Dv=128",
        "NSA": "nsa_cuda.nsa_attention with linear compression (w_k, w_v): compression, compressed attention, "
               "selection, selected + window attention, gated combine; fwd+bwd = gradients of every input",
        "NSA FLOPs": "compressed attention + its selection recompute + selected (n*l' keys) + window (w keys); "
                     "fwd+bwd counted as 3.5x forward",
        "full attention": "SDPA causal, GQA expanded to HQ heads, cuDNN and flash backends, same process",
        "peak memory": "torch.cuda.max_memory_allocated during one call minus what was allocated before "
                       "(inputs: q, k, v, gates, weights, and dO for fwd+bwd)",
        "timing": "median of 5 CUDA-event timings after 2 warm-ups",
        "queries": (f"correlated within runs of {args.query_corr} tokens: q_t = 0.9 u_(t // {args.query_corr}) + "
                    "0.45 z_t (u, z i.i.d. normal)") if args.query_corr > 1 else "i.i.d. normal (q, k, v)",
    }
    if missing:
        notes["not in this build"] = ", ".join(missing)
    path = common.write_table("nsa" + ("_corr" if tag else ""), ["T", "config", "pass", "NSA ms", "NSA TFLOP/s", "cuDNN ms", "flash ms",
                                      "speedup vs cuDNN", "NSA peak extra memory", "cuDNN peak extra memory"],
                              rows, notes)
    common.write_plot(path.with_suffix(""), "NSA vs causal full attention (" + common.card() + ")", series)


if __name__ == "__main__":
    main()
