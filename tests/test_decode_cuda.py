"""The decoding step (DESIGN.md §1.8) on the GPU: nsa_cuda.decode on CUDA tensors against the CPU
op (fp32 inputs, fp64 accumulation) with FlashAttention-style bounds, on random caches whose
rows past cache_seqlens are NaN (never read); unwritten (poisoned) outputs, determinism, CUDA
graph capture and replay with new cache contents, strided / misaligned inputs; and the module's
generation path (NativeSparseAttention + NSACache on CUDA): the decode output at every position
equals the prefill (full-sequence) output."""
import math

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R
from nsa_cuda.cache import NSACache
from helpers import assert_fa_close, poison_cuda_cache, requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

HEAD_DIMS = [(64, 64), (128, 128), (192, 128), (256, 256)]
HP = dict(cmp_block=32, cmp_stride=16, sel_block=64, top_n=16, init_blocks=1, local_blocks=2, window=512)
RAGGED = [0, 1, 17, 33, 130, 1000, 4097, 5000]  # empty, one token, < l, not multiples of l / l'
TIE_REL = 1e-4  # selections whose n-th / (n+1)-th block scores are closer than this may flip


def num_compressed(T, l, d):
    return 0 if T < l else (T - l) // d + 1


def make_inputs(B, S, H, G, Dk, Dv, dtype, lens, hp=HP, seed=0, poison=True):
    """q, caches, compressed caches (mean compression of the caches), lengths, gates. Rows of the
    caches past each sequence's length (and its compressed tokens past Nc) are NaN."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    l, d = hp["cmp_block"], hp["cmp_stride"]
    q = rnd(B, H * G, Dk).to(dtype)
    k, v = rnd(B, S, H, Dk), rnd(B, S, H, Dv)
    kc = R.compress(k, block=l, stride=d).to(dtype)
    vc = R.compress(v, block=l, stride=d).to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    gates = [torch.rand(B, H * G, device="cuda", generator=gen).to(dtype) for _ in range(3)]
    cs = torch.tensor(lens, dtype=torch.int32, device="cuda")
    if poison:
        for b, T in enumerate(lens):
            k[b, T:], v[b, T:] = math.nan, math.nan
            kc[b, num_compressed(T, l, d):], vc[b, num_compressed(T, l, d):] = math.nan, math.nan
    return q, k, v, kc, vc, cs, gates


def decode_cpu(q, k, v, kc, vc, cs, gates, hp=HP):
    """The CPU op on fp32 copies (it accumulates in fp64): the reference."""
    f = lambda t: t.float().cpu()  # noqa: E731
    return nsa_cuda.decode(f(q), f(k), f(v), f(kc), f(vc), cs.cpu(), *[f(g) for g in gates], **hp)


def ref_selection(q, kc, lens, hp=HP):
    """fp64 selection of every (b, KV head) (reference internals) and which of them are within
    TIE_REL of a tie at the top-n boundary (either implementation may pick either block)."""
    l, d, lp, n = hp["cmp_block"], hp["cmp_stride"], hp["sel_block"], hp["top_n"]
    B, HQ, Dk = q.shape
    H = kc.shape[2]
    scale = Dk ** -0.5
    idx = torch.full((B, H, n), -1, dtype=torch.int32)
    ambiguous = torch.zeros(B, H, dtype=torch.bool)
    for b, T in enumerate(lens):
        if T == 0:
            continue
        nc = num_compressed(T, l, d)
        pos = torch.tensor([T - 1])
        qb = q[b:b + 1].double().cpu()
        kcb = kc[b, :nc].double().cpu()
        _, lse = R._compressed_attention_seq(qb, pos, kcb, kcb, scale, l, d)
        S = R._block_scores_seq(qb, pos, kcb, lse, scale, l, d, lp, -(-T // lp))[0]  # [H, nsel]
        idx[b] = R._select_seq(S[None], pos, lp, n, hp["init_blocks"], hp["local_blocks"])[0]
        nv = (T - 1) // lp + 1
        j = torch.arange(nv)
        forced = (j < hp["init_blocks"]) | (j > (T - 1) // lp - hp["local_blocks"])
        free = n - int(forced.sum())
        if nv <= n or free <= 0:
            continue
        for g in range(H):
            s = S[g, :nv][~forced].sort(descending=True).values
            hi, lo = float(s[free - 1]), float(s[free])
            ambiguous[b, g] = hi - lo <= TIE_REL * abs(hi) and hi != lo
    return idx, ambiguous


def lowp_attend(q, k, v, scale):
    """Attention of q [G, Dk] over k [n, Dk], v [n, Dv] done by PyTorch in the input dtype."""
    if k.shape[0] == 0:
        return q.new_zeros(q.shape[0], v.shape[-1])
    s = (q @ k.T).float() * scale
    return torch.softmax(s, -1).to(q.dtype) @ v


def decode_lowp(q, k, v, kc, vc, lens, gates, idx, hp=HP):
    """The same step done by PyTorch in bf16/fp16 (FlashAttention's yardstick), with the
    reference's selection `idx`."""
    l, d, lp, w = hp["cmp_block"], hp["cmp_stride"], hp["sel_block"], hp["window"]
    B, HQ, Dk = q.shape
    H = k.shape[2]
    G = HQ // H
    scale = Dk ** -0.5
    out = torch.zeros(B, HQ, v.shape[-1], device=q.device, dtype=q.dtype)
    for b, T in enumerate(lens):
        if T == 0:
            continue
        nc = num_compressed(T, l, d)
        for g in range(H):
            qg = q[b, g * G:(g + 1) * G]
            blocks = [int(j) for j in idx[b, g] if j >= 0]
            sel = torch.cat([torch.arange(j * lp, min((j + 1) * lp, T)) for j in blocks]).cuda()
            win = torch.arange(max(0, T - w), T, device="cuda")
            o_c = lowp_attend(qg, kc[b, :nc, g], vc[b, :nc, g], scale)
            o_s = lowp_attend(qg, k[b, sel, g], v[b, sel, g], scale)
            o_w = lowp_attend(qg, k[b, win, g], v[b, win, g], scale)
            gc, gs, gw = (x[b, g * G:(g + 1) * G, None] for x in gates)
            out[b, g * G:(g + 1) * G] = gc * o_c + gs * o_s + gw * o_w
    return out


def poison_workspace():
    """NaN in freed caching-allocator blocks of many sizes: the op's scratch (at::empty) likely
    lands in one, so a partial slot read before it is written would surface as NaN."""
    poison_cuda_cache(*[((1 << e,), torch.float32) for e in range(8, 25)])


def check_decode(B, S, H, G, Dk, Dv, dtype, lens, hp=HP, seed=0):
    q, k, v, kc, vc, cs, gates = make_inputs(B, S, H, G, Dk, Dv, dtype, lens, hp, seed)
    poison_workspace()
    poison_cuda_cache(((B, H * G, Dv), dtype))
    out = nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **hp)
    assert out.shape == (B, H * G, Dv) and out.dtype == dtype and out.is_cuda
    assert torch.isfinite(out.float()).all(), "unwritten (poisoned) or non-finite output"
    again = nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **hp)
    assert torch.equal(out, again), "decode must be deterministic"
    ref = decode_cpu(q, k, v, kc, vc, cs, gates, hp).cuda()
    idx, amb = ref_selection(q, kc, lens, hp)
    pt = decode_lowp(q, k, v, kc, vc, lens, gates, idx, hp)
    # near-ties of the selection: compare those groups' heads nowhere (counted, kept rare)
    n_amb = int(amb.sum())
    assert n_amb <= max(1, 0.05 * amb.numel()), f"{n_amb} of {amb.numel()} selections within {TIE_REL} of a tie"
    keep = (~amb).repeat_interleave(G, dim=1).cuda()[..., None]
    masked = [torch.where(keep, x.float(), 0.0) for x in (out, ref, pt)]
    assert_fa_close(*masked, f"decode {dtype} D=({Dk},{Dv}) G={G} lens={lens}", atol=1e-3)
    for b, T in enumerate(lens):
        if T == 0:
            assert torch.all(out[b] == 0), "cache_seqlens = 0 gives o = 0"
    return out


@pytest.mark.parametrize("batch", ["b1", "b8_ragged"])
@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("Dk,Dv", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_matches_cpu(dtype, Dk, Dv, G, batch):
    lens = [4321] if batch == "b1" else RAGGED
    check_decode(len(lens), 5056, 2, G, Dk, Dv, dtype, lens)


@pytest.mark.parametrize("hp", [
    dict(cmp_block=16, cmp_stride=8, sel_block=32, top_n=5, init_blocks=0, local_blocks=3, window=100),
    dict(cmp_block=32, cmp_stride=16, sel_block=48, top_n=7, init_blocks=2, local_blocks=1, window=33),  # l' not 32k
    dict(cmp_block=64, cmp_stride=16, sel_block=32, top_n=3, init_blocks=1, local_blocks=2, window=1),  # l > l'
    dict(cmp_block=32, cmp_stride=32, sel_block=64, top_n=200, init_blocks=1, local_blocks=2, window=4096),  # n > blocks
], ids=["l16_lp32", "lp48", "l64_lp32_w1", "n_all"])
def test_decode_hyper_parameters(hp):
    check_decode(6, 3000, 2, 4, 64, 64, torch.bfloat16, [1, 2, 63, 64, 65, 2999], hp)


def test_decode_many_head_chunks_and_edge_lengths():
    # G = 32: two CTAs of 16 heads per KV head; lengths around every block boundary
    lens = [0, 1, 2, 15, 16, 31, 32, 33, 47, 48, 63, 64, 65, 511, 512, 513, 527, 528, 1023, 1024]
    check_decode(len(lens), 1100, 1, 32, 128, 128, torch.bfloat16, lens)


def test_decode_long_context_many_splits():
    # the headline shape at 32k: many compressed / window / selected slices per (b, KV head)
    check_decode(1, 32768, 4, 16, 128, 128, torch.bfloat16, [32768 - 5])


def test_decode_all_empty():
    q, k, v, kc, vc, cs, gates = make_inputs(3, 100, 2, 4, 64, 64, torch.bfloat16, [0, 0, 0])
    poison_cuda_cache(((3, 8, 64), torch.bfloat16))
    assert torch.all(nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **HP) == 0)


def test_decode_strided_and_misaligned_inputs_bitwise():
    B, S, H, G, D = 3, 700, 2, 4, 128
    lens = [1, 333, 700]
    q, k, v, kc, vc, cs, gates = make_inputs(B, S, H, G, D, D, torch.bfloat16, lens)
    want = nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **HP)
    # caches as views of larger ones (like NSACache's compressed storage with its spare row),
    # q a slice of a fused projection, gates views of one [B, 3, HQ] tensor
    Sc = kc.shape[1]
    kb = torch.full((B, S + 9, H, D), math.nan, device="cuda", dtype=k.dtype)
    kb[:, :S] = k
    kcb = torch.full((B, Sc + 1, H, D), math.nan, device="cuda", dtype=kc.dtype)
    kcb[:, :Sc] = kc
    qb = torch.randn(B, H * G, 3 * D, device="cuda").to(q.dtype)
    qb[..., D:2 * D] = q
    gb = torch.stack(gates, 1)  # [B, 3, HQ]
    got = nsa_cuda.decode(qb[..., D:2 * D], kb[:, :S], v, kcb[:, :Sc], vc, cs, *gb.unbind(1), **HP)
    assert torch.equal(got, want)
    # misaligned q (copied to an aligned buffer) and gates with different batch strides
    flat = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)
    qm = flat[1:].view_as(q)
    qm.copy_(q)
    g2 = torch.empty(B, 2 * H * G, device="cuda", dtype=q.dtype)
    g2[:, :H * G] = gates[1]
    got = nsa_cuda.decode(qm, k, v, kc, vc, cs, gates[0], g2[:, :H * G], gates[2], **HP)
    assert torch.equal(got, want)


def test_decode_cuda_graph_replay_with_new_cache_contents():
    B, S, H, G, D = 4, 3000, 2, 4, 128
    static = make_inputs(B, S, H, G, D, D, torch.bfloat16, [0, 1, 1500, 2999], seed=1)
    q, k, v, kc, vc, cs, gates = static
    eager = nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **HP)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs asks
        nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **HP)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nsa_cuda.decode(q, k, v, kc, vc, cs, *gates, **HP)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # new contents and new lengths, written in place; the graph reads them on replay
    new = make_inputs(B, S, H, G, D, D, torch.bfloat16, [2999, 0, 700, 33], seed=2)
    q2, k2, v2, kc2, vc2, cs2, gates2 = new
    for dst, src in zip((q, k, v, kc, vc, cs, *gates), (q2, k2, v2, kc2, vc2, cs2, *gates2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager2 = nsa_cuda.decode(q2, k2, v2, kc2, vc2, cs2, *gates2, **HP)
    assert torch.equal(out, eager2)
    assert torch.all(out[1] == 0) and torch.isfinite(out.float()).all()
    ref = decode_cpu(q2, k2, v2, kc2, vc2, cs2, gates2).cuda()
    assert (out.float() - ref).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------
# module: generation with NSACache on CUDA equals the full-sequence forward at every position

MOD_HP = dict(cmp_block=32, cmp_stride=16, sel_block=32, top_n=4, init_blocks=1, local_blocks=1, window=64)


def make_module(G, H=2, hp=MOD_HP, compression="linear"):
    torch.manual_seed(0)
    m = nsa_cuda.NativeSparseAttention(256, H * G, H, 64, 64, compression=compression, rope_theta=10000.0, **hp)
    with torch.no_grad():  # move every parameter off its init (pe starts at zero, w at mean pooling)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.05))
    return m.to(device="cuda", dtype=torch.bfloat16).eval()


def generate(m, x, prompts):
    """Prefill row b with its first prompts[b] tokens (right-padded batch), then feed every row
    its next token, one per step, until the longest prompt's row reaches the end of x.
    Returns (prefill output [B, Tp, C], decode outputs [B, steps, C]: row b, step s is
    position prompts[b] + s)."""
    B, X, _ = x.shape
    P = torch.tensor(prompts, device="cuda")
    Tp = max(prompts)
    cache = NSACache.for_layers([m], B, X)
    mask = torch.arange(Tp, device="cuda")[None, :] < P[:, None]
    rows = torch.arange(B, device="cuda")
    outs = []
    with torch.no_grad():
        yp = m(x[:, :Tp], attention_mask=mask, cache=cache)
        cache.advance()
        for off in range(X - Tp):
            outs.append(m(x[rows, P + off][:, None], cache=cache)[:, 0])
            cache.advance()
    assert cache.cache_seqlens.tolist() == [p + X - Tp for p in prompts]
    return yp, torch.stack(outs, 1)


def check_generation(G, prompts, X, hp=MOD_HP):
    m = make_module(G, hp=hp)
    x = torch.randn(len(prompts), X, m.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)  # causal: row b's output at t depends on x[b, :t+1] only
    yp, yd = generate(m, x, prompts)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(yp[b, :p], y[b, :p], atol=2e-2, rtol=2e-2)
    got = torch.stack([yd[b] for b in range(len(prompts))])  # [B, steps, C]
    want = torch.stack([y[b, p:p + yd.shape[1]] for b, p in enumerate(prompts)])
    err = (got.float() - want.float()).abs()
    bound = 2e-2 + 2e-2 * want.float().abs()
    bad = (err > bound).any(-1)  # [B, steps]: positions whose output is off (a selection near-tie flipped)
    n_bad = int(bad.sum())
    assert n_bad <= max(1, 0.01 * bad.numel()), \
        f"{n_bad} of {bad.numel()} decoded positions differ from the full forward; first at {bad.nonzero()[:5].tolist()}"
    rel = err.mean() / want.float().abs().mean()
    assert rel < 1e-2, f"mean |decode - full| / mean |full| = {rel:.2e}"


@pytest.mark.parametrize("batch", ["b1", "b8_ragged"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_module_decode_equals_prefill_every_position(G, batch):
    prompts = [7] if batch == "b1" else [1, 5, 17, 40, 64, 100, 33, 2]
    check_generation(G, prompts, 300 + max(prompts) - min(prompts))


def test_module_decode_equals_prefill_5000_tokens():
    check_generation(4, [100], 5000, hp=HP)
