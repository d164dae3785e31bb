"""Shared fixtures: tiny, locally built components so no test downloads anything."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from chronos_video import ChronosFlowMatchScheduler, NanoSoraPipeline, NanoSoraTransformer3DModel, build_text_encoder, train_caption_tokenizer

CAPTIONS = [
    "a small red circle moving left to right slowly",
    "a large blue square moving top to bottom quickly",
    "a small green triangle moving diagonally up and right slowly",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_caption_tokenizer(CAPTIONS, model_max_length=16)


def make_tiny_pipeline(tokenizer, seed: int = 0, **model_kwargs) -> NanoSoraPipeline:
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    config = dict(sample_frames=4, sample_height=16, sample_width=16, patch_size=(2, 4, 4), hidden_size=32,
                  num_layers=2, num_attention_heads=2, text_embed_dim=32)
    config.update(model_kwargs)
    transformer = NanoSoraTransformer3DModel(**config)
    # AdaLN-Zero starts as the identity; perturb the zero-initialised layers so outputs depend on inputs.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if param.abs().sum() == 0:
                param.normal_(0, 0.02)
    pipe = NanoSoraPipeline(tokenizer, text_encoder, transformer, ChronosFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipeline(tiny_tokenizer) -> NanoSoraPipeline:
    return make_tiny_pipeline(tiny_tokenizer)
