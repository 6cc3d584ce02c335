"""A/B of the selected-block forward's CTA width (NSA_SEL_FWD_WARPS = 4, 2, 1, and "auto": unset,
the default that picks 4 or 2 per group of tokens on the GPU; the launcher reads it per launch, so
one process times all widths; at G >= 16 also the split walk, see variants()) on lists shared by 16
neighbouring tokens and on
independent lists, G = 16 and G = 4, T = 16k and 64k; checks that all widths give the same output.
--backward times forward + backward instead, switching the dQ kernel's width (NSA_SEL_DQ_WARPS = 4,
2, "auto" and the split walk's NSA_SEL_DQ_SPLIT; the forward stays on its default) and comparing dq.

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


SWITCHES = ("NSA_SEL_FWD_WARPS", "NSA_SEL_DQ_WARPS", "NSA_SEL_FWD_SPLIT", "NSA_SEL_DQ_SPLIT", "NSA_SEL_SPLIT_WARPS")


def variants(backward: bool, G: int):
    """(label, environment) pairs: forced widths, the default ("auto"), and at G >= 16 the split
    walk off ("auto:nosplit"), forced for every group ("split", "split:2" / "split:4" warps)."""
    env = "NSA_SEL_DQ_WARPS" if backward else "NSA_SEL_FWD_WARPS"
    split = "NSA_SEL_DQ_SPLIT" if backward else "NSA_SEL_FWD_SPLIT"
    widths = ("4", "2") if backward or G < 16 else ("4", "2", "1")
    out = [(w, {env: w}) for w in widths] + [("auto", {})]
    if G >= 16:
        other = 2 if backward else 4  # the default warps per token: dQ 2, forward 4
        out += [("auto:nosplit", {split: "0"}), ("split", {split: "1"}),
                (f"split:{2 if other == 4 else 4}", {split: "1", "NSA_SEL_SPLIT_WARPS": str(2 if other == 4 else 4)})]
    return out


def main() -> None:
    backward = "--backward" in sys.argv[1:]
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
                res = {}
                for label, env in variants(backward, HQ // H):
                    for name in SWITCHES:
                        os.environ.pop(name, None)
                    os.environ.update(env)

                    def f():
                        o = nsa_cuda.selected_attention(q, k, v, idx, sel_block=LP)[0]
                        return torch.autograd.grad(o, (q,), do)[0] if backward else o

                    res[label] = (common.median_ms(f, 3, 10), f())
                d = max((res[w][1].float() - res["4"][1].float()).abs().max().item() for w in res)
                print(f"G={HQ // H} T={T} {kind}: " + "  ".join(f"warps={w} {res[w][0]:.3f} ms" for w in res)
                      + f"  max diff {d:.1e}", flush=True)
    for name in SWITCHES:
        os.environ.pop(name, None)


if __name__ == "__main__":
    main()
