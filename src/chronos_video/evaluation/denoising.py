"""Held-out rectified-flow loss: a quality signal that is informative long before samples are.

Oracle accuracy needs a model good enough to draw recognisable, moving shapes; early in training
(or at the small budgets of an ablation) every variant sits at chance. The denoising loss on clips
from held-out attribute combinations, with fixed noise and fixed noise levels, separates variants
much earlier and has no sampling noise of its own.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..training_utils import rectified_flow_inputs

DEFAULT_SIGMAS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 0.97)


@torch.no_grad()
def heldout_denoising_loss(
    pipe,
    num_clips: int = 64,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    seed: int = 0,
    batch_size: int = 16,
    max_sequence_length: int = 24,
) -> dict[str, float]:
    """Mean squared velocity error of `pipe`'s backbone on held-out shapes clips.

    Clips come from `build_shapes_dataset(split="heldout")` at the backbone's training size, with
    their own captions; noise is drawn from `seed`, so two pipelines are scored on exactly the same
    inputs. Works for pixel-space pipelines (no VAE).

    Returns `{"loss": mean over all sigmas, "loss@<sigma>": per sigma, "n": num_clips}`.
    """
    from ..data import build_shapes_dataset

    if getattr(pipe, "vae", None) is not None:
        raise ValueError("`heldout_denoising_loss` scores pixel-space pipelines; this one has a VAE.")
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ValueError(f"`num_clips` must be a positive int, got {num_clips!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    sigmas = [float(s) for s in sigmas]
    if not sigmas or not all(0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"`sigmas` must be a non-empty sequence of values in (0, 1], got {sigmas!r}.")

    model = pipe.transformer
    config = model.config
    dataset = build_shapes_dataset(
        num_clips, num_frames=config.sample_frames, height=config.sample_height, width=config.sample_width,
        split="heldout", seed=seed,
    )
    frames = np.asarray(dataset.with_format("numpy")["frames"]).astype(np.uint8)
    clips = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
    captions = list(dataset["caption"])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(sigmas), *clips.shape), generator=generator)

    device, dtype = model.device, model.dtype
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(sigmas), dtype=torch.float64)
    try:
        for start in range(0, num_clips, batch_size):
            stop = min(start + batch_size, num_clips)
            text, mask = pipe._encode_text(captions[start:stop], max_sequence_length, device, dtype)
            x0 = clips[start:stop]
            for index, sigma in enumerate(sigmas):
                level = torch.full((stop - start,), sigma)
                noisy, target = rectified_flow_inputs(x0, level, noise[index, start:stop])
                prediction = model(
                    noisy.to(device, dtype), (level * 1000).to(device), text, mask, return_dict=False
                )[0]
                totals[index] += ((prediction.float().cpu() - target) ** 2).mean(dim=(1, 2, 3, 4)).sum().double()
    finally:
        model.train(was_training)
    per_sigma = (totals / num_clips).tolist()
    result = {"loss": float(np.mean(per_sigma))}
    result.update({f"loss@{sigma:g}": value for sigma, value in zip(sigmas, per_sigma)})
    result["n"] = num_clips
    return result
