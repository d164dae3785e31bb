"""NanoSoraPipeline: text-to-video with the Nano-Sora diffusion transformer."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.transformer_nanosora import NanoSoraTransformer3DModel
from ..schedulers.scheduling_chronos_flow_match import ChronosFlowMatchScheduler
from .pipeline_flow_video import FlowVideoPipeline


class NanoSoraPipeline(FlowVideoPipeline):
    """Text-to-video with [`NanoSoraTransformer3DModel`].

    Example:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from chronos_video import NanoSoraPipeline
        >>> pipe = NanoSoraPipeline.from_pretrained("pipelines/nano-sora-shapes")
        >>> video = pipe("a small red circle moving left to right slowly", generator=torch.Generator().manual_seed(0)).frames[0]
        >>> export_to_video(video, "circle.mp4", fps=8)
        ```
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        transformer: NanoSoraTransformer3DModel,
        scheduler: ChronosFlowMatchScheduler,
        vae=None,
    ):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, vae=vae)
