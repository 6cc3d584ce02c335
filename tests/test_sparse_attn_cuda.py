"""Grouped sparse attention forward (selected blocks §1.5, sliding window §1.6) on the GPU
against nsa_cuda.reference, with FlashAttention-style bounds."""
import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R
from helpers import assert_fa_close, poison_cuda_cache, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

HEAD_DIMS = [(64, 64), (128, 128), (192, 128), (256, 256)]


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def sequences(x, cu):
    if cu is None:
        return [x[b] for b in range(x.shape[0])]
    c = cu.tolist()
    return [x[c[i]:c[i + 1]] for i in range(len(c) - 1)]


def allowed_mask(T, H, G, mode, block_idx_seq=None, sel_block=64, window=512, device="cuda"):
    """[T, HQ, T] bool: which keys each (token, query head) attends (DESIGN §1.5 / §1.6)."""
    t = torch.arange(T, device=device)
    causal = t[None, :] <= t[:, None]
    if mode == "win":
        m = causal & (t[None, :] > t[:, None] - window)
        return m[:, None, :].expand(T, H * G, T)
    blk = t // sel_block  # block of each key
    sel = torch.zeros(T, H, (T + sel_block - 1) // sel_block + 1, dtype=torch.bool, device=device)
    idx = block_idx_seq.long().clamp(min=-1)
    sel.scatter_(2, torch.where(idx < 0, sel.shape[2] - 1, idx), True)
    sel[..., -1] = False
    m = sel[:, :, blk] & causal[:, None, :]  # [T, H, T]
    return m.repeat_interleave(G, dim=1)


def attention_lowp(q, k, v, allowed, scale):
    """The same attention done by PyTorch in the input precision (FlashAttention's yardstick)."""
    G = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(G, dim=1).transpose(0, 1)  # [HQ, T, D]
    vv = v.repeat_interleave(G, dim=1).transpose(0, 1)
    s = torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)).float() * scale  # [HQ, T, T]
    s = s.masked_fill(~allowed.transpose(0, 1), float("-inf"))
    any_key = allowed.transpose(0, 1).any(-1, keepdim=True)
    # rows with no key: lse = -inf without NaN gradients
    lse = torch.logsumexp(s.masked_fill(~any_key, 0), dim=-1).masked_fill(~any_key[..., 0], float("-inf"))
    p = torch.softmax(s.masked_fill(~any_key, 0), dim=-1).masked_fill(~any_key, 0).to(q.dtype)
    o = torch.matmul(p, vv).transpose(0, 1)
    return o, lse.transpose(0, 1)


def add_logit_ramp(q, k, ramp):
    """Shifts q and k along a shared direction so that the scaled logits rise (ramp > 0) or fall
    (ramp < 0) by about 11 |ramp| from the first key row to the last: the running max of an
    online softmax then moves many times, by more than a tile's worth."""
    if ramp == 0:
        return q, k
    rows = k.shape[-3]
    pos = torch.linspace(0, 1, rows, device=k.device).view(rows, 1, 1)
    return (q.float() + 1.0).to(q.dtype), (k.float() + ramp * pos).to(k.dtype)


def run_case(mode, shape, H, G, Dk, Dv, dtype, cu=None, sel_block=64, top_n=4, window=64, idx_kind="random",
             grad=True, with_dlse=True, ramp=0.0):
    q = torch.randn(*shape, H * G, Dk, device="cuda", dtype=dtype)
    k = torch.randn(*shape, H, Dk, device="cuda", dtype=dtype)
    v = torch.randn(*shape, H, Dv, device="cuda", dtype=dtype)
    q, k = add_logit_ramp(q, k, ramp)
    scale = Dk ** -0.5
    block_idx = None
    if mode == "sel":
        if idx_kind == "real":
            kc = R.compress(k.float(), block=32, stride=16, cu_seqlens=cu)
            _, lse_c = R.compressed_attention(q.float(), kc, kc, block=32, stride=16, cu_seqlens=cu)
            block_idx = R.select_blocks(q.float(), kc, lse_c, sel_block=sel_block, top_n=top_n, cu_seqlens=cu)
        else:  # random lists: ascending, -1 padded at the end, duplicates allowed, future blocks cut by causality
            rows = q.shape[:-2]
            lens = [shape[-1]] * shape[0] if cu is None else (cu[1:] - cu[:-1]).tolist()
            nblk_row = torch.cat([torch.full((L,), (L + sel_block - 1) // sel_block) for L in lens]).cuda()
            nblk_row = nblk_row.reshape(*rows, 1, 1) if cu is None else nblk_row.reshape(-1, 1, 1)
            r = (torch.rand(*rows, H, top_n, device="cuda") * nblk_row).long()
            r = torch.where(torch.rand(*rows, H, top_n, device="cuda") < 0.8, r, 1 << 30).sort(-1).values
            block_idx = torch.where(r == 1 << 30, -1, r).int()
            if idx_kind == "mixed":  # padded only: first half of each sequence shares lists per 16 tokens
                t = torch.arange(shape[-1], device="cuda")
                block_idx = block_idx[:, torch.where(t < shape[-1] // 2, t // 16 * 16, t)]
    o_shape = (*q.shape[:-1], Dv)
    poison_cuda_cache((o_shape, dtype), (tuple(q.shape[:-1]), torch.float32))

    def ours(q, k, v):
        if mode == "sel":
            return nsa_cuda.selected_attention(q, k, v, block_idx, sel_block=sel_block, cu_seqlens=cu)
        return nsa_cuda.window_attention(q, k, v, window=window, cu_seqlens=cu)

    def reference(q, k, v):
        if mode == "sel":
            return R.selected_attention(q, k, v, block_idx, sel_block=sel_block, cu_seqlens=cu)
        return R.window_attention(q, k, v, window=window, cu_seqlens=cu)

    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    leaves_ref = [t.detach().float().requires_grad_(grad) for t in (q, k, v)]
    leaves_pt = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    o, lse = ours(*leaves)
    o_ref, lse_ref = reference(*leaves_ref)
    assert not torch.isnan(o).any(), "unwritten (poisoned) output"
    assert not torch.isnan(lse).any(), "unwritten (poisoned) lse"
    # The PyTorch low-precision yardstick, per sequence.
    o_pts, lse_pts = [], []
    bi_seqs = sequences(block_idx, cu) if block_idx is not None else None
    for i, (qs, ks, vs) in enumerate(zip(*(sequences(t, cu) for t in leaves_pt))):
        T = qs.shape[0]
        allowed = allowed_mask(T, H, G, mode, None if bi_seqs is None else bi_seqs[i], sel_block, window)
        os_, ls_ = attention_lowp(qs, ks, vs, allowed, scale)
        o_pts.append(os_)
        lse_pts.append(ls_)
    o_pt = torch.cat(o_pts) if cu is not None else torch.stack(o_pts)
    lse_pt = torch.cat(lse_pts) if cu is not None else torch.stack(lse_pts)
    assert_fa_close(o, o_ref, o_pt, f"o[{mode}]")
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key must give lse = -inf"
    assert_fa_close(lse[finite], lse_ref[finite], lse_pt[finite], f"lse[{mode}]", atol=1e-4)
    # bitwise reproducible forward
    o2, lse2 = ours(q, k, v)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    if not grad:
        return
    do = torch.randn_like(o)
    dlse = torch.randn_like(lse).masked_fill(~finite, 0) if with_dlse else torch.zeros_like(lse)

    def grads(o_, lse_, leaves_):
        lse_term = (lse_.float().masked_fill(~finite, 0) * dlse).sum() if with_dlse else 0
        return torch.autograd.grad((o_.float() * do.float()).sum() + lse_term, leaves_)

    poison_cuda_cache((tuple(q.shape), dtype), (tuple(k.shape), dtype), (tuple(v.shape), dtype))
    g = grads(o, lse, leaves)
    g_ref = grads(o_ref, lse_ref, leaves_ref)
    g_pt = grads(o_pt, lse_pt, leaves_pt)
    for name, a, r, b in zip(("dq", "dk", "dv"), g, g_ref, g_pt):
        assert not torch.isnan(a).any(), f"{name}: unwritten (poisoned) elements"
        assert_fa_close(a, r, b, f"{name}[{mode}]")
    # bitwise reproducible backward (no atomics)
    o3, lse3 = ours(*leaves)
    g2 = grads(o3, lse3, leaves)
    for a, b in zip(g, g2):
        assert torch.equal(a, b), "backward is not bitwise reproducible"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Dk,Dv", HEAD_DIMS)
@pytest.mark.parametrize("mode", ["sel", "win"])
def test_head_dims_dtypes(mode, Dk, Dv, dtype):
    run_case(mode, (2, 200), 2, 4, Dk, Dv, dtype)


@pytest.mark.parametrize("G", [1, 2, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("mode", ["sel", "win"])
def test_group_sizes(mode, G):
    run_case(mode, (2, 150), 2, G, 128, 128, torch.bfloat16)


@pytest.mark.parametrize("sel_block", [32, 64, 128])
@pytest.mark.parametrize("idx_kind", ["random", "real"])
def test_selected_block_sizes(sel_block, idx_kind):
    run_case("sel", (2, 333), 2, 4, 64, 64, torch.bfloat16, sel_block=sel_block, top_n=5, idx_kind=idx_kind)


@pytest.mark.parametrize("G", [1, 4, 16, 32])
def test_selected_adaptive_width(G, monkeypatch):
    """The selected forward and dQ pick their CTA width per group of tokens on the GPU: the 4-warp
    union walk where neighbouring tokens share blocks, 2-warp (2-row-group) CTAs where they do not.
    Lists shared by 16 neighbours in the first half of each sequence and independent (4 of 47
    blocks) in the second run both launches in one call; outputs and gradients match the
    reference and, bitwise, every forced width (NSA_SEL_FWD_WARPS, NSA_SEL_DQ_WARPS)."""
    run_case("sel", (2, 3000), 2, G, 64, 64, torch.bfloat16, top_n=4, idx_kind="mixed")
    q = torch.randn(2, 3000, 2 * G, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 3000, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 3000, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.arange(3000, device="cuda")
    idx = (torch.rand(2, 3000, 2, 4, device="cuda") * (t[None, :, None, None] // 64 + 1)).int().sort(-1).values
    idx = idx[:, torch.where(t < 1500, t // 16 * 16, t)]
    do = torch.randn(2, 3000, 2 * G, 128, device="cuda", dtype=torch.bfloat16)

    def run():
        o, lse = nsa_cuda.selected_attention(q, k, v, idx)
        return (o, lse) + torch.autograd.grad(o, (q, k, v), do)

    # The bitwise comparisons are among the union walks; the split walk (flag-0 groups at G >= 16,
    # test_selected_split_walk) adds its tiles in another order.
    monkeypatch.setenv("NSA_SEL_FWD_SPLIT", "0")
    monkeypatch.setenv("NSA_SEL_DQ_SPLIT", "0")
    ref = run()
    for name, w in [("NSA_SEL_FWD_WARPS", w) for w in (("4", "2", "1") if G >= 16 else ("4", "2"))] + \
                   [("NSA_SEL_DQ_WARPS", "4"), ("NSA_SEL_DQ_WARPS", "2")]:
        monkeypatch.setenv(name, w)
        for label, a, b in zip(("o", "lse", "dq", "dk", "dv"), ref, run()):
            assert torch.equal(a, b), f"{label} with {name}={w} differs from the adaptive widths"
        monkeypatch.delenv(name)


def force_split(monkeypatch, warps=None):
    monkeypatch.setenv("NSA_SEL_FWD_SPLIT", "1")
    monkeypatch.setenv("NSA_SEL_DQ_SPLIT", "1")
    if warps is not None:
        monkeypatch.setenv("NSA_SEL_SPLIT_WARPS", str(warps))


@pytest.mark.parametrize("warps", [2, 4])
@pytest.mark.parametrize("G", [16, 24, 32])
@pytest.mark.parametrize("Dk,Dv", [(64, 64), (128, 128), (192, 128)])
def test_selected_split_walk(Dk, Dv, G, warps, monkeypatch):
    """The split walk (sel_split_walk.cuh: one CTA per token, its warps dealing the token's 16-key
    tiles; forward and dQ) forced for every group, 2 and 4 warps per token: G = 24 has a half-full
    16-head chunk; lists with -1 pads, duplicates and future blocks; against the reference,
    bitwise reproducible (run_case)."""
    force_split(monkeypatch, warps)
    run_case("sel", (2, 333), 2, G, Dk, Dv, torch.bfloat16, top_n=5)


@pytest.mark.parametrize("sel_block,top_n", [(32, 1), (64, 32), (128, 7), (64, 33)])
@pytest.mark.parametrize("packed", [False, True])
def test_selected_split_walk_lists(sel_block, top_n, packed, monkeypatch):
    """Split walk: block sizes, the longest list it takes (32 entries, one per lane) and one past
    it (33: the union walks take the call), ragged varlen batches, fp16, the default adaptive
    launches (split for the independent half) as well as the forced one, with gradients."""
    cu = cu_of([1, 37, 700, 0, 5, 200, 129]) if packed else None
    shape = (int(cu[-1]),) if packed else (2, 700)
    run_case("sel", shape, 2, 16, 128, 128, torch.float16, cu=cu, sel_block=sel_block, top_n=top_n)
    if not packed:
        run_case("sel", shape, 2, 16, 128, 128, torch.bfloat16, sel_block=sel_block, top_n=top_n, idx_kind="mixed",
                 grad=False)
    force_split(monkeypatch)
    run_case("sel", shape, 2, 16, 128, 128, torch.bfloat16, cu=cu, sel_block=sel_block, top_n=top_n)


def test_selected_split_walk_unsorted_duplicates(monkeypatch):
    force_split(monkeypatch)
    q = torch.randn(1, 300, 16, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 300, 1, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 300, 1, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([3, 0, 3, -1, 1, 4], dtype=torch.int32, device="cuda").expand(1, 300, 1, 6).contiguous()
    o, lse = nsa_cuda.selected_attention(q, k, v, idx, sel_block=64)
    o_ref, lse_ref = R.selected_attention(q.float(), k.float(), v.float(), idx, sel_block=64)
    torch.testing.assert_close(o.float(), o_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("tile", ["default", "sm80"])
@pytest.mark.parametrize("case", ["blocks32", "blocks64", "blocks128", "g1", "g16", "varlen", "fp16", "long_lists"])
def test_selected_dkdv_tiles(case, tile, monkeypatch):
    """The selected branch's dK/dV on its sm_90a default (the one-warpgroup wgmma tile; other
    cards and head dims run sm_80's tile) and on sm_80's tile forced (NSA_SEL_DKDV_SM90=0): l' = 32
    / 64 / 128 (two 64-key units per block), G = 1 / 4 / 16, packed, fp16, and lists long enough
    to be cut into chunks whose partials the reduce kernel adds."""
    if tile == "sm80":
        monkeypatch.setenv("NSA_SEL_DKDV_SM90", "0")
    if case.startswith("blocks"):
        run_case("sel", (2, 333), 2, 4, 64, 64, torch.bfloat16, sel_block=int(case[6:]), top_n=5)
    elif case in ("g1", "g16"):
        run_case("sel", (2, 150), 2, int(case[1:]), 128, 128, torch.bfloat16)
    elif case == "varlen":
        cu = cu_of([1, 37, 70, 0, 5, 200, 129])
        run_case("sel", (int(cu[-1]),), 2, 4, 128, 128, torch.bfloat16, cu=cu, top_n=3)
    elif case == "fp16":
        run_case("sel", (2, 200), 2, 4, 128, 128, torch.float16)
    else:
        run_case("sel", (1, 4096), 2, 16, 128, 128, torch.bfloat16, top_n=16)


@pytest.mark.parametrize("Dk,Dv", [(192, 128), (256, 256)])
def test_selected_adaptive_width_head_dims(Dk, Dv):
    """The per-group widths at the wide head dims: the 2-row-group dQ CTAs at D = 256 are 4 warps
    (two column halves per row group), at (192, 128) the 84 KB layout. Lists as in
    test_selected_adaptive_width (both launches run); forward and gradients against the reference."""
    run_case("sel", (1, 3000), 1, 4, Dk, Dv, torch.bfloat16, top_n=4, idx_kind="mixed")
    run_case("sel", (1, 3000), 1, 16, Dk, Dv, torch.bfloat16, top_n=4, idx_kind="mixed")


@pytest.mark.parametrize("window", [1, 17, 512])
def test_window_sizes(window):
    run_case("win", (2, 700), 2, 4, 64, 64, torch.bfloat16, window=window)


@pytest.mark.parametrize("mode", ["sel", "win"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_varlen(mode, G):
    cu = cu_of([1, 37, 70, 0, 5, 200, 129])
    run_case(mode, (int(cu[-1]),), 2, G, 128, 128, torch.bfloat16, cu=cu, top_n=3, window=33)


@pytest.mark.parametrize("mode", ["sel", "win"])
@pytest.mark.parametrize("T", [1, 2, 31, 65])
def test_short_sequences(mode, T):
    run_case(mode, (3, T), 1, 4, 64, 64, torch.bfloat16, top_n=2, window=16)


def test_headline_shape_real_selection():
    # HQ = 64, H = 4 (G = 16), D = 128, l' = 64, n = 16, w = 512 on 2048 tokens.
    run_case("sel", (1, 2048), 4, 16, 128, 128, torch.bfloat16, top_n=16, idx_kind="real")
    run_case("win", (1, 2048), 4, 16, 128, 128, torch.bfloat16, window=512)


def test_backward_deterministic_large():
    # Many tokens select the same blocks: long per-block lists, still bitwise reproducible.
    run_case("sel", (1, 4096), 2, 16, 128, 128, torch.bfloat16, top_n=16, idx_kind="random")


def test_unsorted_and_duplicate_block_lists():
    q = torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 300, 1, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 300, 1, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([3, 0, 3, -1, 1], dtype=torch.int32, device="cuda").expand(1, 300, 1, 5).contiguous()
    o, _ = nsa_cuda.selected_attention(q, k, v, idx, sel_block=64)
    o_ref, _ = R.selected_attention(q.float(), k.float(), v.float(), idx, sel_block=64)
    torch.testing.assert_close(o.float(), o_ref, atol=2e-2, rtol=2e-2)


def test_strided_inputs_from_fused_qkv():
    qkv = torch.randn(2, 100, 6, 64, device="cuda", dtype=torch.bfloat16)  # 4 q heads + k + v
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:5], qkv[:, :, 5:6]
    o, lse = nsa_cuda.window_attention(q, k, v, window=20)
    o2, lse2 = nsa_cuda.window_attention(q.contiguous(), k.contiguous(), v.contiguous(), window=20)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


def test_cuda_rejects_bad_sel_block():
    q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 1, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.zeros(1, 64, 1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="sel_block"):
        nsa_cuda.selected_attention(q, k, k, idx, sel_block=16)


@pytest.mark.parametrize("mode", ["sel", "win"])
def test_backward_without_lse_gradient(mode):
    run_case(mode, (2, 257), 2, 4, 128, 128, torch.bfloat16, with_dlse=False)
