"""Decode benchmark (DESIGN.md §1.8, §4): one NSA decoding step (`nsa_cuda.decode`: compressed,
selected and window branches plus gates for the newest token of every sequence, against its KV
cache and compressed KV cache) beside full-attention decode of the same queries over the same
cache (SDPA in the same process), at contexts 8k .. 128k and batch 1, 8, 64. Headline config:
HQ = 64, H = 4, D = 128, bf16, l = 32, d = 16, l' = 64, n = 16, w = 512.

Reports the step latency (20 steps captured in one CUDA graph, median of 20 replays), tokens/s,
the bytes each step reads (NSA: the visible compressed K/V + the selected blocks + the window;
full: the whole K/V cache), the share of the measured copy-bandwidth floor, and the speedup.
NSA_BENCH_T overrides the contexts, NSA_BENCH_B the batch sizes (space separated)."""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import nsa_cuda  # noqa: E402

HQ, H, D = 64, 4, 128
HP = dict(cmp_block=32, cmp_stride=16, sel_block=64, top_n=16, init_blocks=1, local_blocks=2, window=512)


def num_compressed(T: int) -> int:
    l, d = HP["cmp_block"], HP["cmp_stride"]
    return 0 if T < l else (T - l) // d + 1


def nsa_bytes(B: int, T: int) -> int:
    """K/V bytes one NSA step reads at full context T (the selected blocks that overlap the
    window are read twice, as the kernels do)."""
    row = H * 2 * D * 2  # one position: K and V of every KV head, bf16
    keys = num_compressed(T) + min(HP["top_n"] * HP["sel_block"], T) + min(HP["window"], T)
    return B * keys * row


def full_bytes(B: int, T: int) -> int:
    return B * T * H * 2 * D * 2


def make_case(B: int, T: int):
    dt = torch.bfloat16
    k = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    v = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    kc = nsa_cuda.compress(k, block=HP["cmp_block"], stride=HP["cmp_stride"])
    vc = nsa_cuda.compress(v, block=HP["cmp_block"], stride=HP["cmp_stride"])
    q = torch.randn(B, HQ, D, device="cuda", dtype=dt)
    gates = [torch.rand(B, HQ, device="cuda", dtype=dt) for _ in range(3)]
    lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
    return q, k, v, kc, vc, lens, gates


def full_decode_fns(q, k, v):
    """Full-attention decode of the B x HQ queries over the whole cache, two ways: GQA through
    enable_gqa, and the G query heads of each KV head packed as G query rows (same math, lets
    every fused SDPA backend run it). The cache [B, T, H, D] is read in place ([B, H, T, D] view)."""
    B = q.shape[0]
    G = HQ // H
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    q_gqa = q[:, :, None, :]  # [B, HQ, 1, D]
    q_packed = q.view(B, H, G, D)  # heads g*G .. g*G+G-1 share KV head g

    return {
        "gqa": lambda: F.scaled_dot_product_attention(q_gqa, kt, vt, enable_gqa=True),
        "packed": lambda: F.scaled_dot_product_attention(q_packed, kt, vt),
    }


def fits(B: int, T: int, copies: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    need = copies * (full_bytes(B, T) * (1 + 1 / HP["cmp_stride"]) + 2 * B * HQ * D * 2)
    return need < 0.8 * free


def main() -> None:
    contexts = [int(t) for t in (os.environ.get("NSA_BENCH_T") or "8192 16384 32768 65536 131072").split()]
    batches = [int(b) for b in (os.environ.get("NSA_BENCH_B") or "1 8 64").split()]
    copy = common.copy_bandwidth_gbs()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    series = {}  # plot: (batch, who) -> [(context, ms)]
    for B, T in itertools.product(batches, contexts):
        # Rotate over enough caches that one pass over them is > 2x the L2 size: every step then
        # reads from DRAM, as a real decode step (other layers' caches in between) would.
        copies = max(1, min(8, -(-2 * l2 // full_bytes(B, T))))
        if not fits(B, T, copies):
            rows.append([B, T] + ["does not fit"] + ["-"] * 9)
            continue
        cases = [make_case(B, T) for _ in range(copies)]
        rot = itertools.cycle(cases)

        def nsa_step():
            q, k, v, kc, vc, lens, gates = next(rot)
            return nsa_cuda.decode(q, k, v, kc, vc, lens, *gates, **HP)

        nsa_ms = common.graph_ms(nsa_step)
        full_ms, full_how = None, "-"
        for how in ("gqa", "packed"):
            fns = [full_decode_fns(c[0], c[1], c[2])[how] for c in cases]
            it = itertools.cycle(fns)
            try:
                ms = common.graph_ms(lambda: next(it)())
            except RuntimeError:  # backend refuses the shape or runs out of memory
                torch.cuda.empty_cache()
                continue
            if full_ms is None or ms < full_ms:
                full_ms, full_how = ms, how
        del cases, rot
        torch.cuda.empty_cache()
        nb, fb = nsa_bytes(B, T), full_bytes(B, T)
        nsa_floor = nb / (copy * 1e6)  # ms at the copy bandwidth (GB/s counts read + write)
        full_floor = fb / (copy * 1e6)
        rows.append([B, T, f"{nsa_ms * 1e3:.1f}", f"{B / nsa_ms * 1e3:,.0f}", f"{nb / 1e6:.1f}",
                     f"{100 * nsa_floor / nsa_ms:.0f}%",
                     "-" if full_ms is None else f"{full_ms * 1e3:.1f} ({full_how})",
                     "-" if full_ms is None else f"{B / full_ms * 1e3:,.0f}", f"{fb / 1e6:.0f}",
                     "-" if full_ms is None else f"{100 * full_floor / full_ms:.0f}%",
                     "-" if full_ms is None else f"{full_ms / nsa_ms:.1f}x"])
        series.setdefault((f"B={B}", "NSA"), []).append((T, nsa_ms))
        if full_ms is not None:
            series.setdefault((f"B={B}", "full"), []).append((T, full_ms))
        print(rows[-1], flush=True)
    path = common.write_table(
        "decode", ["B", "context", "NSA step us", "NSA tokens/s", "NSA MB read", "NSA % of BW floor",
                   "full step us (SDPA)", "full tokens/s", "full MB read", "full % of BW floor",
                   "speedup"], rows,
        {"shape": f"HQ={HQ}, H={H}, D={D}, bf16; l={HP['cmp_block']}, d={HP['cmp_stride']}, "
                  f"l'={HP['sel_block']}, n={HP['top_n']}, w={HP['window']}; every sequence at the full context",
         "bytes": "K/V bytes read per step: NSA = visible compressed K/V + n*l' selected keys + w window keys; "
                  "full = the whole cache (q, o, gates negligible)",
         "floor": f"bytes / measured copy bandwidth {copy:.0f} GB/s (read+write)",
         "full attention": "SDPA of the one query per head over the cache, GQA via enable_gqa ('gqa') or the G heads "
                           "of a KV head packed as G query rows ('packed'); the faster one is shown",
         "timing": "20 steps captured in one CUDA graph, median of 20 replays / 20; caches rotated so one pass over "
                   "them exceeds 2x L2"})


if __name__ == "__main__":
    main()
