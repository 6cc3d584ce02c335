"""A tiny decoder-only language model built on :class:`nsa_cuda.NativeSparseAttention`.

``TinyLM``: token embedding, ``num_layers`` pre-norm blocks of
``[RMSNorm, NativeSparseAttention, RMSNorm, SwiGLU MLP]`` (residual around each), final
RMSNorm, LM head. It is shared by the examples: ``generate.py`` (greedy generation with an
:class:`nsa_cuda.cache.NSACache`) and, later, a training example (``forward`` takes padded
``[B, T]`` ids with an optional ``attention_mask``, or packed ``[total]`` ids with
``cu_seqlens``, and returns logits).

``TinyLMConfig(attention="full")`` builds the same model with full causal attention
(:class:`FullAttention`: the same q/k/v/o projections and RoPE, then
``torch.nn.functional.scaled_dot_product_attention``) in place of NSA, the baseline of the
training example ``train_recall.py``. It has no KV cache: generate with ``use_cache=False``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nsa_cuda import NativeSparseAttention
from nsa_cuda.cache import NSACache
from nsa_cuda.module import apply_rotary, packed_positions

__all__ = ["TinyLMConfig", "TinyLM", "FullAttention"]


@dataclass
class TinyLMConfig:
    vocab_size: int = 256  # bytes
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 192
    # NSA hyper-parameters, small so that short contexts use every branch
    cmp_block: int = 16
    cmp_stride: int = 8
    sel_block: int = 16
    top_n: int = 4
    init_blocks: int = 1
    local_blocks: int = 2
    window: int = 32
    compression: str = "linear"
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    attention: str = "nsa"  # "nsa" (NativeSparseAttention) or "full" (causal SDPA, for comparison)


class FullAttention(nn.Module):
    """Full causal attention with the projections and RoPE of :class:`NativeSparseAttention`
    (no gates, no compression), computed by ``F.scaled_dot_product_attention``.

    Same ``forward`` contract: padded ``x [B, T, C]``; packed ``[total, C]`` with int32
    ``cu_seqlens`` (block-diagonal causal mask, RoPE positions restart per sequence); or
    ``[B, T, C]`` with ``attention_mask [B, T]`` (the real tokens of a row, in order, are its
    sequence; masked positions of the output are zero). The two masked layouts build an explicit
    ``[.., T, T]`` mask: fine for examples, not for long packed batches. No KV cache.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, rope_theta: Optional[float] = 10000.0, bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % self.num_kv_heads != 0:
            raise ValueError(f"FullAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.rope_theta = rope_theta
        HQ, H, D = num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * D, bias=bias)
        self.k_proj = nn.Linear(hidden_size, H * D, bias=bias)
        self.v_proj = nn.Linear(hidden_size, H * D, bias=bias)
        self.o_proj = nn.Linear(HQ * D, hidden_size, bias=bias)

    def forward(self, x: Tensor, cu_seqlens: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cache: Optional[NSACache] = None, layer_idx: int = 0) -> Tensor:
        if cache is not None:
            raise NotImplementedError("FullAttention has no KV cache: generate with use_cache=False")
        packed = x.dim() == 2
        if packed:
            if cu_seqlens is None:
                raise ValueError("FullAttention: a packed x [total, C] needs cu_seqlens")
            xb = x[None]
            pos = packed_positions(cu_seqlens, x.shape[0])[None]
            seg = torch.searchsorted(cu_seqlens[1:].to(torch.int64), torch.arange(x.shape[0], device=x.device),
                                     right=True)[None]
            real = torch.ones_like(seg, dtype=torch.bool)
        else:
            xb = x
            B, T = x.shape[:2]
            if attention_mask is None:
                pos, seg, real = torch.arange(T, device=x.device), None, None
            else:
                real = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
                pos = real.long().cumsum(1) - 1
                seg = torch.zeros_like(pos)
        B, T = xb.shape[:2]
        HQ, H, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(xb).unflatten(-1, (HQ, D))
        k = self.k_proj(xb).unflatten(-1, (H, D))
        v = self.v_proj(xb).unflatten(-1, (H, D))
        if self.rope_theta is not None:
            q = apply_rotary(q, pos, self.rope_theta)
            k = apply_rotary(k, pos, self.rope_theta)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        if H != HQ:  # GQA: query head h reads KV head h // (HQ // H)
            k = k.repeat_interleave(HQ // H, dim=1)
            v = v.repeat_interleave(HQ // H, dim=1)
        if seg is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            allowed = causal & (seg[:, :, None] == seg[:, None, :]) & real[:, None, :]  # [B, Tq, Tk]
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=x.device)  # padded rows: no empty softmax
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        out = self.o_proj(o.transpose(1, 2).reshape(B, T, HQ * D))
        if real is not None and not packed:
            out = torch.where(real[..., None], out, 0)
        return out[0] if packed else out


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        if cfg.attention not in ("nsa", "full"):
            raise ValueError(f"TinyLMConfig.attention must be 'nsa' or 'full', got {cfg.attention!r}")
        if cfg.attention == "full":
            self.attn = FullAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                      rope_theta=cfg.rope_theta)
        else:
            self.attn = NativeSparseAttention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cmp_block=cfg.cmp_block,
            cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block, top_n=cfg.top_n, init_blocks=cfg.init_blocks,
            local_blocks=cfg.local_blocks, window=cfg.window, compression=cfg.compression,
            rope_theta=cfg.rope_theta)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, layer_idx: int, cu_seqlens: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, cache: Optional[NSACache] = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens, attention_mask=attention_mask, cache=cache,
                          layer_idx=layer_idx)
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """Decoder-only LM with NSA attention (or full attention: ``attention="full"``). See the module
    docstring."""

    def __init__(self, cfg: Optional[TinyLMConfig] = None, **overrides):
        super().__init__()
        cfg = TinyLMConfig(**{**asdict(cfg or TinyLMConfig()), **overrides})
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init(mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                cache: Optional[NSACache] = None) -> Tensor:
        """``input_ids [B, T]`` (optional ``attention_mask [B, T]``) or packed ``[total]`` with
        ``cu_seqlens`` -> logits ``[B, T, vocab]`` / ``[total, vocab]``.

        With ``cache``: a prefill of the (empty) cache, or the next ``n`` tokens ``[B, n]`` of
        every sequence; the lengths are committed here (``cache.advance()``) after all layers."""
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, i, cu_seqlens=cu_seqlens, attention_mask=attention_mask, cache=cache)
        if cache is not None:
            cache.advance()
        return self.lm_head(self.norm(x))

    def make_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> NSACache:
        """An empty :class:`~nsa_cuda.cache.NSACache` for this model (one layer per block)."""
        if self.cfg.attention != "nsa":
            raise ValueError(f"make_cache: a TinyLM with attention={self.cfg.attention!r} has no KV cache; "
                             "generate with use_cache=False")
        return NSACache.for_layers([b.attn for b in self.blocks], batch_size, max_seqlen, device=device, dtype=dtype)

    @torch.no_grad()
    def generate(self, prompt_ids: Union[Tensor, Sequence[Sequence[int]]], max_new_tokens: int,
                 attention_mask: Optional[Tensor] = None, *, use_cache: bool = True,
                 cache: Optional[NSACache] = None) -> Tensor:
        """Greedy generation: ``max_new_tokens`` new ids per prompt, int64 ``[B, max_new_tokens]``.

        ``prompt_ids``: ``[B, T]`` ids (with ``attention_mask [B, T]`` for ragged prompts; the
        real tokens of a row are its prompt, in order) or a list of id lists (ragged). With
        ``use_cache`` (default) the prompt is prefilled into an :class:`NSACache` (``cache``, or
        a new one of ``T + max_new_tokens`` positions) and each new token is one decode step;
        ``use_cache=False`` recomputes the whole sequence every step, one row at a time (the
        oracle the cache is tested against).
        """
        device = self.embed.weight.device
        if not isinstance(prompt_ids, Tensor):
            rows = [list(map(int, r)) for r in prompt_ids]
            T = max(len(r) for r in rows)
            prompt_ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], dtype=torch.long, device=device)
            attention_mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], dtype=torch.bool,
                                          device=device)
        prompt_ids = prompt_ids.to(device)
        B, T = prompt_ids.shape
        mask = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.to(device=device, dtype=torch.bool))
        if max_new_tokens < 1:
            return prompt_ids.new_zeros(B, 0)

        if not use_cache:
            out: List[Tensor] = []
            for b in range(B):
                seq = prompt_ids[b][mask[b]]
                new = []
                for _ in range(max_new_tokens):
                    nxt = self(seq[None])[0, -1].argmax(-1)
                    new.append(nxt)
                    seq = torch.cat([seq, nxt[None]])
                out.append(torch.stack(new))
            return torch.stack(out)

        if cache is None:
            cache = self.make_cache(B, T + max_new_tokens)
        else:
            cache.reset()
        logits = self(prompt_ids, attention_mask=mask, cache=cache)  # prefill, [B, T, vocab]
        # each row's last real token: the last set position of the mask (any padding side)
        last = (mask.long() * torch.arange(1, T + 1, device=device)).argmax(1)
        nxt = logits[torch.arange(B, device=device), last].argmax(-1)  # [B]
        new = [nxt]
        for _ in range(max_new_tokens - 1):
            nxt = self(nxt[:, None], cache=cache)[:, -1].argmax(-1)
            new.append(nxt)
        return torch.stack(new, 1)
