"""Non-contiguous and oddly strided inputs for every op on the CPU path (issue 7 item 1).

Every tensor argument of every op is fed through the views below (padded and packed layouts) and the
op must either accept it and give results bitwise equal to the same values passed contiguously
(outputs and gradients), or reject it with a ValueError naming the argument. Never a misread.

What is accepted (the contract these tests pin down):
  * q, k, v, k_cmp, v_cmp, x (compress), out (backward ops), the decode q / caches / gates: any
    strides (transposed head/seq/batch dims, slices of fused qkv tensors or of a larger cache,
    expanded stride-0 dims, overlapping heads, sliding-window rows, unaligned storage offsets) as long
    as the LAST dim has stride 1; read in place. Last-dim stride != 1 -> ValueError naming the argument.
  * w, pe (compression parameters): must be contiguous (is_contiguous()), else ValueError.
  * lse, dlse, block_idx, cache_seqlens, dout / dy (gradients), all combine arguments: any strides
    (copied to contiguous, or ATen code).
  * cu_seqlens: must be contiguous, else ValueError naming 'cu_seqlens'.
Gradients handed in by autograd (expanded stride-0 from .sum(), transposed, last-dim strided) are
accepted by every backward and equal to the contiguous gradient (test_strided_gradients).

fp32 / fp16 / bf16 inputs are checked too (test_strided_low_precision), including fp16/bf16 views
whose heads overlap with head stride 1 (the CPU path once misread those after its upcast; fixed
by checks.h's to_compute).
"""
import pytest
import torch

import nsa_cuda


pytestmark = pytest.mark.usefixtures("one_thread")


ops = torch.ops.nsa_cuda
F64 = torch.float64

B, T, H, G, DK, DV = 2, 40, 2, 2, 6, 5
HQ = H * G
L, D, SEL, TOP_N, WIN = 16, 8, 16, 2, 7
LENS = [0, 33, 40, 55]  # packed: an empty sequence, every other one has >= 3 selection blocks
TOTAL = sum(LENS)
CU = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
NC = (T - L) // D + 1


# ---------------------------------------------------------------------------------------------
# Views: name -> (min rank, leaf shape from target shape, view of the leaf with the target shape)


def _overlap_view(s):
    """Heads that overlap in memory (head stride 1 == last-dim stride), as_strided over a 1-D leaf."""
    strides = [1] * len(s)
    strides[-1], strides[-2] = 1, 1
    acc = s[-1] + s[-2] - 1
    for i in range(len(s) - 3, -1, -1):
        strides[i] = acc
        acc *= s[i]
    size = 1 + sum((n - 1) * st for n, st in zip(s, strides))
    return (size,), lambda t: t.as_strided(s, strides)


def _sliding_rows_view(s):
    """Rows that start one element apart (an unfold-style sliding window): row stride 1."""
    strides = [1] * len(s)
    strides[-2] = s[-1]
    acc = s[-1] * s[-2] + s[-3]
    for i in range(len(s) - 4, -1, -1):
        strides[i] = acc
        acc *= s[i]
    size = 1 + sum((n - 1) * st for n, st in zip(s, strides))
    return (size,), lambda t: t.as_strided(s, strides)


VIEWS = {
    # name: (min rank, leaf_shape(s), view(leaf))
    "seq_head_transposed": (3, lambda s: (*s[:-3], s[-2], s[-3], s[-1]), lambda t: t.transpose(-3, -2)),
    "heads_outermost": (3, lambda s: (s[-2], *s[:-2], s[-1]), lambda t: t.movedim(0, -2)),
    "batch_seq_transposed": (4, lambda s: (s[1], s[0], *s[2:]), lambda t: t.transpose(0, 1)),
    "fused_qkv_slice": (2, lambda s: (*s[:-2], 3, s[-2], s[-1]), lambda t: t.select(-3, 1)),
    "fused_heads_slice": (2, lambda s: (*s[:-2], s[-2] + 3, s[-1]), lambda t: t.narrow(-2, 1, t.shape[-2] - 3)),
    "unaligned_last_dim_slice": (1, lambda s: (*s[:-1], s[-1] + 3), lambda t: t.narrow(-1, 1, t.shape[-1] - 3)),
    "rows_of_larger_buffer": (3, lambda s: (*s[:-3], s[-3] + 5, *s[-2:]), lambda t: t.narrow(-3, 2, t.shape[-3] - 5)),
    "expanded_heads": (2, lambda s: (*s[:-2], 1, s[-1]), None),  # view: expand to the target shape
    "expanded_batch": (4, lambda s: (1, *s[1:]), None),
    "overlapping_heads": (2, None, None),
    "sliding_rows": (3, None, None),
    "transposed_2d": (2, lambda s: (*s[:-2], s[-1], s[-2]), lambda t: t.transpose(-1, -2)),  # last dim strided
    "last_dim_step2": (1, lambda s: (*s[:-1], 2 * s[-1]), lambda t: t[..., ::2]),
    "last_dim_expanded": (1, lambda s: (*s[:-1], 1), None),
}


def make_view(name, target, gen, dtype, low=None, high=None):
    """(leaf, view_fn): view_fn(leaf) has shape `target` and the strides of view `name`."""
    _, leaf_shape, view = VIEWS[name]
    if name == "overlapping_heads":
        leaf_shape, view = _overlap_view(target)
    elif name == "sliding_rows":
        leaf_shape, view = _sliding_rows_view(target)
    else:
        leaf_shape = leaf_shape(target)
        if view is None:
            view = lambda t: t.expand(target)  # noqa: E731
    if dtype == torch.int32:
        leaf = torch.randint(low, high, leaf_shape, generator=gen, dtype=torch.int32)
    else:
        leaf = torch.randn(leaf_shape, generator=gen, dtype=F64).to(dtype)
        if low is not None:
            leaf = leaf + low
    out = view(leaf)
    assert tuple(out.shape) == tuple(target), (name, out.shape, target)
    return leaf, view


def applicable(name, t):
    rank = VIEWS[name][0]
    if t.dim() < rank:
        return False
    if name in ("last_dim_expanded", "last_dim_step2", "transposed_2d") and t.shape[-1] < 2:
        return False
    if name == "transposed_2d" and t.shape[-2] < 2:
        return False
    return t.numel() > 0


# ---------------------------------------------------------------------------------------------
# Ops: inputs (contiguous), call, which rule each argument follows


def _inputs(layout):
    gen = torch.Generator().manual_seed(1234)
    lead = (B, T) if layout == "padded" else (TOTAL,)
    cmp_lead = (B, NC) if layout == "padded" else (TOTAL // D,)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    t = dict(q=r(*lead, HQ, DK), k=r(*lead, H, DK), v=r(*lead, H, DV), x=r(*lead, H, DK),
             w=r(H, L * DK, 3), pe=r(H, L, DK), k_cmp=r(*cmp_lead, H, DK), v_cmp=r(*cmp_lead, H, DV),
             lse=(r(*lead, HQ) + 3).float(), dlse=r(*lead, HQ).float(), out=r(*lead, HQ, DV), dout=r(*lead, HQ, DV),
             dy=r(*cmp_lead, H, 3), block_idx=torch.randint(-1, 3, (*lead, H, 3), generator=gen, dtype=torch.int32),
             o_cmp=r(*lead, HQ, DV), o_slc=r(*lead, HQ, DV), o_win=r(*lead, HQ, DV),
             g_cmp=torch.rand(*lead, HQ, generator=gen, dtype=F64), g_slc=torch.rand(*lead, HQ, generator=gen,
                                                                                        dtype=F64),
             g_win=torch.rand(*lead, HQ, generator=gen, dtype=F64))
    t["cu_seqlens"] = CU if layout == "packed" else None
    return t


def _decode_inputs(layout):
    gen = torch.Generator().manual_seed(99)
    S = 70
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    return dict(q=r(3, HQ, DK), k_cache=r(3, S, H, DK), v_cache=r(3, S, H, DV),
                k_cmp_cache=r(3, (S - L) // D + 1, H, DK), v_cmp_cache=r(3, (S - L) // D + 1, H, DV),
                cache_seqlens=torch.tensor([1, 40, 70], dtype=torch.int32),
                g_cmp=torch.rand(3, HQ, generator=gen, dtype=F64), g_slc=torch.rand(3, HQ, generator=gen, dtype=F64),
                g_win=torch.rand(3, HQ, generator=gen, dtype=F64))


# op name -> (inputs(layout), call(t) -> tuple of outputs, {arg: rule}, layouts, differentiable)
# rules: "last_dim" (stride(-1) must be 1), "contig" (must be contiguous), "any" (copied / ATen)
SPECS = {
    "compress": (_inputs, lambda t: (nsa_cuda.compress(t["x"], t["w"], t["pe"], block=L, stride=D,
                                                       cu_seqlens=t["cu_seqlens"]),),
                 dict(x="last_dim", w="contig", pe="contig"), ("padded", "packed"), True),
    "compress_mean": (_inputs, lambda t: (nsa_cuda.compress(t["x"], block=L, stride=D, cu_seqlens=t["cu_seqlens"]),),
                      dict(x="last_dim"), ("padded", "packed"), True),
    "compressed_attention": (_inputs, lambda t: nsa_cuda.compressed_attention(
        t["q"], t["k_cmp"], t["v_cmp"], block=L, stride=D, cu_seqlens=t["cu_seqlens"]),
        dict(q="last_dim", k_cmp="last_dim", v_cmp="last_dim"), ("padded", "packed"), True),
    "select_blocks": (_inputs, lambda t: (nsa_cuda.select_blocks(
        t["q"], t["k_cmp"], t["lse"], cmp_block=L, cmp_stride=D, sel_block=SEL, top_n=TOP_N, init_blocks=0,
        local_blocks=0, cu_seqlens=t["cu_seqlens"]),),
        dict(q="last_dim", k_cmp="last_dim", lse="any"), ("padded", "packed"), False),
    "selected_attention": (_inputs, lambda t: nsa_cuda.selected_attention(
        t["q"], t["k"], t["v"], t["block_idx"], sel_block=SEL, cu_seqlens=t["cu_seqlens"]),
        dict(q="last_dim", k="last_dim", v="last_dim", block_idx="any"), ("padded", "packed"), True),
    "window_attention": (_inputs, lambda t: nsa_cuda.window_attention(
        t["q"], t["k"], t["v"], window=WIN, cu_seqlens=t["cu_seqlens"]),
        dict(q="last_dim", k="last_dim", v="last_dim"), ("padded", "packed"), True),
    "combine": (_inputs, lambda t: (nsa_cuda.combine(t["o_cmp"], t["o_slc"], t["o_win"], t["g_cmp"], t["g_slc"],
                                                     t["g_win"]),),
                dict(o_cmp="any", o_slc="any", o_win="any", g_cmp="any", g_slc="any", g_win="any"), ("padded",),
                True),
    "decode": (_decode_inputs, lambda t: (nsa_cuda.decode(
        t["q"], t["k_cache"], t["v_cache"], t["k_cmp_cache"], t["v_cmp_cache"], t["cache_seqlens"], t["g_cmp"],
        t["g_slc"], t["g_win"], cmp_block=L, cmp_stride=D, sel_block=SEL, top_n=TOP_N, window=WIN),),
        dict(q="last_dim", k_cache="last_dim", v_cache="last_dim", k_cmp_cache="last_dim", v_cmp_cache="last_dim",
             g_cmp="last_dim", g_slc="last_dim", g_win="last_dim", cache_seqlens="any"), ("padded",), False),
    # backward ops called directly (autograd passes its own tensors; see test_strided_gradients)
    "cmp_attn_bwd": (_inputs, lambda t: ops.cmp_attn_bwd(
        t["dout"], t["dlse"], t["q"], t["k_cmp"], t["v_cmp"], t["out"], t["lse"], 0.4, L, D, t["cu_seqlens"]),
        dict(dout="any", dlse="any", out="last_dim", lse="any"), ("padded", "packed"), False),
    "sel_attn_bwd": (_inputs, lambda t: ops.sel_attn_bwd(
        t["dout"], t["dlse"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["block_idx"], 0.4, SEL, t["cu_seqlens"]),
        dict(dout="any", dlse="any", out="last_dim", lse="any", block_idx="any"), ("padded", "packed"), False),
    "win_attn_bwd": (_inputs, lambda t: ops.win_attn_bwd(
        t["dout"], t["dlse"], t["q"], t["k"], t["v"], t["out"], t["lse"], 0.4, WIN, t["cu_seqlens"]),
        dict(dout="any", dlse="any", out="last_dim", lse="any"), ("padded", "packed"), False),
    "compress_bwd": (_inputs, lambda t: ops.compress_bwd(t["dy"], t["x"], t["w"], t["pe"], L, D, t["cu_seqlens"]),
                     dict(dy="any"), ("padded", "packed"), False),
    "combine_bwd": (_inputs, lambda t: ops.combine_bwd(t["dout"], t["o_cmp"], t["o_slc"], t["o_win"], t["g_cmp"],
                                                       t["g_slc"], t["g_win"]),
                    dict(dout="any"), ("padded",), False),
}


def expect_reject(rule, view):
    if rule == "last_dim":
        return view.stride(-1) != 1
    if rule == "contig":
        return not view.is_contiguous()
    return False


def _cases():
    for op, (inputs, _, rules, layouts, _) in SPECS.items():
        for layout in layouts:
            t = inputs(layout)
            for arg in rules:
                for name in VIEWS:
                    if applicable(name, t[arg]):
                        yield pytest.param(op, layout, arg, name, id=f"{op}-{layout}-{arg}-{name}")


CASES = list(_cases())


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(3.0), b.nan_to_num(3.0)) \
        and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("op,layout,arg,view", CASES)
def test_strided_argument(op, layout, arg, view):
    inputs, call, rules, _, differentiable = SPECS[op]
    t = inputs(layout)
    gen = torch.Generator().manual_seed(7)
    target = t[arg]
    if arg == "block_idx":  # values must stay valid block indices whatever the view repeats
        leaf, fn = make_view(view, target.shape, gen, torch.int32, -1, 3)
    elif arg == "cache_seqlens":
        leaf, fn = make_view(view, target.shape, gen, torch.int32, 1, 71)
    elif arg in ("lse", "dlse"):
        leaf, fn = make_view(view, target.shape, gen, torch.float32, 3.0 if arg == "lse" else None)
    else:
        leaf, fn = make_view(view, target.shape, gen, target.dtype)
    grad = differentiable and leaf.dtype.is_floating_point
    leaf_a = leaf.clone().requires_grad_(grad)
    leaf_b = leaf.clone().requires_grad_(grad)
    strided = fn(leaf_a)
    contiguous = fn(leaf_b).contiguous()
    assert torch.equal(strided.detach(), contiguous.detach())

    if expect_reject(rules[arg], strided):
        with pytest.raises(ValueError, match=f"'{arg}'"):
            call({**t, arg: strided})
        return
    out_s = call({**t, arg: strided})
    out_c = call({**t, arg: contiguous})
    for i, (a, b) in enumerate(zip(out_s, out_c)):
        assert _equal(a.detach(), b.detach()), f"output {i} differs with a {view} '{arg}'"
    if grad:
        gos = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype).masked_fill(~torch.isfinite(o), 0)
               for o in out_c]
        (g_s,) = torch.autograd.grad(out_s, leaf_a, gos)
        (g_c,) = torch.autograd.grad(out_c, leaf_b, gos)
        assert _equal(g_s, g_c), f"gradient differs with a {view} '{arg}'"


# ---------------------------------------------------------------------------------------------
# gradients as autograd hands them in: expanded (from .sum()), transposed, last-dim strided

GRAD_OPS = ["compress", "compress_mean", "compressed_attention", "selected_attention", "window_attention", "combine"]


def _grad_view(kind, like, gen):
    if kind == "expanded":  # what out.sum().backward() hands in: stride 0 everywhere
        return torch.ones((), dtype=like.dtype).expand_as(like)
    leaf, fn = make_view({"transposed": "seq_head_transposed" if like.dim() >= 3 else "transposed_2d",
                          "last_dim_step2": "last_dim_step2"}[kind], like.shape, gen, like.dtype)
    return fn(leaf)


@pytest.mark.parametrize("kind", ["expanded", "transposed", "last_dim_step2"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("op", GRAD_OPS)
def test_strided_gradients(op, layout, kind):
    inputs, call, rules, layouts, _ = SPECS[op]
    if layout not in layouts:
        pytest.skip("padded only")
    t = inputs(layout)
    names = [a for a in rules if t[a].dtype.is_floating_point]
    gen = torch.Generator().manual_seed(5)
    leaves = {a: t[a].clone().requires_grad_(True) for a in names}
    outs = call({**t, **leaves})
    # no masking of the -inf lse rows: that would make a copy; the op ignores dlse there anyway
    gos = [_grad_view(kind, o, gen) if o.dtype.is_floating_point else None for o in outs]
    pairs = [(o, g) for o, g in zip(outs, gos) if g is not None]
    got = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [g for _, g in pairs])
    leaves2 = {a: t[a].clone().requires_grad_(True) for a in names}
    outs2 = call({**t, **leaves2})
    pairs2 = [(o, g.contiguous()) for o, g in zip(outs2, gos) if g is not None]
    want = torch.autograd.grad([o for o, _ in pairs2], list(leaves2.values()), [g for _, g in pairs2])
    for a, g, w in zip(names, got, want):
        assert _equal(g, w), f"d{a} differs with a {kind} incoming gradient"


# ---------------------------------------------------------------------------------------------
# cu_seqlens must be contiguous (it is read as a raw int32 array)


@pytest.mark.parametrize("op", ["compress", "compressed_attention", "select_blocks", "selected_attention",
                                "window_attention"])
def test_non_contiguous_cu_seqlens_rejected(op):
    inputs, call, _, _, _ = SPECS[op]
    t = inputs("packed")
    spaced = torch.stack([CU, torch.full_like(CU, 999)], 1).reshape(-1)[::2]  # stride 2, same values
    assert torch.equal(spaced, CU) and not spaced.is_contiguous()
    with pytest.raises(ValueError, match="'cu_seqlens'"):
        call({**t, "cu_seqlens": spaced})


# ---------------------------------------------------------------------------------------------
# fp32 / bf16 inputs take a cast-then-read path on the CPU: the same views must still be read right

LOWP_VIEWS = ["seq_head_transposed", "fused_qkv_slice", "expanded_heads", "overlapping_heads", "sliding_rows",
              "unaligned_last_dim_slice", "last_dim_step2"]
LOWP_ARGS = {"compress": "x", "compressed_attention": "k_cmp", "select_blocks": "q", "selected_attention": "v",
             "window_attention": "q", "decode": "k_cache"}




def _lowp_cases():
    for op in sorted(LOWP_ARGS):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for view in LOWP_VIEWS:
                yield pytest.param(op, dtype, view, id=f"{op}-{str(dtype)[6:]}-{view}")


@pytest.mark.parametrize("op,dtype,view", list(_lowp_cases()))
def test_strided_low_precision(op, dtype, view):
    inputs, call, rules, layouts, differentiable = SPECS[op]
    arg = LOWP_ARGS[op]
    t = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype == F64 else v)
         for k, v in inputs(layouts[-1]).items()}
    leaf, fn = make_view(view, t[arg].shape, torch.Generator().manual_seed(3), dtype)
    a, b = leaf.clone().requires_grad_(differentiable), leaf.clone().requires_grad_(differentiable)
    strided, contiguous = fn(a), fn(b).contiguous()
    if expect_reject(rules[arg], strided):
        with pytest.raises(ValueError, match=f"'{arg}'"):
            call({**t, arg: strided})
        return
    out_s, out_c = call({**t, arg: strided}), call({**t, arg: contiguous})
    for x, y in zip(out_s, out_c):
        assert _equal(x.detach(), y.detach())
    if differentiable:
        gos = [torch.ones_like(o) for o in out_c]
        assert _equal(torch.autograd.grad(out_s, a, gos)[0], torch.autograd.grad(out_c, b, gos)[0])
