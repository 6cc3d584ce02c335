"""NaN / +Inf / -Inf in the inputs on the CPU path (issue 7 item 1): they propagate as the plain
PyTorch reference says, only to the outputs that depend on them, never hang, and never reach
another sequence of a packed batch or another row of a batch (the op-level isolation over fuzzed
shapes is tests/test_fuzz.py::test_nan_stays_in_its_sequence; here the whole NSA, the module, the
masked padding and generation with the cache).

"Propagates as PyTorch would": for a non-finite query, key or compressed key, the non-finite
pattern of every output (which elements are NaN, which are +-Inf) equals that of
``nsa_cuda.reference`` (plain PyTorch) element by element. For a non-finite value, the reference
multiplies the whole softmax matrix by ``v``, so ``0 * NaN`` spreads it to rows that never see
that key; the ops (like FlashAttention) read only visible keys, so there the promise is: exactly
the output elements whose row gives the poisoned key a non-zero weight become NaN (NaN in v) or
+-Inf (+-Inf in v), and nothing else.
"""
import math

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
L, D, SEL, TOP_N, WIN = 16, 8, 16, 2, 8
HP = dict(cmp_block=L, cmp_stride=D, sel_block=SEL, top_n=TOP_N, window=WIN)
LENS = [23, 0, 50, 1, 40]
VALUES = [math.nan, math.inf, -math.inf]


def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def same_pattern(a, b, what):
    assert a.shape == b.shape, what
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN at other places than in the reference"
    assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), \
        f"{what}: +-Inf at other places than in the reference"


def bitwise(a, b, what):
    assert a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and \
        torch.equal(a.isnan(), b.isnan()), f"{what} differs"


def inputs(T=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, 4, 8, generator=g, dtype=F64)
    k = torch.randn(1, T, 2, 8, generator=g, dtype=F64)
    v = torch.randn(1, T, 2, 8, generator=g, dtype=F64)
    kc = R.compress(k, block=L, stride=D)
    vc = R.compress(v, block=L, stride=D)
    _, lse = R.compressed_attention(q, kc, vc, block=L, stride=D)
    idx = R.select_blocks(q, kc, lse, cmp_block=L, cmp_stride=D, sel_block=SEL, top_n=TOP_N)
    return q, k, v, kc, vc, idx


def branches(q, k, v, kc, vc, idx, impl):
    """(o, lse) of the three attention branches with `impl` (nsa_cuda or the reference)."""
    return {
        "cmp": impl.compressed_attention(q, kc, vc, block=L, stride=D),
        "sel": impl.selected_attention(q, k, v, idx, sel_block=SEL),
        "win": impl.window_attention(q, k, v, window=WIN),
    }


@pytest.mark.parametrize("value", VALUES, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "kc"])
@pytest.mark.parametrize("pos", [0, 3, 20, 49])
def test_nonfinite_q_k_propagate_like_the_reference(where, pos, value):
    q, k, v, kc, vc, idx = inputs()
    t = dict(q=q, k=k, v=v, kc=kc, vc=vc, idx=idx)
    t[where] = t[where].clone()
    t[where][0, min(pos, t[where].shape[1] - 1), 1, 3] = value
    ops = branches(**t, impl=nsa_cuda)
    ref = branches(**t, impl=R)
    for name in ops:
        same_pattern(ops[name][0], ref[name][0], f"{name}: o")
        same_pattern(ops[name][1], ref[name][1].float(), f"{name}: lse")
    # compression of a poisoned key: the compressed tokens whose window holds it, as in the reference
    same_pattern(nsa_cuda.compress(t["k"], block=L, stride=D), R.compress(t["k"], block=L, stride=D), "compress")
    w = torch.randn(2, L * 8, 5, dtype=F64)
    same_pattern(nsa_cuda.compress(t["k"], w, block=L, stride=D), R.compress(t["k"], w, block=L, stride=D),
                 "compress (linear)")


@pytest.mark.parametrize("value", VALUES, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("where", ["v", "vc"])
@pytest.mark.parametrize("pos", [0, 3, 20, 49])
def test_nonfinite_v_reaches_exactly_the_rows_that_weigh_it(where, pos, value):
    q, k, v, kc, vc, idx = inputs()
    t = dict(q=q, k=k, v=v, kc=kc, vc=vc, idx=idx)
    pos = min(pos, t[where].shape[1] - 1)
    bad, marker = t[where].clone(), torch.zeros_like(t[where])
    bad[0, pos, 1, 3] = value
    marker[0, pos, 1, 3] = 1.0
    ops = branches(**{**t, where: bad}, impl=nsa_cuda)
    clean = branches(**t, impl=nsa_cuda)
    weights = branches(**{**t, where: marker}, impl=R)  # o = softmax weight of the poisoned key, else 0
    seen = False
    for name in ops:
        o = ops[name][0]
        if (name == "cmp") != (where == "vc"):  # this branch does not read the poisoned tensor
            assert torch.equal(o, clean[name][0]) and torch.equal(ops[name][1], clean[name][1]), name
            continue
        hit = weights[name][0] != 0
        seen = seen or bool(hit.any())
        if value != value:
            assert torch.equal(o.isnan(), hit), f"{name}: NaN in v must reach exactly the rows that weigh it"
        else:
            assert not o.isnan().any(), f"{name}: +-Inf in v must not make NaN"
            assert torch.equal(o.isinf(), hit), f"{name}: +-Inf in v must reach exactly the rows that weigh it"
            assert (o[hit] == value).all()
        assert torch.equal(o[~hit], clean[name][0][~hit]), f"{name}: the other outputs must not change"
        assert torch.equal(ops[name][1], clean[name][1]), f"{name}: lse does not depend on v"
    assert seen, "the poisoned value must be visible to some row"


@pytest.mark.parametrize("value", VALUES, ids=["nan", "+inf", "-inf"])
def test_nonfinite_combine_is_pointwise(value):
    g = torch.Generator().manual_seed(3)
    os_ = [torch.randn(2, 9, 4, 8, generator=g, dtype=F64) for _ in range(3)]
    gs = [torch.rand(2, 9, 4, generator=g, dtype=F64) for _ in range(3)]
    gs[1][0, 2, 1] = 0.0  # a zero gate on a poisoned row: 0 * NaN = NaN, 0 * Inf = NaN, as in PyTorch
    for i in range(6):
        args = [x.clone() for x in os_ + gs]
        if i < 3:
            args[i][0, 2, 1, 5] = value
        else:
            args[i][0, 2, 1] = value
        same_pattern(nsa_cuda.combine(*args), R.combine(*args), f"combine, argument {i}")


# ---------------------------------------------------------------------------------------------
# the whole NSA on a packed batch: a non-finite value in one sequence stays in that sequence


def nsa_packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENS)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    t = dict(q=r(total, 4, 8), k=r(total, 2, 8), v=r(total, 2, 8), g_cmp=torch.rand(total, 4, generator=g, dtype=F64),
             g_slc=torch.rand(total, 4, generator=g, dtype=F64), g_win=torch.rand(total, 4, generator=g, dtype=F64))
    comp = dict(w_k=r(2, L * 8, 8) / 10, w_v=r(2, L * 8, 8) / 10, pe_k=r(2, L, 8), pe_v=r(2, L, 8))
    return t, comp, r(total, 4, 8)


def run_nsa(t, comp, go):
    leaves = {n: x.clone().requires_grad_(True) for n, x in t.items()}
    o, idx = nsa_cuda.nsa_attention(*leaves.values(), **comp, **HP, cu_seqlens=cu_of(LENS), return_block_idx=True)
    grads = torch.autograd.grad(o, list(leaves.values()), go)
    return o.detach(), idx, dict(zip(leaves, grads))


@pytest.mark.parametrize("value", VALUES, ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("victim", [0, 2, 3, 4])
@pytest.mark.parametrize("arg", ["q", "k", "v", "g_cmp", "g_slc", "g_win"])
def test_nsa_attention_nonfinite_stays_in_its_sequence(arg, victim, value):
    t, comp, go = nsa_packed()
    cu = cu_of(LENS).tolist()
    clean_o, clean_idx, clean_g = run_nsa(t, comp, go)
    assert torch.isfinite(clean_o).all()
    bad = dict(t)
    bad[arg] = t[arg].clone()
    row = cu[victim] + LENS[victim] // 2
    bad[arg][row, 0] = value
    o, idx, grads = run_nsa(bad, comp, go)
    for b in range(len(LENS)):
        rows = slice(cu[b], cu[b + 1])
        if b == victim:
            continue
        bitwise(o[rows], clean_o[rows], f"sequence {b}: o")
        assert torch.equal(idx[rows], clean_idx[rows]), f"sequence {b}: block_idx"
        for name in grads:
            bitwise(grads[name][rows], clean_g[name][rows], f"sequence {b}: d{name}")
    # it does reach the poisoned sequence's own row (a gate, a query, a key, a value of the row
    # itself always enter that row's window branch)
    assert not torch.isfinite(o[row]).all(), "the poisoned row must not come out finite"
    # selection stays well-formed in every sequence: -1 or a block of the row's own sequence
    for b in range(len(LENS)):
        for t_ in range(LENS[b]):
            r = idx[cu[b] + t_]
            assert ((r == -1) | ((r >= 0) & (r * SEL <= t_))).all()


# ---------------------------------------------------------------------------------------------
# the module: packed, masked, and generation with the cache


def make_module():
    torch.manual_seed(0)
    m = nsa_cuda.NativeSparseAttention(32, 4, 2, 8, **HP)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.05))
    return m.double()


@pytest.mark.parametrize("value", VALUES, ids=["nan", "+inf", "-inf"])
def test_module_nonfinite_stays_in_its_sequence(value):
    m = make_module()
    x = torch.randn(sum(LENS), 32, dtype=F64)
    cu = cu_of(LENS).tolist()
    clean = m(x, cu_seqlens=cu_of(LENS)).detach()
    for victim in (0, 2, 4):
        bad = x.clone()
        bad[cu[victim] + 1, 7] = value
        y = m(bad, cu_seqlens=cu_of(LENS)).detach()
        for b in range(len(LENS)):
            if b != victim:
                bitwise(y[cu[b]:cu[b + 1]], clean[cu[b]:cu[b + 1]], f"victim {victim}, sequence {b}")
        assert not torch.isfinite(y[cu[victim] + 1]).all()


@pytest.mark.parametrize("value", VALUES, ids=["nan", "+inf", "-inf"])
def test_module_masked_padding_is_never_read(value):
    # attention_mask: whatever sits at masked-out positions (here NaN / Inf) changes nothing, and the
    # outputs there are zero
    m = make_module()
    lens, T = [30, 7, 0, 19], 30
    x = torch.randn(len(lens), T, 32, dtype=F64)
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    clean = m(x, attention_mask=mask)
    y = m(torch.where(mask[..., None], x, value), attention_mask=mask)
    bitwise(y, clean, "outputs with non-finite padding")
    assert (y[~mask] == 0).all()


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "+inf"])
def test_generation_padding_and_other_rows_unaffected(value):
    """Generation with the cache: non-finite values in the padding of a right-padded prompt change
    nothing; a non-finite prompt token of row 0 changes nothing in row 1 (prefill and decode)."""
    m = make_module()
    B, P, steps = 2, 21, 6
    lens = [P, 13]
    x = torch.randn(B, P, 32, dtype=F64)
    mask = torch.arange(P)[None, :] < torch.tensor(lens)[:, None]
    new = torch.randn(steps, B, 1, 32, dtype=F64)

    def generate(prompt):
        cache = nsa_cuda.NSACache.for_layers([m], B, 64)
        with torch.no_grad():
            outs = [m(prompt, attention_mask=mask, cache=cache)]
            cache.advance()
            for s in range(steps):
                outs.append(m(new[s], cache=cache))
                cache.advance()
        return outs

    clean = generate(x)
    padded = generate(torch.where(mask[..., None], x, value))
    for a, b in zip(padded, clean):
        bitwise(a, b, "generation with non-finite prompt padding")
    bad = x.clone()
    bad[0, 4, 3] = value
    poisoned = generate(bad)
    for s, (a, b) in enumerate(zip(poisoned, clean)):
        bitwise(a[1], b[1], f"step {s}: row 1")
    assert not torch.isfinite(poisoned[-1][0]).all(), "row 0 keeps attending to its poisoned token"
