"""Small cases of every CUDA kernel, run under compute-sanitizer by tools/gpu_check.sh --sanitize."""
import os

import torch

import nsa_cuda


def main() -> None:
    torch.manual_seed(0)
    lens = [1, 37, 70, 5, 130]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    built = nsa_cuda.build_info()["dtypes"]  # a --quick build has bf16 only
    dtypes = [dt for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if name in built]
    for dtype in dtypes:
        for D in (64, 128):
            x = torch.randn(sum(lens), 2, D, device="cuda", dtype=dtype, requires_grad=True)
            w = (torch.randn(2, 32 * D, D, device="cuda", dtype=dtype) / 64).requires_grad_(True)
            pe = torch.randn(2, 32, D, device="cuda", dtype=dtype, requires_grad=True)
            for args in ((x, None, None), (x, w, None), (x, w, pe)):
                y = nsa_cuda.compress(*args, cu_seqlens=cu)
                y.float().sum().backward()
                xp = torch.randn(2, 45, 2, D, device="cuda", dtype=dtype)
                nsa_cuda.compress(xp, *[a.detach() if a is not None else None for a in args[1:]])
        # grouped sparse attention forward: selected and window, padded and packed, G = 1, 4, 16
        for G in (1, 4, 16):
            q = torch.randn(sum(lens), 2 * G, 64, device="cuda", dtype=dtype)
            k = torch.randn(sum(lens), 2, 64, device="cuda", dtype=dtype)
            idx = torch.randint(-1, 3, (sum(lens), 2, 3), dtype=torch.int32, device="cuda")
            qg, kg = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
            o, _ = nsa_cuda.window_attention(qg, kg, kg, window=17, cu_seqlens=cu)
            o.float().sum().backward()
            o, _ = nsa_cuda.selected_attention(qg, kg, kg, idx.sort(-1).values, sel_block=64, cu_seqlens=cu)
            o.float().sum().backward()
            qp = torch.randn(2, 45, 2 * G, 128, device="cuda", dtype=dtype)
            kp = torch.randn(2, 45, 2, 128, device="cuda", dtype=dtype)
            nsa_cuda.window_attention(qp, kp, kp, window=8)
    # compressed attention + selection
    for G in (1, 4, 16):
        q = torch.randn(sum(lens), 2 * G, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(sum(lens), 2, 64, device="cuda", dtype=torch.bfloat16)
        kc = nsa_cuda.compress(k, cu_seqlens=cu).requires_grad_(True)
        qg = q.detach().requires_grad_(True)
        o, lse = nsa_cuda.compressed_attention(qg, kc, kc, cu_seqlens=cu)
        o.float().sum().backward()
        nsa_cuda.select_blocks(q, kc.detach(), lse.detach(), top_n=3, cu_seqlens=cu)
        qp = torch.randn(2, 45, 2 * G, 128, device="cuda", dtype=torch.bfloat16)
        kp = nsa_cuda.compress(torch.randn(2, 45, 2, 128, device="cuda", dtype=torch.bfloat16))
        o, lse = nsa_cuda.compressed_attention(qp, kp, kp)
        nsa_cuda.select_blocks(qp, kp, lse, top_n=2)
    wide_head_dims(lens, cu)
    selection_variants_and_widths()
    split_walk_cases()
    torch.cuda.synchronize()
    print("sanitize cases done")
    # decode: one step against a cache, ragged lengths (incl. 0, < cmp_block, more blocks than
    # top_n so the radix selection runs), G = 1, 4, 16
    lens_d = torch.tensor([0, 1, 20, 130, 300], dtype=torch.int32, device="cuda")
    for G in (1, 4, 16):
        for D in (64, 128):
            qd = torch.randn(5, 2 * G, D, device="cuda", dtype=torch.bfloat16)
            kd = torch.randn(5, 320, 2, D, device="cuda", dtype=torch.bfloat16)
            vd = torch.randn(5, 320, 2, D, device="cuda", dtype=torch.bfloat16)
            gd = [torch.rand(5, 2 * G, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            nsa_cuda.decode(qd, kd, vd, nsa_cuda.compress(kd), nsa_cuda.compress(vd), lens_d, *gd, top_n=3,
                            window=64)
    torch.cuda.synchronize()
    print("decode sanitize cases done")


def selection_variants_and_widths() -> None:
    """The sm_90a selection in both variants (NSA_SELECT_SM90_PIPELINED; G = 1 and 2 run the
    pipelined one anyway) over several 64-key tiles, and the selected forward / dQ with lists
    shared by 16 neighbours in the first half and independent in the second, so both CTA widths
    run in one call; padded and packed."""
    T = 1500
    t = torch.arange(T, device="cuda")
    cu = torch.tensor([0, 1, 700, 1500, 3000], dtype=torch.int32, device="cuda")
    for pipelined in ("1", "0"):
        os.environ["NSA_SELECT_SM90_PIPELINED"] = pipelined
        for G in (1, 2, 4, 16):
            q = torch.randn(2 * T, 2 * G, 64, device="cuda", dtype=torch.bfloat16)
            kc = nsa_cuda.compress(torch.randn(2 * T, 2, 64, device="cuda", dtype=torch.bfloat16), cu_seqlens=cu)
            nsa_cuda.select_blocks(q, kc, nsa_cuda.compressed_attention(q, kc, kc, cu_seqlens=cu)[1], cu_seqlens=cu,
                                   top_n=5)
    os.environ.pop("NSA_SELECT_SM90_PIPELINED", None)
    for G in (1, 4, 16):
        q = torch.randn(2, T, 2 * G, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, T, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        idx = (torch.rand(2, T, 2, 4, device="cuda") * (t[None, :, None, None] // 64 + 1)).int().sort(-1).values
        idx = idx[:, torch.where(t < T // 2, t // 16 * 16, t)]
        nsa_cuda.selected_attention(q, k, k, idx)[0].float().sum().backward()
        o = nsa_cuda.selected_attention(q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1),
                                        idx.flatten(0, 1).clamp(max=10), cu_seqlens=cu)[0]
        o.float().sum().backward()


def split_walk_cases() -> None:
    """The split walk (selected forward and dQ, one CTA per token) forced for every group, 2 and 4
    warps per token: lists with -1, duplicates, future and out-of-sequence-end blocks, G = 16 and
    24 (a half-full head chunk), l' = 32 / 64 / 128, D = 64 / 128 / 192."""
    os.environ.update(NSA_SEL_FWD_SPLIT="1", NSA_SEL_DQ_SPLIT="1")
    for warps in ("2", "4"):
        os.environ["NSA_SEL_SPLIT_WARPS"] = warps
        for (T, G, D, lp, n) in ((300, 16, 128, 64, 5), (200, 24, 64, 32, 32), (150, 16, 192, 128, 3)):
            q = torch.randn(2, T, 2 * G, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, T, 2, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(2, T, 2, 128 if D == 192 else D, device="cuda", dtype=torch.bfloat16)
            idx = (torch.rand(2, T, 2, n, device="cuda") * ((T + lp - 1) // lp + 1)).int() - 1
            nsa_cuda.selected_attention(q, k, v, idx, sel_block=lp)[0].float().sum().backward()
    for name in ("NSA_SEL_FWD_SPLIT", "NSA_SEL_DQ_SPLIT", "NSA_SEL_SPLIT_WARPS"):
        os.environ.pop(name, None)


def wide_head_dims(lens, cu, device="cuda") -> None:
    """Backward of the three branches at (192, 128) and (256, 256): the dQ kernels' 84 KB CTAs
    and, at D = 256, 8-warp CTAs whose warp pairs share the Q / dO rows and split the dQ
    columns; G = 32 takes two head chunks."""
    n = sum(lens)
    for Dk, Dv in ((192, 128), (256, 256)):
        for G in (4, 32):
            q = torch.randn(n, 2 * G, Dk, device=device, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(n, 2, Dk, device=device, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(n, 2, Dv, device=device, dtype=torch.bfloat16, requires_grad=True)
            # blocks 0..2 where the row's sequence has them (the CPU path rejects others)
            nb = torch.tensor([(L + 63) // 64 for L in lens for _ in range(L)], dtype=torch.int32, device=device)
            idx = torch.randint(-1, 3, (n, 2, 3), dtype=torch.int32, device=device)
            idx = torch.minimum(idx, (nb - 1)[:, None, None]).sort(-1).values
            o, _ = nsa_cuda.window_attention(q, k, v, window=17, cu_seqlens=cu)
            o.float().sum().backward()
            o, _ = nsa_cuda.selected_attention(q, k, v, idx, sel_block=64, cu_seqlens=cu)
            o.float().sum().backward()
            kc = nsa_cuda.compress(k.detach(), cu_seqlens=cu)
            vc = nsa_cuda.compress(v.detach(), cu_seqlens=cu)
            kc.requires_grad_(True)
            vc.requires_grad_(True)
            o, _ = nsa_cuda.compressed_attention(q, kc, vc, cu_seqlens=cu)
            o.float().sum().backward()


if __name__ == "__main__":
    main()
