"""Attention shared by chronos-video backbones: SDPA, grouped-query heads, optional 3D RoPE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import apply_rotary


def _in_dtype_of(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    return norm(x if weight is None else x.to(weight.dtype))


class ChronosAttention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`.

    `num_kv_heads < num_heads` gives grouped-query attention (fewer key/value projections, a
    smaller KV cache for autoregressive decoding). With `cross_attention_dim` set, keys and
    values come from the text tokens instead of the video tokens. RMS-normalised queries and
    keys keep logits bounded in bf16 training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        cross_attention_dim: int | None = None,
        qk_norm: bool = True,
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
        kv_in = cross_attention_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_in, num_kv_heads * self.head_dim)
        self.to_v = nn.Linear(kv_in, num_kv_heads * self.head_dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_angles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self.to_q(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.to_k(context).view(batch, context.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.to_v(context).view(batch, context.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        # Normalise in the norm's own dtype: mixed-dtype RMSNorm (bf16 activations under autocast
        # with fp32 weights, or the reverse) falls off the fused kernel.
        query, key = _in_dtype_of(self.norm_q, query), _in_dtype_of(self.norm_k, key)
        if rotary_angles is not None:
            query = apply_rotary(query, rotary_angles)
            key = apply_rotary(key, rotary_angles)
        query, key = query.to(value.dtype), key.to(value.dtype)
        if attention_mask is not None and attention_mask.ndim == 2:  # (B, S) key padding mask
            attention_mask = attention_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))
