"""The skeleton every chronos-video velocity backbone shares, and its diffusers cache support.

Nano-Sora and Chronos-V differ only inside their blocks (attention vs. complex scans); embedding the
inputs, the conditioning vector, running the blocks, the output head and the forward signature are
written once here.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from .embeddings import (
    AdaLNFinalLayer,
    FrameConditioning,
    InputSkip,
    TextConditioning,
    TimestepConditioning,
    TubeletEmbed,
    _as_triple,
    check_absolute_pos_embed,
    check_prediction_type,
    sample_to_velocity,
    sincos_position_embedding,
    unpatchify,
)


def check_video_input(hidden_states: torch.Tensor, in_channels: int, patch_size: tuple[int, int, int]) -> None:
    """Fails early, naming the argument, instead of deep inside a Conv3d."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 5:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
        raise ValueError(f"`hidden_states` must be a 5D tensor (batch, channels, frames, height, width), got {shape}.")
    if hidden_states.shape[1] != in_channels:
        raise ValueError(f"`hidden_states` has {hidden_states.shape[1]} channels, the model expects {in_channels}.")
    for size, patch, name in zip(hidden_states.shape[2:], patch_size, ("frames", "height", "width")):
        if size % patch != 0:
            raise ValueError(f"`hidden_states` {name}={size} is not divisible by the patch size {patch}.")


def prepare_text_mask(encoder_attention_mask: torch.Tensor | None, batch: int, seq_len: int, device) -> torch.Tensor:
    """Boolean (B, S) mask that always keeps at least one token, so attention never sees an empty row."""
    if encoder_attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    mask = encoder_attention_mask.to(device=device).bool()
    if mask.shape != (batch, seq_len):
        raise ValueError(
            f"`encoder_attention_mask` must have shape (batch, seq_len)=({batch}, {seq_len}), got {tuple(mask.shape)}."
        )
    empty = ~mask.any(dim=1)
    if empty.any():
        mask = mask.clone()
        mask[empty, 0] = True
    return mask


def register_cache_blocks(model: torch.nn.Module) -> None:
    """Tells diffusers' cache hooks (first-block cache, MagCache, ...) how the model's blocks are called.

    Every chronos-video block takes `hidden_states` first and returns the new hidden states alone (text
    tokens are an input, not a stream the block updates), as LTX's and Wan's blocks do. Registering on
    first use keeps `import chronos_video` from importing every diffusers transformer the registry knows.
    """
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    for block in model.blocks:
        if type(block) not in TransformerBlockRegistry._registry:
            TransformerBlockRegistry.register(type(block), TransformerBlockMetadata(return_hidden_states_index=0))


def run_checkpointed(module: torch.nn.Module, blocks, hidden_states: torch.Tensor, *block_args) -> torch.Tensor:
    """Runs `blocks` in order on `hidden_states`, each through `module`'s gradient checkpointing when that is
    on (diffusers' `enable_gradient_checkpointing`) and gradients are enabled."""
    for block in blocks:
        if torch.is_grad_enabled() and module.gradient_checkpointing:
            hidden_states = module._gradient_checkpointing_func(block, hidden_states, *block_args)
        else:
            hidden_states = block(hidden_states, *block_args)
    return hidden_states


class VideoBackboneMixin(CacheMixin, AttentionMixin):
    """Shared forward of the chronos-video velocity backbones (listed first among the bases so its
    `forward` is the model's).

    A backbone builds its modules with `_init_embeddings` and `_init_head` around its own `blocks`,
    and says in `block_inputs` what its blocks need besides the tokens (RoPE for Nano-Sora, the scan
    route for Chronos-V). Blocks are called `block(hidden_states, conditioning, text_tokens, text_mask,
    extra)` and return the new hidden states, which is what diffusers' cache hooks expect. With
    diffusers' `CacheMixin` and `AttentionMixin`, as LTX and Wan have: `enable_cache`, `cache_context`,
    `attn_processors`, `set_attn_processor`.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embed", "norm", "time_embed"]

    def _init_embeddings(self, config) -> None:
        """Tubelet, timestep, text and (optional) per-frame conditioning embeddings, from the model config."""
        check_absolute_pos_embed(config.absolute_pos_embed, config.hidden_size)
        check_prediction_type(config.prediction_type)
        self.patch_size = _as_triple(config.patch_size, "patch_size")
        self.out_channels = config.out_channels or config.in_channels
        if config.input_skip and self.out_channels != config.in_channels:
            raise ValueError("`input_skip` needs `out_channels` == `in_channels`.")
        self.patch_embed = TubeletEmbed(config.in_channels, config.hidden_size, self.patch_size)
        self.time_embed = TimestepConditioning(config.hidden_size)
        self.text_embed = TextConditioning(config.text_embed_dim, config.hidden_size, config.text_pooling)
        self.frame_embed = FrameConditioning(config.hidden_size) if config.frame_conditioning else None

    def _init_head(self, config) -> None:
        """The zero-initialised output head and the optional input skip."""
        self.final_layer = AdaLNFinalLayer(config.hidden_size, self.patch_size, self.out_channels)
        self.skip_scale = InputSkip(config.hidden_size, config.in_channels) if config.input_skip else None
        self.gradient_checkpointing = False

    def block_inputs(self, hidden_states: torch.Tensor, timestep: torch.Tensor, grid: tuple[int, int, int], text_mask: torch.Tensor):
        """What every block receives after (tokens, conditioning, text_tokens, text_mask)."""
        raise NotImplementedError

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predicts the flow velocity (noise - x0) of `hidden_states` (B, C, F, H, W) at `timestep` (0..1000)."""
        tokens, grid, timestep, conditioning, text_tokens, text_mask = self.embed_inputs(
            hidden_states, timestep, encoder_hidden_states, encoder_attention_mask
        )
        extra = self.block_inputs(hidden_states, timestep, grid, text_mask)
        tokens = self.run_blocks(tokens, conditioning, text_tokens, text_mask, extra)
        return self.velocity_output(tokens, grid, conditioning, hidden_states, timestep, return_dict)

    def enable_cache(self, config) -> None:
        """diffusers' `CacheMixin.enable_cache` (FirstBlockCache, TaylorSeer, MagCache, PAB, ...), blocks registered first."""
        register_cache_blocks(self)
        super().enable_cache(config)

    def embed_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        """Validates the inputs; returns (tokens, grid, timestep (B,), conditioning, text_tokens, text_mask)."""
        check_video_input(hidden_states, self.config.in_channels, self.patch_size)
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim != 3:
            raise ValueError("`encoder_hidden_states` must be a tensor of shape (batch, seq_len, text_embed_dim).")
        batch = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)
        tokens, grid = self.patch_embed(hidden_states)
        if self.config.get("absolute_pos_embed", False):
            tokens = tokens + sincos_position_embedding(grid, tokens.shape[-1], tokens.device, tokens.dtype)
        text_mask = prepare_text_mask(encoder_attention_mask, batch, encoder_hidden_states.shape[1], tokens.device)
        text_tokens, pooled_text = self.text_embed(encoder_hidden_states.to(tokens.dtype), text_mask)
        conditioning = self.time_embed(timestep, tokens.dtype) + pooled_text
        if getattr(self, "frame_embed", None) is not None:
            tokens = self.frame_embed(tokens, grid, conditioning)
        return tokens, grid, timestep, conditioning, text_tokens, text_mask

    def run_blocks(self, tokens: torch.Tensor, *block_args) -> torch.Tensor:
        return run_checkpointed(self, self.blocks, tokens, *block_args)

    def velocity_output(self, tokens, grid, conditioning, hidden_states, timestep, return_dict: bool):
        """The head's output as a velocity: directly, or converted from a clean-sample prediction."""
        output = unpatchify(self.final_layer(tokens, conditioning), grid, self.patch_size, self.out_channels)
        if self.skip_scale is not None:
            output = self.skip_scale(output, hidden_states, conditioning)
        if self.config.get("prediction_type", "velocity") == "sample":
            output = sample_to_velocity(output, hidden_states, timestep)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
