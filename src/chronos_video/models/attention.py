"""Attention shared by chronos-video backbones: grouped-query heads, RMS qk-norm, 3D RoPE, diffusers' attention dispatch.

`ChronosAttention` is a diffusers `AttentionModuleMixin` module with a processor, as diffusers' own
Wan/Flux attention classes are, so `model.set_attention_backend("flash")`, `set_attn_processor` and
pyramid attention broadcast work on it. We keep our own module rather than diffusers' `Attention`
because that one names its output projection `to_out.0` (the shipped checkpoints say `to_out`) and
its default processors apply no RoPE.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb


def _in_dtype_of(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return norm(x if weight is None else x.to(weight.dtype))


class ChronosAttnProcessor:
    """Projections, qk-norm, RoPE on (B, L, heads, head_dim) and `dispatch_attention_fn` (SDPA by default)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "ChronosAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states).view(batch, length, attn.num_heads, attn.head_dim)
        key = attn.to_k(context).view(batch, context.shape[1], attn.num_kv_heads, attn.head_dim)
        value = attn.to_v(context).view(batch, context.shape[1], attn.num_kv_heads, attn.head_dim)
        # Normalise in the norm's own dtype: mixed-dtype RMSNorm (bf16 activations under autocast
        # with fp32 weights, or the reverse) falls off the fused kernel.
        query, key = _in_dtype_of(attn.norm_q, query), _in_dtype_of(attn.norm_k, key)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
            key = apply_rotary_emb(key, rotary_emb, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
        query, key = query.to(value.dtype), key.to(value.dtype)
        if attention_mask is not None and attention_mask.ndim == 2:  # (B, S) key padding mask
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, enable_gqa=attn.num_kv_heads != attn.num_heads,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        return attn.to_out(out.reshape(batch, length, -1))


class ChronosAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with grouped-query heads and RMS-normalised queries and keys.

    `num_kv_heads < num_heads` gives grouped-query attention (fewer key/value projections, a
    smaller KV cache for autoregressive decoding). With `cross_attention_dim` set, keys and
    values come from the text tokens instead of the video tokens. RMS-normalised queries and
    keys keep logits bounded in bf16 training.
    """

    _default_processor_cls = ChronosAttnProcessor
    _available_processors = [ChronosAttnProcessor]
    _supports_qkv_fusion = False  # GQA projections differ in width; the processor reads to_q/to_k/to_v

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        cross_attention_dim: int | None = None,
        qk_norm: bool = True,
        processor: ChronosAttnProcessor | None = None,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads != 0:
            raise ValueError(f"`dim`={dim} must be divisible by `num_heads`={num_heads}.")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"`num_heads`={num_heads} must be divisible by `num_kv_heads`={num_kv_heads}.")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.is_cross_attention = cross_attention_dim is not None
        kv_in = cross_attention_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_in, num_kv_heads * self.head_dim)
        self.to_v = nn.Linear(kv_in, num_kv_heads * self.head_dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.set_processor(processor or self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`rotary_emb` is the (cos, sin) pair of `rotary_cos_sin`, each (L, head_dim)."""
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def rotary_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles (L, dim // 2) of consecutive pairs -> the (cos, sin) pair (L, dim) diffusers' `apply_rotary_emb` takes."""
    return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)
