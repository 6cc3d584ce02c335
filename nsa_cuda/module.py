"""``NativeSparseAttention``: an attention layer (projections, RoPE, gates, compression
parameters) around :func:`nsa_cuda.nsa_attention`."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .cache import NSACache
from .functional import nsa_attention

__all__ = ["NativeSparseAttention", "apply_rotary", "packed_positions"]


def packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every row of a packed batch inside its own sequence: int64 ``[total]``.

    Row ``r`` of sequence ``b`` (``cu_seqlens[b] <= r < cu_seqlens[b+1]``) gets
    ``r - cu_seqlens[b]``. No data-dependent shapes (traces under ``torch.compile``).
    """
    # Boundaries are the caller's cu_seqlens itself (rows in its dtype), not a slice or a cast
    # of it: Inductor (torch 2.11) cannot lower searchsorted on a sliced buffer. The number of
    # boundaries <= r, minus one, is r's sequence (empty sequences share a boundary and are
    # skipped); rows past the last boundary belong to the last sequence.
    rows = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    seq = (torch.searchsorted(cu_seqlens, rows, right=True) - 1).clamp_(min=0, max=cu_seqlens.numel() - 2)
    return (rows - cu_seqlens[seq]).to(torch.int64)


def apply_rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (RoPE, rotate-half / GPT-NeoX layout) of ``x [..., tokens, heads, D]``.

    ``positions`` has the token dims of ``x`` (or broadcasts to them). Pair ``(x[i], x[i + D/2])``
    is rotated by the angle ``position * theta ** (-2i / D)``. The rotation is computed in fp32
    (fp64 for fp64 ``x``) and the result has the dtype of ``x``.
    """
    D = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=dt) / D)  # [D/2]
    angle = positions.to(dt)[..., None, None] * inv_freq  # [..., tokens, 1, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention layer (Yuan et al. 2025, arXiv 2502.11089).

    ``x -> q, k, v`` projections, RoPE on ``q`` and ``k``, per-head gates
    ``sigmoid(Linear(x))`` for the compressed / selected / window branches,
    :func:`nsa_cuda.nsa_attention`, output projection. Causal; self-attention only.

    Args:
        hidden_size: model width ``C``.
        num_heads: query heads ``HQ``.
        num_kv_heads: key/value heads ``H`` (``HQ`` must be a multiple); default ``num_heads``.
        head_dim: query/key head dim ``Dk``; default ``hidden_size // num_heads``.
        v_head_dim: value head dim ``Dv``; default ``head_dim``.
        cmp_block, cmp_stride, sel_block, top_n, init_blocks, local_blocks, window, scale:
            the NSA hyper-parameters, as in :func:`nsa_cuda.nsa_attention` (same defaults).
        compression: ``"linear"`` (default; learnable ``w_k [H, l*Dk, Dk]``,
            ``w_v [H, l*Dv, Dv]`` and position tables ``pe_k [H, l, Dk]``, ``pe_v [H, l, Dv]``,
            initialised to mean pooling plus a little noise and zero) or ``"mean"`` (no
            parameters). Note that ``pe_k`` is inert: it adds one vector per head to every
            compressed key, which the compressed softmax (and so the selection) ignores; its
            gradient is zero up to rounding. It is kept for the paper's formulation (and
            ``pe_v``, which shifts ``o_cmp``, is not inert).
        rope_theta: RoPE base, applied to ``q`` and ``k`` before everything else (so the
            compression sees rotated keys); ``None`` disables RoPE. Needs an even ``head_dim``.
        bias: whether the projections have biases (default False).

    Parameters: ``q_proj`` (C -> HQ*Dk), ``k_proj`` (C -> H*Dk), ``v_proj`` (C -> H*Dv),
    ``g_proj`` (C -> 3*HQ; output features ``[0, HQ)`` gate the compressed branch,
    ``[HQ, 2HQ)`` the selected one, ``[2HQ, 3HQ)`` the window), ``o_proj`` (HQ*Dv -> C) and,
    for linear compression, ``w_k``, ``w_v``, ``pe_k``, ``pe_v``.

    ``forward(x, cu_seqlens=None, attention_mask=None, max_seqlen=None, cache=None, layer_idx=0)``:

    * padded batch: ``x [B, T, C]``, every row a sequence of length ``T``;
    * packed batch: ``x [total, C]`` and int32 ``cu_seqlens [N + 1]``; RoPE positions
      restart at 0 in every sequence;
    * masked batch: ``x [B, T, C]`` and ``attention_mask [B, T]`` (bool or 0/1, true = a real
      token), e.g. a right-padded batch. The unmasked tokens of each row, in order, form that
      row's sequence; they are packed, run as a packed batch and scattered back; masked
      positions of the output are zero. Packing has a data-dependent shape (``nonzero``):
      PyTorch 2.14 traces it under ``torch.compile(fullgraph=True)`` (tested), but older
      versions may need a graph break there; ``cu_seqlens`` (pack outside the compiled
      region) is the path that never does.

    Generation (``cache=`` an :class:`nsa_cuda.cache.NSACache`, ``layer_idx=`` this layer's index in
    it; padded ``x [B, T, C]`` only):

    * while the cache is empty (nothing committed by ``cache.advance()`` since its ``reset``), the
      call is a prefill: the prompt ``x`` (with an optional ``attention_mask``; any mask works,
      the real tokens of each row are compacted to the front, and their outputs put back where
      they came from) runs through :func:`nsa_cuda.nsa_attention` as usual, and its keys (after
      RoPE) and values fill the cache with ``cache.prefill``;
    * otherwise ``x [B, n, C]`` holds the next ``n`` tokens of every sequence (usually ``n = 1``):
      RoPE positions are ``cache.cache_seqlens[b] + j``, ``cache.append`` stores their keys and
      values (and the compressed tokens that become due), and :func:`nsa_cuda.decode` attends
      each new token to the cache (one decode call per token when ``n > 1``). ``attention_mask``
      is not taken here.

    The layer never advances the cache: the model calls ``cache.advance()`` once per step after
    all its layers ran. The cache is written under ``no_grad`` (inference only), and the decode
    op has no backward.

    Returns ``[B, T, C]`` (or ``[total, C]``). Inside, ``q``, ``k``, ``v``, the gates and the
    compression parameters are cast to the dtype of ``q`` (under autocast the projections'
    output dtype), because the ops take one dtype. On CUDA the ops take bf16/fp16: run the
    module in bf16 or under ``torch.autocast``. Works with ``torch.compile``,
    ``torch.utils.checkpoint`` (the recomputation selects the same blocks) and DDP/FSDP (no
    custom collectives).

    :meth:`reference_forward` computes the same function with :mod:`nsa_cuda.reference` in
    place of the ops (for tests).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        v_head_dim: Optional[int] = None,
        *,
        cmp_block: int = 32,
        cmp_stride: int = 16,
        sel_block: int = 64,
        top_n: int = 16,
        init_blocks: int = 1,
        local_blocks: int = 2,
        window: int = 512,
        scale: Optional[float] = None,
        compression: str = "linear",
        rope_theta: Optional[float] = 10000.0,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"NativeSparseAttention: argument '{name}' must be an integer >= 1, got {val!r}")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"hidden_size ({hidden_size}) is not a multiple of num_heads ({num_heads}): "
                                 "pass head_dim")
            head_dim = hidden_size // num_heads
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"NativeSparseAttention: argument '{name}' must be an integer >= 1, got {val!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"NativeSparseAttention: 'num_heads' ({num_heads}) must be a multiple of "
                             f"'num_kv_heads' ({num_kv_heads})")
        if compression not in ("linear", "mean"):
            raise ValueError(f"NativeSparseAttention: argument 'compression' must be 'linear' or 'mean', "
                             f"got {compression!r}")
        if rope_theta is not None and (head_dim % 2 != 0 or not rope_theta > 0):
            raise ValueError(f"NativeSparseAttention: RoPE needs an even 'head_dim' (got {head_dim}) and "
                             f"'rope_theta' > 0 (got {rope_theta}); pass rope_theta=None to disable it")
        if cmp_stride < 1 or cmp_block % cmp_stride != 0 or sel_block % cmp_stride != 0:
            raise ValueError(f"NativeSparseAttention: 'cmp_stride' ({cmp_stride}) must divide 'cmp_block' "
                             f"({cmp_block}) and 'sel_block' ({sel_block})")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim
        self.cmp_block = cmp_block
        self.cmp_stride = cmp_stride
        self.sel_block = sel_block
        self.top_n = top_n
        self.init_blocks = init_blocks
        self.local_blocks = local_blocks
        self.window = window
        self.scale = scale
        self.compression = compression
        self.rope_theta = rope_theta

        fk = dict(device=device, dtype=dtype)
        HQ, H, Dk, Dv = num_heads, num_kv_heads, head_dim, v_head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * Dk, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, H * Dk, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, H * Dv, bias=bias, **fk)
        self.g_proj = nn.Linear(hidden_size, 3 * HQ, bias=bias, **fk)
        self.o_proj = nn.Linear(HQ * Dv, hidden_size, bias=bias, **fk)
        if compression == "linear":
            self.w_k = nn.Parameter(torch.empty(H, cmp_block * Dk, Dk, **fk))
            self.w_v = nn.Parameter(torch.empty(H, cmp_block * Dv, Dv, **fk))
            self.pe_k = nn.Parameter(torch.empty(H, cmp_block, Dk, **fk))
            self.pe_v = nn.Parameter(torch.empty(H, cmp_block, Dv, **fk))
        else:
            self.register_parameter("w_k", None)
            self.register_parameter("w_v", None)
            self.register_parameter("pe_k", None)
            self.register_parameter("pe_v", None)
        self._reset_compression()

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _reset_compression(self) -> None:
        """Linear compression starts as mean pooling plus small noise; position tables at zero.

        ``w[h]`` is ``l`` stacked copies of ``I_D / l`` (so ``flatten(block) @ w`` is the block's
        mean) plus N(0, (0.02 / sqrt(l*D))^2) noise, which breaks the symmetry between heads
        without moving far from mean pooling.
        """
        if self.w_k is None:
            return
        for w, pe in ((self.w_k, self.pe_k), (self.w_v, self.pe_v)):
            H, lD, D = w.shape
            l = lD // D
            eye = torch.eye(D, device=w.device, dtype=torch.float32) / l
            w.copy_(eye.repeat(l, 1).expand(H, lD, D))
            w.add_(torch.randn(w.shape, device=w.device, dtype=torch.float32) * (0.02 / math.sqrt(lD)))
            pe.zero_()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj):
            lin.reset_parameters()
        self._reset_compression()

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, cmp_block={self.cmp_block}, "
                f"cmp_stride={self.cmp_stride}, sel_block={self.sel_block}, top_n={self.top_n}, "
                f"init_blocks={self.init_blocks}, local_blocks={self.local_blocks}, window={self.window}, "
                f"compression={self.compression!r}, rope_theta={self.rope_theta}")

    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, cache: Optional[NSACache] = None, layer_idx: int = 0) -> Tensor:
        """``x [B, T, C]`` (or packed ``[total, C]`` with ``cu_seqlens``, or ``[B, T, C]`` with
        ``attention_mask [B, T]``) -> ``[B, T, C]`` / ``[total, C]``. With ``cache`` (and
        ``layer_idx``): prefill of an empty cache, else decoding of the next tokens ``x [B, n, C]``.
        See the class docstring."""
        if cache is not None:
            return self._forward_cached(x, cu_seqlens, attention_mask, cache, layer_idx)
        return self._run(x, cu_seqlens, attention_mask, max_seqlen, self._nsa_ops)

    def reference_forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None,
                          attention_mask: Optional[Tensor] = None) -> Tensor:
        """:meth:`forward` with :func:`nsa_cuda.reference.nsa_attention` (plain PyTorch, small
        shapes only) in place of the ops: same weights, projections, RoPE and gates."""
        return self._run(x, cu_seqlens, attention_mask, None, self._nsa_reference)

    # ------------------------------------------------------------------------------------------

    def _nsa_kwargs(self) -> dict:
        return dict(cmp_block=self.cmp_block, cmp_stride=self.cmp_stride, sel_block=self.sel_block, top_n=self.top_n,
                    init_blocks=self.init_blocks, local_blocks=self.local_blocks, window=self.window, scale=self.scale)

    def _nsa_ops(self, q, k, v, gates, comp, cu_seqlens, max_seqlen):
        return nsa_attention(q, k, v, *gates, **comp, **self._nsa_kwargs(), cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen)

    def _nsa_reference(self, q, k, v, gates, comp, cu_seqlens, max_seqlen):
        o = reference.nsa_attention(q, k, v, *gates, **comp, **self._nsa_kwargs(), cu_seqlens=cu_seqlens)
        return o.to(q.dtype)

    def _run(self, x: Tensor, cu_seqlens: Optional[Tensor], attention_mask: Optional[Tensor],
             max_seqlen: Optional[int], attn: Callable) -> Tensor:
        name = type(self).__name__
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: argument 'x' must have hidden size {self.hidden_size} in its last dim, "
                             f"got shape {list(x.shape)}")
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError(f"{name}: pass either 'cu_seqlens' or 'attention_mask', not both")
            if x.dim() != 3:
                raise ValueError(f"{name}: with attention_mask, argument 'x' must be [B, T, C], got shape "
                                 f"{list(x.shape)}")
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"{name}: argument 'attention_mask' must have shape {list(x.shape[:2])} "
                                 f"([B, T] of 'x'), got {list(attention_mask.shape)}")
            return self._run_masked(x, attention_mask, attn)
        if cu_seqlens is not None:
            if x.dim() != 2:
                raise ValueError(f"{name}: with cu_seqlens, argument 'x' must be packed [total, C], got shape "
                                 f"{list(x.shape)}")
            if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
                raise ValueError(f"{name}: argument 'cu_seqlens' must be a 1-D int32 tensor [N + 1]")
            positions = packed_positions(cu_seqlens, x.shape[0]) if self.rope_theta is not None else None
        else:
            if x.dim() != 3:
                raise ValueError(f"{name}: argument 'x' must be [B, T, C] (or packed [total, C] with cu_seqlens), "
                                 f"got shape {list(x.shape)}")
            positions = torch.arange(x.shape[1], device=x.device) if self.rope_theta is not None else None
        return self._attend(x, positions, cu_seqlens, max_seqlen, attn)

    def _run_masked(self, x: Tensor, attention_mask: Tensor, attn: Callable) -> Tensor:
        B, T, C = x.shape
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        cu_seqlens = F.pad(mask.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        rows = mask.reshape(-1).nonzero().squeeze(1)  # data-dependent shape
        packed = x.reshape(B * T, C).index_select(0, rows)
        positions = packed_positions(cu_seqlens, packed.shape[0]) if self.rope_theta is not None else None
        out = self._attend(packed, positions, cu_seqlens, None, attn)
        return out.new_zeros(B * T, out.shape[-1]).index_copy(0, rows, out).reshape(B, T, out.shape[-1])

    def _attend(self, x: Tensor, positions: Optional[Tensor], cu_seqlens: Optional[Tensor],
                max_seqlen: Optional[int], attn: Callable) -> Tensor:
        lead = x.shape[:-1]
        HQ, Dv = self.num_heads, self.v_head_dim
        q, k, v, gates, comp = self._project(x, positions)
        o = attn(q, k, v, gates, comp, cu_seqlens, max_seqlen)  # [*lead, HQ, Dv]
        return self.o_proj(o.reshape(*lead, HQ * Dv))

    def _project(self, x: Tensor, positions: Optional[Tensor]):
        """``q, k, v`` (RoPE applied at ``positions``), the three gates and the compression
        parameters, all in the dtype of ``q``."""
        HQ, H, Dk, Dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self.q_proj(x).unflatten(-1, (HQ, Dk))
        k = self.k_proj(x).unflatten(-1, (H, Dk))
        v = self.v_proj(x).unflatten(-1, (H, Dv))
        gates = torch.sigmoid(self.g_proj(x)).unflatten(-1, (3, HQ)).unbind(-2)
        if positions is not None:
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)
        dt = q.dtype  # the ops take one dtype: that of q (the projections' dtype under autocast)
        k, v = k.to(dt), v.to(dt)
        gates = tuple(g.to(dt) for g in gates)
        comp = {}
        if self.w_k is not None:
            comp = dict(w_k=self.w_k.to(dt), w_v=self.w_v.to(dt), pe_k=self.pe_k.to(dt), pe_v=self.pe_v.to(dt))
        return q, k, v, gates, comp

    # ------------------------------------------------------------------------------------------
    # generation with an NSACache

    def _forward_cached(self, x: Tensor, cu_seqlens: Optional[Tensor], attention_mask: Optional[Tensor],
                        cache: NSACache, layer_idx: int) -> Tensor:
        name = type(self).__name__
        if not isinstance(cache, NSACache):
            raise TypeError(f"{name}: argument 'cache' must be an nsa_cuda.cache.NSACache, got "
                            f"{type(cache).__name__}")
        if cu_seqlens is not None:
            raise ValueError(f"{name}: with a cache, pass a padded 'x' [B, T, C] (right-padded prompts with "
                             "attention_mask), not 'cu_seqlens'")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size or x.shape[0] != cache.batch_size:
            raise ValueError(f"{name}: with a cache, argument 'x' must be [B={cache.batch_size}, T, "
                             f"C={self.hidden_size}], got shape {list(x.shape)}")
        for attr in ("num_kv_heads", "head_dim", "v_head_dim", "cmp_block", "cmp_stride"):
            if getattr(cache, attr) != getattr(self, attr):
                raise ValueError(f"{name}: argument 'cache' has {attr}={getattr(cache, attr)}, this layer "
                                 f"{getattr(self, attr)}")
        if cache.is_empty:
            return self._prefill_cached(x, attention_mask, cache, layer_idx)
        if attention_mask is not None:
            raise ValueError(f"{name}: 'attention_mask' applies to the prompt (the prefill of an empty cache) "
                             "only; decoding steps take every row's next tokens")
        return self._decode_cached(x, cache, layer_idx)

    def _prefill_cached(self, x: Tensor, attention_mask: Optional[Tensor], cache: NSACache,
                        layer_idx: int) -> Tensor:
        B, T, C = x.shape
        HQ, Dv = self.num_heads, self.v_head_dim
        mask = seqlens = dest = None
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"{type(self).__name__}: argument 'attention_mask' must have shape "
                                 f"{list(x.shape[:2])} ([B, T] of 'x'), got {list(attention_mask.shape)}")
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
            seqlens = mask.sum(1, dtype=torch.int32)
            # compact every row's real tokens to its front (fixed shapes, no sync): right padding
            dest = torch.where(mask, mask.cumsum(1) - 1, T)  # [B, T]; masked-out -> spare column T
            x = x.new_zeros(B, T + 1, C).scatter(1, dest[..., None].expand(-1, -1, C), x)[:, :T]
        positions = torch.arange(T, device=x.device) if self.rope_theta is not None else None
        q, k, v, gates, comp = self._project(x, positions)
        cache.prefill(layer_idx, k, v, seqlens, **comp)
        # causal: on a right-padded batch the real positions of a row never see its padding, so
        # the padded-batch call gives each row's prefill output at its real positions
        o = nsa_attention(q, k, v, *gates, **comp, **self._nsa_kwargs())
        out = self.o_proj(o.reshape(B, T, HQ * Dv))
        if mask is None:
            return out
        out = torch.gather(out, 1, dest.clamp(max=T - 1)[..., None].expand(-1, -1, out.shape[-1]))
        return torch.where(mask[..., None], out, 0)

    def _decode_cached(self, x: Tensor, cache: NSACache, layer_idx: int) -> Tensor:
        B, n, _ = x.shape
        HQ, Dv = self.num_heads, self.v_head_dim
        positions = None
        if self.rope_theta is not None:
            positions = cache.cache_seqlens.to(torch.int64)[:, None] + torch.arange(n, device=x.device)  # [B, n]
        q, k, v, gates, comp = self._project(x, positions)
        cache.append(layer_idx, k, v, **comp)
        dt = cache.dtype
        kc, vc, kcc, vcc = cache.layer(layer_idx)
        outs = []
        for j in range(n):  # token j of the step sees positions 0 .. cache_seqlens + j
            outs.append(ops.decode(q[:, j].to(dt), kc, vc, kcc, vcc, cache.cache_seqlens + (j + 1),
                                   *(g[:, j].to(dt) for g in gates), **self._nsa_kwargs()))
        o = torch.stack(outs, 1).to(q.dtype)  # [B, n, HQ, Dv]
        return self.o_proj(o.reshape(B, n, HQ * Dv))
