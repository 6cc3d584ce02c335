"""A/B of the block scoring + top-n selection kernels on sm_90a, in one process (the launcher reads
the variables per launch): sm_80's mma.sync kernel (NSA_DISABLE_WGMMA=1), the pipelined wgmma kernel
(NSA_SELECT_SM90_PIPELINED=1: two S buffers, one CTA per SM), the wgmma kernel with its block scores
and lists in shared memory (NSA_SELECT_REG_LIST=0), its key tiles by cp.async instead of TMA
(NSA_SELECT_TMA=0), a CTA barrier per tile instead of per-stage empty barriers
(NSA_SELECT_TILE_BARRIER=1) and the default wgmma kernel (one S buffer, two CTAs per SM, TMA key
tiles; at G = 16 in the default geometry the scores and lists in registers). Headline D = 128, H = 4, G = 16 and 4, T = 16k and 64k; prints ms, TFLOP/s of the
score product on the visible pairs, the speedup over sm_80 and how many rows differ from
sm_80's block_idx (near-ties only: the head sums are added in another order).

    python tools/ab_select_sm90.py      # on an sm_90 GPU, from the repository root
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import torch  # noqa: E402

import common  # noqa: E402
import nsa_cuda  # noqa: E402
from bench_cmp_select import visible_pairs  # noqa: E402

D, H = 128, 4
VARIANTS = (("sm80", {"NSA_DISABLE_WGMMA": "1"}), ("wgmma-pipelined", {"NSA_SELECT_SM90_PIPELINED": "1"}),
            ("wgmma-shared-lists", {"NSA_SELECT_REG_LIST": "0"}), ("wgmma-cp.async", {"NSA_SELECT_TMA": "0"}),
            ("wgmma-tile-barrier", {"NSA_SELECT_TILE_BARRIER": "1"}), ("wgmma", {}))
SWITCHES = ("NSA_DISABLE_WGMMA", "NSA_SELECT_SM90_PIPELINED", "NSA_SELECT_REG_LIST", "NSA_SELECT_TMA",
            "NSA_SELECT_TILE_BARRIER")


def main() -> None:
    print(f"card: {common.card()}")
    for HQ in (64, 16):
        for T in (16384, 65536):
            torch.manual_seed(0)
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
            kc = nsa_cuda.compress(k)
            lse = nsa_cuda.compressed_attention(q, kc, nsa_cuda.compress(k))[1]
            flops = 2.0 * visible_pairs(T) * HQ * D
            res = {}
            for label, env in VARIANTS:
                for name in SWITCHES:
                    os.environ.pop(name, None)
                os.environ.update(env)
                f = lambda: nsa_cuda.select_blocks(q, kc, lse)  # noqa: E731
                res[label] = (common.median_ms(f, 3, 10), f())
            base_ms, base_idx = res["sm80"]
            line = f"select G={HQ // H} T={T}:"
            for label, (ms, idx) in res.items():
                rows = (idx != base_idx).any(-1).float().mean().item()
                line += f"  {label} {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s x{base_ms / ms:.2f} (rows differ {rows:.1e})"
            print(line, flush=True)
    for name in SWITCHES:
        os.environ.pop(name, None)


if __name__ == "__main__":
    main()
