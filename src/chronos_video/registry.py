"""Architectures the training script and CLI know by name.

Each model family registers its backbone and pipeline classes here, so `training/train.py`
builds any of them from a config's `architecture:` key without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    model_class: type
    pipeline_class: type | None  # None: a component trained on its own (the video tokenizer, the video VAE)


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, model_class: type, pipeline_class: type | None) -> None:
    _ARCHITECTURES[name] = Architecture(name, model_class, pipeline_class)


def get_architecture(name: str) -> Architecture:
    if name not in _ARCHITECTURES:
        raise ValueError(f"Unknown `architecture` {name!r}; registered: {sorted(_ARCHITECTURES)}.")
    return _ARCHITECTURES[name]


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def _register_builtin() -> None:
    from diffusers import AutoencoderKLLTXVideo

    from .models.ar_video import ARVideoForCausalLM
    from .models.fsq_tokenizer import FSQVideoTokenizer
    from .models.hrm_video import HRMVideoModel
    from .models.mamba_chronos import ChronosMambaModel
    from .models.transformer_nanosora import NanoSoraTransformer3DModel
    from .pipelines.pipeline_ar import ARVideoPipeline
    from .pipelines.pipeline_chronos import ChronosPipeline
    from .pipelines.pipeline_hrm import HRMVideoPipeline
    from .pipelines.pipeline_nanosora import NanoSoraPipeline

    register_architecture("chronos-v", ChronosMambaModel, ChronosPipeline)
    register_architecture("nano-sora", NanoSoraTransformer3DModel, NanoSoraPipeline)
    register_architecture("hrm", HRMVideoModel, HRMVideoPipeline)
    register_architecture("fsq-tokenizer", FSQVideoTokenizer, None)
    register_architecture("ar-video", ARVideoForCausalLM, ARVideoPipeline)
    # the video autoencoder of latent training (training_vae.py); `model.vae_class` may pick another diffusers class
    register_architecture("video-vae", AutoencoderKLLTXVideo, None)


_register_builtin()
