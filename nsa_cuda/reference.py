"""Reference implementation of Native Sparse Attention (DESIGN.md section 1).

This module is the executable form of DESIGN.md section 1 and the test oracle of the
whole project. It follows the paper (Yuan et al. 2025, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention", arXiv 2502.11089) step by step:

    compress          Eq. 7    k_c, v_c: one token per (overlapping) block of l keys, stride d
    compressed_attention        o_cmp and lse_cmp over the compressed tokens (section 1.2)
    block_scores      Eq. 8-10 importance p_cmp = softmax(q^T K_cmp), mapped to selection
                               blocks by overlap (Eq. 9) and summed over a GQA group (Eq. 10)
    select_blocks     Eq. 11   top-n selection blocks per token and KV head (with forced ones)
    selected_attention          attention over the union of the selected blocks
    window_attention            sliding-window attention
    combine           Eq. 5    o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win
    nsa_attention              all of the above (prefill / training)
    decode                     one new token per sequence against a KV cache (section 1.8)

It is written for clarity, not speed: every function works one sequence at a time with
dense masks (O(T^2) memory), so use it on small shapes only.

Numerics. All math runs in ``torch.promote_types(x.dtype, torch.float32)`` (fp32 for
bf16/fp16/fp32 inputs, fp64 for fp64 inputs so that ``torch.autograd.gradcheck`` works)
and results are returned in that dtype; ``block_idx`` is int32. Compression, the three
attention branches and the combination are differentiable with ordinary autograd; the
selection is not (indices are constants for autograd).

Notation (DESIGN.md section 1). Positions are 0-based inside one sequence of length T.
``q`` has HQ heads, ``k``/``v`` have H heads, G = HQ // H, and query head h uses KV head
h // G. ``scale=None`` means ``Dk ** -0.5``. Hyper-parameters: compression block l
(``block`` / ``cmp_block``), compression stride d (``stride`` / ``cmp_stride``), selection
block l' (``sel_block``), n selected blocks (``top_n``, forced ones included),
``init_blocks``, ``local_blocks``, window w. We require d | l and d | l'.

Batch layouts. A padded batch is ``[B, T, heads, dim]`` (B sequences of length T). A packed
("varlen") batch is ``[total, heads, dim]`` plus ``cu_seqlens`` int32 ``[N + 1]``
(FlashAttention's convention: sequence b occupies rows ``cu[b]:cu[b+1]``). Every function
takes ``cu_seqlens=None`` and handles both; nothing ever crosses a sequence boundary.

Compressed-token layout (project convention). A sequence of length T has
``Nc(T) = 0 if T < l else (T - l) // d + 1`` compressed tokens (``num_compressed``);
compressed token i summarises keys ``[i*d, i*d + l)``.

* padded: ``[B, Nc(T), H, D]``;
* varlen: one compact tensor ``[total // d, H, D]`` in which the compressed tokens of
  sequence b are rows ``cu[b] // d .. cu[b] // d + Nc(T_b) - 1``
  (``compressed_offsets(cu_seqlens, d)`` gives the row starts). These ranges never overlap,
  because ``floor(a/d) + floor(T/d) <= floor((a+T)/d)`` and ``Nc(T) <= T // d``. Rows that
  belong to no sequence ("gap rows") are zero in outputs and ignored in inputs.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "num_compressed",
    "compressed_offsets",
    "compress",
    "compressed_attention",
    "block_scores",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "combine",
    "nsa_attention",
    "decode",
]

_NEG_INF = float("-inf")
_POS_INF = float("inf")


# --------------------------------------------------------------------------------------
# Validation and layout helpers
# --------------------------------------------------------------------------------------


def _int_param(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _check_compression(block, stride) -> Tuple[int, int]:
    """DESIGN 1: 'Require d | l'."""
    block = _int_param("block (l)", block, 1)
    stride = _int_param("stride (d)", stride, 1)
    if block % stride != 0:
        raise ValueError(
            f"the compression stride d={stride} must divide the compression block l={block}"
        )
    return block, stride


def _check_selection(block, stride, sel_block) -> Tuple[int, int, int]:
    """DESIGN 1: 'Require d | l, d | l''."""
    block, stride = _check_compression(block, stride)
    sel_block = _int_param("sel_block (l')", sel_block, 1)
    if sel_block % stride != 0:
        raise ValueError(
            f"the compression stride d={stride} must divide the selection block l'={sel_block}"
        )
    return block, stride, sel_block


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """promote_types(x.dtype, float32) over all floating inputs: fp32, or fp64 for fp64."""
    dtype = torch.float32
    for t in tensors:
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"expected a floating point tensor, got dtype {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _scale(scale: Optional[float], dk: int) -> float:
    return dk ** -0.5 if scale is None else float(scale)


def _check_cu_seqlens(cu_seqlens: Tensor, total: int) -> List[int]:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least one sequence ([N + 1] with N >= 1)")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens[-1]={cu[-1]} must equal the number of rows {total}")
    return cu


class _Layout:
    """Where the sequences of a batch live (padded [B, T, ...] or packed [total, ...])."""

    def __init__(self, x: Tensor, cu_seqlens: Optional[Tensor], name: str):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            if x.dim() != 3:
                raise ValueError(
                    f"{name}: with cu_seqlens expected [total, heads, dim], got {tuple(x.shape)}"
                )
            self.rows = x.shape[0]
            self.cu = _check_cu_seqlens(cu_seqlens, self.rows)
        else:
            if x.dim() != 4:
                raise ValueError(f"{name}: expected [B, T, heads, dim], got {tuple(x.shape)}")
            B, T = x.shape[0], x.shape[1]
            if B < 1:
                raise ValueError(f"{name}: empty batch (B = 0)")
            self.rows = T
            self.cu = [b * T for b in range(B + 1)]
        self.num_seqs = len(self.cu) - 1
        self.lead = tuple(x.shape[: 1 if self.varlen else 2])  # token dims

    def length(self, b: int) -> int:
        return self.cu[b + 1] - self.cu[b]

    def tokens(self, x: Tensor, b: int) -> Tensor:
        """The rows of sequence b: [T_b, ...]."""
        return x[self.cu[b] : self.cu[b + 1]] if self.varlen else x[b]

    def merge(self, parts: List[Tensor]) -> Tensor:
        return torch.cat(parts) if self.varlen else torch.stack(parts)

    def check_tokens(self, x: Tensor, name: str, extra_dims: int) -> None:
        """x must be [*lead, <extra_dims dims>]."""
        if tuple(x.shape[: len(self.lead)]) != self.lead or x.dim() != len(self.lead) + extra_dims:
            want = "[total, ...]" if self.varlen else "[B, T, ...]"
            raise ValueError(
                f"{name}: expected {want} with leading dims {self.lead} and "
                f"{len(self.lead) + extra_dims} dims, got {tuple(x.shape)}"
            )

    # -- compressed tokens -------------------------------------------------------------

    def check_compressed(self, xc: Tensor, name: str, block: int, stride: int) -> None:
        if self.varlen:
            if xc.dim() != 3 or xc.shape[0] != self.rows // stride:
                raise ValueError(
                    f"{name}: expected compact varlen compressed tokens "
                    f"[total // d = {self.rows // stride}, H, D], got {tuple(xc.shape)}"
                )
        else:
            nc = num_compressed(self.rows, block, stride)
            want = (self.num_seqs, nc)
            if xc.dim() != 4 or tuple(xc.shape[:2]) != want:
                raise ValueError(
                    f"{name}: expected padded compressed tokens [B, Nc(T)] = {list(want)} "
                    f"+ [H, D], got {tuple(xc.shape)}"
                )

    def compressed(self, xc: Tensor, b: int, block: int, stride: int) -> Tensor:
        """The compressed tokens of sequence b: [Nc(T_b), H, D]."""
        if not self.varlen:
            return xc[b]
        start = self.cu[b] // stride
        return xc[start : start + num_compressed(self.length(b), block, stride)]

    def merge_compressed(self, parts: List[Tensor], stride: int) -> Tensor:
        if not self.varlen:
            return torch.stack(parts)
        pieces, row = [], 0
        tail = parts[0].shape[1:]
        for b, part in enumerate(parts):
            start = self.cu[b] // stride
            if start > row:  # gap rows are zero
                pieces.append(part.new_zeros((start - row, *tail)))
            pieces.append(part)
            row = start + part.shape[0]
        end = self.rows // stride
        if end > row:
            pieces.append(parts[0].new_zeros((end - row, *tail)))
        return torch.cat(pieces)


def _check_heads(q: Tensor, k: Tensor, v: Tensor, q_name="q", k_name="k", v_name="v") -> int:
    """GQA: HQ = G * H; k and v have the same number of heads; q and k the same Dk."""
    HQ, Dk = q.shape[-2], q.shape[-1]
    H = k.shape[-2]
    if v.shape[-2] != H:
        raise ValueError(f"{k_name} and {v_name} must have the same number of heads, got {H} and {v.shape[-2]}")
    if H < 1 or HQ % H != 0:
        raise ValueError(f"the number of query heads ({HQ}) must be a multiple of the KV heads ({H})")
    if k.shape[-1] != Dk:
        raise ValueError(f"{q_name} and {k_name} must have the same head dim, got {Dk} and {k.shape[-1]}")
    return HQ // H


def num_compressed(T: int, block: int, stride: int) -> int:
    """DESIGN 1.1: ``Nc(T) = 0 if T < l else (T - l) // d + 1``."""
    T = _int_param("T", T, 0)
    block = _int_param("block (l)", block, 1)
    stride = _int_param("stride (d)", stride, 1)
    return 0 if T < block else (T - block) // stride + 1


def compressed_offsets(cu_seqlens: Tensor, stride: int) -> Tensor:
    """Row where sequence b's compressed tokens start in the compact varlen layout: ``cu[b] // d``.

    Returns a tensor [N] with the dtype of ``cu_seqlens``.
    """
    stride = _int_param("stride (d)", stride, 1)
    return torch.div(cu_seqlens[:-1], stride, rounding_mode="floor")


# --------------------------------------------------------------------------------------
# Per-sequence building blocks. Queries come with their positions ``pos`` [Tq] so that the
# same code serves prefill (pos = 0 .. T-1) and decoding (pos = [t]).
# --------------------------------------------------------------------------------------


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Masked softmax attention of one sequence.

    q [Tq, HQ, Dk], k [S, H, Dk], v [S, H, Dv], allowed [Tq, HQ, S] (bool): which keys each
    query head sees. Query head h uses KV head h // G. Returns o [Tq, HQ, Dv] and the natural
    log-sum-exp lse [Tq, HQ]. Rows without any allowed key give o = 0, lse = -inf and a zero
    gradient (the max is taken over allowed keys only, and masked scores never reach exp).
    """
    HQ, H = q.shape[1], k.shape[1]
    G = HQ // H
    k = k.repeat_interleave(G, dim=1)  # [S, HQ, Dk]: head h reads KV head h // G
    v = v.repeat_interleave(G, dim=1)
    s = torch.einsum("thd,shd->ths", q, k) * scale  # [Tq, HQ, S]
    has_key = allowed.any(-1)  # [Tq, HQ]
    if s.shape[-1] > 0:
        m = torch.where(allowed, s, _NEG_INF).amax(-1).detach()
        m = torch.where(has_key, m, 0.0)  # safe max: finite everywhere
    else:  # no keys at all (e.g. T < l in the compressed branch)
        m = s.new_zeros(s.shape[:-1])
    e = torch.exp(torch.where(allowed, s - m[..., None], _NEG_INF))
    z = torch.where(has_key, e.sum(-1), 1.0)
    o = torch.einsum("ths,shd->thd", e / z[..., None], v)
    lse = torch.where(has_key, m + torch.log(z), _NEG_INF)
    return o, lse


def _compress_seq(x: Tensor, w: Optional[Tensor], pe: Optional[Tensor], l: int, d: int) -> Tensor:
    """x [T, H, D] -> x_c [Nc(T), H, Dout] (Eq. 7 / DESIGN 1.1)."""
    T, H, D = x.shape
    nc = num_compressed(T, l, d)
    idx = torch.arange(nc, device=x.device)[:, None] * d + torch.arange(l, device=x.device)
    blocks = x[idx]  # [Nc, l, H, D]: compressed token i covers keys [i*d, i*d + l)
    if w is None:
        return blocks.mean(dim=1)
    blocks = blocks.permute(0, 2, 1, 3)  # [Nc, H, l, D]
    if pe is not None:
        blocks = blocks + pe  # intra-block position encoding, per KV head
    return torch.einsum("nhk,hko->nho", blocks.reshape(nc, H, l * D), w)


def _cmp_visible(pos: Tensor, nc: int, l: int, d: int) -> Tensor:
    """DESIGN 1.2: query t sees compressed token i iff ``i*d + l - 1 <= t``. [Tq, Nc]"""
    i = torch.arange(nc, device=pos.device)
    return (i[None, :] * d + l - 1) <= pos[:, None]


def _compressed_attention_seq(q, pos, k_c, v_c, scale, l, d):
    visible = _cmp_visible(pos, k_c.shape[0], l, d)
    allowed = visible[:, None, :].expand(-1, q.shape[1], -1)
    return _attend(q, k_c, v_c, allowed, scale)


def _overlap_weights(l: int, d: int, sel_block: int) -> List[int]:
    """c(i, j) of DESIGN 1.3 as a function of r = i - (j*l'/d - l/d + 1).

    With d | l and d | l', compressed token i overlaps selection block j only for
    i = j*l'/d - l/d + 1 + r, r = 0 .. l/d + l'/d - 2, and the overlap of [i*d, i*d+l) with
    [j*l', (j+1)*l'), divided by d, depends on r alone: min(r+1, l'/d) - max(r-l/d+1, 0).
    For l=32, d=16, l'=64 this is [1, 2, 2, 2, 1] (the paper's Eq. 9 weights).
    """
    a, b = l // d, sel_block // d
    return [min(r + 1, b) - max(r - a + 1, 0) for r in range(a + b - 1)]


def _block_scores_seq(q, pos, k_c, lse, scale, l, d, sel_block, n_sel):
    """Eq. 8-10 for one sequence: S [Tq, H, n_sel]."""
    Tq, HQ, _ = q.shape
    nc, H, _ = k_c.shape
    G = HQ // H
    # Eq. 8: p_cmp[t, h, i] = exp(scale * q[t,h] . k_c[i] - lse_cmp[t,h]) for visible i, else 0.
    s = torch.einsum("thd,ihd->thi", q, k_c.repeat_interleave(G, dim=1)) * scale
    ok = _cmp_visible(pos, nc, l, d)[:, None, :] & torch.isfinite(lse)[..., None]
    p = torch.exp(torch.where(ok, s - lse[..., None], _NEG_INF))  # [Tq, HQ, Nc]
    # Eq. 10: sum over the G query heads that share KV head g.
    P = p.reshape(Tq, H, G, nc).sum(dim=2)  # [Tq, H, Nc]
    # Eq. 9: S[j] = sum_i c(i, j) * P[i] (overlap form). Zero-pad P so that every shifted
    # view is in range, then add the l/d + l'/d - 1 overlapping tokens in order of i.
    a, b = l // d, sel_block // d
    P = F.pad(P, (a - 1, n_sel * b - nc))
    S = torch.zeros((Tq, H, n_sel), dtype=P.dtype, device=P.device)
    for r, c in enumerate(_overlap_weights(l, d, sel_block)):
        S = S + c * P[..., r : r + (n_sel - 1) * b + 1 : b]
    return S


def _select_seq(S, pos, sel_block, top_n, init_blocks, local_blocks) -> Tensor:
    """Eq. 11 / DESIGN 1.4 for one sequence: S [Tq, H, Nsel] -> block_idx [Tq, H, top_n] int32."""
    Tq, H, n_sel = S.shape
    j = torch.arange(n_sel, device=S.device)[None, :]
    cur = (pos // sel_block)[:, None]  # the block that holds t
    valid = j <= cur  # j*l' <= t
    forced = valid & ((j < init_blocks) | (j >= cur - local_blocks + 1))
    score = torch.where(forced[:, None, :], _POS_INF, S)
    score = torch.where(valid[:, None, :], score, _NEG_INF)
    # largest scores first; a stable sort keeps ties in index order, so the lower index wins
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    k = min(top_n, n_sel)
    top = order[..., :k]
    n_valid = valid.sum(-1)  # [Tq]
    taken = torch.arange(k, device=S.device)[None, None, :] < n_valid[:, None, None]
    top = torch.where(taken, top, n_sel)  # invalid -> sentinel that sorts last
    top = torch.sort(top, dim=-1).values
    top = torch.where(top == n_sel, -1, top)
    if k < top_n:
        top = F.pad(top, (0, top_n - k), value=-1)
    return top.to(torch.int32)


def _selected_attention_seq(q, pos, k, v, block_idx, scale, sel_block):
    """DESIGN 1.5 for one sequence; block_idx [Tq, H, n] (-1 = none)."""
    Tq, HQ = q.shape[0], q.shape[1]
    S, H = k.shape[0], k.shape[1]
    n_sel = -(-S // sel_block)
    G = HQ // H
    idx = block_idx.long()
    chosen = torch.zeros((Tq, H, n_sel + 1), dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(idx < 0, n_sel, idx), True)  # -1 -> dummy column
    key = torch.arange(S, device=q.device)
    allowed = chosen[:, :, key // sel_block] & (key[None, None, :] <= pos[:, None, None])
    return _attend(q, k, v, allowed.repeat_interleave(G, dim=1), scale)


def _window_attention_seq(q, pos, k, v, window, scale):
    """DESIGN 1.6 for one sequence: keys [max(0, t-w+1), t]."""
    key = torch.arange(k.shape[0], device=q.device)[None, :]
    allowed = (key <= pos[:, None]) & (key > pos[:, None] - window)
    return _attend(q, k, v, allowed[:, None, :].expand(-1, q.shape[1], -1), scale)


def _check_block_idx_values(block_idx: Tensor, n_sel: int, name="block_idx") -> None:
    if block_idx.numel() and (int(block_idx.min()) < -1 or int(block_idx.max()) >= n_sel):
        raise ValueError(
            f"{name}: entries must be -1 or a block index in [0, {n_sel}), got range "
            f"[{int(block_idx.min())}, {int(block_idx.max())}]"
        )


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def compress(
    x: Tensor,
    w: Optional[Tensor] = None,
    pe: Optional[Tensor] = None,
    *,
    block: int = 32,
    stride: int = 16,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Token compression, Eq. 7 / DESIGN 1.1.

    "Compressed token i summarises keys [i*d, i*d + l). Modes: mean:
    x_c[i] = mean(x[i*d : i*d+l]); linear: x_c[i] = flatten(x[i*d : i*d+l] + pe) @ W, per KV
    head, W: [H, l*D, D], pe: [H, l, D] (optional)."

    x: [B, T, H, D] (or [total, H, D] with cu_seqlens). ``w=None`` selects mean compression
    (then ``pe`` must be None); otherwise w is [H, l*D, Dout] and the flatten is row-major
    over (l, D). Returns [B, Nc(T), H, Dout], or the compact varlen layout [total // d, H, Dout]
    described in the module docstring (gap rows zero).
    """
    block, stride = _check_compression(block, stride)
    lay = _Layout(x, cu_seqlens, "x")
    H, D = x.shape[-2], x.shape[-1]
    if w is None:
        if pe is not None:
            raise ValueError("pe is only used by linear compression: pass w as well (or pe=None)")
        d_out = D
    else:
        if w.dim() != 3 or w.shape[0] != H or w.shape[1] != block * D:
            raise ValueError(f"w: expected [H, l*D, Dout] = [{H}, {block * D}, Dout], got {tuple(w.shape)}")
        d_out = w.shape[2]
        if pe is not None and tuple(pe.shape) != (H, block, D):
            raise ValueError(f"pe: expected [H, l, D] = {[H, block, D]}, got {tuple(pe.shape)}")
    dt = _compute_dtype(x, w, pe)
    w = None if w is None else w.to(dt)
    pe = None if pe is None else pe.to(dt)
    parts = [
        _compress_seq(lay.tokens(x, b).to(dt), w, pe, block, stride) for b in range(lay.num_seqs)
    ]
    out = lay.merge_compressed(parts, stride)
    assert out.shape[-1] == d_out
    return out


def compressed_attention(
    q: Tensor,
    k_c: Tensor,
    v_c: Tensor,
    *,
    scale: Optional[float] = None,
    block: int = 32,
    stride: int = 16,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention over the compressed tokens, DESIGN 1.2.

    "Query t sees compressed token i iff i*d + l - 1 <= t.
    o_cmp[t,h] = softmax_i(scale * q[t,h]·k_c[i]) @ v_c over visible i; also return
    lse_cmp[t,h] (natural log). No visible token: o_cmp = 0, lse = -inf, zero gradient."

    q [B, T, HQ, Dk], k_c [B, Nc(T), H, Dk], v_c [B, Nc(T), H, Dv] (or the varlen layouts).
    Returns o [B, T, HQ, Dv] and lse [B, T, HQ] (varlen: [total, HQ, Dv], [total, HQ]).
    """
    block, stride = _check_compression(block, stride)
    lay = _Layout(q, cu_seqlens, "q")
    lay.check_compressed(k_c, "k_c", block, stride)
    lay.check_compressed(v_c, "v_c", block, stride)
    _check_heads(q, k_c, v_c, "q", "k_c", "v_c")
    dt = _compute_dtype(q, k_c, v_c)
    sc = _scale(scale, q.shape[-1])
    outs, lses = [], []
    for b in range(lay.num_seqs):
        qb = lay.tokens(q, b).to(dt)
        pos = torch.arange(qb.shape[0], device=q.device)
        o, lse = _compressed_attention_seq(
            qb,
            pos,
            lay.compressed(k_c, b, block, stride).to(dt),
            lay.compressed(v_c, b, block, stride).to(dt),
            sc,
            block,
            stride,
        )
        outs.append(o)
        lses.append(lse)
    return lay.merge(outs), lay.merge(lses)


def block_scores(
    q: Tensor,
    k_c: Tensor,
    lse: Tensor,
    *,
    scale: Optional[float] = None,
    block: int = 32,
    stride: int = 16,
    sel_block: int = 64,
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, List[Tensor]]:
    """Selection-block importance scores, Eq. 8-10 / DESIGN 1.3.

    "p[t,h,i] = exp(scale*q[t,h]·k_c[i] - lse_cmp[t,h]) for visible i (Eq. 8); group sum
    P[t,g,i] = sum over h in group g of p[t,h,i] (Eq. 10); block score
    S[t,g,j] = sum_i P[t,g,i] * c(i,j) where c(i,j) = length of the overlap of [i*d, i*d+l)
    with [j*l', (j+1)*l'), divided by d (Eq. 9, for 32/16/64:
    S[j] = P[4j-1] + 2P[4j] + 2P[4j+1] + 2P[4j+2] + P[4j+3])."

    Rows with lse = -inf score 0 everywhere. Returns S [B, T, H, Nsel(T)] with
    Nsel(T) = ceil(T / l') (padded), or a list of per-sequence tensors [T_b, H, Nsel(T_b)]
    (varlen). Computed in the promoted dtype (fp32, or fp64 for fp64 inputs).
    """
    block, stride, sel_block = _check_selection(block, stride, sel_block)
    lay = _Layout(q, cu_seqlens, "q")
    lay.check_compressed(k_c, "k_c", block, stride)
    _check_heads(q, k_c, k_c, "q", "k_c", "k_c")
    lay.check_tokens(lse, "lse", 1)
    if lse.shape[-1] != q.shape[-2]:
        raise ValueError(f"lse: expected {q.shape[-2]} heads, got {lse.shape[-1]}")
    dt = _compute_dtype(q, k_c, lse)
    sc = _scale(scale, q.shape[-1])
    scores = []
    for b in range(lay.num_seqs):
        qb = lay.tokens(q, b).to(dt)
        T = qb.shape[0]
        pos = torch.arange(T, device=q.device)
        scores.append(
            _block_scores_seq(
                qb,
                pos,
                lay.compressed(k_c, b, block, stride).to(dt),
                lay.tokens(lse, b).to(dt),
                sc,
                block,
                stride,
                sel_block,
                -(-T // sel_block),
            )
        )
    return scores if lay.varlen else torch.stack(scores)


def select_blocks(
    q: Tensor,
    k_c: Tensor,
    lse: Tensor,
    *,
    scale: Optional[float] = None,
    cmp_block: int = 32,
    cmp_stride: int = 16,
    sel_block: int = 64,
    top_n: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 2,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Top-n block selection, Eq. 11 / DESIGN 1.4.

    "Block j is valid iff j*l' <= t. Blocks 0 .. init_blocks-1 and
    t//l' - local_blocks + 1 .. t//l' (clamped at 0) are forced (score +inf). Take the n
    valid blocks with the largest score, ties to the lower index; emit them sorted ascending
    as int32 block_idx[t,g,0:n], padded with -1 at the end when fewer than n are valid."

    Scores come from ``block_scores`` (on detached inputs: selection is not differentiable).
    When more blocks are forced than n, the tie rule applies among them too (the n lowest
    forced indices win). Returns int32 [B, T, H, top_n] (varlen: [total, H, top_n]).
    """
    cmp_block, cmp_stride, sel_block = _check_selection(cmp_block, cmp_stride, sel_block)
    top_n = _int_param("top_n", top_n, 1)
    init_blocks = _int_param("init_blocks", init_blocks, 0)
    local_blocks = _int_param("local_blocks", local_blocks, 0)
    lay = _Layout(q, cu_seqlens, "q")
    with torch.no_grad():
        scores = block_scores(
            q.detach(),
            k_c.detach(),
            lse.detach(),
            scale=scale,
            block=cmp_block,
            stride=cmp_stride,
            sel_block=sel_block,
            cu_seqlens=cu_seqlens,
        )
        parts = []
        for b in range(lay.num_seqs):
            S = scores[b]
            pos = torch.arange(S.shape[0], device=q.device)
            parts.append(_select_seq(S, pos, sel_block, top_n, init_blocks, local_blocks))
    return lay.merge(parts)


def selected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_idx: Tensor,
    *,
    scale: Optional[float] = None,
    sel_block: int = 64,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention over the selected blocks, DESIGN 1.5.

    "Keys of query t (group g): the union of the selected blocks, cut at t (causal inside
    the current block). Ordinary softmax attention per head."

    q [B, T, HQ, Dk], k [B, T, H, Dk], v [B, T, H, Dv], block_idx [B, T, H, n] with entries
    -1 (skipped) or in [0, ceil(T/l')); duplicates are harmless (a union). Query head h uses
    the row of KV head h // G. No keys: o = 0, lse = -inf. Returns (o, lse).
    """
    sel_block = _int_param("sel_block (l')", sel_block, 1)
    lay = _Layout(q, cu_seqlens, "q")
    lay.check_tokens(k, "k", 2)
    lay.check_tokens(v, "v", 2)
    lay.check_tokens(block_idx, "block_idx", 2)
    _check_heads(q, k, v)
    if block_idx.shape[-2] != k.shape[-2]:
        raise ValueError(f"block_idx: expected {k.shape[-2]} KV heads, got {block_idx.shape[-2]}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_idx must be int32 (or int64), got {block_idx.dtype}")
    dt = _compute_dtype(q, k, v)
    sc = _scale(scale, q.shape[-1])
    outs, lses = [], []
    for b in range(lay.num_seqs):
        qb = lay.tokens(q, b).to(dt)
        idx = lay.tokens(block_idx, b)
        _check_block_idx_values(idx, -(-qb.shape[0] // sel_block))
        pos = torch.arange(qb.shape[0], device=q.device)
        o, lse = _selected_attention_seq(
            qb, pos, lay.tokens(k, b).to(dt), lay.tokens(v, b).to(dt), idx, sc, sel_block
        )
        outs.append(o)
        lses.append(lse)
    return lay.merge(outs), lay.merge(lses)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int = 512,
    scale: Optional[float] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sliding-window attention, DESIGN 1.6: "Keys [max(0, t-w+1), t] (w keys including t)".

    Returns (o [B, T, HQ, Dv], lse [B, T, HQ]) (varlen: [total, HQ, Dv], [total, HQ]).
    """
    window = _int_param("window", window, 1)
    lay = _Layout(q, cu_seqlens, "q")
    lay.check_tokens(k, "k", 2)
    lay.check_tokens(v, "v", 2)
    _check_heads(q, k, v)
    dt = _compute_dtype(q, k, v)
    sc = _scale(scale, q.shape[-1])
    outs, lses = [], []
    for b in range(lay.num_seqs):
        qb = lay.tokens(q, b).to(dt)
        pos = torch.arange(qb.shape[0], device=q.device)
        o, lse = _window_attention_seq(
            qb, pos, lay.tokens(k, b).to(dt), lay.tokens(v, b).to(dt), window, sc
        )
        outs.append(o)
        lses.append(lse)
    return lay.merge(outs), lay.merge(lses)


def combine(
    o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor
) -> Tensor:
    """Gated output, Eq. 5 / DESIGN 1.7.

    "o[t,h] = g_cmp[t,h]*o_cmp + g_slc[t,h]*o_slc + g_win[t,h]*o_win", outputs [..., HQ, Dv],
    gates [..., HQ].
    """
    for name, o in (("o_slc", o_slc), ("o_win", o_win)):
        if o.shape != o_cmp.shape:
            raise ValueError(f"{name}: expected shape {tuple(o_cmp.shape)}, got {tuple(o.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        if g.shape != o_cmp.shape[:-1]:
            raise ValueError(f"{name}: expected shape {tuple(o_cmp.shape[:-1])}, got {tuple(g.shape)}")
    dt = _compute_dtype(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    return (
        g_cmp.to(dt)[..., None] * o_cmp.to(dt)
        + g_slc.to(dt)[..., None] * o_slc.to(dt)
        + g_win.to(dt)[..., None] * o_win.to(dt)
    )


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
    return_block_idx: bool = False,
):
    """Native Sparse Attention, the whole of DESIGN section 1 (paper Eq. 5).

    k and v are compressed (mean, or linear with ``w_k``/``w_v`` and optional ``pe_k``/
    ``pe_v``; each independently), the compressed branch gives o_cmp and lse_cmp, the
    selection (on detached tensors: indices are constants for autograd) picks top_n blocks
    per token and KV head from lse_cmp, then selected and sliding-window attention, and the
    three outputs are combined with the gates [B, T, HQ] (varlen [total, HQ]).

    Returns o [B, T, HQ, Dv] (varlen [total, HQ, Dv]), and block_idx as well when
    ``return_block_idx``.
    """
    _check_selection(cmp_block, cmp_stride, sel_block)
    _int_param("top_n", top_n, 1)
    _int_param("init_blocks", init_blocks, 0)
    _int_param("local_blocks", local_blocks, 0)
    _int_param("window", window, 1)
    lay = _Layout(q, cu_seqlens, "q")
    lay.check_tokens(k, "k", 2)
    lay.check_tokens(v, "v", 2)
    _check_heads(q, k, v)
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        if g.shape != q.shape[:-1]:
            raise ValueError(f"{name}: expected shape {tuple(q.shape[:-1])}, got {tuple(g.shape)}")
    cmp_kw = dict(block=cmp_block, stride=cmp_stride, cu_seqlens=cu_seqlens)
    k_c = compress(k, w_k, pe_k, **cmp_kw)
    v_c = compress(v, w_v, pe_v, **cmp_kw)
    o_cmp, lse_cmp = compressed_attention(q, k_c, v_c, scale=scale, **cmp_kw)
    block_idx = select_blocks(
        q.detach(),
        k_c.detach(),
        lse_cmp.detach(),
        scale=scale,
        cmp_block=cmp_block,
        cmp_stride=cmp_stride,
        sel_block=sel_block,
        top_n=top_n,
        init_blocks=init_blocks,
        local_blocks=local_blocks,
        cu_seqlens=cu_seqlens,
    )
    o_slc, _ = selected_attention(
        q, k, v, block_idx, scale=scale, sel_block=sel_block, cu_seqlens=cu_seqlens
    )
    o_win, _ = window_attention(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens)
    o = combine(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    return (o, block_idx) if return_block_idx else o


def decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp_cache: Tensor,
    v_cmp_cache: Tensor,
    cache_seqlens: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_win: Tensor,
    *,
    scale: Optional[float] = None,
    cmp_block: int = 32,
    cmp_stride: int = 16,
    sel_block: int = 64,
    top_n: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 2,
    window: int = 512,
) -> Tensor:
    """One decoding step, DESIGN 1.8.

    "Appending token t to a cache and decoding it gives the same o[t] as the prefill of the
    whole sequence. Compressed keys in the cache are made incrementally: token i appears
    once keys up to i*d + l - 1 exist."

    q [B, HQ, Dk] is the query of the newest token of each sequence, at position
    t_b = cache_seqlens[b] - 1 (cache_seqlens int32 [B] counts the new token too);
    k_cache / v_cache [B, S_max, H, D] hold keys 0 .. t_b; k_cmp_cache / v_cmp_cache
    [B, Sc_max, H, D] hold the first Nc(t_b + 1) compressed tokens; gates [B, HQ].
    Everything past those is ignored. Returns o [B, HQ, Dv], equal to row t_b of
    ``nsa_attention`` on the whole sequence when the compressed caches equal ``compress``
    of the cached keys and values.
    """
    cmp_block, cmp_stride, sel_block = _check_selection(cmp_block, cmp_stride, sel_block)
    top_n = _int_param("top_n", top_n, 1)
    init_blocks = _int_param("init_blocks", init_blocks, 0)
    local_blocks = _int_param("local_blocks", local_blocks, 0)
    window = _int_param("window", window, 1)
    if q.dim() != 3:
        raise ValueError(f"q: expected [B, HQ, Dk], got {tuple(q.shape)}")
    B = q.shape[0]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_cmp_cache", k_cmp_cache), ("v_cmp_cache", v_cmp_cache)):
        if x.dim() != 4 or x.shape[0] != B:
            raise ValueError(f"{name}: expected [B={B}, S, H, D], got {tuple(x.shape)}")
    if k_cache.shape[1] != v_cache.shape[1] or k_cmp_cache.shape[1] != v_cmp_cache.shape[1]:
        raise ValueError("k and v caches must have the same capacity")
    _check_heads(q, k_cache, v_cache, "q", "k_cache", "v_cache")
    _check_heads(q, k_cmp_cache, v_cmp_cache, "q", "k_cmp_cache", "v_cmp_cache")
    if k_cmp_cache.shape[2] != k_cache.shape[2] or v_cmp_cache.shape[-1] != v_cache.shape[-1]:
        raise ValueError("compressed caches must have the heads and head dims of the caches")
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_seqlens: expected int32 [B={B}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        if g.shape != q.shape[:-1]:
            raise ValueError(f"{name}: expected shape {tuple(q.shape[:-1])}, got {tuple(g.shape)}")
    dt = _compute_dtype(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache)
    sc = _scale(scale, q.shape[-1])
    outs = []
    for b, T in enumerate(int(x) for x in cache_seqlens.tolist()):
        if not 1 <= T <= k_cache.shape[1]:
            raise ValueError(f"cache_seqlens[{b}]={T} must be in [1, {k_cache.shape[1]}]")
        nc = num_compressed(T, cmp_block, cmp_stride)
        if nc > k_cmp_cache.shape[1]:
            raise ValueError(f"k_cmp_cache holds {k_cmp_cache.shape[1]} tokens, sequence {b} needs {nc}")
        pos = torch.tensor([T - 1], device=q.device)
        qb = q[b : b + 1].to(dt)  # [1, HQ, Dk]
        k, v = k_cache[b, :T].to(dt), v_cache[b, :T].to(dt)
        k_c, v_c = k_cmp_cache[b, :nc].to(dt), v_cmp_cache[b, :nc].to(dt)
        o_cmp, lse = _compressed_attention_seq(qb, pos, k_c, v_c, sc, cmp_block, cmp_stride)
        with torch.no_grad():
            S = _block_scores_seq(
                qb.detach(), pos, k_c.detach(), lse.detach(), sc, cmp_block, cmp_stride,
                sel_block, -(-T // sel_block),
            )
            idx = _select_seq(S, pos, sel_block, top_n, init_blocks, local_blocks)
        o_slc, _ = _selected_attention_seq(qb, pos, k, v, idx, sc, sel_block)
        o_win, _ = _window_attention_seq(qb, pos, k, v, window, sc)
        outs.append(combine(o_cmp, o_slc, o_win, g_cmp[b : b + 1], g_slc[b : b + 1], g_win[b : b + 1])[0])
    return torch.stack(outs)
