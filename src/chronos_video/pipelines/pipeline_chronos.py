"""ChronosPipeline: text-to-video with the Chronos-V omni-directional complex Mamba backbone."""

from __future__ import annotations

from ..models.mamba_chronos import ChronosMambaModel
from .pipeline_flow_video import FlowVideoPipeline


class ChronosPipeline(FlowVideoPipeline):
    """Text-to-video with [`ChronosMambaModel`] (cost linear in the number of video tokens).

    Components, sampling loop and config are [`FlowVideoPipeline`]'s; the class names the
    backbone, so `from_pretrained` folders and model cards say which model they hold.

    With the model's wavelet gate on, low-detail tubelets skip the Mamba mixers at sampling time;
    `pipe.transformer.last_gate_stats` reports the skipped fraction of the last denoising step.

    Example:
        ```py
        >>> import torch
        >>> from chronos_video import ChronosPipeline

        >>> pipe = ChronosPipeline.from_pretrained("pipelines/chronos-v-shapes")
        >>> frames = pipe("a small red circle moving left to right slowly", generator=torch.Generator().manual_seed(0)).frames
        >>> frames.shape  # (videos, num_frames, height, width, 3) in [0, 1], at `pipe.default_size`
        ```
    """

    transformer: ChronosMambaModel
