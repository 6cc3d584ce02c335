"""A/B of the range branches' dK/dV kernels on sm_90a: the 128-key two-warpgroup tile
(range_attn_bwd_dkdv_sm90.cuh, the default) against the earlier ones (NSA_DKDV_WIDE=0: sm_80's
mma.sync tile for the compressed branch, the one-warpgroup wgmma tile for the window), read per
launch, so one process times both. Headline D = 128, H = 4, G = 16 and 4, T = 8k / 16k / 64k.

Per case: the dK/dV kernels' device time (torch.profiler, kernels whose name holds "dkdv",
reduce included), its TFLOP/s on the four products (S, dP, dV, dK) over the attended pairs, the
whole backward's time (autograd.grad after one forward), and the max |difference| of dk / dv
from the other variant (fp32 sums in a different order: rounding only).

    python tools/ab_dkdv_wide.py [--T 8192 16384 65536]
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

D, H, W = 128, 4, 512


def window_pairs(T: int) -> int:
    return sum(min(t + 1, W) for t in range(T)) if T < 4096 else (W * (W + 1)) // 2 + (T - W) * W


def dkdv_us(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.key_averages():
        if "dkdv" in ev.key:
            for name in ("self_device_time_total", "self_cuda_time_total"):
                v = getattr(ev, name, None)
                if v is not None:
                    total += float(v)
                    break
    return total / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 65536])
    args = ap.parse_args()
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
            cases = (("cmp", lambda: torch.autograd.grad(o_cmp, (q, kc, vc), dout, retain_graph=True), visible_pairs(T)),
                     ("win", lambda: torch.autograd.grad(o_win, (q, k, v), dout, retain_graph=True), window_pairs(T)))
            for name, f, pairs in cases:
                res = {}
                for label, env in (("narrow", "0"), ("wide", "1")):
                    os.environ["NSA_DKDV_WIDE"] = env
                    res[label] = (dkdv_us(f), common.median_ms(f, 2, 5), f())
                flops = 2.0 * pairs * HQ * D * 4  # S^T, dP^T, dV, dK
                line = f"{name} G={HQ // H} T={T}:"
                for label, (us, ms, g) in res.items():
                    other = res["narrow" if label == "wide" else "wide"][2]
                    ddk = (g[1].float() - other[1].float()).abs().max().item()
                    ddv = (g[2].float() - other[2].float()).abs().max().item()
                    line += (f"  {label} dkdv {us / 1e3:.3f} ms ({flops / us / 1e6:.0f} TFLOP/s), bwd {ms:.3f} ms,"
                             f" |ddk| {ddk:.2e} |ddv| {ddv:.2e};")
                line += f"  dkdv speedup {res['narrow'][0] / res['wide'][0]:.2f}x"
                print(line, flush=True)
            os.environ.pop("NSA_DKDV_WIDE", None)
            del q, k, v, kc, vc, o_cmp, o_win
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
