"""Bad input: every public function raises a Python exception that names the argument (never a
crash or an out-of-bounds read). CPU tensors here; the CUDA paths share the same checks."""
import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R

F32 = torch.float32


def cu_of(lens, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype)


@pytest.fixture
def data():
    torch.manual_seed(0)
    q = torch.randn(1, 64, 4, 16)
    k = torch.randn(1, 64, 2, 16)
    v = torch.randn(1, 64, 2, 16)
    kc = R.compress(k, block=16, stride=8)
    _, lse = R.compressed_attention(q, kc, kc, block=16, stride=8)
    idx = R.select_blocks(q, kc, lse, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    return dict(q=q, k=k, v=v, kc=kc, lse=lse.float(), idx=idx)


def raises(exc, arg):
    return pytest.raises(exc, match=f"'{arg}'")


# ---- compress ----------------------------------------------------------------------------------

def test_compress_bad_inputs(data):
    k = data["k"]
    with raises(TypeError, "x"):
        nsa_cuda.compress(k.int())
    with raises(ValueError, "x"):
        nsa_cuda.compress(k[0])  # rank 3 without cu_seqlens
    with raises(ValueError, "x"):
        nsa_cuda.compress(k.transpose(-1, -2).contiguous().transpose(-1, -2))  # last dim not contiguous
    with raises(ValueError, "stride"):
        nsa_cuda.compress(k, block=16, stride=5)
    with raises(ValueError, "block"):
        nsa_cuda.compress(k, block=0, stride=8)
    with raises(ValueError, "w"):
        nsa_cuda.compress(k, torch.randn(2, 15 * 16, 16), block=16, stride=8)
    with raises(ValueError, "w"):
        nsa_cuda.compress(k, torch.randn(3, 16 * 16, 16), block=16, stride=8)
    with raises(TypeError, "w"):
        nsa_cuda.compress(k, torch.randn(2, 16 * 16, 16, dtype=torch.float64), block=16, stride=8)
    with raises(ValueError, "pe"):
        nsa_cuda.compress(k, None, torch.randn(2, 16, 16), block=16, stride=8)  # pe without w
    with raises(ValueError, "pe"):
        nsa_cuda.compress(k, torch.randn(2, 16 * 16, 16), torch.randn(2, 8, 16), block=16, stride=8)


MALFORMED_CU = [
    pytest.param(cu_of([10, 20], torch.int64), TypeError, id="int64"),                        # wrong dtype
    pytest.param(cu_of([10, 20]).float(), TypeError, id="float32"),                          # wrong dtype
    pytest.param(torch.tensor([0, 40, 30], dtype=torch.int32), ValueError, id="decreasing"),  # not increasing
    pytest.param(torch.tensor([0, 10, 20], dtype=torch.int32), ValueError, id="last<total"),  # last != total
    pytest.param(torch.tensor([0, 10, 40], dtype=torch.int32), ValueError, id="last>total"),  # last != total
    pytest.param(torch.tensor([5, 10, 30], dtype=torch.int32), ValueError, id="start!=0"),    # does not start at 0
    pytest.param(torch.tensor([30], dtype=torch.int32), ValueError, id="too-short"),          # too short
    pytest.param(cu_of([10, 20]).reshape(3, 1), ValueError, id="2-D"),                        # not 1-D
]


def packed_calls(cu, total=30):
    """Every public function that takes cu_seqlens, on a packed batch of `total` tokens."""
    torch.manual_seed(1)
    q, x = torch.randn(total, 4, 16), torch.randn(total, 2, 16)
    kc = torch.randn(total // 8, 2, 16)
    lse = torch.randn(total, 4)
    idx = torch.zeros(total, 2, 1, dtype=torch.int32)
    g = torch.rand(total, 4)
    return [
        lambda: nsa_cuda.compress(x, block=16, stride=8, cu_seqlens=cu),
        lambda: nsa_cuda.compressed_attention(q, kc, kc, block=16, stride=8, cu_seqlens=cu),
        lambda: nsa_cuda.select_blocks(q, kc, lse, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, cu_seqlens=cu),
        lambda: nsa_cuda.selected_attention(q, x, x, idx, sel_block=16, cu_seqlens=cu),
        lambda: nsa_cuda.window_attention(q, x, x, window=8, cu_seqlens=cu),
        lambda: nsa_cuda.nsa_attention(q, x, x, g, g, g, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2,
                                       window=8, cu_seqlens=cu),
    ]


@pytest.mark.parametrize("cu,why", MALFORMED_CU)
def test_malformed_cu_seqlens(cu, why):
    for call in packed_calls(cu):
        with raises(why, "cu_seqlens"):
            call()


@pytest.mark.parametrize("cu,why", MALFORMED_CU)
def test_module_malformed_cu_seqlens(cu, why):
    # the module checks rank and dtype itself (ValueError for both), the ops check the values
    m = nsa_cuda.NativeSparseAttention(32, 4, 2, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)
    with raises(ValueError, "cu_seqlens"):
        m(torch.randn(30, 32), cu_seqlens=cu)


def test_packed_batch_without_sequences_rejected():
    # cu_seqlens = [0] (no sequence at all) is malformed: FlashAttention's convention needs N + 1 >= 2
    # entries. (Sequences of length 0 are fine: cu_seqlens = [0, 0].)
    for call in packed_calls(torch.zeros(1, dtype=torch.int32), total=0):
        with raises(ValueError, "cu_seqlens"):
            call()
    for call in packed_calls(torch.zeros(2, dtype=torch.int32), total=0):  # one empty sequence: valid
        call()


# ---- attention branches ------------------------------------------------------------------------

@pytest.mark.parametrize("branch", ["cmp", "sel", "win"])
def test_attention_bad_inputs(data, branch):
    q, k, v, kc, idx = data["q"], data["k"], data["v"], data["kc"], data["idx"]

    def call(q=q, k=k, v=v, **kw):
        if branch == "cmp":
            kk = kc if k is data["k"] else k
            vv = kc if v is data["v"] else v
            return nsa_cuda.compressed_attention(q, kk, vv, block=16, stride=8, **kw)
        if branch == "sel":
            return nsa_cuda.selected_attention(q, k, v, idx, sel_block=16, **kw)
        return nsa_cuda.window_attention(q, k, v, window=8, **kw)

    with raises(TypeError, "q"):
        call(q=q.int())
    with raises(ValueError, "q"):
        call(q=q[0])
    with raises(ValueError, "q"):  # 3 query heads over 2 KV heads
        call(q=q[:, :, :3])
    with raises(ValueError, "k" if branch != "cmp" else "k_cmp"):
        call(k=torch.randn(1, 64, 2, 8) if branch != "cmp" else torch.randn(1, kc.shape[1], 2, 8))
    with raises(ValueError, "v" if branch != "cmp" else "v_cmp"):
        call(v=torch.randn(1, 64, 3, 16) if branch != "cmp" else torch.randn(1, kc.shape[1], 3, 16))
    with raises(ValueError, "scale"):
        call(scale=-1.0)


def test_selected_attention_bad_block_idx(data):
    q, k, v, idx = data["q"], data["k"], data["v"], data["idx"]
    with raises(TypeError, "block_idx"):
        nsa_cuda.selected_attention(q, k, v, idx.long(), sel_block=16)
    with raises(ValueError, "block_idx"):
        nsa_cuda.selected_attention(q, k, v, idx[:, :10], sel_block=16)
    bad = idx.clone()
    bad[0, 5, 0, 0] = 4  # block 4 starts at 64 = T: out of range
    with raises(ValueError, "block_idx"):
        nsa_cuda.selected_attention(q, k, v, bad, sel_block=16)
    bad[0, 5, 0, 0] = -2
    with raises(ValueError, "block_idx"):
        nsa_cuda.selected_attention(q, k, v, bad, sel_block=16)


def test_window_bad_hyper_parameters(data):
    with raises(ValueError, "window"):
        nsa_cuda.window_attention(data["q"], data["k"], data["v"], window=0)


def test_select_blocks_bad_inputs(data):
    q, kc, lse = data["q"], data["kc"], data["lse"]
    kw = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    with raises(ValueError, "top_n"):
        nsa_cuda.select_blocks(q, kc, lse, **{**kw, "top_n": 0})
    with raises(ValueError, "sel_block"):
        nsa_cuda.select_blocks(q, kc, lse, **{**kw, "sel_block": 20})  # stride 8 does not divide 20
    with raises(TypeError, "lse"):
        nsa_cuda.select_blocks(q, kc, lse.double(), **kw)
    with raises(ValueError, "lse"):
        nsa_cuda.select_blocks(q, kc, lse[:, :10], **kw)
    with raises(ValueError, "init_blocks"):
        nsa_cuda.select_blocks(q, kc, lse, **kw, init_blocks=-1)


def test_combine_bad_inputs():
    o = torch.randn(1, 8, 4, 16)
    g = torch.rand(1, 8, 4)
    with raises(ValueError, "o_slc"):
        nsa_cuda.combine(o, o[:, :4], o, g, g, g)
    with raises(ValueError, "g_win"):
        nsa_cuda.combine(o, o, o, g, g, g[:, :, :2])
    with raises(TypeError, "g_cmp"):
        nsa_cuda.combine(o, o, o, g.double(), g, g)


def _decode_inputs():
    """A small valid decode problem: q, k (also v), compressed k, gates, lengths, hyper-parameters."""
    B, S, H, D = 2, 40, 2, 16
    k = torch.randn(B, S, H, D)
    return (torch.randn(B, 4, D), k, R.compress(k, block=16, stride=8), torch.rand(B, 4),
            torch.tensor([17, 40], dtype=torch.int32),
            dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8))


def test_decode_bad_inputs():
    q, k, kc, g, seq, kw = _decode_inputs()
    B, S, H, D = *k.shape,
    with raises(TypeError, "cache_seqlens"):
        nsa_cuda.decode(q, k, k, kc, kc, seq.long(), g, g, g, **kw)
    with raises(ValueError, "cache_seqlens"):
        nsa_cuda.decode(q, k, k, kc, kc, torch.tensor([17, 41], dtype=torch.int32), g, g, g, **kw)
    with raises(ValueError, "q"):
        nsa_cuda.decode(q[:, :3], k, k, kc, kc, seq, g, g, g, **kw)
    with raises(ValueError, "g_slc"):
        nsa_cuda.decode(q, k, k, kc, kc, seq, g, g[:1], g, **kw)


def test_empty_and_one_token_sequences():
    # Zero-length sequences inside a packed batch and 1-token sequences are valid input.
    lens = [0, 1, 0, 40]
    cu = cu_of(lens)
    x = torch.randn(41, 2, 16)
    q = torch.randn(41, 4, 16)
    y = nsa_cuda.compress(x, block=16, stride=8, cu_seqlens=cu)
    torch.testing.assert_close(y, R.compress(x, block=16, stride=8, cu_seqlens=cu))
    o, lse = nsa_cuda.window_attention(q, x, x, window=8, cu_seqlens=cu)
    o_r, lse_r = R.window_attention(q, x, x, window=8, cu_seqlens=cu)
    torch.testing.assert_close(o, o_r, atol=1e-5, rtol=1e-5)
    # An empty batch.
    y = nsa_cuda.compress(torch.randn(0, 64, 2, 16), block=16, stride=8)
    assert y.shape == (0, 7, 2, 16)


@pytest.mark.parametrize("fn,kwargs,name", [
    ("compress", dict(block=2 ** 21, stride=16), "block"),
    ("compressed_attention", dict(block=2 ** 21, stride=16), "block"),
    ("select_blocks", dict(sel_block=2 ** 21), "sel_block"),
])
def test_huge_block_sizes_rejected(fn, kwargs, name):
    # block sizes beyond 2^20 would overflow 32-bit tile arithmetic in the kernels
    x = torch.randn(1, 40, 2, 16)
    q = torch.randn(1, 40, 4, 16)
    kc = torch.randn(1, 2, 2, 16)
    lse = torch.zeros(1, 40, 4)
    args = {"compress": (x,), "compressed_attention": (q, kc, kc), "select_blocks": (q, kc, lse)}[fn]
    with pytest.raises(ValueError, match=f"'{name}' must be at most"):
        getattr(nsa_cuda, fn)(*args, **kwargs)


# ---- the token cap (docs/OFFSET_AUDIT.md): sequences and packed batches of more than 2^31 - 2^21
# tokens are rejected before any kernel runs. The tensors are expanded along the token dim (stride
# 0), so the test allocates a few bytes, not gigabytes.
_TOO_MANY = nsa_cuda.functional.MAX_TOKENS + 1


def _tokens(*shape):
    small = [1 if n == _TOO_MANY else n for n in shape]
    return torch.zeros(small).expand(*shape)


_CAP_CASES = {
    "compress": (lambda: nsa_cuda.compress(_tokens(1, _TOO_MANY, 1, 16)), "x"),
    "compressed_attention": (lambda: nsa_cuda.compressed_attention(
        _tokens(1, _TOO_MANY, 2, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16)), "q"),
    "select_blocks": (lambda: nsa_cuda.select_blocks(
        _tokens(1, _TOO_MANY, 2, 16), torch.zeros(1, 4, 1, 16), _tokens(1, _TOO_MANY, 2), top_n=1), "q"),
    "selected_attention": (lambda: nsa_cuda.selected_attention(
        _tokens(1, _TOO_MANY, 2, 16), _tokens(1, _TOO_MANY, 1, 16), _tokens(1, _TOO_MANY, 1, 16),
        torch.zeros(1, 1, 1, 1, dtype=torch.int32).expand(1, _TOO_MANY, 1, 1)), "q"),
    "window_attention": (lambda: nsa_cuda.window_attention(
        _tokens(1, _TOO_MANY, 2, 16), _tokens(1, _TOO_MANY, 1, 16), _tokens(1, _TOO_MANY, 1, 16)), "q"),
    "nsa_attention": (lambda: nsa_cuda.nsa_attention(
        _tokens(1, _TOO_MANY, 2, 16), _tokens(1, _TOO_MANY, 1, 16), _tokens(1, _TOO_MANY, 1, 16),
        *[_tokens(1, _TOO_MANY, 2)] * 3), "q"),
    "compress_packed": (lambda: nsa_cuda.compress(
        _tokens(_TOO_MANY, 1, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),
    "window_attention_packed": (lambda: nsa_cuda.window_attention(
        _tokens(_TOO_MANY, 2, 16), _tokens(_TOO_MANY, 1, 16), _tokens(_TOO_MANY, 1, 16),
        cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "cu_seqlens"),
    "nsa_attention_packed": (lambda: nsa_cuda.nsa_attention(
        _tokens(_TOO_MANY, 2, 16), _tokens(_TOO_MANY, 1, 16), _tokens(_TOO_MANY, 1, 16),
        *[_tokens(_TOO_MANY, 2)] * 3, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32), max_seqlen=5), "q"),
}


@pytest.mark.parametrize("case", sorted(_CAP_CASES))
def test_token_cap_rejected(case):
    fn, arg = _CAP_CASES[case]
    with pytest.raises(ValueError, match=rf"(?s)(?=.*'{arg}')(?=.*2\^31 - 2\^21)"):
        fn()


# ---- the rest of the matrix: one row per bad input (issue 7 item 1) ------------------------------
# Each row: (id, thunk, exception type, the argument the message must name). Built lazily so that the
# tensors are made under the autouse seed fixture.


def _op_rows():
    q = torch.randn(1, 64, 4, 16)
    k = torch.randn(1, 64, 2, 16)
    kc = R.compress(k, block=16, stride=8)
    _, lse = R.compressed_attention(q, kc, kc, block=16, stride=8)
    lse = lse.float()
    idx = R.select_blocks(q, kc, lse, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    cmp_kw = dict(block=16, stride=8)
    sel_kw = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    cmp = lambda q=q, kc=kc, vc=kc, **kw: nsa_cuda.compressed_attention(q, kc, vc, **{**cmp_kw, **kw})  # noqa: E731
    sel = lambda q=q, kc=kc, lse=lse, **kw: nsa_cuda.select_blocks(q, kc, lse, **{**sel_kw, **kw})  # noqa: E731
    slc = lambda q=q, k=k, v=k, idx=idx, **kw: nsa_cuda.selected_attention(  # noqa: E731
        q, k, v, idx, **{"sel_block": 16, **kw})
    win = lambda q=q, k=k, v=k, **kw: nsa_cuda.window_attention(q, k, v, **{"window": 8, **kw})  # noqa: E731
    # packed: sequence 0 has 20 tokens (blocks 0, 1 of 16), sequence 1 has 44
    cu = cu_of([20, 44])
    kcp = R.compress(k[0], block=16, stride=8, cu_seqlens=cu)
    past_end = torch.zeros(64, 2, 2, dtype=torch.int32)
    past_end[5, 0, 0] = 2  # block 2 starts at 32 > 20: past the end of sequence 0 (but inside the packed batch)
    nan, inf = float("nan"), float("inf")
    return [
        # compress
        ("compress/stride-0", lambda: nsa_cuda.compress(k, block=16, stride=0), ValueError, "stride"),
        ("compress/block-negative", lambda: nsa_cuda.compress(k, block=-16, stride=8), ValueError, "block"),
        ("compress/x-rank-5", lambda: nsa_cuda.compress(k[None]), ValueError, "x"),
        ("compress/x-no-heads", lambda: nsa_cuda.compress(k[:, :, :0]), ValueError, "x"),
        ("compress/w-rank-2", lambda: nsa_cuda.compress(k, torch.randn(16 * 16, 16), block=16, stride=8),
         ValueError, "w"),
        ("compress/pe-dtype", lambda: nsa_cuda.compress(k, torch.randn(2, 16 * 16, 16),
                                                         torch.randn(2, 16, 16).double(), block=16, stride=8),
         TypeError, "pe"),
        # compressed attention
        ("cmp/k_cmp-too-few-rows", lambda: cmp(kc=kc[:, :3], vc=kc[:, :3]), ValueError, "k_cmp"),
        ("cmp/k_cmp-too-many-rows", lambda: cmp(kc=torch.cat([kc, kc], 1), vc=torch.cat([kc, kc], 1)),
         ValueError, "k_cmp"),
        ("cmp/packed-k_cmp-rows", lambda: nsa_cuda.compressed_attention(q[0], kcp[:5], kcp[:5], cu_seqlens=cu,
                                                                         **cmp_kw), ValueError, "k_cmp"),
        ("cmp/k_cmp-dtype", lambda: cmp(kc=kc.double()), TypeError, "k_cmp"),
        ("cmp/v_cmp-rows", lambda: cmp(vc=kc[:, :3]), ValueError, "v_cmp"),
        ("cmp/scale-nan", lambda: cmp(scale=nan), ValueError, "scale"),
        ("cmp/scale-inf", lambda: cmp(scale=inf), ValueError, "scale"),
        ("cmp/scale-0", lambda: cmp(scale=0.0), ValueError, "scale"),
        ("cmp/stride-not-dividing", lambda: cmp(stride=5), ValueError, "stride"),
        ("cmp/block-0", lambda: cmp(block=0), ValueError, "block"),
        # select_blocks
        ("select/q-int", lambda: sel(q=q.int()), TypeError, "q"),
        ("select/q-rank-3", lambda: sel(q=q[0]), ValueError, "q"),
        ("select/k_cmp-dtype", lambda: sel(kc=kc.double()), TypeError, "k_cmp"),
        ("select/k_cmp-rows", lambda: sel(kc=kc[:, :3]), ValueError, "k_cmp"),
        ("select/lse-int", lambda: sel(lse=lse.int()), TypeError, "lse"),
        ("select/lse-heads", lambda: sel(lse=lse[..., :2]), ValueError, "lse"),
        ("select/q-heads-not-multiple", lambda: sel(q=q[:, :, :3], lse=lse[..., :3]), ValueError, "q"),
        ("select/local_blocks-negative", lambda: sel(local_blocks=-1), ValueError, "local_blocks"),
        ("select/top_n-beyond-int32", lambda: sel(top_n=2 ** 40), ValueError, "top_n"),
        ("select/scale-0", lambda: sel(scale=0.0), ValueError, "scale"),
        ("select/cmp_block-0", lambda: sel(cmp_block=0), ValueError, "cmp_block"),
        # selected attention
        ("selected/block_idx-heads", lambda: slc(idx=idx[:, :, :1]), ValueError, "block_idx"),
        ("selected/block_idx-rank", lambda: slc(idx=idx[..., 0]), ValueError, "block_idx"),
        ("selected/block_idx-past-its-sequence", lambda: nsa_cuda.selected_attention(
            q[0], k[0], k[0], past_end, sel_block=16, cu_seqlens=cu), ValueError, "block_idx"),
        ("selected/sel_block-0", lambda: slc(sel_block=0), ValueError, "sel_block"),
        ("selected/scale-nan", lambda: slc(scale=nan), ValueError, "scale"),
        ("selected/v-dtype", lambda: slc(v=k.double()), TypeError, "v"),
        ("selected/k-tokens", lambda: slc(k=k[:, :60]), ValueError, "k"),
        # window attention
        ("window/k-tokens", lambda: win(k=k[:, :60], v=k[:, :60]), ValueError, "k"),
        ("window/v-heads", lambda: win(v=k[:, :, :1]), ValueError, "v"),
        ("window/no-heads", lambda: win(q=q[:, :, :0], k=k[:, :, :0], v=k[:, :, :0]), ValueError, "q"),
        ("window/head-dim-0", lambda: win(q=q[..., :0], k=k[..., :0], v=k[..., :0], scale=1.0), ValueError, "q"),
        ("window/k-dtype", lambda: win(k=k.double()), TypeError, "k"),
        ("window/q-rank-5", lambda: win(q=q[None], k=k[None], v=k[None]), ValueError, "q"),
        ("window/window-negative", lambda: win(window=-3), ValueError, "window"),
        ("window/scale-negative", lambda: win(scale=-0.5), ValueError, "scale"),
    ]


def _decode_rows():
    q, k, kc, g, seq, kw = _decode_inputs()
    B, S, H, D = *k.shape,

    def dec(q=q, k=k, v=k, kc=kc, vc=kc, seq=seq, gc=g, gs=g, gw=g, **over):
        return nsa_cuda.decode(q, k, v, kc, vc, seq, gc, gs, gw, **{**kw, **over})

    last_dim_strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    return [
        ("decode/q-int", lambda: dec(q=q.int()), TypeError, "q"),
        ("decode/q-rank-4", lambda: dec(q=q[:, None]), ValueError, "q"),
        ("decode/q-heads-not-multiple", lambda: dec(q=q[:, :3], gc=g[:, :3], gs=g[:, :3], gw=g[:, :3]),
         ValueError, "q"),
        ("decode/q-head-dim", lambda: dec(q=q[..., :8]), ValueError, "k_cache"),
        ("decode/k_cache-dtype", lambda: dec(k=k.double()), TypeError, "k_cache"),
        ("decode/k_cache-batch", lambda: dec(k=k[:1]), ValueError, "k_cache"),
        ("decode/v_cache-heads", lambda: dec(v=k[:, :, :1]), ValueError, "v_cache"),
        ("decode/v_cache-length", lambda: dec(v=k[:, :30]), ValueError, "v_cache"),
        ("decode/v_cache-last-dim-stride", lambda: dec(v=last_dim_strided), ValueError, "v_cache"),
        ("decode/k_cmp_cache-dtype", lambda: dec(kc=kc.double()), TypeError, "k_cmp_cache"),
        ("decode/k_cmp_cache-heads", lambda: dec(kc=kc[:, :, :1]), ValueError, "k_cmp_cache"),
        ("decode/k_cmp_cache-head-dim", lambda: dec(kc=kc[..., :8]), ValueError, "k_cmp_cache"),
        ("decode/v_cmp_cache-rows", lambda: dec(vc=kc[:, :2]), ValueError, "v_cmp_cache"),
        ("decode/cmp-caches-too-short", lambda: dec(kc=kc[:, :2], vc=kc[:, :2]), ValueError, "k_cmp_cache"),
        ("decode/cache_seqlens-length", lambda: dec(seq=seq[:1]), ValueError, "cache_seqlens"),
        ("decode/cache_seqlens-2-D", lambda: dec(seq=seq[:, None]), ValueError, "cache_seqlens"),
        ("decode/cache_seqlens-negative", lambda: dec(seq=torch.tensor([-1, 40], dtype=torch.int32)),
         ValueError, "cache_seqlens"),
        ("decode/g_cmp-dtype", lambda: dec(gc=g.double()), TypeError, "g_cmp"),
        ("decode/g_win-shape", lambda: dec(gw=g[:, :2]), ValueError, "g_win"),
        ("decode/top_n-0", lambda: dec(top_n=0), ValueError, "top_n"),
        ("decode/window-0", lambda: dec(window=0), ValueError, "window"),
        ("decode/sel_block-not-multiple-of-stride", lambda: dec(sel_block=20), ValueError, "sel_block"),
        ("decode/cmp_stride-not-dividing", lambda: dec(cmp_stride=5), ValueError, "cmp_stride"),
        ("decode/init_blocks-negative", lambda: dec(init_blocks=-1), ValueError, "init_blocks"),
        ("decode/local_blocks-negative", lambda: dec(local_blocks=-1), ValueError, "local_blocks"),
        ("decode/scale-negative", lambda: dec(scale=-1.0), ValueError, "scale"),
        ("decode/scale-nan", lambda: dec(scale=float("nan")), ValueError, "scale"),
    ]


def _combine_rows():
    o = torch.randn(1, 8, 4, 16)
    g = torch.rand(1, 8, 4)
    cb = nsa_cuda.combine
    return [
        ("combine/o_cmp-int", lambda: cb(o.int(), o, o, g, g, g), TypeError, "o_cmp"),
        ("combine/o_slc-dtype", lambda: cb(o, o.double(), o, g, g, g), TypeError, "o_slc"),
        ("combine/o_cmp-rank-1", lambda: cb(o[0, 0, 0], o[0, 0, 0], o[0, 0, 0], g[0, 0], g[0, 0], g[0, 0]),
         ValueError, "o_cmp"),
        ("combine/o_win-head-dim", lambda: cb(o, o, o[..., :8], g, g, g), ValueError, "o_win"),
        ("combine/g_cmp-extra-dim", lambda: cb(o, o, o, g[..., None], g, g), ValueError, "g_cmp"),
        ("combine/g_slc-int", lambda: cb(o, o, o, g, g.int(), g), TypeError, "g_slc"),
    ]


def _nsa_attention_rows():
    HP = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)
    q, k, v = torch.randn(1, 40, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    g = torch.rand(1, 40, 4)
    f = nsa_cuda.nsa_attention
    lds = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    return [
        ("nsa_attention/q-int", lambda: f(q.int(), k, v, g, g, g, **HP), TypeError, "q"),
        ("nsa_attention/q-not-a-tensor", lambda: f(q.tolist(), k, v, g, g, g, **HP), TypeError, "q"),
        ("nsa_attention/g_win-None", lambda: f(q, k, v, g, g, None, **HP), TypeError, "g_win"),
        ("nsa_attention/v-heads", lambda: f(q, k, v[:, :, :1], g, g, g, **HP), ValueError, "v"),
        ("nsa_attention/k-head-dim", lambda: f(q, k[..., :8], v, g, g, g, **HP), ValueError, "k"),
        ("nsa_attention/k-last-dim-stride", lambda: f(q, lds, v, g, g, g, **HP), ValueError, "x"),
        ("nsa_attention/no-heads", lambda: f(q[:, :, :0], k[:, :, :0], v[:, :, :0], g[..., :0], g[..., :0],
                                             g[..., :0], **HP), ValueError, "q"),
        ("nsa_attention/cmp_block-0", lambda: f(q, k, v, g, g, g, **dict(HP, cmp_block=0)), ValueError, "cmp_block"),
        ("nsa_attention/sel_block-0", lambda: f(q, k, v, g, g, g, **dict(HP, sel_block=0)), ValueError, "sel_block"),
        ("nsa_attention/init_blocks-negative", lambda: f(q, k, v, g, g, g, init_blocks=-1, **HP),
         ValueError, "init_blocks"),
        ("nsa_attention/local_blocks-float", lambda: f(q, k, v, g, g, g, local_blocks=1.5, **HP),
         ValueError, "local_blocks"),
        ("nsa_attention/top_n-bool", lambda: f(q, k, v, g, g, g, **dict(HP, top_n=True)), ValueError, "top_n"),
        ("nsa_attention/scale-nan", lambda: f(q, k, v, g, g, g, scale=float("nan"), **HP), ValueError, "scale"),
        ("nsa_attention/scale-str", lambda: f(q, k, v, g, g, g, scale="a", **HP), ValueError, "scale"),
        ("nsa_attention/max_seqlen-negative", lambda: f(q[0], k[0], v[0], g[0], g[0], g[0], cu_seqlens=cu_of([40]),
                                                        max_seqlen=-1, **HP), ValueError, "max_seqlen"),
    ]


BUILDERS = {"ops": _op_rows, "decode": _decode_rows, "combine": _combine_rows, "nsa_attention": _nsa_attention_rows}
MATRIX = [pytest.param(b, i, id=row[0]) for b, build in BUILDERS.items() for i, row in enumerate(build())]


@pytest.mark.parametrize("builder,index", MATRIX)
def test_bad_input_matrix(builder, index):
    """Each row raises the expected exception type with a message naming the argument, and the
    process keeps working afterwards (a valid call right after gives a finite result)."""
    name, thunk, exc, arg = BUILDERS[builder]()[index]
    with raises(exc, arg):
        thunk()
    o, _ = nsa_cuda.window_attention(torch.randn(1, 9, 2, 8), torch.randn(1, 9, 1, 8), torch.randn(1, 9, 1, 8),
                                     window=4)
    assert torch.isfinite(o).all()


# ---- documented behaviour that is not an error: empty batches, T = 0, 1-token sequences ----------

EMPTY_HP = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)


@pytest.mark.parametrize("B,T", [(0, 40), (2, 0), (1, 1), (3, 1)], ids=["B=0", "T=0", "T=1", "B=3,T=1"])
def test_degenerate_padded_batches_every_op(B, T):
    """B = 0, T = 0 and 1-token sequences are valid for every op: the right shapes, and the values
    of the reference (float64) where there is anything to compute; gradients have the input shapes."""
    f64 = torch.float64
    q = torch.randn(B, T, 4, 16, dtype=f64, requires_grad=True)
    k = torch.randn(B, T, 2, 16, dtype=f64, requires_grad=True)
    kc = nsa_cuda.compress(k, block=16, stride=8)
    assert kc.shape == (B, 0 if T < 16 else (T - 16) // 8 + 1, 2, 16)
    o, lse = nsa_cuda.compressed_attention(q, kc, kc, block=16, stride=8)
    assert o.shape == (B, T, 4, 16) and lse.shape == (B, T, 4)
    idx = nsa_cuda.select_blocks(q, kc, lse, cmp_block=16, cmp_stride=8, sel_block=16, top_n=2)
    assert idx.shape == (B, T, 2, 2) and idx.dtype == torch.int32
    if T == 1:  # T < l: nothing to see (o = 0, lse = -inf); the one block there is, then padding
        assert (o == 0).all() and torch.isneginf(lse).all()
        assert (idx[..., 0] == 0).all() and (idx[..., 1] == -1).all()
    o_s, _ = nsa_cuda.selected_attention(q, k, k, idx, sel_block=16)
    o_w, _ = nsa_cuda.window_attention(q, k, k, window=8)
    if B and T:
        torch.testing.assert_close(o_s, R.selected_attention(q, k, k, idx, sel_block=16)[0])
        torch.testing.assert_close(o_w, R.window_attention(q, k, k, window=8)[0])
    g = torch.rand(B, T, 4, dtype=f64)
    out = nsa_cuda.combine(o, o_s, o_w, g, g, g)
    assert out.shape == (B, T, 4, 16)
    grads = torch.autograd.grad(out.sum(), (q, k), allow_unused=True)
    assert grads[0].shape == q.shape and grads[1].shape == k.shape
    o_n = nsa_cuda.nsa_attention(q, k, k, g, g, g, **EMPTY_HP)
    assert o_n.shape == (B, T, 4, 16)
    if B and T:
        torch.testing.assert_close(o_n, R.nsa_attention(q, k, k, g, g, g, **EMPTY_HP))


def test_degenerate_decode_batches():
    # B = 0: an empty result; a cache length of 0: o = 0 (nothing to attend to)
    kw = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)
    k, kc, q, g = torch.randn(0, 40, 2, 16), torch.randn(0, 4, 2, 16), torch.randn(0, 4, 16), torch.rand(0, 4)
    assert nsa_cuda.decode(q, k, k, kc, kc, torch.zeros(0, dtype=torch.int32), g, g, g, **kw).shape == (0, 4, 16)
    k, kc, q, g = torch.randn(2, 40, 2, 16), torch.randn(2, 4, 2, 16), torch.randn(2, 4, 16), torch.rand(2, 4)
    o = nsa_cuda.decode(q, k, k, kc, kc, torch.tensor([0, 1], dtype=torch.int32), g, g, g, **kw)
    assert (o[0] == 0).all()
    # length 1: the only key is position 0 (window and selected branch), no compressed token
    v0 = k[1, 0].repeat_interleave(2, 0)  # [HQ, D]: query head h reads KV head h // 2
    torch.testing.assert_close(o[1], (g[1, :, None] * 2) * v0)


def test_module_degenerate_batches():
    m = nsa_cuda.NativeSparseAttention(32, 4, 2, **EMPTY_HP)
    assert m(torch.randn(0, 30, 32)).shape == (0, 30, 32)
    assert m(torch.randn(2, 0, 32)).shape == (2, 0, 32)
    x = torch.randn(2, 1, 32)
    torch.testing.assert_close(m(x), m.reference_forward(x))
    y = m(torch.randn(2, 5, 32), attention_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert (y == 0).all()  # every position masked: all outputs zero


# ---- NativeSparseAttention and NSACache -----------------------------------------------------------


def test_module_bad_forward_arguments():
    HP = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)
    m = nsa_cuda.NativeSparseAttention(32, 4, 2, **HP)
    x = torch.randn(2, 30, 32)
    with raises(ValueError, "attention_mask"):
        m(x, attention_mask=torch.ones(30, dtype=torch.bool))  # rank 1
    with raises(ValueError, "x"):
        m(x.reshape(60, 32), attention_mask=torch.ones(60, dtype=torch.bool))  # packed x with a mask
    with raises(ValueError, "x"):
        m(x[0, 0])  # rank 1
    with raises(ValueError, "x"):
        m(x[None])  # rank 4
    with raises(ValueError, "cu_seqlens"):
        m(x.reshape(60, 32), cu_seqlens=[0, 30, 60])  # a list
    with raises(ValueError, "max_seqlen"):
        m(x, max_seqlen=30)  # padded batch
    with raises(ValueError, "max_seqlen"):
        m(x.reshape(60, 32), cu_seqlens=cu_of([30, 30]), max_seqlen=-3)
    cache = nsa_cuda.NSACache.for_layers([m], 2, 64)
    with raises(ValueError, "layer"):
        m(x, cache=cache, layer_idx=3)
    with raises(ValueError, "layer"):
        m(x, cache=cache, layer_idx=-1)
    with raises(ValueError, "x"):
        m(x, cache=nsa_cuda.NSACache.for_layers([m], 3, 64))  # batch of the cache
    with pytest.raises(ValueError, match="max_seqlen"):
        m(x, cache=nsa_cuda.NSACache.for_layers([m], 2, 20))  # prompt longer than the cache
    # x of another dtype than the parameters: PyTorch's own error from the first projection
    with pytest.raises(RuntimeError, match="dtype"):
        m(x.double())


@pytest.mark.parametrize("hp,arg", [
    (dict(top_n=0), "top_n"), (dict(window=0), "window"), (dict(init_blocks=-1), "init_blocks"),
    (dict(local_blocks=-1), "local_blocks"), (dict(scale=-1.0), "scale"), (dict(sel_block=0), "sel_block"),
])
def test_module_hyper_parameters_out_of_range(hp, arg):
    # The constructor checks shapes (heads, head dims, cmp_stride | cmp_block, sel_block); the
    # attention hyper-parameters are checked by nsa_attention at the first forward, which names them.
    kw = dict(dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8), **hp)
    m = nsa_cuda.NativeSparseAttention(32, 4, 2, **kw)
    with raises(ValueError, arg):
        m(torch.randn(1, 20, 32))


def test_module_zero_heads_rejected():
    with raises(ValueError, "num_heads"):
        nsa_cuda.NativeSparseAttention(64, 0)


def _cache(**kw):
    return nsa_cuda.NSACache(2, 2, 64, 2, 16, 8, cmp_block=16, cmp_stride=8, dtype=torch.float64, **kw)


def test_cache_bad_constructor_arguments():
    C = nsa_cuda.NSACache
    for args, kw, arg in [
        ((0, 2, 64, 2, 16), {}, "num_layers"), ((1, 0, 64, 2, 16), {}, "batch_size"),
        ((1, 2, 64, 0, 16), {}, "num_kv_heads"), ((1, 2, 64, 2, 0), {}, "head_dim"),
        ((1, 2, 64, 2, 16, 0), {}, "v_head_dim"), ((1, 2, 64, 2, 16), dict(cmp_block=0), "cmp_block"),
        ((1, 2, 64, 2, 16), dict(cmp_stride=0), "cmp_stride"), ((1, 2.0, 64, 2, 16), {}, "batch_size"),
        ((1, True, 64, 2, 16), {}, "batch_size"),
    ]:
        with raises(ValueError, arg):
            C(*args, **kw)
    with raises(TypeError, "dtype"):
        C(1, 2, 64, 2, 16, dtype=torch.int32)
    with raises(ValueError, "layers"):
        C.for_layers([], 1, 64)


def test_cache_bad_method_arguments():
    f64 = torch.float64
    k, v = torch.randn(2, 20, 2, 16, dtype=f64), torch.randn(2, 20, 2, 8, dtype=f64)
    c = _cache()
    for bad in (-1, 2, "0"):
        with raises(ValueError, "layer"):
            c.layer(bad)
    for kk, vv, arg in [(k.tolist(), v, "k"), (k[0], v, "k"), (k[:, :, :1], v, "k"), (k[..., :8], v, "k"),
                        (k, v[..., :4], "v")]:
        with raises(ValueError, arg):
            c.prefill(0, kk, vv)
    with pytest.raises(ValueError, match="same number of tokens"):
        c.prefill(0, k, v[:, :5])
    for seqlens in (torch.tensor([3.0, 4.0]), torch.tensor([3, 4, 5]), torch.tensor([-1, 4]),
                    torch.tensor([[3, 4]]), [3, 4], torch.tensor([3, 21])):
        with raises(ValueError, "seqlens"):
            c.prefill(0, k, v, seqlens)
    with pytest.raises(ValueError, match="at least one token"):
        c.append(0, k[:, :0], v[:, :0])
    with raises(ValueError, "k"):
        c.append(0, k[:, 0], v[:, 0])  # rank 3
    with raises(ValueError, "layer"):
        c.append(5, k, v)
    for n in (-1, 1.5, True):
        with raises(ValueError, "n"):
            c.advance(n)
    with pytest.raises(ValueError, match="max_seqlen"):
        c.advance(65)
    assert c.is_empty and c.pending_tokens is None, "rejected calls must leave the cache untouched"
    # compression parameters are checked before anything is written
    with pytest.raises(ValueError, match="'pe_k'"):
        _cache().prefill(0, k, v, pe_k=torch.randn(2, 16, 16))  # a position table without its weight
    with raises(ValueError, "w_k"):
        _cache().prefill(0, k, v, w_k=torch.randn(3, 16 * 16, 16))  # 3 heads for 2


def test_cache_rejected_prefill_leaves_cache_untouched():
    f64 = torch.float64
    k, v = torch.randn(2, 20, 2, 16, dtype=f64), torch.randn(2, 20, 2, 8, dtype=f64)
    c = _cache()
    with pytest.raises(ValueError, match="'pe_k'"):
        c.prefill(0, k, v, pe_k=torch.randn(2, 16, 16))
    assert c.pending_tokens is None, "the rejected prefill left a pending step"


def test_cache_append_rejects_wrong_weight_output_dim():
    f64 = torch.float64
    k, v = torch.randn(2, 20, 2, 16, dtype=f64), torch.randn(2, 20, 2, 8, dtype=f64)
    c = _cache()
    c.prefill(0, k, v)
    c.prefill(1, k, v)
    c.advance()
    with raises(ValueError, "w_k"):
        c.append(0, k[:, :1], v[:, :1], w_k=torch.randn(2, 16 * 16, 17, dtype=f64))


def test_cache_prefill_checks_parameters_of_short_prompts():
    f64 = torch.float64
    c = _cache()
    with pytest.raises(ValueError, match="'pe_k'"):
        c.prefill(0, torch.randn(2, 5, 2, 16, dtype=f64), torch.randn(2, 5, 2, 8, dtype=f64),
                  pe_k=torch.randn(2, 16, 16, dtype=f64))
