"""Held-out rectified-flow loss: a quality signal that is informative long before samples are.

Oracle accuracy needs a model good enough to draw recognisable, moving shapes; early in training
(or at the small budgets of an ablation) every variant sits at chance. The denoising loss on clips
from held-out attribute combinations, with fixed noise and fixed noise levels, separates variants
much earlier and has no sampling noise of its own.

`caption_swap_loss_gap` asks a sharper question of the same loss: does the model use a given
attribute of the caption at all? Swapping only that attribute (say "left to right" for "right to
left") must raise the loss on the real clip if the model relies on it; a gap near zero means
the caption's attribute never reaches the prediction.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data.shapes import ATTRIBUTE_NAMES, DIRECTIONS, ShapeAttributes, _VOCABULARY
from ..flow_matching import frames_to_model_input, rectified_flow_inputs, sigmas_to_timesteps, velocity_mse

DEFAULT_SIGMAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 0.97)


def _check_arguments(pipe, num_clips, batch_size, sigmas) -> list[float]:
    if getattr(pipe, "vae", None) is not None:
        raise ValueError("Denoising-loss evaluation scores pixel-space pipelines; this one has a VAE.")
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ValueError(f"`num_clips` must be a positive int, got {num_clips!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    sigmas = [float(s) for s in sigmas]
    if not sigmas or not all(0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"`sigmas` must be a non-empty sequence of values in (0, 1], got {sigmas!r}.")
    return sigmas


def _shapes_clips(
    pipe, num_clips: int, split: str, seed: int, start_spread: float = 1.0, attributes=None
) -> tuple[torch.Tensor, list[ShapeAttributes], list[str]]:
    """Shapes clips at the backbone's training size as (N, 3, F, H, W) in [-1, 1], attributes, captions."""
    from ..data import build_shapes_dataset

    config = pipe.transformer.config
    dataset = build_shapes_dataset(
        num_clips, num_frames=config.sample_frames, height=config.sample_height, width=config.sample_width,
        split=split, seed=seed, start_spread=start_spread, attributes=attributes,
    )
    frames = np.asarray(dataset.with_format("numpy")["frames"]).astype(np.uint8)
    clips = frames_to_model_input(torch.from_numpy(frames))
    columns = [dataset[name] for name in ATTRIBUTE_NAMES]
    attributes = [ShapeAttributes(*values) for values in zip(*columns)]
    return clips, attributes, list(dataset["caption"])


@torch.no_grad()
def _velocity_errors(pipe, clips, captions, noise, sigmas, batch_size, max_sequence_length) -> torch.Tensor:
    """Per-clip mean squared velocity error, shape (len(sigmas), N), in float64."""
    model = pipe.transformer
    device, dtype = model.device, model.dtype
    was_training = model.training
    model.eval()
    errors = torch.zeros(len(sigmas), clips.shape[0], dtype=torch.float64)
    try:
        for start in range(0, clips.shape[0], batch_size):
            stop = min(start + batch_size, clips.shape[0])
            text, mask, _, _ = pipe.encode_prompt(
                captions[start:stop], do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device, dtype=dtype
            )
            x0 = clips[start:stop]
            for index, sigma in enumerate(sigmas):
                level = torch.full((stop - start,), sigma)
                noisy, target = rectified_flow_inputs(x0, level, noise[index, start:stop])
                prediction = model(noisy.to(device, dtype), sigmas_to_timesteps(level).to(device), text, mask, return_dict=False)[0]
                errors[index, start:stop] = velocity_mse(prediction.cpu(), target).double()
    finally:
        model.train(was_training)
    return errors


@torch.no_grad()
def heldout_denoising_loss(
    pipe,
    num_clips: int = 64,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    seed: int = 0,
    batch_size: int = 16,
    max_sequence_length: int | None = None,
) -> dict[str, float]:
    """Mean squared velocity error of `pipe`'s backbone on held-out shapes clips.

    Clips come from `build_shapes_dataset(split="heldout")` at the backbone's training size, with
    their own captions; noise is drawn from `seed`, so two pipelines are scored on exactly the same
    inputs. Works for pixel-space pipelines (no VAE).

    Returns `{"loss": mean over all sigmas, "loss@<sigma>": per sigma, "n": num_clips}`.
    """
    sigmas = _check_arguments(pipe, num_clips, batch_size, sigmas)
    clips, _, captions = _shapes_clips(pipe, num_clips, "heldout", seed)
    noise = torch.randn((len(sigmas), *clips.shape), generator=torch.Generator().manual_seed(seed))
    per_sigma = _velocity_errors(pipe, clips, captions, noise, sigmas, batch_size, max_sequence_length).mean(dim=1).tolist()
    result = {"loss": float(np.mean(per_sigma))}
    result.update({f"loss@{sigma:g}": value for sigma, value in zip(sigmas, per_sigma)})
    result["n"] = num_clips
    return result


def swapped_attribute(attrs: ShapeAttributes, attribute: str) -> ShapeAttributes:
    """`attrs` with one attribute replaced: the opposite direction, else the next value in the vocabulary."""
    values = attrs.to_dict()
    if attribute == "direction":
        dx, dy = DIRECTIONS[attrs.direction]
        values["direction"] = next(name for name, (x, y) in DIRECTIONS.items() if (x, y) == (-dx, -dy))
    else:
        vocabulary = _VOCABULARY[attribute]
        values[attribute] = vocabulary[(vocabulary.index(values[attribute]) + 1) % len(vocabulary)]
    return ShapeAttributes(**values)


@torch.no_grad()
def caption_swap_loss_gaps(
    pipe,
    attributes: Sequence[str] = ATTRIBUTE_NAMES,
    num_clips: int = 64,
    sigmas: Sequence[float] = (0.5, 0.7, 0.9),
    split: str = "train",
    seed: int = 0,
    batch_size: int = 16,
    max_sequence_length: int | None = None,
    start_spread: float = 1.0,
    data_attributes: dict[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, float]]:
    """`caption_swap_loss_gap` for several attributes, rendering the clips and scoring the true
    captions once. Returns `{attribute: result}`.

    `start_spread` and `data_attributes` are passed to `build_shapes_dataset`, so a model is scored
    on clips placed and restricted the way it was trained."""
    attributes = list(attributes)
    unknown = [a for a in attributes if a not in ATTRIBUTE_NAMES]
    if not attributes or unknown:
        raise ValueError(f"`attribute` must be one of {list(ATTRIBUTE_NAMES)}, got {unknown or attributes!r}.")
    sigmas = _check_arguments(pipe, num_clips, batch_size, sigmas)
    clips, clip_attributes, _ = _shapes_clips(pipe, num_clips, split, seed, start_spread, data_attributes)
    noise = torch.randn((len(sigmas), *clips.shape), generator=torch.Generator().manual_seed(seed))

    def mean_errors(captions: list[str]) -> torch.Tensor:
        return _velocity_errors(pipe, clips, captions, noise, sigmas, batch_size, max_sequence_length).mean(dim=1)

    true = mean_errors([a.caption() for a in clip_attributes])
    results = {}
    for attribute in attributes:
        swapped = mean_errors([swapped_attribute(a, attribute).caption() for a in clip_attributes])
        gaps = (swapped - true).tolist()
        result = {"gap": float(np.mean(gaps))}
        result.update({f"gap@{sigma:g}": value for sigma, value in zip(sigmas, gaps)})
        result["loss_true"] = float(true.mean())
        result["relative_gap"] = result["gap"] / result["loss_true"]
        result["n"] = num_clips
        results[attribute] = result
    return results


def caption_swap_loss_gap(
    pipe,
    attribute: str = "direction",
    num_clips: int = 64,
    sigmas: Sequence[float] = (0.5, 0.7, 0.9),
    split: str = "train",
    seed: int = 0,
    batch_size: int = 16,
    max_sequence_length: int | None = None,
) -> dict[str, float]:
    """How much worse the backbone denoises real clips when one caption attribute is swapped.

    Each clip is scored twice on the same noise: with its true caption and with `attribute`
    replaced (`swapped_attribute`: the opposite direction, or the next colour, shape, size or
    speed). Both captions use the canonical template, so only that attribute's words differ.

    Returns `{"gap": mean over sigmas of (swapped - true) loss, "gap@<sigma>": per sigma,
    "relative_gap": gap / true loss, "loss_true": ..., "n": num_clips}`.
    """
    return caption_swap_loss_gaps(
        pipe, [attribute], num_clips=num_clips, sigmas=sigmas, split=split, seed=seed, batch_size=batch_size,
        max_sequence_length=max_sequence_length,
    )[attribute]
