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
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], path.name).write_text(text)
    print(text)
    return path


def write_plot(stem: Path, title: str, series: Dict[tuple, List[tuple]]) -> List[Path]:
    """Line plot of ms against T (log-log), one line per series key (tuple of labels): an SVG
    written without dependencies, and a PNG too when matplotlib is installed. Also copied to
    $OUT when set. Returns the written paths."""
    import math

    pts = [(t, ms) for v in series.values() for t, ms in v if ms and ms > 0]
    if not pts:
        return []
    W, H, L, R, TOP, BOT = 760, 460, 70, 230, 40, 50
    xs = [math.log2(t) for t, _ in pts]
    ys = [math.log10(ms) for _, ms in pts]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys)) if max(ys) > math.floor(min(ys)) else math.floor(min(ys)) + 1
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda y: TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOT)  # noqa: E731
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for e in range(int(y0), int(y1) + 1):
        y = py(e)
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:g} ms</text>')
    for t in sorted({t for t, _ in pts}):
        x = px(math.log2(t))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{H - BOT}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{H - BOT + 16}" text-anchor="middle">{t // 1024}k</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">tokens T</text>')
    for n, (key, v) in enumerate(sorted(series.items())):
        v = sorted((t, ms) for t, ms in v if ms and ms > 0)
        if not v:
            continue
        c = colors[n % len(colors)]
        dash = ' stroke-dasharray="6,4"' if any("full" in str(k) for k in key) else ""
        path = " ".join(f"{px(math.log2(t)):.1f},{py(math.log10(ms)):.1f}" for t, ms in v)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for t, ms in v:
            out.append(f'<circle cx="{px(math.log2(t)):.1f}" cy="{py(math.log10(ms)):.1f}" r="3" fill="{c}"/>')
        ly = TOP + 16 * n
        out.append(f'<line x1="{W - R + 10}" x2="{W - R + 30}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{W - R + 36}" y="{ly + 4}">{" ".join(str(k) for k in key)}</text>')
    out.append("</svg>")
    paths = [Path(f"{stem}.svg")]
    paths[0].write_text("\n".join(out) + "\n")
    try:
        import matplotlib  # noqa: F401
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for key, v in sorted(series.items()):
            v = sorted(v)
            ax.plot([t for t, _ in v], [ms for _, ms in v], "o--" if "full" in str(key) else "o-",
                    label=" ".join(str(k) for k in key))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}.png", dpi=120)
        plt.close(fig)
        paths.append(Path(f"{stem}.png"))
    except ImportError:
        pass
    if os.environ.get("OUT"):
        for p in paths:
            Path(os.environ["OUT"], p.name).write_bytes(p.read_bytes())
    return paths
