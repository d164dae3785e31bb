"""chronos-video: Hugging Face-native efficient text-to-video generators.

diffusers resolves third-party pipeline components by looking their class names up on the
top-level package named in `model_index.json`, so every component class is an attribute here.
They are imported on first access (PEP 562), which keeps `import chronos_video` fast and quiet
(see `import_utils`); `from chronos_video import NanoSoraPipeline` works as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .import_utils import lazy_export

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "ARVideoConfig": ".models",
    "ARVideoForCausalLM": ".models",
    "FSQVideoTokenizer": ".models",
    "ARVideoPipeline": ".pipelines",
    "ChronosAttention": ".models",
    "ChronosMambaModel": ".models",
    "HRMVideoModel": ".models",
    "NanoSoraTransformer3DModel": ".models",
    "ChronosPipeline": ".pipelines",
    "FlowVideoPipeline": ".pipelines",
    "HRMVideoPipeline": ".pipelines",
    "NanoSoraPipeline": ".pipelines",
    "VideoPipelineOutput": ".pipelines",
    "ChronosFlowMatchScheduler": ".schedulers",
    "build_text_encoder": ".text",
    "pretrain_text_encoder": ".text",
    "train_caption_tokenizer": ".text",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .models import ARVideoConfig, ARVideoForCausalLM, ChronosAttention, ChronosMambaModel, FSQVideoTokenizer, HRMVideoModel, NanoSoraTransformer3DModel
    from .pipelines import ARVideoPipeline, ChronosPipeline, FlowVideoPipeline, HRMVideoPipeline, NanoSoraPipeline, VideoPipelineOutput
    from .schedulers import ChronosFlowMatchScheduler
    from .text import build_text_encoder, pretrain_text_encoder, train_caption_tokenizer


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, globals(), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
