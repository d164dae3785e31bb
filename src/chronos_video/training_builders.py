"""What a `TrainConfig` builds: the caption tokenizer and text encoder, the backbone, the pipeline.

`training/train.py` and `benchmarks/train_throughput.py` both build through these, so a benchmark
measures exactly the model a config trains.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import get_architecture
from .schedulers import ChronosFlowMatchScheduler
from .text import build_text_encoder, pretrain_text_encoder, train_caption_tokenizer
from .training_config import TrainConfig

__all__ = ["TextToVideoModule", "backbone_kwargs", "build_backbone", "build_pipeline", "build_text_model"]


class TextToVideoModule(torch.nn.Module):
    """Text encoder + backbone as one module, so DDP, autocast and accumulation wrap both."""

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.transformer(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text, encoder_attention_mask=attention_mask, return_dict=False
        )[0]


def build_text_model(config: TrainConfig, captions: list[str]):
    """A caption tokenizer trained on `captions` and a fresh text encoder for it, pretrained for
    `config.text_encoder_pretrain_steps` steps when set.

    Returns `(tokenizer, text_encoder, pretrain_accuracy)`; the accuracy is None without pretraining.
    """
    tokenizer = train_caption_tokenizer(captions, model_max_length=config.tokenizer_max_length)
    text_encoder = build_text_encoder(
        len(tokenizer),
        **{
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": config.tokenizer_max_length,
            **config.text_encoder,
        },
    )
    accuracy = None
    if config.text_encoder_pretrain_steps:
        accuracy = pretrain_text_encoder(
            text_encoder, tokenizer, captions, num_steps=config.text_encoder_pretrain_steps, seed=config.seed,
            text_pooling=config.model.get("text_pooling", "mean"),
        )
    return tokenizer, text_encoder, accuracy


def backbone_kwargs(config: TrainConfig, text_embed_dim: int | None = None) -> dict[str, Any]:
    """The backbone's constructor arguments for a fresh run: the clip size of `config.data`, the text
    width (default: the config's text encoder `d_model`) and `config.model` on top."""
    return {
        "sample_frames": config.data.get("num_frames", 16),
        "sample_height": config.data.get("height", 32),
        "sample_width": config.data.get("width", 32),
        "text_embed_dim": text_embed_dim if text_embed_dim is not None else config.text_encoder.get("d_model", 128),
        **config.model,
    }


def build_backbone(config: TrainConfig, text_embed_dim: int | None = None) -> torch.nn.Module:
    """A freshly initialised backbone of `config.architecture` (seed the global RNG first for a fixed init)."""
    return get_architecture(config.architecture).model_class(**backbone_kwargs(config, text_embed_dim))


def build_pipeline(
    architecture, tokenizer, text_encoder, transformer, scheduler_config: dict[str, Any], pipeline_config: dict[str, Any] | None = None
):
    """The architecture's pipeline around trained (or training) components, with a new scheduler.

    `pipeline_config` carries sampling policy (precision / constraint settings) over from a base
    pipeline when fine-tuning, so the fine-tuned folder samples the way its base did.
    """
    return architecture.pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=ChronosFlowMatchScheduler(**scheduler_config),
        **(pipeline_config or {}),
    )
