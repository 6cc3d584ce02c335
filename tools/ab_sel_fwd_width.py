"""A/B of the selected-block forward's CTA width (NSA_SEL_FWD_WARPS = 4, 2, 1, and "auto": unset,
the default that picks 4 or 2 per group of tokens on the GPU; the launcher reads it per launch, so
one process times all widths) on lists shared by 16 neighbouring tokens and on
independent lists, G = 16 and G = 4, T = 16k and 64k; checks that all widths give the same output.
--backward times forward + backward instead, switching the dQ kernel's width (NSA_SEL_DQ_WARPS = 4,
2, and "auto"; the forward stays on its default) and comparing dq.

    python tools/ab_sel_fwd_width.py [--backward]     # on a GPU, from the repository root
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import torch  # noqa: E402

import common  # noqa: E402
import nsa_cuda  # noqa: E402
from bench_sparse_attn import make_block_idx  # noqa: E402

D, H, LP, N = 128, 4, 64, 16


def main() -> None:
    backward = "--backward" in sys.argv[1:]
    env = "NSA_SEL_DQ_WARPS" if backward else "NSA_SEL_FWD_WARPS"
    print(f"card: {common.card()}  ({'forward + backward, dQ widths' if backward else 'forward widths'})")
    for HQ in (64, 16):
        for T in (16384, 65536):
            torch.manual_seed(0)
            q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            do = torch.randn_like(q)
            for kind, redraw in (("shared", 16), ("independent", 1)):
                idx = make_block_idx(T, H, N, LP, redraw=redraw)
                widths = ("4", "2", "auto") if backward or HQ // H < 16 else ("4", "2", "1", "auto")
                res = {}
                for w in widths:
                    if w == "auto":  # the default: width picked per group of tokens on the GPU
                        os.environ.pop(env, None)
                    else:
                        os.environ[env] = w

                    def f():
                        o = nsa_cuda.selected_attention(q, k, v, idx, sel_block=LP)[0]
                        return torch.autograd.grad(o, (q,), do)[0] if backward else o

                    res[w] = (common.median_ms(f, 3, 10), f())
                d = max((res[w][1].float() - res["4"][1].float()).abs().max().item() for w in res)
                print(f"G={HQ // H} T={T} {kind}: " + "  ".join(f"warps={w} {res[w][0]:.3f} ms" for w in res)
                      + f"  max diff {d:.1e}", flush=True)
    os.environ.pop(env, None)


if __name__ == "__main__":
    main()
