"""One-level orthonormal 2D Haar transform and per-patch detail energy of videos.

The high bands of a Haar transform are zero wherever a frame is locally constant, so their mean
magnitude is a cheap, parameter-free measure of how much spatial detail a region carries. Chronos-V
uses it per tubelet to decide which tokens may skip the sequence mixer; the precision gauges and
evaluation code can reuse the same helpers on any (..., H, W) tensor.

Conventions: the transform is orthonormal (coefficients are sums/differences of 2x2 blocks divided
by 2), so i.i.d. unit Gaussian noise gives unit Gaussian coefficients in every band, whose mean
magnitude is sqrt(2/pi) (`GAUSSIAN_DETAIL_ENERGY`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "GAUSSIAN_DETAIL_ENERGY",
    "haar_detail_magnitude",
    "haar_dwt2d",
    "haar_idwt2d",
    "patch_detail_energy",
]

# E|z| for z ~ N(0, 1): the expected detail energy of unit-variance white noise under the orthonormal Haar transform.
GAUSSIAN_DETAIL_ENERGY = math.sqrt(2.0 / math.pi)


def _check_spatial(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(f"`{name}` needs at least two dims (..., height, width), got shape {tuple(x.shape)}.")
    if not (x.is_floating_point()):
        raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}.")


def haar_dwt2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the orthonormal Haar transform over the last two dims.

    Args:
        x: (..., H, W) with even H and W.
    Returns:
        (LL, LH, HL, HH), each (..., H/2, W/2): the local average, the detail across rows (changes
        along H), across columns (changes along W) and the diagonal detail.
    """
    _check_spatial(x, "x")
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"`x` must have even height and width for the Haar transform, got {height}x{width}.")
    top_left, top_right = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    bottom_left, bottom_right = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    low = (top_left + top_right + bottom_left + bottom_right) / 2
    across_rows = (top_left + top_right - bottom_left - bottom_right) / 2
    across_cols = (top_left - top_right + bottom_left - bottom_right) / 2
    diagonal = (top_left - top_right - bottom_left + bottom_right) / 2
    return low, across_rows, across_cols, diagonal


def haar_idwt2d(low: torch.Tensor, across_rows: torch.Tensor, across_cols: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt2d` (perfect reconstruction: the transform is orthonormal)."""
    for name, band in (("low", low), ("across_rows", across_rows), ("across_cols", across_cols), ("diagonal", diagonal)):
        _check_spatial(band, name)
        if band.shape != low.shape:
            raise ValueError(f"`{name}` has shape {tuple(band.shape)}, expected the shape of `low` {tuple(low.shape)}.")
    top_left = (low + across_rows + across_cols + diagonal) / 2
    top_right = (low + across_rows - across_cols - diagonal) / 2
    bottom_left = (low - across_rows + across_cols - diagonal) / 2
    bottom_right = (low - across_rows - across_cols + diagonal) / 2
    top = torch.stack((top_left, top_right), dim=-1).flatten(-2)  # interleave columns
    bottom = torch.stack((bottom_left, bottom_right), dim=-1).flatten(-2)
    return torch.stack((top, bottom), dim=-2).flatten(-3, -2)  # interleave rows


def haar_detail_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel detail map (..., H, W): mean |LH|, |HL|, |HH| of the 2x2 Haar block each pixel belongs to.

    Odd sizes are handled by replicate padding (which adds no detail) and cropping back, so the map
    lines up pixel for pixel with `x` and can be pooled over any patch grid.
    """
    _check_spatial(x, "x")
    height, width = x.shape[-2:]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        lead = x.shape[:-2]
        x = F.pad(x.reshape(-1, 1, height, width), (0, pad_w, 0, pad_h), mode="replicate").reshape(*lead, height + pad_h, width + pad_w)
    _, across_rows, across_cols, diagonal = haar_dwt2d(x)
    detail = (across_rows.abs() + across_cols.abs() + diagonal.abs()) / 3
    detail = detail.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return detail[..., :height, :width]


def patch_detail_energy(video: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Information energy E of every (t, h, w) tubelet of a video: mean |Haar detail| per patch.

    The 2D transform runs on every frame; E averages the three detail bands over channels, the
    patch's frames and its pixels (with even patch sides this is exactly the mean over the Haar
    coefficients inside the patch). A locally constant patch has E = 0.

    Args:
        video: (B, C, F, H, W), F/H/W divisible by `patch_size`.
        patch_size: tubelet size (t, h, w).
    Returns:
        (B, F/t, H/h, W/w), in the raster order of `TubeletEmbed` once flattened.
    """
    if not isinstance(video, torch.Tensor) or video.ndim != 5:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"`video` must be a 5D tensor (batch, channels, frames, height, width), got {shape}.")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or any(p < 1 for p in patch_size):
        raise ValueError(f"`patch_size` must be three positive ints (t, h, w), got {patch_size}.")
    for size, patch, name in zip(video.shape[2:], patch_size, ("frames", "height", "width")):
        if size % patch:
            raise ValueError(f"`video` {name}={size} is not divisible by the patch size {patch}.")
    detail = haar_detail_magnitude(video.float()).mean(dim=1, keepdim=True)  # (B, 1, F, H, W)
    return F.avg_pool3d(detail, kernel_size=patch_size, stride=patch_size).squeeze(1)
