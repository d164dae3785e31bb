"""NanoSoraPipeline: text-to-video with the Nano-Sora diffusion transformer."""

from __future__ import annotations

from ..models.transformer_nanosora import NanoSoraTransformer3DModel
from .pipeline_flow_video import FlowVideoPipeline


class NanoSoraPipeline(FlowVideoPipeline):
    """Text-to-video with [`NanoSoraTransformer3DModel`].

    Components, sampling loop and config are [`FlowVideoPipeline`]'s; the class names the
    backbone, so `from_pretrained` folders and model cards say which model they hold.

    Example (any diffusers flow-match scheduler drops in; the shipped folder carries a calibrated
    precision schedule):
        ```py
        >>> import torch
        >>> from diffusers import FlowMatchHeunDiscreteScheduler
        >>> from diffusers.utils import export_to_video
        >>> from chronos_video import NanoSoraPipeline

        >>> pipe = NanoSoraPipeline.from_pretrained("pipelines/nano-sora-shapes")
        >>> pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
        >>> generator = torch.Generator().manual_seed(0)
        >>> video = pipe("a small red circle moving left to right slowly", precision="calibrated", generator=generator).frames[0]
        >>> export_to_video(video, "circle.mp4", fps=8)
        ```
    """

    transformer: NanoSoraTransformer3DModel
