"""nsa_cuda against the best public Triton NSA, fla-org's flash-linear-attention (`fla.ops.nsa`,
the successor of fla-org/native-sparse-attention), on the same work, one process, per branch:

  selected   attention over given block lists (l' = 64, n = 16): forward, forward+backward. The
             same int lists go to both (fla takes them as `block_indices`); two kinds of lists:
             'shared' (redrawn every 16 tokens, neighbours select alike, as trained models do) and
             'independent' (redrawn every token, as random inputs select).
  compressed attention over mean-pooled blocks of 64 keys (l = d = 64: fla's only compression;
             the pooled keys are computed once and given to both): forward, forward+backward.
  top-n      selection from the compressed lse (l = d = l' = 64, n = 16; block 0 and the two
             blocks of t forced, as fla forces them).
  full       causal SDPA (cuDNN) of the same T, for scale.

Every pair's outputs are compared (max |difference|, or the share of rows whose block sets agree)
so that both sides demonstrably did the same work. fla needs G = HQ / H >= 16 (a power of two), so
only the headline G = 16 runs; G = 4 is reported as unsupported by fla.

Needs fla on the GPU machine, which has no package registry: carry the wheels in .whl/
(`pip download --no-deps fla-core einops -d .whl`); tools/gpu_check.sh installs them.

    python bench/bench_triton_nsa.py [--T 8192 16384 32768 65536]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_sparse_attn import attended_keys_selected, make_block_idx  # noqa: E402

import nsa_cuda  # noqa: E402

D, HQ, H, LP, N = 128, 64, 4, 64, 16
FB = 3.5  # forward+backward FLOPs = 3.5 x forward (FlashAttention's convention)


def load_fla():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla warns that flash-attn (its window branch) is missing
        import fla
        from fla.ops.nsa.compression import parallel_nsa_compression
        from fla.ops.nsa.parallel import ParallelNSAFunction, parallel_nsa_topk
    return fla.__version__, ParallelNSAFunction, parallel_nsa_compression, parallel_nsa_topk


def fwd_bwd_ms(fn, leaves, do, warmup=2, iters=5):
    def step():
        o = fn(*leaves)
        torch.autograd.grad(o, leaves, do)

    return common.median_ms(step, warmup, iters)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    args = ap.parse_args()
    try:
        fla_version, ParallelNSAFunction, fla_compression, fla_topk = load_fla()
    except ImportError as e:
        print(f"bench_triton_nsa: fla is not installed ({e}); carry fla-core and einops wheels in .whl/")
        return
    scale = D ** -0.5
    dt = torch.bfloat16
    rows = []
    for T in args.T:
        torch.manual_seed(0)
        full = common.full_attention("cudnn", T, HQ, H, D)
        full_fb = common.full_attention("cudnn", T, HQ, H, D, backward=True, iters=5)
        q = torch.randn(1, T, HQ, D, device="cuda", dtype=dt)
        k = torch.randn(1, T, H, D, device="cuda", dtype=dt)
        v = torch.randn(1, T, H, D, device="cuda", dtype=dt)
        do = torch.randn(1, T, HQ, D, device="cuda", dtype=dt)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

        def row(work, ours_ms, fla_ms, ours_fb, fla_fb, flops, check):
            rows.append([T, work, f"{ours_ms:.3f}", f"{fla_ms:.3f}", f"{fla_ms / ours_ms:.2f}x",
                         f"{flops / ours_ms / 1e9:.1f}", f"{flops / fla_ms / 1e9:.1f}",
                         "-" if ours_fb is None else f"{ours_fb:.3f}", "-" if fla_fb is None else f"{fla_fb:.3f}",
                         "-" if ours_fb is None else f"{fla_fb / ours_fb:.2f}x",
                         f"{full:.2f} / {full_fb:.2f}", check])

        # ---- selected attention, the same lists on both sides
        for kind, redraw in (("shared", 16), ("independent", 1)):
            idx = make_block_idx(T, H, N, LP, redraw=redraw)  # int32 [1, T, H, n], ascending, -1 padded
            idx_fla = idx.long()

            def ours_sel(a, b, c):
                return nsa_cuda.selected_attention(a, b, c, idx, sel_block=LP, scale=scale)[0]

            def fla_sel(a, b, c):
                return ParallelNSAFunction.apply(a, b, c, idx_fla, N, LP, scale, None)

            check = f"max|o diff| {max_diff(ours_sel(q, k, v), fla_sel(q, k, v)):.1e}"
            flops = 2.0 * attended_keys_selected(idx, LP) * (HQ // H) * (D + D)
            row(f"selected ({kind} lists)", common.median_ms(lambda: ours_sel(q, k, v), 3, 10),
                common.median_ms(lambda: fla_sel(q, k, v), 3, 10), fwd_bwd_ms(ours_sel, leaves, do),
                fwd_bwd_ms(fla_sel, leaves, do), flops, check)

        # ---- compressed attention over mean-pooled 64-key blocks (both get the same pooled keys)
        kc = nsa_cuda.compress(k, block=64, stride=64)
        vc = nsa_cuda.compress(v, block=64, stride=64)
        cleaves = [t.detach().requires_grad_(True) for t in (q, kc, vc)]

        def ours_cmp(a, b, c):
            return nsa_cuda.compressed_attention(a, b, c, block=64, stride=64, scale=scale)[0]

        def fla_cmp(a, b, c):
            return fla_compression(a, b, c, T, 64, scale)[0]

        o_ours, lse_ours = nsa_cuda.compressed_attention(q, kc, vc, block=64, stride=64, scale=scale)
        o_fla, lse_fla = fla_compression(q, kc, vc, T, 64, scale)
        visible = sum((t + 1) // 64 for t in range(T))  # compressed keys attended, per query head
        flops = 2.0 * visible * HQ * (D + D)
        check = f"max|o diff| {max_diff(o_ours, o_fla):.1e}"
        row("compressed (l = d = 64)", common.median_ms(lambda: ours_cmp(q, kc, vc), 3, 10),
            common.median_ms(lambda: fla_cmp(q, kc, vc), 3, 10), fwd_bwd_ms(ours_cmp, cleaves, do),
            fwd_bwd_ms(fla_cmp, cleaves, do), flops, check)

        # ---- top-n selection from the compressed lse (same lse to both)
        lse = lse_ours.contiguous()

        def ours_topk():
            return nsa_cuda.select_blocks(q, kc, lse, scale=scale, cmp_block=64, cmp_stride=64, sel_block=64,
                                          top_n=N, init_blocks=1, local_blocks=2)

        lse_fla = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # fla's lse of no visible key is 0

        def fla_topk_call():
            return fla_topk(q, kc, T, lse_fla, N, 64, scale)

        a = ours_topk()[0].sort(-1).values
        b = fla_topk_call()[0].long().sort(-1).values
        b = torch.where(b < 0, -1, b)
        agree = (a.long() == b).all(-1).float().mean().item()
        flops = 2.0 * visible * HQ * D  # the recomputed q.k products
        row("top-n selection", common.median_ms(ours_topk, 3, 10), common.median_ms(fla_topk_call, 3, 10),
            None, None, flops, f"same block set in {agree * 100:.1f}% of (token, head) rows")

    rows.append(["-", "any branch, G = 4 (HQ = 16, H = 4)", "runs", "unsupported (fla needs G >= 16)", "-", "-",
                 "-", "-", "-", "-", "-", "-"])
    notes = {
        "compared with": f"fla (flash-linear-attention, fla-core {fla_version}) `fla.ops.nsa`: Triton kernels, "
                         "autotuned during warm-up",
        "shape": f"q [1, T, {HQ}, {D}], k/v [1, T, {H}, {D}] bf16 (G = {HQ // H}), l' = {LP}, n = {N}",
        "block lists": "0, t//64-1, t//64 + 13 random valid blocks, redrawn every 16 tokens (shared) or every token "
                       "(independent); the same lists to both",
        "FLOPs": "2 * attended keys * (Dk + Dv) per (token, query head); top-n: the q.k products; "
                 f"fwd+bwd: {FB} x forward",
        "check": "the outputs of each pair compared on the same inputs (bf16 rounding differs between kernels); "
                 "top-n: fla forces its 3 blocks with score 1.0 where nsa_cuda uses +inf, so rows where a "
                 "forced block scores below others may differ",
        "full attention": "cuDNN SDPA causal, HQ = 64 (GQA expanded), fwd / fwd+bwd ms",
        "timing": "median of 10 (fwd) / 5 (fwd+bwd) CUDA-event timings after warm-up",
    }
    common.write_table("triton_nsa", ["T", "work", "nsa_cuda fwd ms", "fla fwd ms", "fwd speedup",
                                      "nsa_cuda TFLOP/s", "fla TFLOP/s", "nsa_cuda fwd+bwd ms", "fla fwd+bwd ms",
                                      "fwd+bwd speedup", "full fwd / fwd+bwd ms", "same work"], rows, notes)


if __name__ == "__main__":
    main()
