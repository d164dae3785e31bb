"""Nano-Sora: a diffusion transformer over 3D tubelets with AdaLN-Zero and text cross-attention."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin

from .attention import ChronosAttention, rotary_cos_sin
from .backbone import VideoBackboneMixin
from .embeddings import AdaLNZero, modulate, rope_angles_3d


class NanoSoraBlock(nn.Module):
    """DiT block: modulated self-attention (3D RoPE), cross-attention to text, modulated MLP."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = ChronosAttention(hidden_size, num_heads, num_kv_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = ChronosAttention(hidden_size, num_heads, num_kv_heads, cross_attention_dim=hidden_size, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(hidden_size, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.modulation = AdaLNZero(hidden_size, 6)

    def forward(self, hidden_states, conditioning, text_tokens, text_mask, rotary_emb):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(conditioning)
        x = hidden_states
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rotary_emb=rotary_emb)
        x = x + self.cross_attn(self.norm2(x), encoder_hidden_states=text_tokens, attention_mask=text_mask)
        return x + gate_mlp * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class NanoSoraTransformer3DModel(VideoBackboneMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Velocity predictor for rectified-flow video generation (Nano-Sora).

    Args:
        in_channels / out_channels: channels of the (pixel or latent) video.
        sample_frames / sample_height / sample_width: training size, used as pipeline defaults.
        patch_size: tubelet size (t, h, w).
        hidden_size, num_layers, num_attention_heads, num_kv_heads: width, depth, heads (GQA when
            `num_kv_heads` < heads).
        mlp_ratio: MLP expansion.
        text_embed_dim: hidden size of the text encoder whose states are passed in.
        rope_theta: base of the 3D rotary frequencies.
        input_skip: add a learned, conditioning-dependent per-channel multiple of the input to the
            velocity (`InputSkip`); zero-initialised, so it starts as the plain DiT.
        absolute_pos_embed: add diffusers' fixed 3D sin-cos position embedding to the tokens, so the
            model knows absolute place and time as well as RoPE's relative offsets.
        text_pooling: how the text states become the AdaLN conditioning vector: "mean" over the
            tokens, or "last" (the [EOS] state, CLIP's pooled output; order-aware with a causal encoder).
        frame_conditioning: add a learned function of (text + timestep conditioning, latent frame
            index) to each frame's tokens (`FrameConditioning`), so motion words can act per frame.
        prediction_type: "velocity" (the head predicts noise - x0) or "sample" (it predicts the clean
            video x0, as JiT recommends for high-dimensional pixel tokens; `forward` still returns the
            velocity (z - x0) / sigma, so sampling and the loss are unchanged).
    """

    _no_split_modules = ["NanoSoraBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        sample_frames: int = 16,
        sample_height: int = 32,
        sample_width: int = 32,
        patch_size: tuple[int, int, int] = (2, 4, 4),
        hidden_size: int = 192,
        num_layers: int = 6,
        num_attention_heads: int = 6,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        text_embed_dim: int = 128,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        input_skip: bool = False,
        absolute_pos_embed: bool = False,
        prediction_type: str = "velocity",
        frame_conditioning: bool = False,
        text_pooling: str = "mean",
    ):
        super().__init__()
        self._init_embeddings(self.config)
        self.blocks = nn.ModuleList(
            [NanoSoraBlock(hidden_size, num_attention_heads, num_kv_heads, mlp_ratio, qk_norm) for _ in range(num_layers)]
        )
        self._init_head(self.config)

    def block_inputs(self, hidden_states, timestep, grid, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """3D RoPE of the self-attention, as the (cos, sin) pair diffusers' `apply_rotary_emb` takes."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        return rotary_cos_sin(rope_angles_3d(grid, head_dim, self.config.rope_theta, device=hidden_states.device))
