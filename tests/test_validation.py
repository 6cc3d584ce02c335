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


@pytest.mark.parametrize("cu,why", [
    (cu_of([10, 20], torch.int64), TypeError),      # wrong dtype
    (torch.tensor([0, 40, 30], dtype=torch.int32), ValueError),  # not increasing
    (torch.tensor([0, 10, 20], dtype=torch.int32), ValueError),  # last != total
    (torch.tensor([5, 10, 30], dtype=torch.int32), ValueError),  # does not start at 0
    (torch.tensor([30], dtype=torch.int32), ValueError),         # too short
    (cu_of([10, 20]).reshape(3, 1), ValueError),                 # not 1-D
])
def test_malformed_cu_seqlens(data, cu, why):
    x = torch.randn(30, 2, 16)
    for call in (
        lambda: nsa_cuda.compress(x, block=16, stride=8, cu_seqlens=cu),
        lambda: nsa_cuda.window_attention(torch.randn(30, 4, 16), x, x, window=8, cu_seqlens=cu),
    ):
        with raises(why, "cu_seqlens"):
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


def test_decode_bad_inputs():
    B, S, H, D = 2, 40, 2, 16
    k = torch.randn(B, S, H, D)
    kc = R.compress(k, block=16, stride=8)
    q = torch.randn(B, 4, D)
    g = torch.rand(B, 4)
    seq = torch.tensor([17, 40], dtype=torch.int32)
    kw = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=2, window=8)
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
