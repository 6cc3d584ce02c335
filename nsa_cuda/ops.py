"""Thin Python layer over ``torch.ops.nsa_cuda``: defaults, fake (shape) functions, autograd.

Layouts follow FlashAttention: padded batches ``[B, T, H, D]``, or packed batches
``[total, H, D]`` with int32 ``cu_seqlens [B+1]``. Compressed keys/values of a packed batch are a
``[total // stride, H, D]`` tensor in which sequence ``b`` owns rows ``cu_seqlens[b] // stride``
onward (``Nc(T_b)`` of them); other rows are zero. ``lse`` is fp32 ``[B, T, HQ]`` /
``[total, HQ]``. Validation happens in the compiled ops, so direct ``torch.ops`` calls are
checked too; errors name the argument.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.nsa_cuda


def _scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def _num_compressed(T, block: int, stride: int):
    return 0 if T < block else (T - block) // stride + 1


# ---------------------------------------------------------------------------------------------
# Public wrappers


def compress(x: Tensor, w: Optional[Tensor] = None, pe: Optional[Tensor] = None, *, block: int = 32,
             stride: int = 16, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """§1.1: compressed tokens of ``x`` (mean pooling when ``w`` is None, else
    ``flatten(window + pe) @ w`` per head). Differentiable in x, w and pe."""
    return _ops.compress_fwd(x, w, pe, block, stride, cu_seqlens)


def compressed_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, scale: Optional[float] = None,
                         block: int = 32, stride: int = 16,
                         cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """§1.2: attention of every query over the compressed tokens it may see -> (o, lse)."""
    return _ops.cmp_attn_fwd(q, k_cmp, v_cmp, _scale(scale, q.shape[-1]), block, stride, cu_seqlens)


def select_blocks(q: Tensor, k_cmp: Tensor, lse: Tensor, *, scale: Optional[float] = None, cmp_block: int = 32,
                  cmp_stride: int = 16, sel_block: int = 64, top_n: int = 16, init_blocks: int = 1,
                  local_blocks: int = 2, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """§1.3-1.4: int32 ``block_idx [.., H, top_n]`` (ascending, -1 padded). Not differentiable."""
    return _ops.select_blocks(q, k_cmp, lse, _scale(scale, q.shape[-1]), cmp_block, cmp_stride, sel_block, top_n,
                              init_blocks, local_blocks, cu_seqlens)


def selected_attention(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, *, scale: Optional[float] = None,
                       sel_block: int = 64, cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """§1.5: attention over the selected blocks (causal inside the current one) -> (o, lse)."""
    return _ops.sel_attn_fwd(q, k, v, block_idx, _scale(scale, q.shape[-1]), sel_block, cu_seqlens)


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int = 512, scale: Optional[float] = None,
                     cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """§1.6: sliding-window attention over keys ``[t-window+1, t]`` -> (o, lse)."""
    return _ops.win_attn_fwd(q, k, v, _scale(scale, q.shape[-1]), window, cu_seqlens)


def combine(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor) -> Tensor:
    """§1.7: ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` with per-(token, head) gates."""
    return _ops.combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_cmp_cache: Tensor, v_cmp_cache: Tensor,
           cache_seqlens: Tensor, g_cmp: Tensor, g_slc: Tensor, g_win: Tensor, *, scale: Optional[float] = None,
           cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64, top_n: int = 16, init_blocks: int = 1,
           local_blocks: int = 2, window: int = 512) -> Tensor:
    """§1.8: output ``[B, HQ, Dv]`` of the newest token of each sequence (position
    ``cache_seqlens[b] - 1``) against its K/V cache and compressed K/V cache."""
    return _ops.decode_fwd(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win,
                           _scale(scale, q.shape[-1]), cmp_block, cmp_stride, sel_block, top_n, init_blocks,
                           local_blocks, window)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes only, for torch.compile and opcheck.


@torch.library.register_fake("nsa_cuda::compress_fwd")
def _compress_fwd_fake(x, w, pe, block, stride, cu_seqlens):
    heads, dim = x.shape[-2], x.shape[-1]
    out_dim = w.shape[2] if w is not None else dim
    if cu_seqlens is not None:
        return x.new_empty(x.shape[0] // stride, heads, out_dim)
    return x.new_empty(x.shape[0], _num_compressed(x.shape[1], block, stride), heads, out_dim)


@torch.library.register_fake("nsa_cuda::compress_bwd")
def _compress_bwd_fake(dy, x, w, pe, block, stride, cu_seqlens):
    empty = x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w) if w is not None else empty, torch.empty_like(pe) if pe is not None else empty)


def _attn_fwd_fake(q, v):
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(*q.shape[:-1], dtype=torch.float32)
    return o, lse


def _attn_bwd_fake(q, k, v):
    c = torch.contiguous_format
    return (torch.empty_like(q, memory_format=c), torch.empty_like(k, memory_format=c),
            torch.empty_like(v, memory_format=c))


@torch.library.register_fake("nsa_cuda::cmp_attn_fwd")
def _cmp_attn_fwd_fake(q, k_cmp, v_cmp, scale, block, stride, cu_seqlens):
    return _attn_fwd_fake(q, v_cmp)


@torch.library.register_fake("nsa_cuda::cmp_attn_bwd")
def _cmp_attn_bwd_fake(dout, dlse, q, k_cmp, v_cmp, out, lse, scale, block, stride, cu_seqlens, delta=None, dq_acc=None):
    return _attn_bwd_fake(q, k_cmp, v_cmp)


@torch.library.register_fake("nsa_cuda::sel_attn_fwd")
def _sel_attn_fwd_fake(q, k, v, block_idx, scale, sel_block, cu_seqlens):
    return _attn_fwd_fake(q, v)


@torch.library.register_fake("nsa_cuda::sel_attn_bwd")
def _sel_attn_bwd_fake(dout, dlse, q, k, v, out, lse, block_idx, scale, sel_block, cu_seqlens, delta=None, dq_acc=None):
    return _attn_bwd_fake(q, k, v)


@torch.library.register_fake("nsa_cuda::win_attn_fwd")
def _win_attn_fwd_fake(q, k, v, scale, window, cu_seqlens):
    return _attn_fwd_fake(q, v)


@torch.library.register_fake("nsa_cuda::win_attn_bwd")
def _win_attn_bwd_fake(dout, dlse, q, k, v, out, lse, scale, window, cu_seqlens, delta=None, dq_acc=None):
    return _attn_bwd_fake(q, k, v)


@torch.library.register_fake("nsa_cuda::select_blocks")
def _select_blocks_fake(q, k_cmp, lse, scale, cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks,
                        cu_seqlens):
    return q.new_empty(*q.shape[:-2], k_cmp.shape[-2], top_n, dtype=torch.int32)


@torch.library.register_fake("nsa_cuda::combine_fwd")
def _combine_fwd_fake(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
    return torch.empty_like(o_cmp, memory_format=torch.contiguous_format)


@torch.library.register_fake("nsa_cuda::combine_bwd")
def _combine_bwd_fake(dout, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, dg_fp32=False):
    c = torch.contiguous_format
    dg_dtype = torch.float32 if dg_fp32 else o_cmp.dtype
    return (*(torch.empty_like(t, memory_format=c) for t in (o_cmp, o_slc, o_win)),
            *(torch.empty_like(t, memory_format=c, dtype=dg_dtype) for t in (g_cmp, g_slc, g_win)))


@torch.library.register_fake("nsa_cuda::decode_fwd")
def _decode_fwd_fake(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, cache_seqlens, g_cmp, g_slc, g_win, scale,
                     cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks, window):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


# ---------------------------------------------------------------------------------------------
# Autograd: each forward op's backward is another op (so compiled graphs keep the kernels).


def _compress_setup(ctx, inputs, output):
    x, w, pe, block, stride, cu_seqlens = inputs
    ctx.save_for_backward(x, w, pe, cu_seqlens)
    ctx.block, ctx.stride = block, stride


def _compress_backward(ctx, dy):
    x, w, pe, cu_seqlens = ctx.saved_tensors
    dx, dw, dpe = _ops.compress_bwd(dy, x, w, pe, ctx.block, ctx.stride, cu_seqlens)
    return dx, (dw if w is not None else None), (dpe if pe is not None else None), None, None, None


torch.library.register_autograd("nsa_cuda::compress_fwd", _compress_backward, setup_context=_compress_setup)


def _cmp_attn_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, scale, block, stride, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, cu_seqlens)
    ctx.args = (scale, block, stride)


def _cmp_attn_backward(ctx, do, dlse):
    q, k_cmp, v_cmp, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _ops.cmp_attn_bwd(do, dlse, q, k_cmp, v_cmp, o, lse, *ctx.args, cu_seqlens)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("nsa_cuda::cmp_attn_fwd", _cmp_attn_backward, setup_context=_cmp_attn_setup)


def _sel_attn_setup(ctx, inputs, output):
    q, k, v, block_idx, scale, sel_block, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, block_idx, cu_seqlens)
    ctx.args = (scale, sel_block)


def _sel_attn_backward(ctx, do, dlse):
    q, k, v, o, lse, block_idx, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _ops.sel_attn_bwd(do, dlse, q, k, v, o, lse, block_idx, *ctx.args, cu_seqlens)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("nsa_cuda::sel_attn_fwd", _sel_attn_backward, setup_context=_sel_attn_setup)


def _win_attn_setup(ctx, inputs, output):
    q, k, v, scale, window, cu_seqlens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.args = (scale, window)


def _win_attn_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _ops.win_attn_bwd(do, dlse, q, k, v, o, lse, *ctx.args, cu_seqlens)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("nsa_cuda::win_attn_fwd", _win_attn_backward, setup_context=_win_attn_setup)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, do):
    return _ops.combine_bwd(do, *ctx.saved_tensors)


torch.library.register_autograd("nsa_cuda::combine_fwd", _combine_backward, setup_context=_combine_setup)


# ---------------------------------------------------------------------------------------------
# The branches, selection and gated sum as one autograd node (nsa_attention's default). One node
# lets the backward hand each branch its delta = rowsum(dout_b * o_b) = g_b * rowsum(dout * o_b),
# which the combine backward already sums in fp32 for the gate gradients: the attention backwards
# then skip their own pass over dout_b and o_b (1.8 ms at 64k on the H200), and dq's three parts
# are summed by the dq kernels themselves (dq_acc). The branch outputs and lse come back as extra
# outputs so that the backward can use them (they may also be used; their gradients are then added).


@torch.library.custom_op("nsa_cuda::nsa_fwd", mutates_args=())
def nsa_fwd(q: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor, g_cmp: Tensor, g_slc: Tensor,
            g_win: Tensor, scale: float, cmp_block: int, cmp_stride: int, sel_block: int, top_n: int,
            init_blocks: int, local_blocks: int, window: int,
            cu_seqlens: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """DESIGN.md §1.2-§1.7 from compressed keys / values: (o, block_idx, o_cmp, lse_cmp, o_slc,
    lse_slc, o_win, lse_win)."""
    o_cmp, lse_cmp = _ops.cmp_attn_fwd(q, k_cmp, v_cmp, scale, cmp_block, cmp_stride, cu_seqlens)
    block_idx = _ops.select_blocks(q, k_cmp, lse_cmp, scale, cmp_block, cmp_stride, sel_block, top_n, init_blocks,
                                   local_blocks, cu_seqlens)
    o_slc, lse_slc = _ops.sel_attn_fwd(q, k, v, block_idx, scale, sel_block, cu_seqlens)
    o_win, lse_win = _ops.win_attn_fwd(q, k, v, scale, window, cu_seqlens)
    o = _ops.combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    return o, block_idx, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win


@nsa_fwd.register_fake
def _nsa_fwd_fake(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, scale, cmp_block, cmp_stride, sel_block, top_n,
                  init_blocks, local_blocks, window, cu_seqlens):
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    block_idx = q.new_empty(*q.shape[:-2], k.shape[-2], top_n, dtype=torch.int32)
    return o, block_idx, *_attn_fwd_fake(q, v), *_attn_fwd_fake(q, v), *_attn_fwd_fake(q, v)


def _nsa_fwd_setup(ctx, inputs, output):
    q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, scale, cmp_block, cmp_stride, sel_block, _, _, _, window, cu = inputs
    _, block_idx, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win = output
    ctx.save_for_backward(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_idx, o_cmp, lse_cmp, o_slc, lse_slc,
                          o_win, lse_win, cu)
    ctx.args = (scale, cmp_block, cmp_stride, sel_block, window)
    # Outputs nothing used arrive as None, not as materialised zeros (full-size: 1 GB each at 64k,
    # and a zero gradient on o_b would also cost the branch its precomputed delta).
    ctx.set_materialize_grads(False)


def _nsa_fwd_backward(ctx, do, _d_block_idx, do_cmp, dlse_cmp, do_slc, dlse_slc, do_win, dlse_win):
    (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_idx, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win,
     cu) = ctx.saved_tensors
    scale, cmp_block, cmp_stride, sel_block, window = ctx.args
    if do is None:
        do = torch.zeros_like(o_cmp)
    d_cmp, d_slc, d_win, dg_cmp, dg_slc, dg_win = _ops.combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, True)

    def branch_dout(d_b, g, dg, extra):
        # delta_b = g_b * rowsum(dout * o_b) in fp32; a gradient reaching o_b directly changes dout_b
        # and its delta, which the branch then computes itself.
        if extra is not None:
            return d_b + extra, None
        return d_b, g.float() * dg

    # Each branch's dout_b is dropped as soon as it is used (as the autograd engine does between
    # separate nodes), and each branch backward returns the running dq plus its own (dq_acc): the
    # peak holds two dq buffers, and no separate full-size adds run.
    d_cmp, delta_cmp = branch_dout(d_cmp, g_cmp, dg_cmp, do_cmp)
    dq, dk_cmp, dv_cmp = _ops.cmp_attn_bwd(d_cmp, dlse_cmp, q, k_cmp, v_cmp, o_cmp, lse_cmp, scale, cmp_block,
                                           cmp_stride, cu, delta_cmp)
    del d_cmp, delta_cmp
    d_slc, delta_slc = branch_dout(d_slc, g_slc, dg_slc, do_slc)
    dq, dk, dv = _ops.sel_attn_bwd(d_slc, dlse_slc, q, k, v, o_slc, lse_slc, block_idx, scale, sel_block, cu,
                                   delta_slc, dq)
    del d_slc, delta_slc
    d_win, delta_win = branch_dout(d_win, g_win, dg_win, do_win)
    dq, dk_w, dv_w = _ops.win_attn_bwd(d_win, dlse_win, q, k, v, o_win, lse_win, scale, window, cu, delta_win, dq)
    del d_win, delta_win
    dk.add_(dk_w)
    dv.add_(dv_w)
    return (dq, dk, dv, dk_cmp, dv_cmp, dg_cmp.to(g_cmp.dtype), dg_slc.to(g_slc.dtype), dg_win.to(g_win.dtype),
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("nsa_cuda::nsa_fwd", _nsa_fwd_backward, setup_context=_nsa_fwd_setup)
