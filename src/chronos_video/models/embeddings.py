"""Building blocks shared by every chronos-video backbone.

Tubelet patchification, 3D rotary positions, the timestep/text conditioning vector and
AdaLN-Zero modulation live here once; each model family imports them instead of re-implementing.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_1d_sincos_pos_embed_from_grid, get_3d_sincos_pos_embed


def _as_triple(value: int | tuple[int, int, int] | list[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v < 1 for v in value):
        raise ValueError(f"`{name}` must be a positive int or three positive ints (t, h, w), got {value}.")
    return value


class TubeletEmbed(nn.Module):
    """Cuts a video into non-overlapping (t, h, w) tubelets and projects each to a token.

    A strided Conv3d is exactly a linear map per tubelet, so spacetime is tokenised jointly
    rather than frame by frame.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = _as_triple(patch_size, "patch_size")
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        tokens = self.proj(video)  # (B, D, F', H', W')
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int], channels: int):
    """Inverse of tubelet patchification: (B, F'H'W', pt*ph*pw*C) -> (B, C, F, H, W)."""
    batch = tokens.shape[0]
    gf, gh, gw = grid
    pt, ph, pw = patch_size
    video = tokens.reshape(batch, gf, gh, gw, pt, ph, pw, channels)
    video = video.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return video.reshape(batch, channels, gf * pt, gh * ph, gw * pw)


def rope_axes_dims(dim: int) -> tuple[int, int, int]:
    """Splits an even rotary dimension over (time, height, width), each share even.

    Height and width get equal shares; time takes the remainder, so it is never starved.
    """
    if dim % 2 != 0 or dim < 6:
        raise ValueError(f"3D RoPE needs an even dimension >= 6, got {dim}.")
    spatial = 2 * (dim // 6)
    return dim - 2 * spatial, spatial, spatial


def rope_angles_3d(
    grid: tuple[int, int, int],
    dim: int,
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotation angles (L, dim // 2) of every token of a (F', H', W') grid, raster (t, h, w) order.

    Each axis owns a slice of the frequency pairs, so a rotation by these angles makes the dot
    product of two tokens depend on their relative (Δt, Δh, Δw) offset only.
    """
    axes = rope_axes_dims(dim)
    per_axis = []
    for size, axis_dim in zip(grid, axes):
        freqs = theta ** (-torch.arange(0, axis_dim, 2, device=device, dtype=torch.float64) / axis_dim)
        positions = torch.arange(size, device=device, dtype=torch.float64)
        per_axis.append(torch.outer(positions, freqs))  # (size, axis_dim / 2)
    gf, gh, gw = grid
    angles_t = per_axis[0][:, None, None, :].expand(gf, gh, gw, -1)
    angles_h = per_axis[1][None, :, None, :].expand(gf, gh, gw, -1)
    angles_w = per_axis[2][None, None, :, :].expand(gf, gh, gw, -1)
    return torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(gf * gh * gw, dim // 2).float()


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive pairs of the last dim of `x` (..., L, dim) by `angles` (L, dim // 2).

    Attention uses diffusers' `apply_rotary_emb` (same result); the Chronos-V mixer needs this one
    because its angles differ per batch row (gathered tokens), which `apply_rotary_emb` cannot broadcast.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos(), angles.sin()
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 0] * sin + pairs[..., 1] * cos
    return torch.stack((real, imag), dim=-1).flatten(-2).to(x.dtype)


def sincos_position_embedding(grid: tuple[int, int, int], dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 3D sin-cos embedding (L, dim) of a (F', H', W') token grid in raster (t, h, w) order.

    RoPE only tells attention the *relative* offset of two tokens; on a clip whose layout depends on
    absolute place and time (an object moving left to right starts on the left, in frame 0) the model
    also needs to know where and when a token is. diffusers' CogVideoX embedding provides that.
    """
    return _sincos_table(tuple(grid), dim).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _sincos_table(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Computed once per grid and width: the sampling loop asks for the same table at every step."""
    frames, height, width = grid
    return get_3d_sincos_pos_embed(dim, (width, height), frames, output_type="pt").reshape(frames * height * width, dim)


def check_absolute_pos_embed(absolute_pos_embed: bool, hidden_size: int) -> None:
    if absolute_pos_embed and hidden_size % 16 != 0:
        raise ValueError(f"`absolute_pos_embed` needs `hidden_size` divisible by 16, got {hidden_size}.")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence axis of (B, S, D) that ignores padding."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


TEXT_POOLING_MODES: tuple[str, ...] = ("mean", "last")


def check_text_pooling(text_pooling: str) -> None:
    if text_pooling not in TEXT_POOLING_MODES:
        raise ValueError(f"`text_pooling` must be one of {list(TEXT_POOLING_MODES)}, got {text_pooling!r}.")


def pool_text_states(tokens: torch.Tensor, mask: torch.Tensor | None, text_pooling: str = "mean") -> torch.Tensor:
    """One vector per caption: the masked mean of the states, or the last non-padding state.

    "last" is CLIP's pooled output (the [EOS] state of a causal encoder, which has read every word
    in order); a mean of states, like cross-attention over a set of keys, is dominated by which
    words occur, so "left to right" and "right to left" look alike to it.
    """
    if text_pooling == "mean":
        return masked_mean(tokens, mask)
    if mask is None:
        return tokens[:, -1]
    last = mask.long().sum(dim=1).clamp_min(1) - 1
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


class TextConditioning(nn.Module):
    """Projects any text encoder's hidden states to the model width and pools them.

    Keeping the projection inside the backbone is what lets a user swap in any pretrained
    transformers encoder: only `text_embed_dim` has to match.
    """

    def __init__(self, text_embed_dim: int, hidden_size: int, text_pooling: str = "mean"):
        super().__init__()
        check_text_pooling(text_pooling)
        self.text_pooling = text_pooling
        # diffusers' PixArtAlphaTextProjection(act_fn="gelu_tanh") computes the same, but would rename the
        # shipped weights `proj.0`/`proj.2` to `linear_1`/`linear_2`.
        self.proj = nn.Sequential(nn.Linear(text_embed_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size))
        self.pooled = nn.Linear(hidden_size, hidden_size)

    def forward(self, encoder_hidden_states: torch.Tensor, mask: torch.Tensor | None):
        tokens = self.proj(encoder_hidden_states)
        return tokens, self.pooled(pool_text_states(tokens, mask, self.text_pooling))


@functools.lru_cache(maxsize=16)
def _frame_table(frames: int, dim: int) -> torch.Tensor:
    """Sin-cos features of the latent frame indices, computed once: every sampling step asks again."""
    return get_1d_sincos_pos_embed_from_grid(dim, torch.arange(frames, dtype=torch.float64), output_type="pt")


class FrameConditioning(nn.Module):
    """Adds to every token a learned function of (conditioning vector, the token's latent frame index).

    Where an object is at frame t depends on the prompt *and* t ("left to right": left early, right
    late). With one conditioning vector for the whole clip the backbone must learn that as a
    three-way product of text, time and place, and on the shapes data it does not within thousands
    of steps, while colour and size (text times place) come quickly. This MLP sees the text and the
    frame index together, so each frame's tokens start from "what this prompt wants at this time"
    and only the text-time-place step remains two-way. The last layer is zero-initialised, so a model
    starts exactly as it would without it.
    """

    def __init__(self, hidden_size: int, frequency_dim: int = 32):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(hidden_size + frequency_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int], conditioning: torch.Tensor) -> torch.Tensor:
        frames = grid[0]
        frame_features = _frame_table(frames, self.frequency_dim).to(device=tokens.device, dtype=conditioning.dtype)
        batch = conditioning.shape[0]
        inputs = torch.cat([conditioning[:, None].expand(batch, frames, -1), frame_features[None].expand(batch, -1, -1)], dim=-1)
        per_frame = self.mlp(inputs).to(tokens.dtype)  # (B, F', D)
        return (tokens.view(batch, frames, -1, tokens.shape[-1]) + per_frame[:, :, None]).view_as(tokens)


class TimestepConditioning(nn.Module):
    """Sinusoidal timestep features followed by an MLP (diffusers' own modules)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(frequency_dim, hidden_size)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embedding(self.time_proj(timestep).to(dtype))


class AdaLNZero(nn.Module):
    """Produces `num_chunks` modulation vectors from the conditioning vector.

    Zero-initialised so every residual branch starts as the identity (DiT's AdaLN-Zero): the
    network begins as a no-op and learns how much each block should contribute.
    """

    def __init__(self, hidden_size: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(hidden_size, num_chunks * hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(conditioning)).unsqueeze(1).chunk(self.num_chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNFinalLayer(nn.Module):
    """Modulated norm + linear head mapping tokens back to tubelet pixels, zero-initialised.

    Not diffusers' `AdaLayerNormContinuous`: that one chunks its projection as (scale, shift), ours as
    (shift, scale) like every AdaLN-Zero block here, and it is not zero-initialised; adopting it would
    permute the shipped weights.
    """

    def __init__(self, hidden_size: int, patch_size: tuple[int, int, int], out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = AdaLNZero(hidden_size, 2)
        self.proj_out = nn.Linear(hidden_size, math.prod(patch_size) * out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(conditioning)
        return self.proj_out(modulate(self.norm(x), shift, scale))


class InputSkip(nn.Linear):
    """Adds a timestep/text-dependent per-channel multiple of the input to the predicted velocity.

    In pixel space the velocity contains the input noise itself (v = eps - x0, and z = eps at
    sigma = 1); the skip carries it directly instead of through the tubelet bottleneck. The
    linear map is zero-initialised, so a model starts exactly as it would without the skip.
    """

    def __init__(self, hidden_size: int, channels: int):
        super().__init__(hidden_size, channels)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, output: torch.Tensor, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        return output + super().forward(conditioning)[:, :, None, None, None] * hidden_states


PREDICTION_TYPES: tuple[str, ...] = ("velocity", "sample")
# Smallest sigma the sample-to-velocity conversion divides by (JiT clamps the same way).
SAMPLE_PREDICTION_MIN_SIGMA = 0.05


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}.")


def sample_to_velocity(sample: torch.Tensor, noisy: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """v = (z - x0) / sigma with sigma = timestep / 1000, clamped away from zero, computed in float32.

    A backbone that predicts the clean sample (JiT) still returns a velocity, so the sampler, the
    training loss (on v), the swap gap, calibration and constraint transport need no branch.
    """
    sigma = (timestep.float() / 1000.0).clamp_min(SAMPLE_PREDICTION_MIN_SIGMA).view(-1, *([1] * (noisy.ndim - 1)))
    return ((noisy.float() - sample.float()) / sigma).to(noisy.dtype)
