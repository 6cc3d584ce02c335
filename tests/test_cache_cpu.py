"""NSACache and cached generation on the CPU path (DESIGN.md §1.8): decoding token t after a
prefill equals the full-sequence output at t, at every position, for ragged batches; the cache's
compressed tokens equal a from-scratch compression of the cached keys/values and appear exactly
when their last key arrives; multi-token appends; the tiny-LM generate example."""
import math
import os
import subprocess
import sys

import pytest
import torch

import nsa_cuda
from nsa_cuda import reference as R
from nsa_cuda.cache import NSACache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

F64 = torch.float64
HP = dict(cmp_block=16, cmp_stride=8, sel_block=16, top_n=3, init_blocks=1, local_blocks=2, window=20)
L_, D_ = HP["cmp_block"], HP["cmp_stride"]


pytestmark = pytest.mark.usefixtures("one_thread")


def nc(T):
    return R.num_compressed(T, L_, D_)


def make_module(G=2, compression="linear", H=2, dtype=F64, rope_theta=10000.0):
    m = nsa_cuda.NativeSparseAttention(64, H * G, H, 16, 8, compression=compression, rope_theta=rope_theta, **HP)
    with torch.no_grad():  # move every parameter off its init (pe starts at zero, w at mean pooling)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(0.05))
    return m.to(dtype)


def comp_params(m):
    if m.w_k is None:
        return {}
    return dict(w_k=m.w_k.detach(), w_v=m.w_v.detach(), pe_k=m.pe_k.detach(), pe_v=m.pe_v.detach())


def assert_cache_matches_compress(cache, layer, comp, atol=1e-12):
    """Rows 0 .. Nc(T_b)-1 of the compressed caches equal nsa_cuda.compress (and the reference)
    of the cached keys/values from scratch; rows after them were never written (still zero)."""
    k, v, k_c, v_c = cache.layer(layer)
    for b, T in enumerate(cache.cache_seqlens.tolist()):
        n = nc(T)
        for x, x_c, w, pe in ((k, k_c, comp.get("w_k"), comp.get("pe_k")), (v, v_c, comp.get("w_v"), comp.get("pe_v"))):
            want = nsa_cuda.compress(x[b:b + 1, :T], w, pe, block=L_, stride=D_)[0]
            want_ref = R.compress(x[b:b + 1, :T], w, pe, block=L_, stride=D_)[0]
            torch.testing.assert_close(x_c[b, :n], want, atol=atol, rtol=0)
            torch.testing.assert_close(x_c[b, :n], want_ref.to(x_c.dtype), atol=max(atol, 1e-10), rtol=1e-6)
            assert torch.all(x_c[b, n:] == 0), f"row {b}: compressed tokens past Nc({T}) = {n} were written"


# ---------------------------------------------------------------------------------------------
# decode == prefill at every position (module level)


def run_prefill_then_decode(m, x, prompts, chunks=None, left_pad=False):
    """Prefill row b with x[b, :prompts[b]] (right- or left-padded batch), then feed each row's next
    tokens (one per step, or chunks[i] per step). Returns (prefill output, list of (offset, out))."""
    B, X, C = x.shape
    P = torch.tensor(prompts)
    Tp = max(prompts)
    steps = X - min(prompts) - (Tp - min(prompts))  # every row has tokens for all steps
    cache = NSACache.for_layers([m], B, X)
    mask = torch.arange(Tp)[None, :] < P[:, None]
    xp = x[:, :Tp].clone()
    if left_pad:
        mask = mask.flip(1)
        xp = torch.zeros_like(xp)
        for b, p in enumerate(prompts):
            xp[b, Tp - p:] = x[b, :p]
    with torch.no_grad():
        yp = m(xp, attention_mask=mask, cache=cache)
        cache.advance()
        assert cache.cache_seqlens.tolist() == prompts
        outs, off = [], 0
        chunks = chunks or [1] * steps
        rows = torch.arange(B)
        for n in chunks:
            if off + n > steps:
                break
            idx = P[:, None] + off + torch.arange(n)
            ys = m(x[rows[:, None], idx], cache=cache)
            assert cache.pending_tokens == n
            cache.advance()
            outs.append((off, ys))
            off += n
    assert cache.cache_seqlens.tolist() == (P + off).tolist()
    return cache, mask, yp, outs


def check_against_full(y, prompts, mask, yp, outs, left_pad=False, atol=1e-10, rtol=1e-10):
    Tp = max(prompts)
    for b, p in enumerate(prompts):
        got = yp[b, Tp - p:] if left_pad else yp[b, :p]
        torch.testing.assert_close(got, y[b, :p], atol=atol, rtol=rtol, msg=lambda s: f"prefill row {b}: {s}")
        assert torch.all(yp[b][~mask[b]] == 0), "padding positions of the prefill output must be zero"
    for off, ys in outs:
        for b, p in enumerate(prompts):
            t = p + off
            torch.testing.assert_close(ys[b], y[b, t:t + ys.shape[1]], atol=atol, rtol=rtol,
                                       msg=lambda s: f"row {b}, positions {t}..{t + ys.shape[1] - 1}: {s}")


@pytest.mark.parametrize("compression", ["mean", "linear"])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("prompts", [[1], [40], [5, 64, 17]], ids=["b1_p1", "b1_p40", "b3_ragged"])
def test_decode_equals_prefill_every_position(compression, G, prompts):
    m = make_module(G, compression)
    T = 300  # the row with the shortest prompt decodes positions prompt .. 299
    X = T + max(prompts) - min(prompts)
    x = torch.randn(len(prompts), X, 64, dtype=F64)
    with torch.no_grad():
        y = m(x)  # causal: row b's output at t depends on x[b, :t+1] only
    cache, mask, yp, outs = run_prefill_then_decode(m, x, prompts)
    assert len(outs) == T - min(prompts)
    check_against_full(y, prompts, mask, yp, outs)
    assert_cache_matches_compress(cache, 0, comp_params(m))


def test_selection_is_exercised():
    # the decode test above would be weak if top_n covered every block: check it does not
    m = make_module(2, "linear")
    x = torch.randn(1, 300, 64, dtype=F64)
    with torch.no_grad():
        q, k, v, gates, comp = m._project(x, torch.arange(300))
        _, idx = nsa_cuda.nsa_attention(q, k, v, *gates, **comp, **HP, return_block_idx=True)
    assert (idx[0, -1] >= 0).sum() == 2 * HP["top_n"] and -(-300 // HP["sel_block"]) > 3 * HP["top_n"]
    chosen = idx[0, 100:].flatten()
    assert len(set(chosen[chosen >= 0].tolist())) > 2 * HP["top_n"], "selection should vary over positions"


@pytest.mark.parametrize("chunks", [[3, 8, 1, 16, 17, 5, 9, 24, 2, 40, 7], [8] * 30])
def test_decode_several_tokens_per_step(chunks):
    m = make_module(4, "linear")
    prompts = [10, 23, 1]
    X = 260
    x = torch.randn(3, X, 64, dtype=F64)
    with torch.no_grad():
        y = m(x)
    cache, mask, yp, outs = run_prefill_then_decode(m, x, prompts, chunks=chunks)
    assert sum(ys.shape[1] for _, ys in outs) >= 120
    check_against_full(y, prompts, mask, yp, outs)
    assert_cache_matches_compress(cache, 0, comp_params(m))


def test_left_padded_prompts():
    m = make_module(2, "mean")
    prompts = [30, 7, 1]
    x = torch.randn(3, 120, 64, dtype=F64)
    with torch.no_grad():
        y = m(x)
    cache, mask, yp, outs = run_prefill_then_decode(m, x, prompts, left_pad=True)
    check_against_full(y, prompts, mask, yp, outs, left_pad=True)


def test_no_rope_and_float32():
    m = make_module(2, "linear", rope_theta=None, dtype=torch.float32)
    prompts = [33, 2]
    x = torch.randn(2, 180, 64)
    with torch.no_grad():
        y = m(x)
    cache, mask, yp, outs = run_prefill_then_decode(m, x, prompts, chunks=[1] * 40 + [5] * 20)
    assert cache.dtype == torch.float32
    check_against_full(y, prompts, mask, yp, outs, atol=2e-5, rtol=2e-5)


def test_bf16_cache_close():
    # a bf16 cache under a float32 module: decoding reads bf16 keys/values, close to fp32
    m = make_module(2, "linear", dtype=torch.float32)
    x = torch.randn(1, 150, 64)
    with torch.no_grad():
        y = m(x)
        cache = NSACache.for_layers([m], 1, 150, dtype=torch.bfloat16)
        m(x[:, :20], cache=cache)
        cache.advance()
        outs = []
        for t in range(20, 150):
            outs.append(m(x[:, t:t + 1], cache=cache)[:, 0])
            cache.advance()
    got = torch.stack(outs, 1)
    err = (got - y[:, 20:]).norm() / y[:, 20:].norm()
    assert got.dtype == torch.float32 and err < 3e-2, err.item()


# ---------------------------------------------------------------------------------------------
# cache contents (op level)


@pytest.mark.parametrize("compression", ["mean", "linear", "linear_pe"])
def test_cache_contents_equal_compress_from_scratch(compression):
    B, S, H, Dk, Dv = 3, 260, 2, 16, 8
    k = torch.randn(B, S, H, Dk, dtype=F64)
    v = torch.randn(B, S, H, Dv, dtype=F64)
    comp = {}
    if compression != "mean":
        comp = dict(w_k=torch.randn(H, L_ * Dk, Dk, dtype=F64) / math.sqrt(L_ * Dk),
                    w_v=torch.randn(H, L_ * Dv, Dv, dtype=F64) / math.sqrt(L_ * Dv))
    if compression == "linear_pe":
        comp.update(pe_k=torch.randn(H, L_, Dk, dtype=F64), pe_v=torch.randn(H, L_, Dv, dtype=F64))
    cache = NSACache(2, B, S, H, Dk, Dv, cmp_block=L_, cmp_stride=D_, dtype=F64)
    assert cache.k_cmp[0].shape == (B, nc(S), H, Dk) and cache.v_cmp[1].shape == (B, nc(S), H, Dv)
    lens = [15, 0, 40]  # T < l, empty, several compressed tokens
    Tp = 40
    kp, vp = k[:, :Tp].clone(), v[:, :Tp].clone()
    kp[1], vp[1] = 1e3, 1e3  # padding garbage must not reach the cache
    for layer in range(2):
        out = cache.prefill(layer, kp, vp, torch.tensor(lens), **comp)
        assert out.dtype == torch.int32 and out.tolist() == lens
    assert cache.is_empty and cache.cache_seqlens.tolist() == [0, 0, 0]
    cache.advance()
    assert not cache.is_empty and cache.cache_seqlens.tolist() == lens
    for layer in range(2):
        assert_cache_matches_compress(cache, layer, comp)
        assert torch.all(cache.k[layer][1] == 0)
    gen = torch.Generator().manual_seed(1)
    cur = torch.tensor(lens)
    rows = torch.arange(B)[:, None]
    sizes = [1] * 20 + [2, 3, 7, 8, 9, 16, 17, 1, 1, 5, 24, 1]
    for n in sizes:
        before = [nc(T) for T in cur.tolist()]
        pos = cur[:, None] + torch.arange(n)
        for layer in range(2):
            got = cache.append(layer, k[rows, pos], v[rows, pos], **comp)
            assert got.tolist() == (cur + n).tolist()
        assert cache.cache_seqlens.tolist() == cur.tolist(), "lengths move only at advance()"
        torch.testing.assert_close(cache.seqlens_after_step(), (cur + n).int())
        cache.advance()
        cur += n
        for layer in range(2):
            assert_cache_matches_compress(cache, layer, comp)  # includes "nothing before it is due"
        if n == 1:  # token i appears exactly when key i*d + l - 1 arrives
            for b, T in enumerate(cur.tolist()):
                assert nc(T) - before[b] == int(T >= L_ and (T - L_) % D_ == 0)
    for b, T in enumerate(cur.tolist()):
        assert torch.equal(cache.k[0][b, :T], k[b, :T]) and torch.equal(cache.v[1][b, :T], v[b, :T])
    assert cache.seqlen_bound == max(lens) + sum(sizes)


def test_decode_op_on_cache_matches_reference():
    # the cache's tensors are what nsa_cuda.decode / reference.decode take
    B, S, H, G, Dk, Dv = 2, 120, 2, 2, 16, 8
    k, v = torch.randn(B, S, H, Dk, dtype=F64), torch.randn(B, S, H, Dv, dtype=F64)
    cache = NSACache(1, B, S, H, Dk, Dv, cmp_block=L_, cmp_stride=D_, dtype=F64)
    cache.prefill(0, k[:, :50], v[:, :50], torch.tensor([50, 31]))
    cache.advance()
    rows = torch.arange(B)[:, None]
    for _ in range(30):
        pos = cache.cache_seqlens.long()[:, None]
        lens = cache.append(0, k[rows, pos], v[rows, pos])
        q = torch.randn(B, H * G, Dk, dtype=F64)
        gates = [torch.rand(B, H * G, dtype=F64) for _ in range(3)]
        o = nsa_cuda.decode(q, *cache.layer(0), lens, *gates, **HP)
        o_ref = R.decode(q, *cache.layer(0), lens, *gates, **HP)
        torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
        # and the reference on the whole sequences, last row
        for b in range(B):
            T = int(lens[b])
            full = R.nsa_attention(torch.cat([torch.zeros(1, T - 1, H * G, Dk, dtype=F64), q[b:b + 1, None]], 1),
                                   k[b:b + 1, :T], v[b:b + 1, :T],
                                   *[torch.cat([torch.zeros(1, T - 1, H * G, dtype=F64), g[b:b + 1, None]], 1)
                                     for g in gates], **HP)
            torch.testing.assert_close(o[b], full[0, -1], atol=1e-12, rtol=1e-12)
        cache.advance()


def test_reset_and_reuse():
    m = make_module(2, "linear")
    x1, x2 = torch.randn(2, 100, 64, dtype=F64), torch.randn(2, 100, 64, dtype=F64)
    cache = NSACache.for_layers([m], 2, 100)
    with torch.no_grad():
        for x, P in ((x1, 60), (x2, 25)):  # second prompt is shorter: stale entries must not be read
            cache.reset()
            assert cache.is_empty and cache.seqlen_bound == 0
            y = m(x)
            torch.testing.assert_close(m(x[:, :P], cache=cache), y[:, :P], atol=1e-10, rtol=1e-10)
            cache.advance()
            for t in range(P, 100):
                torch.testing.assert_close(m(x[:, t:t + 1], cache=cache)[:, 0], y[:, t], atol=1e-10, rtol=1e-10)
                cache.advance()
    cache.reset(zero=True)
    assert all(torch.all(t == 0) for t in cache.k + cache.v + cache.k_cmp + cache.v_cmp)


def test_cache_errors():
    m = make_module(2, "linear")
    H, Dk, Dv = 2, 16, 8
    cache = NSACache(2, 2, 64, H, Dk, Dv, cmp_block=L_, cmp_stride=D_, dtype=F64)
    k, v = torch.randn(2, 10, H, Dk, dtype=F64), torch.randn(2, 10, H, Dv, dtype=F64)
    with pytest.raises(ValueError, match="'cmp_stride'"):
        NSACache(1, 1, 64, H, Dk, cmp_block=16, cmp_stride=6)
    with pytest.raises(ValueError, match="'max_seqlen'"):
        NSACache(1, 1, 0, H, Dk)
    with pytest.raises(ValueError, match="'layer'"):
        cache.prefill(2, k, v)
    with pytest.raises(ValueError, match="'k'"):
        cache.prefill(0, k[:1], v)
    with pytest.raises(ValueError, match="'v'"):
        cache.append(0, k, v[..., :4])
    with pytest.raises(ValueError, match="'seqlens'"):
        cache.prefill(0, k, v, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="max_seqlen"):
        cache.prefill(0, torch.randn(2, 65, H, Dk, dtype=F64), torch.randn(2, 65, H, Dv, dtype=F64))
    with pytest.raises(RuntimeError, match="nothing was written"):
        cache.advance()
    cache.prefill(0, k, v)
    with pytest.raises(RuntimeError, match="same tokens"):
        cache.prefill(1, k[:, :5], v[:, :5])  # another layer, another prompt
    with pytest.raises(RuntimeError, match=r"layer\(s\) \[1\]"):
        cache.advance()  # layer 1 has not written
    cache.prefill(1, k, v)
    with pytest.raises(ValueError, match="prefill"):
        cache.advance(10)
    cache.advance()
    with pytest.raises(RuntimeError, match="not empty"):
        cache.prefill(0, k, v)
    cache.append(0, k[:, :2], v[:, :2])
    with pytest.raises(RuntimeError, match="same tokens"):
        cache.append(1, k[:, :1], v[:, :1])
    cache.append(1, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="'n'"):
        cache.advance(3)
    cache.advance(2)
    with pytest.raises(ValueError, match="max_seqlen"):
        cache.append(0, torch.randn(2, 53, H, Dk, dtype=F64), torch.randn(2, 53, H, Dv, dtype=F64))
    # module-level misuse
    mc = NSACache.for_layers([m], 2, 64)
    x = torch.randn(2, 10, 64, dtype=F64)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x.reshape(20, 64), cu_seqlens=torch.tensor([0, 10, 20], dtype=torch.int32), cache=mc)
    with pytest.raises(ValueError, match="'x'"):
        m(x[:1], cache=mc)
    with pytest.raises(ValueError, match="cmp_block"):
        m(x, cache=NSACache(1, 2, 64, H, Dk, Dv, cmp_block=32, cmp_stride=8, dtype=F64))
    with pytest.raises(TypeError, match="'cache'"):
        m(x, cache=object())
    with torch.no_grad():
        m(x, cache=mc)
        mc.advance()
        with pytest.raises(ValueError, match="attention_mask"):
            m(x[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.bool), cache=mc)
    with pytest.raises(ValueError, match="layer 1 has"):
        NSACache.for_layers([m, make_module(4, "linear", H=1)], 1, 64)


# ---------------------------------------------------------------------------------------------
# the generate example


def test_generate_with_cache_equals_without():
    from tiny_lm import TinyLM

    torch.manual_seed(0)
    model = TinyLM(num_layers=3).double().eval()
    prompts = [list(range(40, 80)), [7], list(range(100, 117))]
    new = model.generate(prompts, 70)
    assert new.shape == (3, 70) and new.dtype == torch.int64
    assert len(set(new.flatten().tolist())) > 10, "the test needs varied tokens"
    assert torch.equal(new, model.generate(prompts, 70, use_cache=False))
    assert torch.equal(new, model.generate(prompts, 70)), "generation must be deterministic"
    # a padded tensor with a mask works too, and a given cache is reset and reused
    T = 40
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (T - len(p)) for p in prompts])
    cache = model.make_cache(3, T + 70)
    assert torch.equal(new, model.generate(ids, 70, mask, cache=cache))
    assert torch.equal(new, model.generate(ids, 70, mask, cache=cache))


def test_generate_example_runs_and_is_deterministic(capsys):
    import generate

    a = generate.main(["--device", "cpu", "--new-tokens", "24", "--check"])
    b = generate.main(["--device", "cpu", "--new-tokens", "24"])
    assert a.shape == (3, 24) and torch.equal(a, b)
    out = capsys.readouterr().out
    assert "same tokens" in out and "tokens/s" in out


def test_generate_script_subprocess():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "generate.py"), "--new-tokens", "12"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout
