"""ChronosPipeline: text-to-video with the Chronos-V omni-directional complex Mamba backbone."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.mamba_chronos import ChronosMambaModel
from ..schedulers.scheduling_chronos_flow_match import ChronosFlowMatchScheduler
from .pipeline_flow_video import FlowVideoPipeline


class ChronosPipeline(FlowVideoPipeline):
    """Text-to-video with [`ChronosMambaModel`] (cost linear in the number of video tokens).

    With the model's wavelet gate on, a model in eval mode (as after `from_pretrained`) lets
    low-detail tubelets skip the Mamba mixers; `pipe.transformer.last_gate_stats` reports the
    skipped fraction of the last denoising step.

    Example:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from chronos_video import ChronosPipeline
        >>> pipe = ChronosPipeline.from_pretrained("pipelines/chronos-v-shapes")
        >>> video = pipe("a small red circle moving left to right slowly", generator=torch.Generator().manual_seed(0)).frames[0]
        >>> export_to_video(video, "circle.mp4", fps=8)
        ```
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        transformer: ChronosMambaModel,
        scheduler: ChronosFlowMatchScheduler,
        vae=None,
    ):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, vae=vae)
