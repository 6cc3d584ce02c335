"""Shared pieces of the Python benchmarks: timing, the full-attention baseline, result tables."""
from __future__ import annotations

import datetime
import os
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def median_ms(fn: Callable[[], object], warmup: int = 5, iters: int = 30, batch: int = 1) -> float:
    """Median over `iters` CUDA-event samples of the mean time of `batch` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / batch)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], batch: int = 20, iters: int = 20) -> float:
    """Device time per call of a short op: `batch` calls captured in one CUDA graph, replayed and
    timed with events (so Python dispatch and launch latency, which overlap inside a model's
    stream, are not counted). Falls back to back-to-back eager calls if capture fails."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(batch):
                fn()
        return median_ms(g.replay, 2, iters) / batch
    except Exception:  # noqa: BLE001 - any capture problem: time eagerly instead
        torch.cuda.synchronize()
        return median_ms(fn, 2, iters, batch)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), 3, 10)
    return 2 * nbytes / (ms * 1e6)


def causal_attention_flops(T: int, HQ: int, Dk: int, Dv: int, batch: int = 1) -> float:
    """Forward FLOPs of causal full attention (QK^T and PV over the lower triangle)."""
    return 2.0 * batch * HQ * (T * (T + 1) / 2) * (Dk + Dv)


_BACKENDS = {
    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
    "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
}


def full_attention(backend: str, T: int, HQ: int, H: int, D: int, dtype=torch.bfloat16, backward: bool = False,
                   iters: int = 10) -> Optional[float]:
    """Median ms of causal SDPA (GQA expanded to HQ heads) with one backend, or None if the
    backend refuses the shape on this card."""
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=dtype, requires_grad=backward)
    k = torch.randn(1, H, T, D, device="cuda", dtype=dtype).repeat_interleave(HQ // H, dim=1).requires_grad_(backward)
    v = torch.randn(1, H, T, D, device="cuda", dtype=dtype).repeat_interleave(HQ // H, dim=1).requires_grad_(backward)
    do = torch.randn(1, HQ, T, D, device="cuda", dtype=dtype)

    def run():
        with torch.nn.attention.sdpa_kernel(_BACKENDS[backend]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if backward:
                torch.autograd.grad(o, (q, k, v), do)

    try:
        return median_ms(run, 2, iters)
    except RuntimeError:
        return None


def write_table(name: str, header: List[str], rows: List[List[object]], notes: Dict[str, str]) -> Path:
    """Writes a dated markdown table to bench/results/ (and to $OUT when set) and returns it."""
    date = datetime.date.today().isoformat()
    slug = card().replace(" ", "_").replace("/", "_")
    lines = [f"# {name} — {card()} — {date}", ""]
    lines += [f"- {k}: {v}" for k, v in notes.items()]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{date}_{name}_{slug}.md"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    print(text)
    return path
