"""The one map from latents to pixels, shared by the pipelines and the constraint transport.

A pipeline returns ``postprocess_video(decoder.decode(z))`` and a constraint is judged on ``decoder(z)``.
Both come from the same :meth:`LatentDecoder.decoder_output` (latent denormalisation, VAE decode), so the
video a user gets and the pixels the constraint was checked on cannot drift apart:

* :meth:`LatentDecoder.decode`: video ``(B, C, F, H, W)`` in ``[-1, 1]`` (clamped), the diffusers
  ``decode_latents`` contract that ``VideoProcessor.postprocess_video`` expects.
* ``LatentDecoder.__call__``: the constraint space, pixels ``(B, F, C, H, W)`` mapped to ``[0, 1]`` with the
  same ``x * 0.5 + 0.5`` as diffusers' ``VaeImageProcessor.denormalize`` but not clamped, so gradients stay
  informative outside the displayable range.

So the returned ``"pt"`` video is exactly ``decoder(z).clamp(0, 1)``. Constraint targets lie in ``[0, 1]``,
and clamping to that box never moves a pixel away from them: the returned video is at least as close to every
target as the pixels the constraint was checked on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _config_value(vae: Any, key: str) -> Any:
    config = getattr(vae, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def default_latent_mask(mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """Map a pixel mask ``(F, C, H, W)`` to a latent mask ``(C', F', H', W')``.

    A latent cell counts as known only if every pixel it covers (by area resampling, over all colour
    channels) is constrained; that is conservative for VAEs whose cells mix neighbouring pixels.
    """
    c_lat, f_lat, h_lat, w_lat = latent_shape
    covered = mask.all(dim=1).float()[None, None]  # (1, 1, F, H, W)
    coverage = F.interpolate(covered, size=(f_lat, h_lat, w_lat), mode="area")[0, 0]
    return (coverage >= 1.0 - 1e-6)[None].expand(c_lat, f_lat, h_lat, w_lat)


class LatentDecoder:
    """Latents ``(B, C, F, H, W)`` to pixels, for pixel-space pipelines (``vae=None``) and any diffusers video
    autoencoder (``AutoencoderKLWan``, ``AutoencoderKLLTXVideo``, ``AutoencoderKLCogVideoX``,
    ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLMochi``, ...).

    Pipelines keep latents normalised. The raw VAE latent is ``z · std / scaling_factor + mean`` when the VAE
    has per-channel ``latents_mean``/``latents_std`` (in its config as Wan and Mochi, or as buffers as LTX)
    and ``z / scaling_factor + shift_factor`` otherwise, as the diffusers pipelines of those VAEs do. In pixel
    space the latents are the video in ``[-1, 1]``; the map is then linear with an exact inverse.

    Args:
        vae: a diffusers autoencoder with ``decode`` (and ``encode`` for :meth:`encode`), or ``None``.
        scaling_factor, shift_factor, latents_mean, latents_std: override the values read from the VAE.
    """

    def __init__(
        self,
        vae: Any = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | torch.Tensor | None = None,
        latents_std: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        overrides = (scaling_factor, shift_factor, latents_mean, latents_std)
        if vae is None:
            if any(value is not None for value in overrides):
                raise ValueError("Latent scaling overrides need a `vae`; pixel-space latents are the video itself.")
        elif not callable(getattr(vae, "decode", None)):
            raise TypeError(f"`vae` must have a `decode` method (a diffusers autoencoder), got {type(vae).__name__}.")
        self.vae = vae
        scale = scaling_factor if scaling_factor is not None else _config_value(vae, "scaling_factor")
        self.scaling_factor = float(scale) if scale is not None else 1.0
        if self.scaling_factor == 0.0:
            raise ValueError("`scaling_factor` must be non-zero.")
        shift = shift_factor if shift_factor is not None else _config_value(vae, "shift_factor")
        self.shift_factor = float(shift) if shift is not None else 0.0
        mean = latents_mean if latents_mean is not None else _config_value(vae, "latents_mean")
        std = latents_std if latents_std is not None else _config_value(vae, "latents_std")
        if mean is None and std is None and isinstance(getattr(vae, "latents_mean", None), torch.Tensor):
            mean, std = vae.latents_mean, vae.latents_std  # LTX keeps them as buffers
        if (mean is None) != (std is None):
            raise ValueError("`latents_mean` and `latents_std` must be given together.")
        self.latents_mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).detach().flatten()
        self.latents_std = None if std is None else torch.as_tensor(std, dtype=torch.float32).detach().flatten()

    # ------------------------------------------------------------------ latent normalisation
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1, 1, 1, 1)
        return (
            self.latents_mean.to(like.device, like.dtype).view(view),
            self.latents_std.to(like.device, like.dtype).view(view),
        )

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Pipeline latents -> the VAE's raw latents (identity in pixel space)."""
        if self.vae is None:
            return latents
        if self.latents_mean is not None:
            mean, std = self._stats(latents)
            return latents * std / self.scaling_factor + mean
        return latents / self.scaling_factor + self.shift_factor

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`denormalize`."""
        if self.vae is None:
            return raw
        if self.latents_mean is not None:
            mean, std = self._stats(raw)
            return (raw - mean) * self.scaling_factor / std
        return (raw - self.shift_factor) * self.scaling_factor

    def _vae_dtype(self, fallback: torch.dtype) -> torch.dtype:
        return getattr(self.vae, "dtype", fallback)

    # ------------------------------------------------------------------ decoding
    def decoder_output(self, latents: torch.Tensor) -> torch.Tensor:
        """Unclamped video ``(B, C, F, H, W)`` in the decoder's ``[-1, 1]`` range, at least float32.

        Denormalisation runs in the latents' dtype, then the VAE runs in its own dtype; a half-precision VAE
        output is promoted so that the returned video and the constraint see the same float32 values.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must have shape (B, C, F, H, W), got {got}.")
        if self.vae is None:
            out = latents
        else:
            raw = self.denormalize(latents).to(self._vae_dtype(latents.dtype))
            out = self.vae.decode(raw, return_dict=False)[0]
        return out if out.dtype in (torch.float32, torch.float64) else out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video ``(B, C, F, H, W)`` float32 in ``[-1, 1]``: what a pipeline returns (via its video processor)."""
        return self.decoder_output(latents).float().clamp(-1, 1)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels ``(B, F, C, H, W)`` in ``[0, 1]`` (unclamped): the space constraints are stated in."""
        return self.decoder_output(latents).permute(0, 2, 1, 3, 4) * 0.5 + 0.5

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, F, C, H, W)`` in ``[0, 1]`` -> normalised latents (the posterior mode: deterministic)."""
        video = (pixels * 2.0 - 1.0).permute(0, 2, 1, 3, 4)
        if self.vae is None:
            return video
        if not callable(getattr(self.vae, "encode", None)):
            raise TypeError(f"{type(self.vae).__name__} has no `encode` method; this decoder cannot invert it.")
        encoded = self.vae.encode(video.to(self._vae_dtype(pixels.dtype)), return_dict=False)[0]
        raw = encoded.mode() if hasattr(encoded, "mode") else encoded
        return self.normalize(raw)

    def latent_mask(self, mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
        """Pixel mask ``(F, C, H, W)`` -> latent mask ``(C', F', H', W')`` of the cells a constraint fixes."""
        if self.vae is not None:
            return default_latent_mask(mask, latent_shape)
        lat = mask.permute(1, 0, 2, 3)
        if tuple(lat.shape) != tuple(latent_shape):
            raise ValueError(f"Pixel mask {tuple(mask.shape)} does not match latent shape {tuple(latent_shape)}.")
        return lat

    def __repr__(self) -> str:
        if self.vae is None:
            return "LatentDecoder(vae=None)"
        return f"LatentDecoder({type(self.vae).__name__}, scaling_factor={self.scaling_factor})"


def vae_compression(vae: torch.nn.Module | None) -> tuple[int, int]:
    """(temporal, spatial) compression of a diffusers video autoencoder; (1, 1) for None (pixel space).
    Latent training sizes its backbone with the same rule the pipeline samples with."""
    if vae is None:
        return 1, 1
    config = vae.config
    if "temperal_downsample" in config:  # Wan-style autoencoders
        return 2 ** sum(config.temperal_downsample), 2 ** len(config.temperal_downsample)
    # LTX-style autoencoders compute their ratios in __init__ and may store None in the config.
    temporal = getattr(vae, "temporal_compression_ratio", None) or config.get("temporal_compression_ratio") or 1
    spatial = getattr(vae, "spatial_compression_ratio", None) or config.get("spatial_compression_ratio")
    if spatial is None:
        spatial = 2 ** (len(config.get("block_out_channels", [0])) - 1)
    return int(temporal), int(spatial)
