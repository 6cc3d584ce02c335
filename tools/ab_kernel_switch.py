"""A/B of attention kernels on sm_90a through an environment switch that the launchers read per
launch, so one process times both settings (--values, default "0" and "1"). Headline D = 128,
H = 4, G = 16 and 4, T = 8k / 16k / 64k; the backward unless --forward.

  --switch NSA_DKDV_WIDE --kernel dkdv (default): the 128-key two-warpgroup dK/dV tile
      (range_attn_bwd_dkdv_sm90.cuh, "1") against sm_80's 64-key tile ("0").
  --switch NAME --kernel bwd_dq, or --forward --kernel fwd_sm90: the range dQ or forward under a
      switch (session 12 timed bench/patches/range-dq-serial-tiles.patch and
      range-fwd-dq-tiles128.patch this way: NSA_RANGE_DQ_TILE / NSA_RANGE_FWD_TILE --values 64 128).
  --switch NSA_SEL_DKDV_SM90 --branches sel: the selected branch's dK/dV on the one-warpgroup
      wgmma tile ("1", the default) or sm_80's ("0"), on lists shared by 16 neighbours and on independent ones
      (bench_sparse_attn.make_block_idx, l' = 64, n = 16).

Per case: the selected kernels' device time (torch.profiler, kernels whose name holds --kernel),
its TFLOP/s on their products over the attended pairs (dK/dV: S, dP, dV, dK; dQ: S, dP, dQ),
the whole backward's time (autograd.grad after one forward), and the max |difference| of the
gradients from the other setting (fp32 sums in another order: rounding only).

    python tools/ab_kernel_switch.py [--T 8192 16384 65536] [--switch NAME --values A B --kernel SUBSTRING]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import common  # noqa: E402
import nsa_cuda  # noqa: E402
from bench_cmp_select import visible_pairs  # noqa: E402
from bench_sparse_attn import attended_keys_selected, make_block_idx  # noqa: E402

D, H, W = 128, 4, 512


def window_pairs(T: int) -> int:
    return sum(min(t + 1, W) for t in range(T)) if T < 4096 else (W * (W + 1)) // 2 + (T - W) * W


def kernel_us(fn, which: str, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.key_averages():
        if which in ev.key:
            for name in ("self_device_time_total", "self_cuda_time_total"):
                v = getattr(ev, name, None)
                if v is not None:
                    total += float(v)
                    break
    return total / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 65536])
    ap.add_argument("--switch", default="NSA_DKDV_WIDE")
    ap.add_argument("--kernel", default="dkdv")
    ap.add_argument("--branches", nargs="+", default=["cmp", "win"], choices=["cmp", "win", "sel"])
    ap.add_argument("--values", nargs=2, default=["0", "1"], help="the switch's two settings")
    ap.add_argument("--forward", action="store_true", help="time the forward (cmp / win) instead of the backward")
    args = ap.parse_args()
    products = 2 if args.forward else 3 if "dq" in args.kernel else 4
    names = ("o", "lse") if args.forward else ("dq", "dk", "dv")
    v0, v1 = args.values
    print(f"card: {common.card()}")
    for HQ in (64, 16):
        for T in args.T:
            torch.manual_seed(0)
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            kc = nsa_cuda.compress(k.detach()).requires_grad_(True)
            vc = nsa_cuda.compress(v.detach()).requires_grad_(True)
            dout = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            o_cmp = nsa_cuda.compressed_attention(q, kc, vc)[0]
            o_win = nsa_cuda.window_attention(q, k, v, window=W)[0]
            cases = [("cmp", lambda: torch.autograd.grad(o_cmp, (q, kc, vc), dout, retain_graph=True), visible_pairs(T)),
                     ("win", lambda: torch.autograd.grad(o_win, (q, k, v), dout, retain_graph=True), window_pairs(T))]
            if args.forward:
                qd, kd, vd, kcd, vcd = (t.detach() for t in (q, k, v, kc, vc))
                cases = [("cmp", lambda: nsa_cuda.compressed_attention(qd, kcd, vcd), visible_pairs(T)),
                         ("win", lambda: nsa_cuda.window_attention(qd, kd, vd, window=W), window_pairs(T))]
            if "sel" in args.branches:
                for kind, redraw in (("shared", 16), ("independent", 1)):
                    idx = make_block_idx(T, H, 16, 64, redraw=redraw)
                    o_sel = nsa_cuda.selected_attention(q, k, v, idx, sel_block=64)[0]
                    cases.append((f"sel-{kind}", lambda o_sel=o_sel: torch.autograd.grad(o_sel, (q, k, v), dout, retain_graph=True),
                                  attended_keys_selected(idx, 64) / H))  # per token, like the others
            for name, f, pairs in cases:
                if name.split("-")[0] not in args.branches:
                    continue
                res = {}
                for label in (v0, v1):
                    os.environ[args.switch] = label
                    res[label] = (kernel_us(f, args.kernel), common.median_ms(f, 2, 5), f())
                flops = 2.0 * pairs * HQ * D * products
                line = f"{name} G={HQ // H} T={T}:"
                for label, (us, ms, g) in res.items():
                    other = res[v0 if label == v1 else v1][2]
                    diffs = " ".join(f"|{n}| {(a.float() - b.float()).abs().max().item():.2e}"
                                     for n, a, b in zip(names, g, other))
                    line += (f"  {args.switch}={label}: {args.kernel} {us / 1e3:.3f} ms ({flops / us / 1e6:.0f} TFLOP/s),"
                             f" {'fwd' if args.forward else 'bwd'} {ms:.3f} ms, diff {diffs};")
                line += f"  speedup of {v1} over {v0}: {res[v0][0] / res[v1][0]:.2f}x"
                print(line, flush=True)
            os.environ.pop(args.switch, None)
            del q, k, v, kc, vc, o_cmp, o_win
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
