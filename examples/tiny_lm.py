"""A tiny decoder-only language model built on :class:`nsa_cuda.NativeSparseAttention`.

``TinyLM``: token embedding, ``num_layers`` pre-norm blocks of
``[RMSNorm, NativeSparseAttention, RMSNorm, SwiGLU MLP]`` (residual around each), final
RMSNorm, LM head. It is shared by the examples: ``generate.py`` (greedy generation with an
:class:`nsa_cuda.cache.NSACache`) and, later, a training example (``forward`` takes padded
``[B, T]`` ids with an optional ``attention_mask``, or packed ``[total]`` ids with
``cu_seqlens``, and returns logits).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nsa_cuda import NativeSparseAttention
from nsa_cuda.cache import NSACache

__all__ = ["TinyLMConfig", "TinyLM"]


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
    """Decoder-only LM with NSA attention. See the module docstring."""

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
