"""FSQVideoTokenizer: frames to integer codes and back, for the autoregressive video LM.

Finite scalar quantisation (Mentzer et al., 2024) rounds each of a few latent channels to a fixed
number of levels; the code is the mixed-radix number of those levels, so the codebook is implicit,
cannot collapse and needs no commitment loss or codebook updates. The quantiser is diffusers'
`FSQRegularizer`; encoder and decoder are diffusers' `Encoder`/`Decoder` (the AutoencoderKL stacks),
applied frame by frame. Frames are tokenised independently (no temporal compression) so the LM's
sliding window can drop whole frames and generate past the training length.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_vidtok import FSQRegularizer
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["FSQVideoTokenizer"]


class FSQVideoTokenizer(ModelMixin, ConfigMixin):
    """Per-frame FSQ autoencoder for videos of shape (batch, channels, frames, height, width) in [-1, 1].

    Args:
        in_channels: colour channels.
        block_out_channels: widths of the encoder's down blocks (and, reversed, the decoder's up
            blocks); each block after the first halves the resolution, so the code grid is
            `height / 2**(len(block_out_channels) - 1)` by the same for width.
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups (must divide every width).
        levels: FSQ levels per latent channel; `prod(levels)` codes (e.g. [8, 5, 5, 5] = 1000).
        mid_block_add_attention: self-attention in the encoder/decoder mid blocks.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        levels: Sequence[int] = (8, 5, 5, 5),
        mid_block_add_attention: bool = False,
    ):
        super().__init__()
        if not levels or any(int(level) < 2 for level in levels):
            raise ValueError(f"`levels` must be a non-empty list of integers >= 2, got {list(levels)}.")
        if any(width % norm_num_groups for width in block_out_channels):
            raise ValueError(f"`norm_num_groups`={norm_num_groups} must divide every `block_out_channels` width {list(block_out_channels)}.")
        latent_channels = len(levels)
        num_blocks = len(block_out_channels)
        self.encoder = Encoder(
            in_channels=in_channels, out_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * num_blocks,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
            double_z=False, mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels, out_channels=in_channels, up_block_types=("UpDecoderBlock2D",) * num_blocks,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quantizer = FSQRegularizer(levels=[int(level) for level in levels])

    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def code_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of codes per frame for frames of `height` x `width` pixels."""
        ratio = self.spatial_compression_ratio
        if height % ratio or width % ratio:
            raise ValueError(f"`height` and `width` must be multiples of {ratio} for this tokenizer, got {height}x{width}.")
        return height // ratio, width // ratio

    def _frames(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"`video` must be (batch, {self.config.in_channels}, frames, height, width), got shape {tuple(video.shape)}.")
        self.code_grid(*video.shape[-2:])
        return video.transpose(1, 2).flatten(0, 1)  # (batch * frames, C, H, W)

    def quantize(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantised latents (B*F, levels, h, w) with a straight-through gradient, codes (B, F, h, w))."""
        batch, frames = video.shape[0], video.shape[2]
        latents = self.encoder(self._frames(video))
        quantized, indices = self.quantizer(latents.float())
        return quantized.to(latents.dtype), indices.long().reshape(batch, frames, *indices.shape[-2:])

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.LongTensor:
        """Integer codes (batch, frames, rows, columns) in [0, codebook_size)."""
        return self.quantize(video)[1]

    def decode(self, codes: torch.LongTensor) -> torch.Tensor:
        """Frames (batch, channels, frames, height, width) in about [-1, 1] from codes (batch, frames, rows, columns)."""
        if codes.ndim != 4:
            raise ValueError(f"`codes` must be (batch, frames, rows, columns), got shape {tuple(codes.shape)}.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"`codes` must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}].")
        batch, frames = codes.shape[:2]
        latents = self.quantizer.indices_to_codes(codes.flatten(0, 1))  # (B*F, levels, h, w)
        return self._decode_latents(latents.to(self.dtype), batch, frames)

    def _decode_latents(self, latents: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        pixels = self.decoder(latents)
        return pixels.reshape(batch, frames, *pixels.shape[1:]).transpose(1, 2)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """(reconstruction (B, C, F, H, W), codes (B, F, h, w)); gradients pass the rounding straight through."""
        quantized, codes = self.quantize(video)
        return self._decode_latents(quantized, video.shape[0], video.shape[2]), codes
