"""Per-sample information estimators of latents, used to gate precision gauges.

All estimators take a batch (B, ...) and return one value per sample (B,) in float32, so a
sampler can decide per step from the mean over the batch. The histogram and KDE estimators
treat the elements of a sample as draws from one scalar distribution (the H(z_t) of the `seed_entropy` gate);
the wavelet energy measures spatial detail instead.

Units: :func:`histogram_entropy` is the *discrete* Shannon entropy of the binned values (at
most log2(bins) bits; it depends on the bin count), or, with ``differential=True``, that
value plus log2(bin width), an estimate of the differential entropy. :func:`kde_entropy` is
a differential entropy. Both are in bits by default (``base=2``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from ..ops.wavelet import haar_dwt2d


def _flatten_batch(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be batched with shape (B, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    flat = x.detach().reshape(x.shape[0], -1).float()
    if flat.shape[1] == 0:
        raise ValueError(f"{name} has no elements per sample (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} contains NaN or inf; entropy is undefined")
    return flat


def _check_base(base: float) -> float:
    if not isinstance(base, (int, float)) or base <= 0 or base == 1:
        raise ValueError(f"base must be a positive number other than 1, got {base!r}")
    return math.log(base)


def histogram_entropy(
    x: torch.Tensor,
    bins: int = 256,
    *,
    value_range: Optional[tuple[float, float]] = None,
    differential: bool = False,
    base: float = 2.0,
) -> torch.Tensor:
    """Shannon entropy -sum p_i log p_i of a `bins`-bin histogram of each sample's values.

    Args:
        x: (B, ...) batch; each sample is histogrammed on its own.
        bins: number of equal-width bins.
        value_range: fixed (low, high) for every sample; default: each sample's own min/max,
            which makes the value scale-free (a constant sample has entropy 0).
        differential: add log(bin width) to estimate the differential entropy instead.
        base: logarithm base (2 = bits).
    Returns:
        (B,) float32 tensor.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    log_base = _check_base(base)
    flat = _flatten_batch(x)
    if value_range is None:
        low = flat.amin(dim=1, keepdim=True)
        high = flat.amax(dim=1, keepdim=True)
    else:
        if len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        low = torch.full((flat.shape[0], 1), float(value_range[0]), device=flat.device)
        high = torch.full((flat.shape[0], 1), float(value_range[1]), device=flat.device)
    width = (high - low) / bins
    safe_width = torch.where(width > 0, width, torch.ones_like(width))
    index = ((flat - low) / safe_width).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(flat.shape[0], bins, device=flat.device).scatter_add_(1, index, torch.ones_like(flat))
    probabilities = counts / counts.sum(dim=1, keepdim=True)
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=1) / log_base
    if differential:
        entropy = entropy + torch.log(safe_width.squeeze(1)) / log_base
    return entropy


def kde_entropy(
    x: torch.Tensor,
    num_samples: int = 1024,
    *,
    bandwidth: Optional[float] = None,
    base: float = 2.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Resubstitution estimate -mean_i log p_hat(v_i) of the differential entropy, where
    p_hat is a Gaussian kernel density fitted on `num_samples` values drawn from each sample.

    The bandwidth defaults to Silverman's rule (0.9 min(std, IQR/1.34) n^-1/5, per sample).
    The subsample is drawn without replacement from `generator` (a fixed seed by default), so
    the estimate is deterministic; it costs O(num_samples^2) per sample.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples!r}")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
    log_base = _check_base(base)
    flat = _flatten_batch(x)
    count = flat.shape[1]
    if count > num_samples:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        index = torch.randperm(count, generator=generator)[:num_samples].to(flat.device)
        values = flat[:, index]
    else:
        values = flat
    n = values.shape[1]
    if bandwidth is None:
        std = values.std(dim=1)
        quartiles = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device), dim=1)
        spread = torch.minimum(std, (quartiles[1] - quartiles[0]) / 1.34)
        spread = torch.where(spread > 0, spread, std)
        h = 0.9 * spread * n ** (-0.2)
        # A constant sample has no spread: any tiny bandwidth gives a (very negative) finite value.
        h = torch.where(h > 0, h, torch.full_like(h, 1e-6))
    else:
        h = torch.full((values.shape[0],), float(bandwidth), device=values.device)
    diffs = (values.unsqueeze(2) - values.unsqueeze(1)) / h.view(-1, 1, 1)
    log_kernel = -0.5 * diffs.square() - 0.5 * math.log(2 * math.pi)
    log_density = torch.logsumexp(log_kernel, dim=2) - math.log(n) - torch.log(h).unsqueeze(1)
    return -log_density.mean(dim=1) / log_base


def haar_highpass_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three detail bands of one orthonormal 2D Haar level over the last two dims.

    Odd heights/widths drop their last row/column (the transform pairs neighbours); the
    transform itself is the shared one in :mod:`chronos_video.ops.wavelet`.
    """
    if x.dim() < 2:
        raise ValueError(f"haar_highpass_2d needs at least 2 dims (H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    if height == 0 or width == 0:
        raise ValueError(f"spatial size must be at least 2x2, got {tuple(x.shape[-2:])}")
    _, across_rows, across_cols, diagonal = haar_dwt2d(x[..., :height, :width])
    return across_cols, across_rows, diagonal  # (changes along W, along H, diagonal)


def wavelet_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean |Haar high-pass coefficient| per sample: the information energy E(X) of a latent.

    Accepts videos (B, C, F, H, W) (the 2D transform runs on every frame) and images
    (B, C, H, W). Zero for constant frames, large for fine texture and edges.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (B, C, F, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    details = haar_highpass_2d(x.detach().float())
    total = sum(d.abs().flatten(1).sum(dim=1) for d in details)
    return total / (3 * details[0][0].numel())


ENTROPY_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "histogram": histogram_entropy,
    "kde": kde_entropy,
    "wavelet": wavelet_energy,
}


def estimate_entropy(x: torch.Tensor, method: str = "histogram", **kwargs: Union[int, float, bool]) -> torch.Tensor:
    """Dispatches to one of :data:`ENTROPY_ESTIMATORS` by name (as stored in a schedule)."""
    if method not in ENTROPY_ESTIMATORS:
        raise ValueError(f"method must be one of {sorted(ENTROPY_ESTIMATORS)}, got {method!r}")
    return ENTROPY_ESTIMATORS[method](x, **kwargs)
