"""Where the GPU idles during one whole NSA call: the bench's call (bench/bench_nsa.py's
full_nsa: learned compression w_k / w_v, all leaves requiring grad) under torch.profiler, then
the idle gaps between consecutive device activities (kernels, memsets, copies) on the trace.

    python tools/trace_gaps.py [--T 65536] [--forward-only] [--op nsa|cmp] [--top 15] [--trace FILE]

--op cmp traces the compressed attention op alone instead (bench/bench_cmp_select.py's cmp
fwd+bwd: q, compressed keys / values as leaves).

Prints CUDA-event time, summed device time, busy time (union of the device intervals) and the
largest gaps, each with the activities on either side, the host runtime calls that ran inside it
(a synchronisation, cudaMalloc / cudaFree, a blocking copy) and the op that launched the activity
ending it. An event time well above the busy time means the host, not the kernels, sets the pace."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import nsa_cuda  # noqa: E402
from bench_nsa import HP, make_call  # noqa: E402

DEVICE_CATS = ("kernel", "gpu_memset", "gpu_memcpy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--op", choices=("nsa", "cmp"), default="nsa")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace", default="", help="also keep the chrome trace here")
    args = ap.parse_args()
    backward = not args.forward_only
    torch.manual_seed(0)
    call, leaves, do = make_call("headline", args.T, backward)
    q, k, v = leaves[:3]
    T = args.T

    if args.op == "cmp":
        cmp = dict(block=HP["cmp_block"], stride=HP["cmp_stride"])
        kc = nsa_cuda.compress(k.detach(), **cmp).requires_grad_(backward)
        vc = nsa_cuda.compress(v.detach(), **cmp).requires_grad_(backward)

        def call():  # noqa: F811
            o, _ = nsa_cuda.compressed_attention(q, kc, vc, **cmp)
            if backward:
                torch.autograd.grad(o, (q, kc, vc), do)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    call()
    e.record()
    torch.cuda.synchronize()
    event_ms = s.elapsed_time(e)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    path = args.trace or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    if not args.trace:
        os.unlink(path)

    dev = sorted((ev for ev in events if ev.get("cat") in DEVICE_CATS and "dur" in ev), key=lambda ev: ev["ts"])
    runtime = [ev for ev in events if ev.get("cat") == "cuda_runtime" and "dur" in ev]
    cpu_ops = [ev for ev in events if ev.get("cat") == "cpu_op" and "dur" in ev]
    launch_of = {ev["args"].get("correlation"): ev for ev in runtime if "correlation" in ev.get("args", {})}

    def op_around(ts: float) -> str:
        """Innermost CPU op whose interval holds host time ts."""
        best = None
        for op in cpu_ops:
            if op["ts"] <= ts <= op["ts"] + op["dur"] and (best is None or op["dur"] < best["dur"]):
                best = op
        return best["name"] if best else "?"

    total = sum(ev["dur"] for ev in dev)
    busy, end, gaps = 0.0, None, []
    for i, ev in enumerate(dev):
        a, b = ev["ts"], ev["ts"] + ev["dur"]
        if end is None:
            busy += b - a
        elif a > end:
            busy += b - a
            gaps.append((a - end, i))
        elif b > end:
            busy += b - end
        end = b if end is None else max(end, b)
    span = end - dev[0]["ts"]
    print(f"{args.op} T={T} {'forward+backward' if backward else 'forward'}: CUDA events {event_ms:.2f} ms; profiled span "
          f"{span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, device sum {total / 1e3:.2f} ms, "
          f"{len(dev)} activities, idle {(span - busy) / 1e3:.2f} ms in {len(gaps)} gaps")
    sizes = [g for g, _ in gaps]
    for lo, hi in ((0, 5), (5, 20), (20, 100), (100, 1e12)):
        sel = [g for g in sizes if lo <= g < hi]
        print(f"  gaps in [{lo}, {hi if hi < 1e12 else 'inf'}) us: {len(sel):4d}, {sum(sel) / 1e3:7.2f} ms")
    print(f"largest {args.top} gaps:")
    for gap, i in sorted(gaps, reverse=True)[: args.top]:
        prev, nxt = dev[i - 1], dev[i]
        g0, g1 = prev["ts"] + prev["dur"], nxt["ts"]
        launch = launch_of.get(nxt.get("args", {}).get("correlation"))
        host = sorted({r["name"] for r in runtime if r["ts"] < g1 and r["ts"] + r["dur"] > g0 and
                       not r["name"].startswith(("cudaLaunch", "cuLaunch"))})
        print(f"  {gap:8.1f} us  after {prev['name'][:60]!r}\n{'':14}before {nxt['name'][:60]!r}"
              f" (launched by {op_around(launch['ts']) if launch else '?'}"
              f"{', launch ' + format(g1 - launch['ts'], '.0f') + ' us before start' if launch else ''})"
              f"\n{'':14}host calls in the gap: {', '.join(host) if host else '-'}")


if __name__ == "__main__":
    main()
