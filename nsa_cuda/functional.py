"""Native Sparse Attention in one call: :func:`nsa_attention`.

The function composes the ops of :mod:`nsa_cuda.ops` (and nothing else), so every branch runs
on the compiled kernels, gradients flow through the ops' registered autograd formulas, and the
whole call traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops

# nsa_attention runs steps 2-6 as the one autograd node ops.nsa_fwd unless NSA_ONE_NODE=0 (read at
# import; tests set the attribute). H200, 64k headline, one run each (session 16): forward +
# backward 131.5 ms against 133.6 ms per step (the three delta launches, 1.7 ms, go), peak memory
# 8.42 against 8.25 GiB (the node keeps every branch output until its backward ends, where the
# per-step graph frees each one after its branch).
ONE_NODE = os.environ.get("NSA_ONE_NODE", "1") != "0"

__all__ = ["nsa_attention"]

_FN = "nsa_attention"
MAX_TOKENS = 2 ** 31 - 2 ** 21  # longest sequence / packed batch (csrc/torch/checks.cpp: kMaxTokens)


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{_FN}: argument '{name}' must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{_FN}: argument '{name}' must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{_FN}: argument '{name}' must be an integer >= {minimum}, got {value}")
    return value


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _check_tensor(name: str, t, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{_FN}: argument '{name}' must be a Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"{_FN}: argument '{name}' must have the dtype of 'q' ({like.dtype}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{_FN}: argument '{name}' must be on the device of 'q' ({like.device}), got {t.device}")


def _validate(q, k, v, gates, w_k, w_v, pe_k, pe_v, cmp_block, cmp_stride, sel_block, top_n, init_blocks,
              local_blocks, window, scale, cu_seqlens, max_seqlen) -> None:
    """Checks that need the whole call in view (the ops check their own arguments again)."""
    if not isinstance(q, Tensor):
        raise TypeError(f"{_FN}: argument 'q' must be a Tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"{_FN}: argument 'q' must be a floating point tensor, got {q.dtype}")
    for name, t in (("k", k), ("v", v)) + tuple(zip(("g_cmp", "g_slc", "g_win"), gates)):
        _check_tensor(name, t, q)
    for name, t in (("w_k", w_k), ("w_v", w_v), ("pe_k", pe_k), ("pe_v", pe_v)):
        if t is not None:
            _check_tensor(name, t, q)

    # layout: padded [B, T, heads, dim] or packed [total, heads, dim] with cu_seqlens
    rank = 4 if cu_seqlens is None else 3
    layout = "[B, T, heads, dim]" if cu_seqlens is None else "packed [total, heads, dim] (cu_seqlens given)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{_FN}: argument '{name}' must be {layout}, got shape {_shape(t)}")
    lead = q.shape[:-2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[:-2] != lead:
            raise ValueError(f"{_FN}: argument '{name}' must have the token dims {list(lead)} of 'q', "
                             f"got shape {_shape(t)}")
    # Positions are int32 in the kernels, with 2^21 of headroom for rounding up to block
    # multiples (docs/OFFSET_AUDIT.md); checked here so that the message names this call's 'q'.
    tokens = q.shape[1] if cu_seqlens is None else q.shape[0]
    if tokens > MAX_TOKENS:
        what = "sequence" if cu_seqlens is None else "packed batch"
        raise ValueError(f"{_FN}: argument 'q' holds {tokens} tokens per {what}; at most 2^31 - 2^21 = {MAX_TOKENS}")
    HQ, Dk = q.shape[-2], q.shape[-1]
    H, Dv = k.shape[-2], v.shape[-1]
    if H < 1 or HQ % H != 0:
        raise ValueError(f"{_FN}: the heads of 'q' ({HQ}) must be a multiple of the heads of 'k' ({H})")
    if v.shape[-2] != H:
        raise ValueError(f"{_FN}: argument 'v' must have the {H} heads of 'k', got shape {_shape(v)}")
    if k.shape[-1] != Dk:
        raise ValueError(f"{_FN}: argument 'k' must have the head dim {Dk} of 'q', got shape {_shape(k)}")
    for name, g in zip(("g_cmp", "g_slc", "g_win"), gates):
        if g.shape != q.shape[:-1]:
            raise ValueError(f"{_FN}: argument '{name}' must have shape {list(q.shape[:-1])} (the tokens x heads "
                             f"of 'q'), got {_shape(g)}")

    # hyper-parameters (DESIGN §1: d | l and d | l')
    cmp_block = _int_arg("cmp_block", cmp_block, 1)
    cmp_stride = _int_arg("cmp_stride", cmp_stride, 1)
    sel_block = _int_arg("sel_block", sel_block, 1)
    if cmp_block % cmp_stride != 0:
        raise ValueError(f"{_FN}: argument 'cmp_stride' ({cmp_stride}) must divide 'cmp_block' ({cmp_block})")
    if sel_block % cmp_stride != 0:
        raise ValueError(f"{_FN}: argument 'cmp_stride' ({cmp_stride}) must divide 'sel_block' ({sel_block})")
    _int_arg("top_n", top_n, 1)
    _int_arg("init_blocks", init_blocks, 0)
    _int_arg("local_blocks", local_blocks, 0)
    _int_arg("window", window, 1)
    if scale is not None:
        try:
            ok = not isinstance(scale, bool) and math.isfinite(float(scale)) and float(scale) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{_FN}: argument 'scale' must be a finite number > 0 or None, got {scale!r}")
    if max_seqlen is not None:
        if cu_seqlens is None:
            raise ValueError(f"{_FN}: argument 'max_seqlen' only applies to packed batches (pass cu_seqlens)")
        _int_arg("max_seqlen", max_seqlen, 0)

    # compression parameters: w [H, l*D, D], pe [H, l, D] (pe needs w)
    for kind, D, w, pe in (("k", Dk, w_k, pe_k), ("v", Dv, w_v, pe_v)):
        if pe is not None and w is None:
            raise ValueError(f"{_FN}: argument 'pe_{kind}' needs 'w_{kind}' (mean compression has no parameters)")
        if w is not None and tuple(w.shape) != (H, cmp_block * D, D):
            raise ValueError(f"{_FN}: argument 'w_{kind}' must have shape [H, cmp_block*D{kind}, D{kind}] = "
                             f"{[H, cmp_block * D, D]}, got {_shape(w)}")
        if pe is not None and tuple(pe.shape) != (H, cmp_block, D):
            raise ValueError(f"{_FN}: argument 'pe_{kind}' must have shape [H, cmp_block, D{kind}] = "
                             f"{[H, cmp_block, D]}, got {_shape(pe)}")


def nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    *,
    w_k: Optional[Tensor] = None,
    w_v: Optional[Tensor] = None,
    pe_k: Optional[Tensor] = None,
    pe_v: Optional[Tensor] = None,
    cmp_block: int = 32,
    cmp_stride: int = 16,
    sel_block: int = 64,
    top_n: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 2,
    window: int = 512,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_block_idx: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Native Sparse Attention (Yuan et al. 2025): compressed, selected and sliding-window
    attention, gated and summed (DESIGN.md §1, the paper's Eq. 5).

    Steps, each one op of :mod:`nsa_cuda.ops` (2-6 run inside the one op and autograd node
    :func:`nsa_cuda.ops.nsa_fwd`, except in float64 or with ``NSA_ONE_NODE=0``):

    1. ``k`` and ``v`` are compressed into one token per block of ``cmp_block`` positions,
       every ``cmp_stride`` positions (mean pooling, or ``flatten(block + pe) @ w`` per KV head
       when ``w_k`` / ``w_v`` are given; keys and values independently);
    2. compressed attention gives ``o_cmp`` and its log-sum-exp;
    3. from those, every token picks ``top_n`` blocks of ``sel_block`` keys per KV head
       (the first ``init_blocks`` and the last ``local_blocks`` blocks are always taken).
       The selection runs on detached tensors: its indices are constants for autograd;
    4. selected attention over the chosen blocks (causal) gives ``o_slc``;
    5. sliding-window attention over the last ``window`` keys gives ``o_win``;
    6. ``o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` per token and query head.

    Args:
        q: queries ``[B, T, HQ, Dk]`` (packed: ``[total, HQ, Dk]``).
        k: keys ``[B, T, H, Dk]`` (packed: ``[total, H, Dk]``). ``HQ`` must be a multiple of
            ``H``; query head ``h`` uses KV head ``h // (HQ // H)`` (GQA).
        v: values ``[B, T, H, Dv]`` (packed: ``[total, H, Dv]``); ``Dv`` may differ from ``Dk``.
        g_cmp, g_slc, g_win: gates of the compressed, selected and window branches,
            ``[B, T, HQ]`` (packed: ``[total, HQ]``), usually ``sigmoid`` of a projection.
        w_k, w_v: linear compression weights ``[H, cmp_block * Dk, Dk]`` and
            ``[H, cmp_block * Dv, Dv]``; ``None`` (the default) means mean pooling.
        pe_k, pe_v: optional intra-block position tables ``[H, cmp_block, Dk]`` and
            ``[H, cmp_block, Dv]`` added before the linear compression (need ``w_k`` / ``w_v``).
        cmp_block: compression block length ``l`` (default 32).
        cmp_stride: compression stride ``d`` (default 16); must divide ``cmp_block`` and
            ``sel_block``.
        sel_block: selection block length ``l'`` (default 64).
        top_n: number of selected blocks per token and KV head, forced ones included (default 16).
        init_blocks: leading blocks every token selects (default 1).
        local_blocks: trailing blocks (the one holding the token and those before it) every
            token selects (default 2).
        window: sliding-window size, the token itself included (default 512).
        scale: softmax scale; ``None`` means ``Dk ** -0.5``.
        cu_seqlens: int32 ``[N + 1]`` cumulative sequence lengths of a packed batch
            (FlashAttention's convention; sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]``).
            Nothing crosses a sequence boundary; positions restart at 0 in every sequence.
        max_seqlen: the longest sequence of a packed batch. Optional and only a hint (the
            current ops do not need it); accepted for FlashAttention-style call sites.
        return_block_idx: also return the selected blocks.

    Returns:
        ``o`` ``[B, T, HQ, Dv]`` (packed: ``[total, HQ, Dv]``) in the dtype of ``q``, or
        ``(o, block_idx)`` with int32 ``block_idx [B, T, H, top_n]`` (packed:
        ``[total, H, top_n]``) when ``return_block_idx``: per token and KV head the selected
        block indices in ascending order, padded with ``-1`` when fewer are valid.

    Every tensor must share the dtype and device of ``q``: float16 / bfloat16 on CUDA, also
    float32 / float64 on the CPU (which computes in fp32, fp64 for fp64). Bad arguments raise
    ``ValueError`` / ``TypeError`` naming the argument. ``o`` is differentiable in ``q``,
    ``k``, ``v``, the three gates and ``w_k``, ``w_v``, ``pe_k``, ``pe_v``.

    Example::

        o = nsa_cuda.nsa_attention(q, k, v, g_cmp, g_slc, g_win, w_k=w_k, w_v=w_v)
    """
    _validate(q, k, v, (g_cmp, g_slc, g_win), w_k, w_v, pe_k, pe_v, cmp_block, cmp_stride, sel_block, top_n,
              init_blocks, local_blocks, window, scale, cu_seqlens, max_seqlen)
    scale = ops._scale(scale, q.shape[-1])
    cmp = dict(block=cmp_block, stride=cmp_stride, cu_seqlens=cu_seqlens)

    k_cmp = ops.compress(k, w_k, pe_k, **cmp)
    v_cmp = ops.compress(v, w_v, pe_v, **cmp)
    if ONE_NODE and q.dtype != torch.float64:
        # Steps 2-6 as one op and one autograd node (ops.nsa_fwd: the backward reuses the
        # combine's fp32 row sums as the branches' delta; see ONE_NODE). float64 keeps the
        # per-step ops (delta in float64: gradcheck).
        o, block_idx, *_ = ops.nsa_fwd(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, scale, cmp_block, cmp_stride,
                                       sel_block, top_n, init_blocks, local_blocks, window, cu_seqlens)
        return (o, block_idx) if return_block_idx else o
    o_cmp, lse_cmp = ops.compressed_attention(q, k_cmp, v_cmp, scale=scale, **cmp)
    block_idx = ops.select_blocks(
        q.detach(), k_cmp.detach(), lse_cmp.detach(), scale=scale, cmp_block=cmp_block, cmp_stride=cmp_stride,
        sel_block=sel_block, top_n=top_n, init_blocks=init_blocks, local_blocks=local_blocks,
        cu_seqlens=cu_seqlens)
    o_slc, _ = ops.selected_attention(q, k, v, block_idx, scale=scale, sel_block=sel_block, cu_seqlens=cu_seqlens)
    o_win, _ = ops.window_attention(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens)
    o = ops.combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    return (o, block_idx) if return_block_idx else o
