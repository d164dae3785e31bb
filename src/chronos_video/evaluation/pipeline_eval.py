"""Scores a text-to-video pipeline with the pixel oracle on prompts it was never trained on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import heldout_prompts
from .oracle import ShapesOracle, format_oracle_table


def evaluate_pipeline(
    pipe,
    num_prompts: int = 32,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 8,
    **pipeline_kwargs: Any,
) -> tuple[dict[str, float], str]:
    """Generates one video per held-out prompt and returns (oracle scores, markdown table).

    Prompts come from `heldout_prompts`, i.e. attribute combinations excluded from training,
    so the score measures compositional generalisation, not memorisation.
    """
    if num_prompts < 1:
        raise ValueError(f"`num_prompts` must be >= 1, got {num_prompts}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    prompts = heldout_prompts(num_prompts, seed=seed)
    videos: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
        output = pipe(
            [caption for caption, _ in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **pipeline_kwargs,
        )
        videos.extend(list(output.frames))
    height, width = videos[0].shape[1:3]
    scores = ShapesOracle(height=height, width=width).score(videos, [attrs for _, attrs in prompts])
    return scores, format_oracle_table({"generated (held-out prompts)": scores})
