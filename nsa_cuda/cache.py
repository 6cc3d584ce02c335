"""``NSACache``: the key/value cache of Native Sparse Attention for generation (DESIGN.md §1.8).

Per layer it holds

* ``k[layer]`` ``[B, S, H, Dk]`` and ``v[layer]`` ``[B, S, H, Dv]``: the keys (after RoPE, as the
  attention sees them) and values of every position of every sequence, ``S = max_seqlen``;
* ``k_cmp[layer]`` ``[B, Sc, H, Dk]`` and ``v_cmp[layer]`` ``[B, Sc, H, Dv]``: the compressed
  tokens, ``Sc = Nc(max_seqlen)``. Row ``i`` of sequence ``b`` is compressed token ``i``, made
  from keys ``[i*d, i*d + l)`` by the layer's compression (mean, or linear with ``w``/``pe``)
  the moment its last key ``i*d + l - 1`` is written (§1.8), so at any time the first
  ``Nc(cache_seqlens[b])`` rows equal ``nsa_cuda.compress`` of the cached keys/values;

and, shared by all layers, ``cache_seqlens`` (int32 ``[B]``, on the cache's device): how many
positions of each sequence are committed. Sequences of a batch may have different lengths.
These are exactly the arguments of :func:`nsa_cuda.decode` (:meth:`NSACache.layer` returns them).

One generation step of a model with ``L`` layers::

    for layer in range(L):              # each layer writes the step's tokens...
        ...  cache.append(layer, k_new, v_new, w_k=..., pe_k=..., w_v=..., pe_v=...)
        ...  nsa_cuda.decode(q, *cache.layer(layer), cache.cache_seqlens + 1, ...)
    cache.advance()                     # ...then the lengths move once, for all layers

``prefill(layer, k, v, seqlens)`` fills an empty cache from a (right-padded) prompt;
``append(layer, k_new, v_new)`` writes ``n >= 1`` new tokens per sequence at positions
``cache_seqlens[b] .. cache_seqlens[b] + n - 1``; both leave ``cache_seqlens`` alone (every
layer writes at the same positions) until :meth:`advance` commits the step. :meth:`reset`
empties the cache for a new batch. :class:`nsa_cuda.NativeSparseAttention` does the per-layer
part when called with ``cache=`` and ``layer_idx=`` (the model calls ``advance`` itself).

The cache is for inference: writes run under ``torch.no_grad()`` (its contents are not
differentiable). Create it outside ``torch.inference_mode()`` if it will also be written outside.

Host synchronisation. Nothing reads device memory back to the host: the write positions come
from ``cache_seqlens`` on the device, and the capacity check uses a host-side upper bound of the
lengths (the padded prompt length ``T`` after a prefill, plus ``n`` per append), so ``append`` +
``advance`` keep fixed shapes for a fixed ``n`` (ready for CUDA-graph capture once the decode op
has its kernel). The bound is conservative: a right-padded prompt counts as ``T`` tokens for
every row. Value checks of ``seqlens`` (``0 <= seqlens[b] <= T``) are done only for CPU tensors,
where reading them is free.

Incremental compression (``append``). Compressed token ``i`` is due when key
``e_i = i*d + l - 1`` lands in ``[L_b, L_b + n)`` (``L_b = cache_seqlens[b]``). At most
``m = ceil(n / d)`` tokens per sequence can be due, so ``append`` always computes ``m``
candidates per sequence — ``i = i0_b + c`` with ``i0_b`` the first index whose last key is at or
after ``L_b`` — by gathering their ``[l]``-key windows from the cache (after writing the new keys)
and running :func:`nsa_cuda.compress` on them, the same op (and math) as the prefill.
Candidates that are not due (their last key is not among the new ones) are written to a spare
row ``Sc`` of the compressed storage that no reader ever sees, so the shapes never depend on
data. Prefill compresses the padded prompt ``[B, T]`` in one call; in a right-padded row of
length ``T_b`` the first ``Nc(T_b)`` compressed tokens only cover real keys, the others (and the
padded keys) are zeroed and written again by ``append`` when their real last key arrives.

TODO:
  * paged layout (a block table of fixed-size pages shared by the sequences, as vLLM /
    FlashAttention's ``block_table``), for serving with sequences that come and go;
  * per-sequence reset (continuous batching: refill one row while the others decode);
  * chunked prefill (a prompt chunk attending to a non-empty cache) needs a multi-query decode
    op; today a chunk of ``n`` tokens runs ``n`` single-token decodes (see the module).
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops

__all__ = ["NSACache"]

_NAME = "NSACache"


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{_NAME}: argument '{name}' must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{_NAME}: argument '{name}' must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{_NAME}: argument '{name}' must be an integer >= {minimum}, got {value}")
    return value


def _num_compressed(T: int, l: int, d: int) -> int:
    return 0 if T < l else (T - l) // d + 1


class NSACache:
    """Preallocated NSA key/value cache (plain and compressed) for a batch of ``batch_size``
    sequences of up to ``max_seqlen`` tokens each, for ``num_layers`` attention layers.

    Args:
        num_layers: number of attention layers sharing the cache (``layer`` is ``0 .. L-1``).
        batch_size: ``B``, the number of sequences.
        max_seqlen: ``S``, the capacity of every sequence (prompt and generated tokens).
        num_kv_heads: ``H``.
        head_dim: ``Dk`` (keys, and compressed keys).
        v_head_dim: ``Dv``; default ``head_dim``.
        cmp_block, cmp_stride: compression block ``l`` and stride ``d`` (``d | l``), those of
            the layers (all layers share them).
        device, dtype: of the cache tensors; the keys/values/compression parameters given to
            ``prefill``/``append`` are cast to ``dtype``. :func:`nsa_cuda.decode` wants ``q`` and
            the gates in this dtype too.

    :meth:`for_layers` builds one that fits a list of :class:`~nsa_cuda.NativeSparseAttention`.

    Attributes: ``k``, ``v``, ``k_cmp``, ``v_cmp`` (lists over layers, see the module docstring),
    ``cache_seqlens`` (int32 ``[B]``, committed lengths), ``max_seqlen``, ``max_compressed``.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: Optional[int] = None, *, cmp_block: int = 32, cmp_stride: int = 16, device=None,
                 dtype: Optional[torch.dtype] = None):
        num_layers = _int("num_layers", num_layers, 1)
        B = _int("batch_size", batch_size, 1)
        S = _int("max_seqlen", max_seqlen, 1)
        H = _int("num_kv_heads", num_kv_heads, 1)
        Dk = _int("head_dim", head_dim, 1)
        Dv = Dk if v_head_dim is None else _int("v_head_dim", v_head_dim, 1)
        l = _int("cmp_block", cmp_block, 1)
        d = _int("cmp_stride", cmp_stride, 1)
        if l % d != 0:
            raise ValueError(f"{_NAME}: argument 'cmp_stride' ({d}) must divide 'cmp_block' ({l})")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"{_NAME}: argument 'dtype' must be a floating point dtype, got {dtype}")
        self.num_layers, self.batch_size, self.max_seqlen = num_layers, B, S
        self.num_kv_heads, self.head_dim, self.v_head_dim = H, Dk, Dv
        self.cmp_block, self.cmp_stride = l, d
        self.max_compressed = Sc = _num_compressed(S, l, d)
        fk = dict(device=device, dtype=dtype)
        self.k: List[Tensor] = [torch.zeros(B, S, H, Dk, **fk) for _ in range(num_layers)]
        self.v: List[Tensor] = [torch.zeros(B, S, H, Dv, **fk) for _ in range(num_layers)]
        # compressed storage has one spare row (index Sc) that absorbs the writes of candidates
        # that are not due (see the module docstring); k_cmp / v_cmp are views without it
        self._k_cmp_store = [torch.zeros(B, Sc + 1, H, Dk, **fk) for _ in range(num_layers)]
        self._v_cmp_store = [torch.zeros(B, Sc + 1, H, Dv, **fk) for _ in range(num_layers)]
        self.k_cmp: List[Tensor] = [t[:, :Sc] for t in self._k_cmp_store]
        self.v_cmp: List[Tensor] = [t[:, :Sc] for t in self._v_cmp_store]
        self.cache_seqlens = torch.zeros(B, dtype=torch.int32, device=self.k[0].device)
        self._len_bound = 0  # host-side upper bound of max(cache_seqlens)
        self._committed_any = False  # host-side: has advance() committed anything since reset()
        self._reset_step()

    @classmethod
    def for_layers(cls, layers: Sequence, batch_size: int, max_seqlen: int, *, device=None,
                   dtype: Optional[torch.dtype] = None) -> "NSACache":
        """A cache for ``layers`` (a sequence of :class:`~nsa_cuda.NativeSparseAttention`, which
        must agree on ``num_kv_heads``, ``head_dim``, ``v_head_dim``, ``cmp_block`` and
        ``cmp_stride``). ``device``/``dtype`` default to those of the first layer's parameters."""
        layers = list(layers)
        if not layers:
            raise ValueError(f"{_NAME}: argument 'layers' must hold at least one layer")
        keys = ("num_kv_heads", "head_dim", "v_head_dim", "cmp_block", "cmp_stride")
        first = {k: getattr(layers[0], k) for k in keys}
        for i, m in enumerate(layers[1:], 1):
            for k in keys:
                if getattr(m, k) != first[k]:
                    raise ValueError(f"{_NAME}: layer {i} has {k}={getattr(m, k)}, layer 0 has {first[k]}; "
                                     "one cache needs layers of one shape")
        p = next(layers[0].parameters())
        return cls(len(layers), batch_size, max_seqlen, first["num_kv_heads"], first["head_dim"],
                   first["v_head_dim"], cmp_block=first["cmp_block"], cmp_stride=first["cmp_stride"],
                   device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    # ------------------------------------------------------------------------------------------
    # properties

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def is_empty(self) -> bool:
        """True until the first :meth:`advance` after a :meth:`reset` (a host-side flag: no sync)."""
        return not self._committed_any

    @property
    def seqlen_bound(self) -> int:
        """Host-side upper bound of ``max(cache_seqlens)`` (no sync); used for capacity checks."""
        return self._len_bound

    @property
    def pending_tokens(self) -> Optional[int]:
        """Tokens per sequence written by this step's ``append`` calls (before ``advance``), the
        padded length ``T`` after a ``prefill``, ``None`` when nothing is pending."""
        return self._step_n

    def layer(self, layer: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(k_cache, v_cache, k_cmp_cache, v_cmp_cache)`` of ``layer``, as :func:`nsa_cuda.decode` takes them."""
        layer = self._check_layer(layer)
        return self.k[layer], self.v[layer], self.k_cmp[layer], self.v_cmp[layer]

    def seqlens_after_step(self) -> Tensor:
        """Lengths including this step's pending tokens (``cache_seqlens + n``, or the prompt
        lengths after a prefill): the ``cache_seqlens`` to decode the step's last token with."""
        if self._step_n is None:
            return self.cache_seqlens.clone()
        if self._step_counts is not None:
            return self.cache_seqlens + self._step_counts
        return self.cache_seqlens + self._step_n

    # ------------------------------------------------------------------------------------------
    # writing

    @torch.no_grad()
    def prefill(self, layer: int, k: Tensor, v: Tensor, seqlens: Optional[Tensor] = None, *,
                w_k: Optional[Tensor] = None, w_v: Optional[Tensor] = None, pe_k: Optional[Tensor] = None,
                pe_v: Optional[Tensor] = None) -> Tensor:
        """Fill ``layer`` of an empty cache from a prompt.

        ``k [B, T, H, Dk]``, ``v [B, T, H, Dv]``: keys (after RoPE) and values of a right-padded
        prompt batch, row ``b`` real for its first ``seqlens[b]`` positions (int tensor ``[B]``;
        ``None`` means all ``T``). Positions past ``seqlens[b]`` are stored as zeros, and so are
        the compressed tokens past ``Nc(seqlens[b])``. The compressed part is
        :func:`nsa_cuda.compress` of the padded prompt with the layer's parameters ``w_k``,
        ``pe_k``, ``w_v``, ``pe_v`` (all ``None``: mean compression). Returns the lengths the
        cache will have after :meth:`advance` (int32 ``[B]``).
        """
        layer = self._check_layer(layer)
        if not self.is_empty:
            raise RuntimeError(f"{_NAME}.prefill: the cache is not empty (lengths were committed by advance()); "
                               "call reset() first, or append() to extend the sequences")
        B, S = self.batch_size, self.max_seqlen
        T = self._check_kv("prefill", k, v)
        if T > S:
            raise ValueError(f"{_NAME}.prefill: the prompt has {T} positions, more than max_seqlen={S}")
        if seqlens is None:
            counts = torch.full((B,), T, dtype=torch.int32, device=self.device)
        else:
            if not isinstance(seqlens, Tensor) or seqlens.dim() != 1 or seqlens.shape[0] != B or \
                    seqlens.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{_NAME}.prefill: argument 'seqlens' must be an int32/int64 tensor [{B}]")
            counts = seqlens.to(device=self.device, dtype=torch.int32)
            if counts.device.type == "cpu" and bool(((counts < 0) | (counts > T)).any()):
                raise ValueError(f"{_NAME}.prefill: argument 'seqlens' must hold lengths in [0, {T}] (the "
                                 f"prompt length), got {counts.tolist()}")
        wk, pk, wv, pv = self._check_params("prefill", w_k, w_v, pe_k, pe_v)
        self._begin_step(layer, T, counts, prefill=True)

        dt, l, d = self.dtype, self.cmp_block, self.cmp_stride
        keep = torch.arange(T, device=self.device)[None, :] < counts[:, None]  # [B, T]
        k = torch.where(keep[..., None, None], k.to(dt), 0)
        v = torch.where(keep[..., None, None], v.to(dt), 0)
        self.k[layer][:, :T].copy_(k)
        self.v[layer][:, :T].copy_(v)
        nc = _num_compressed(T, l, d)
        if nc:
            keep_c = torch.arange(nc, device=self.device)[None, :] * d + (l - 1) < counts[:, None]  # [B, nc]
            for x, w, pe, store in ((k, wk, pk, self._k_cmp_store[layer]), (v, wv, pv, self._v_cmp_store[layer])):
                xc = ops.compress(x, w, pe, block=l, stride=d)  # [B, nc, H, D]
                store[:, :nc].copy_(torch.where(keep_c[..., None, None], xc, 0))
        return counts.clone()

    @torch.no_grad()
    def append(self, layer: int, k_new: Tensor, v_new: Tensor, *, w_k: Optional[Tensor] = None,
               w_v: Optional[Tensor] = None, pe_k: Optional[Tensor] = None,
               pe_v: Optional[Tensor] = None) -> Tensor:
        """Write ``n`` new tokens per sequence into ``layer``: ``k_new [B, n, H, Dk]``,
        ``v_new [B, n, H, Dv]`` go to positions ``cache_seqlens[b] .. cache_seqlens[b] + n - 1``,
        and every compressed token whose last key is among them is computed from the cached
        window (with ``w_k``, ``pe_k``, ``w_v``, ``pe_v``; ``None``: mean) and stored. Returns
        ``cache_seqlens + n`` (int32 ``[B]``), the lengths to decode the last new token with;
        ``cache_seqlens`` itself changes at :meth:`advance`. No host synchronisation.
        """
        layer = self._check_layer(layer)
        n = self._check_kv("append", k_new, v_new)
        if self._len_bound + n > self.max_seqlen:
            raise ValueError(f"{_NAME}.append: {n} more token(s) may exceed max_seqlen={self.max_seqlen} "
                             f"(sequences may already hold up to {self._len_bound})")
        wk, pk, wv, pv = self._check_params("append", w_k, w_v, pe_k, pe_v)
        self._begin_step(layer, n, None, prefill=False)
        B, dev = self.batch_size, self.device
        l, d, Sc = self.cmp_block, self.cmp_stride, self.max_compressed
        L = self.cache_seqlens.to(torch.int64)  # [B]
        rows = torch.arange(B, device=dev)[:, None]  # [B, 1]
        pos = L[:, None] + torch.arange(n, device=dev)  # [B, n]
        self.k[layer][rows, pos] = k_new.to(self.dtype)
        self.v[layer][rows, pos] = v_new.to(self.dtype)

        # compressed tokens i with last key e_i = i*d + l - 1 in [L, L + n): at most ceil(n / d)
        m = -(-n // d)
        i0 = torch.div(L - (l - 1) + (d - 1), d, rounding_mode="floor").clamp_(min=0)  # first e_i >= L
        cand = i0[:, None] + torch.arange(m, device=dev)  # [B, m]
        last = cand * d + (l - 1)
        due = (last < (L + n)[:, None]) & (cand < Sc)
        dest = torch.where(due, cand, Sc)  # not due -> the spare row
        win = (cand[..., None] * d + torch.arange(l, device=dev)).clamp_(max=self.max_seqlen - 1)  # [B, m, l]
        for cache, w, pe, store in ((self.k[layer], wk, pk, self._k_cmp_store[layer]),
                                    (self.v[layer], wv, pv, self._v_cmp_store[layer])):
            windows = cache[rows[..., None], win]  # [B, m, l, H, D]
            xc = ops.compress(windows.flatten(0, 1), w, pe, block=l, stride=d)  # [B*m, 1, H, Dout]
            store[rows, dest] = xc.reshape(B, m, *xc.shape[-2:])
        return (L + n).to(torch.int32)

    def advance(self, n: Optional[int] = None) -> Tensor:
        """Commit this step's tokens for all layers: ``cache_seqlens += n`` (in place, on the
        device), or ``cache_seqlens = seqlens`` after a prefill. Every layer must have written
        the step (``prefill`` or ``append``). ``n`` (optional) must match the tokens appended;
        with nothing pending, ``advance(n)`` just moves the lengths by ``n`` (for callers that
        write ``k``/``v``/``k_cmp``/``v_cmp`` themselves). Returns ``cache_seqlens``."""
        if self._step_n is None:
            if n is None:
                raise RuntimeError(f"{_NAME}.advance: nothing was written since the last advance()")
            n = _int("n", n, 0)
            if self._len_bound + n > self.max_seqlen:
                raise ValueError(f"{_NAME}.advance: {n} more token(s) may exceed max_seqlen={self.max_seqlen}")
            self.cache_seqlens += n
            self._len_bound += n
            self._committed_any = True
            return self.cache_seqlens
        if n is not None and (self._step_counts is not None or _int("n", n, 0) != self._step_n):
            raise ValueError(f"{_NAME}.advance: argument 'n' ({n}) does not match this step, which "
                             + ("was a prefill (call advance() without n)" if self._step_counts is not None
                                else f"appended {self._step_n} token(s)"))
        missing = [i for i in range(self.num_layers) if i not in self._step_layers]
        if missing:
            raise RuntimeError(f"{_NAME}.advance: layer(s) {missing} did not write this step's tokens "
                               "(every layer must prefill/append before advance())")
        if self._step_counts is not None:
            self.cache_seqlens.copy_(self._step_counts)
        else:
            self.cache_seqlens += self._step_n
        self._len_bound += self._step_n
        self._committed_any = True
        self._reset_step()
        return self.cache_seqlens

    def reset(self, zero: bool = False) -> None:
        """Empty the cache (all lengths 0) for a new batch of prompts. The tensors keep their
        contents unless ``zero`` (stale entries are never read: prefill/append overwrite every
        position and compressed token before any length covers it)."""
        self.cache_seqlens.zero_()
        self._len_bound = 0
        self._reset_step()
        self._committed_any = False
        if zero:
            for t in self.k + self.v + self._k_cmp_store + self._v_cmp_store:
                t.zero_()

    # ------------------------------------------------------------------------------------------

    def _reset_step(self) -> None:
        self._step_n: Optional[int] = None  # tokens per sequence written by this step (host)
        self._step_counts: Optional[Tensor] = None  # per-row counts of a prefill step (device)
        self._step_layers: set = set()

    def _begin_step(self, layer: int, n: int, counts: Optional[Tensor], prefill: bool) -> None:
        if self._step_n is not None:
            was_prefill = self._step_counts is not None
            if was_prefill != prefill or self._step_n != n:
                raise RuntimeError(
                    f"{_NAME}: layer {layer} writes {'a prefill' if prefill else 'an append'} of {n} token(s), but "
                    f"this step already has {'a prefill' if was_prefill else 'an append'} of {self._step_n}; all "
                    "layers must write the same tokens, then advance()")
        else:
            self._step_n, self._step_counts = n, counts
        self._step_layers.add(layer)

    def _check_layer(self, layer) -> int:
        layer = _int("layer", layer, 0)
        if layer >= self.num_layers:
            raise ValueError(f"{_NAME}: argument 'layer' must be in [0, {self.num_layers}), got {layer}")
        return layer

    def _check_kv(self, fn: str, k: Tensor, v: Tensor) -> int:
        B, H, Dk, Dv = self.batch_size, self.num_kv_heads, self.head_dim, self.v_head_dim
        for name, t, D in (("k", k, Dk), ("v", v, Dv)):
            if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != B or t.shape[2] != H or t.shape[3] != D:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{_NAME}.{fn}: argument '{name}' must be [B={B}, tokens, H={H}, D={D}], got {got}")
            if t.device != self.device:
                raise ValueError(f"{_NAME}.{fn}: argument '{name}' must be on {self.device}, got {t.device}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"{_NAME}.{fn}: 'k' and 'v' must have the same number of tokens, got "
                             f"{k.shape[1]} and {v.shape[1]}")
        n = k.shape[1]
        if fn == "append" and n < 1:
            raise ValueError(f"{_NAME}.append: at least one token per sequence is needed")
        return n

    def _check_params(self, fn: str, w_k, w_v, pe_k, pe_v):
        """Validate and cast the compression parameters before anything is written, so that a
        rejected call leaves the cache untouched whatever the prompt length."""
        H, l, out = self.num_kv_heads, self.cmp_block, []
        for which, D, w, pe in (("k", self.head_dim, w_k, pe_k), ("v", self.v_head_dim, w_v, pe_v)):
            for name, t, shape in ((f"w_{which}", w, (H, l * D, D)), (f"pe_{which}", pe, (H, l, D))):
                if t is None:
                    continue
                if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{_NAME}.{fn}: argument '{name}' must be a floating point tensor "
                                     f"{list(shape)}, got {got}")
                if t.device != self.device:
                    raise ValueError(f"{_NAME}.{fn}: argument '{name}' must be on {self.device}, got {t.device}")
            if pe is not None and w is None:
                raise ValueError(f"{_NAME}.{fn}: a position table 'pe_{which}' needs its weight 'w_{which}' "
                                 "(mean compression has none)")
            out += [None if w is None else w.to(self.dtype), None if pe is None else pe.to(self.dtype)]
        return out

    def __repr__(self) -> str:
        return (f"{_NAME}(num_layers={self.num_layers}, batch_size={self.batch_size}, max_seqlen={self.max_seqlen}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, "
                f"cmp_block={self.cmp_block}, cmp_stride={self.cmp_stride}, dtype={self.dtype}, "
                f"device={self.device}, seqlen_bound={self._len_bound})")
