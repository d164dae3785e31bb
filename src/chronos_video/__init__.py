"""chronos-video: Hugging Face-native efficient text-to-video generators.

Every component class is imported here because diffusers resolves third-party pipeline
components by looking them up on the top-level package named in `model_index.json`.
"""

__version__ = "0.1.0"

from .models import ChronosAttention, ChronosMambaModel, NanoSoraTransformer3DModel
from .pipelines import ChronosPipeline, FlowVideoPipeline, NanoSoraPipeline, VideoPipelineOutput
from .schedulers import ChronosFlowMatchScheduler
from .text import build_text_encoder, pretrain_text_encoder, train_caption_tokenizer

__all__ = [
    "ChronosAttention",
    "ChronosFlowMatchScheduler",
    "ChronosMambaModel",
    "ChronosPipeline",
    "FlowVideoPipeline",
    "NanoSoraPipeline",
    "NanoSoraTransformer3DModel",
    "VideoPipelineOutput",
    "build_text_encoder",
    "pretrain_text_encoder",
    "train_caption_tokenizer",
]
