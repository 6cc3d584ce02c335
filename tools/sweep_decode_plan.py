"""Sweep the decode work split on a GPU (one process, same caches): NSA_DECODE_CMP_CHUNK (compressed
tokens per split at most) x NSA_DECODE_SLC_BLOCKS (selected blocks per split at most), step time
of `nsa_cuda.decode` at the headline config (bench/bench_decode.py's cases and timing), beside
SDPA full-attention decode.

    python tools/sweep_decode_plan.py [--T 65536] [--B 1 8 64] [--chunks 256 512 1024] [--slc 16 8 4 2]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_decode as bd  # noqa: E402
import common  # noqa: E402

import nsa_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--B", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--slc", type=int, nargs="+", default=[16, 8, 4, 2])
    a = ap.parse_args()
    print(f"card: {common.card()}; T = {a.T}")
    print("| B | NSA_DECODE_CMP_CHUNK | NSA_DECODE_SLC_BLOCKS | NSA step us | full step us | speedup |")
    print("|---|---|---|---|---|---|")
    for B in a.B:
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = max(1, min(8, -(-2 * l2 // bd.full_bytes(B, a.T))))
        cases = [bd.make_case(B, a.T) for _ in range(copies)]
        fns = [bd.full_decode_fns(c[0], c[1], c[2])["gqa"] for c in cases]
        it = itertools.cycle(fns)
        full_ms = common.graph_ms(lambda: next(it)())
        ref = None
        for chunk, slc in itertools.product(a.chunks, a.slc):
            os.environ["NSA_DECODE_CMP_CHUNK"] = str(chunk)
            os.environ["NSA_DECODE_SLC_BLOCKS"] = str(slc)
            rot = itertools.cycle(cases)

            def step():
                q, k, v, kc, vc, lens, gates = next(rot)
                return nsa_cuda.decode(q, k, v, kc, vc, lens, *gates, **bd.HP)

            q, k, v, kc, vc, lens, gates = cases[0]
            o = nsa_cuda.decode(q, k, v, kc, vc, lens, *gates, **bd.HP).float()
            if ref is None:
                ref = o
            err = (o - ref).abs().max().item()  # the split changes only the order of sums
            ms = common.graph_ms(step)
            print(f"| {B} | {chunk} | {slc} | {ms * 1e3:.1f} | {full_ms * 1e3:.1f} | {full_ms / ms:.2f}x |"
                  f"{'' if err < 2e-2 else f' MISMATCH {err:.3g}'}", flush=True)
        os.environ.pop("NSA_DECODE_CMP_CHUNK")
        os.environ.pop("NSA_DECODE_SLC_BLOCKS")
        del cases, fns, it
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
