"""A/B of the range branches (compressed and sliding window) on sm_90a: the sm_80 mma.sync kernels
(NSA_DISABLE_WGMMA=1) against the wgmma ones (the launchers read the variable per launch, so one
process times both), headline D = 128 with G = 16, 4 and 1, T = 16k and 64k. Prints ms, TFLOP/s
on the attended pairs, the speedup over sm_80 and the max difference from the sm_80 output, for
the forward and then forward + backward (every kernel of the branch that has a wgmma version
switches: forward, dQ, and the window's dK/dV), with the dq difference.

    python tools/ab_wgmma_range.py      # on an sm_90 GPU, from the repository root
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import torch  # noqa: E402

import common  # noqa: E402
import nsa_cuda  # noqa: E402
from bench_cmp_select import visible_pairs  # noqa: E402

D, H, W = 128, 4, 512


def window_pairs(T: int) -> int:
    return sum(min(t + 1, W) for t in range(T)) if T < 4096 else (W * (W + 1)) // 2 + (T - W) * W


def main() -> None:
    print(f"card: {common.card()}")
    for HQ in (64, 16, 4):
        for T in (16384, 65536):
            torch.manual_seed(0)
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            kc, vc = nsa_cuda.compress(k), nsa_cuda.compress(v)
            qg, kcg, vcg, kg, vg = (t.detach().requires_grad_(True) for t in (q, kc, vc, k, v))
            dout = torch.randn_like(q)

            def cmp_fb():
                o = nsa_cuda.compressed_attention(qg, kcg, vcg)[0]
                return torch.autograd.grad(o, (qg, kcg, vcg), dout)[0], o

            def win_fb():
                o = nsa_cuda.window_attention(qg, kg, vg, window=W)[0]
                return torch.autograd.grad(o, (qg, kg, vg), dout)[0], o

            cases = (("cmp", lambda: nsa_cuda.compressed_attention(q, kc, vc), visible_pairs(T), 1),
                     ("win", lambda: nsa_cuda.window_attention(q, k, v, window=W), window_pairs(T), 1),
                     ("cmp fwd+bwd (diff: dq)", cmp_fb, visible_pairs(T), 3.5),
                     ("win fwd+bwd (diff: dq)", win_fb, window_pairs(T), 3.5))
            for name, f, pairs, flop_mult in cases:
                res = {}
                for label, off in (("sm80", "1"), ("wgmma", "0")):
                    os.environ["NSA_DISABLE_WGMMA"] = off
                    res[label] = (common.median_ms(f, 3, 10), f())
                flops = 2.0 * pairs * HQ * 2 * D * flop_mult  # fwd+bwd: 2.5x the forward's products more
                base = res["sm80"]
                line = f"{name} G={HQ // H} T={T}:"
                for label, (ms, out) in res.items():
                    do = (out[0].float() - base[1][0].float()).abs().max().item()
                    line += f"  {label} {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s x{base[0] / ms:.2f} (diff {do:.0e})"
                print(line, flush=True)
    os.environ.pop("NSA_DISABLE_WGMMA", None)


if __name__ == "__main__":
    main()
