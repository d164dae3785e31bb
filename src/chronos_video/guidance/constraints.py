"""Region constraints on decoded video.

A constraint says "the decoded frames must match ``target`` on the region ``mask`` to within an
RMS tolerance ``epsilon``". It is evaluated on pixels in ``[0, 1]`` laid out ``(B, F, C, H, W)``,
so the same constraint works for pixel-space and latent-space pipelines: only the decoder
(:class:`~chronos_video.decoding.LatentDecoder`) differs.

Normalisation used everywhere (natural gradient, CBF, projection, reports)::

    residual  r = D(x0)|Ω - g                       (one value per constrained element)
    violation   = sqrt(mean_Ω r²)                   (RMS error over Ω)
    barrier   h = ε² - mean_Ω r²                    (h >= 0  <=>  violation <= ε)

so ``epsilon`` is an RMS tolerance in pixel units, independent of the size of Ω.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..decoding import LatentDecoder


def _check_positive_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"`{name}` must be a positive finite number, got {value}.")
    return value


class RegionConstraint:
    """Pixel constraint ``D(x̂0)|Ω ≈ g`` on a video of shape ``(F, C, H, W)``.

    Args:
        target: float tensor ``(F, C, H, W)`` with values in ``[0, 1]``; only the masked entries are used.
        mask: boolean tensor, same shape as ``target`` (a mask broadcastable to it, e.g. ``(F, 1, H, W)``,
            is expanded). Keyframes are whole frames, regions are boxes or arbitrary masks.
        epsilon: RMS tolerance over Ω in pixel units (``violation <= epsilon`` means satisfied).
        strength: relative weight of this constraint when several are stacked in one least-squares problem.
    """

    def __init__(
        self, target: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.05, strength: float = 1.0
    ) -> None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"`target` must be a torch.Tensor of shape (F, C, H, W), got {type(target).__name__}.")
        if target.ndim != 4:
            raise ValueError(f"`target` must have shape (F, C, H, W), got a {target.ndim}-D tensor {tuple(target.shape)}.")
        if not target.is_floating_point():
            raise ValueError(f"`target` must be a floating-point tensor with values in [0, 1], got dtype {target.dtype}.")
        if not bool(torch.isfinite(target).all()):
            raise ValueError("`target` contains NaN or infinite values.")
        if target.numel() == 0:
            raise ValueError(f"`target` is empty (shape {tuple(target.shape)}).")
        lo, hi = float(target.min()), float(target.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"`target` values must lie in [0, 1] (pixel range), got min {lo:.4g} and max {hi:.4g}.")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"`mask` must be a boolean torch.Tensor, got {type(mask).__name__}.")
        if mask.dtype != torch.bool:
            raise ValueError(f"`mask` must have dtype torch.bool, got {mask.dtype}.")
        try:
            mask = torch.broadcast_to(mask, target.shape)
        except RuntimeError:
            raise ValueError(
                f"`mask` of shape {tuple(mask.shape)} does not match (or broadcast to) `target` shape {tuple(target.shape)}."
            ) from None
        if not bool(mask.any()):
            raise ValueError("`mask` is empty: a constraint needs at least one constrained element.")
        self.target = target.detach()
        self.mask = mask.to(target.device).contiguous()
        self.epsilon = _check_positive_finite(epsilon, "epsilon")
        self.strength = _check_positive_finite(strength, "strength")
        self._flat_cache: tuple | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def keyframes(
        cls,
        frames: torch.Tensor,
        frame_indices: Sequence[int] | int,
        num_frames: int | None = None,
        epsilon: float = 0.05,
        strength: float = 1.0,
    ) -> "RegionConstraint":
        """Constrain whole frames.

        ``frames`` is either the full video ``(F, C, H, W)`` (frames not listed are ignored), or, when
        ``num_frames`` is given, just the keyframes ``(len(frame_indices), C, H, W)`` placed at
        ``frame_indices`` of a ``num_frames``-long video. Negative indices count from the end.
        """
        if isinstance(frame_indices, int):
            frame_indices = [frame_indices]
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
            raise ValueError("`frames` must be a tensor of shape (F, C, H, W).")
        indices = [int(i) for i in frame_indices]
        if not indices:
            raise ValueError("`frame_indices` must name at least one frame.")
        total = frames.shape[0] if num_frames is None else int(num_frames)
        if num_frames is not None and frames.shape[0] != len(indices):
            raise ValueError(
                f"With `num_frames` given, `frames` must hold one frame per index: got {frames.shape[0]} frames "
                f"for {len(indices)} indices."
            )
        resolved = [i + total if i < 0 else i for i in indices]
        bad = [i for i, r in zip(indices, resolved) if not 0 <= r < total]
        if bad:
            raise ValueError(f"`frame_indices` {bad} are out of range for a video of {total} frames.")
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"`frame_indices` contains duplicates after resolving negatives: {resolved}.")
        if num_frames is None:
            target = frames
        else:
            target = frames.new_zeros((total, *frames.shape[1:]))
            target[resolved] = frames
        mask = torch.zeros(target.shape, dtype=torch.bool, device=target.device)
        mask[resolved] = True
        return cls(target, mask, epsilon=epsilon, strength=strength)

    @classmethod
    def box(
        cls,
        video: torch.Tensor,
        top: int,
        left: int,
        height: int,
        width: int,
        frame_indices: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        epsilon: float = 0.05,
        strength: float = 1.0,
    ) -> "RegionConstraint":
        """Constrain the rectangle ``[top:top+height, left:left+width]`` of ``video`` (F, C, H, W) on the
        given frames (all when ``None``) and channels (all when ``None``)."""
        if not isinstance(video, torch.Tensor) or video.ndim != 4:
            raise ValueError("`video` must be a tensor of shape (F, C, H, W).")
        num_f, num_c, full_h, full_w = video.shape
        for name, val in (("top", top), ("left", left), ("height", height), ("width", width)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"`{name}` must be an int, got {type(val).__name__}.")
        if height <= 0 or width <= 0:
            raise ValueError(f"Box `height` and `width` must be positive, got {height}x{width}.")
        if top < 0 or left < 0 or top + height > full_h or left + width > full_w:
            raise ValueError(
                f"Box (top={top}, left={left}, height={height}, width={width}) lies outside the {full_h}x{full_w} frame."
            )
        requested = list(range(num_f)) if frame_indices is None else [int(i) for i in frame_indices]
        if not requested or any(not -num_f <= i < num_f for i in requested):
            raise ValueError(f"`frame_indices` {frame_indices} must be non-empty and within [-{num_f}, {num_f}).")
        frames = sorted({i % num_f for i in requested})
        chans = list(range(num_c)) if channels is None else list(channels)
        if not chans or any(not 0 <= c < num_c for c in chans):
            raise ValueError(f"`channels` {channels} must be non-empty and within [0, {num_c}).")
        mask = torch.zeros(video.shape, dtype=torch.bool, device=video.device)
        f_idx = torch.tensor(frames, device=video.device)[:, None]
        c_idx = torch.tensor(chans, device=video.device)[None, :]
        mask[f_idx, c_idx, top : top + height, left : left + width] = True
        return cls(video, mask, epsilon=epsilon, strength=strength)

    # ------------------------------------------------------------------ evaluation
    def _flat(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Constant flat indices of Ω and the target values there. Integer gathers (not boolean masks)
        keep the residual traceable by ``torch.func.linearize``."""
        key = (device, dtype)
        if self._flat_cache is None or self._flat_cache[0] != key:
            index = self.mask.flatten().nonzero().squeeze(1).to(device)
            values = self.target.flatten().to(device=device, dtype=dtype).index_select(0, index)
            self._flat_cache = (key, index, values)
        return self._flat_cache[1], self._flat_cache[2]

    @property
    def num_elements(self) -> int:
        """|Ω|: number of constrained scalars per sample."""
        return int(self.mask.sum())

    @property
    def shape(self) -> torch.Size:
        return self.target.shape

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 5 or pixels.shape[1:] != self.target.shape:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(
                f"Decoded pixels must have shape (B, {', '.join(map(str, self.target.shape))}) = (B, F, C, H, W) "
                f"to match the constraint target; got {got}. Check the decoder's output layout."
            )

    def residual(self, pixels: torch.Tensor) -> torch.Tensor:
        """``D(x̂0)|Ω - g`` as a ``(B, |Ω|)`` tensor (differentiable in ``pixels``)."""
        self._check_pixels(pixels)
        index, values = self._flat(pixels.device, pixels.dtype)
        return pixels.flatten(1).index_select(1, index) - values

    def violation(self, pixels: torch.Tensor) -> torch.Tensor:
        """RMS error over Ω per sample, shape ``(B,)``."""
        return self.residual(pixels).pow(2).mean(dim=1).sqrt()

    def barrier(self, pixels: torch.Tensor) -> torch.Tensor:
        """Control-barrier value ``h = ε² - mean_Ω r²`` per sample; ``h >= 0`` iff satisfied."""
        return self.epsilon**2 - self.residual(pixels).pow(2).mean(dim=1)

    def is_satisfied(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.violation(pixels) <= self.epsilon

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RegionConstraint":
        """Move the target (and mask) in place; returns ``self`` for chaining."""
        self.target = self.target.to(device=device, dtype=dtype)
        self.mask = self.mask.to(device=device)
        self._flat_cache = None
        return self

    def __repr__(self) -> str:
        return (
            f"RegionConstraint(shape={tuple(self.target.shape)}, |Ω|={self.num_elements}, "
            f"epsilon={self.epsilon}, strength={self.strength})"
        )


# ---------------------------------------------------------------------- decoders
# One decoder (chronos_video.decoding.LatentDecoder) serves the pipelines and the transport; the names
# below are its earlier spellings, kept so existing imports and calls keep working.
PixelDecoder = LatentDecoder
VAEDecoder = LatentDecoder


def identity_pixel_decoder() -> LatentDecoder:
    """Decoder for pixel-space pipelines (``vae=None``): latents are the video in ``[-1, 1]``."""
    return LatentDecoder()


def vae_decoder(vae: Any, **overrides: Any) -> LatentDecoder:
    """Wrap a diffusers video VAE as a ``decode(latents) -> pixels`` callable with scaling handled
    from its config (``overrides`` may set ``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std``)."""
    if vae is None:
        raise TypeError("`vae` must be a diffusers autoencoder; use identity_pixel_decoder() for pixel space.")
    return LatentDecoder(vae, **overrides)
