"""Shared fixtures: tiny, locally built components so no test downloads anything."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

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


def perturb_zero_init(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """AdaLN-Zero and zero-initialised heads make a fresh model ignore its inputs; give those layers
    small random weights so tests can see every input matter."""
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0:
                param.normal_(0, std)
    return model


def backbone_inputs(batch: int = 2, text_dim: int = 24):
    """(video (B, 3, 4, 16, 16), timesteps, text states (B, 5, text_dim), text mask with padding)."""
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 3, 4, 16, 16, generator=generator)
    text = torch.randn(batch, 5, text_dim, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])[:batch]
    return video, torch.tensor([900.0, 50.0])[:batch], text, mask


def check_attention_dispatch(model: torch.nn.Module) -> None:
    """The model's attention modules are diffusers `AttentionModuleMixin`s: our processor everywhere, and
    switching the dispatch backend to "native" leaves the output unchanged."""
    video, timestep, text, mask = backbone_inputs()
    with torch.no_grad():
        base = model(video, timestep, text, mask).sample
        assert model.attn_processors and all(type(p).__name__ == "ChronosAttnProcessor" for p in model.attn_processors.values())
        model.set_attention_backend("native")
        assert torch.equal(model(video, timestep, text, mask).sample, base)


def make_tiny_pipeline(tokenizer, seed: int = 0, **model_kwargs) -> NanoSoraPipeline:
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    config = dict(sample_frames=4, sample_height=16, sample_width=16, patch_size=(2, 4, 4), hidden_size=32,
                  num_layers=2, num_attention_heads=2, text_embed_dim=32)
    config.update(model_kwargs)
    transformer = NanoSoraTransformer3DModel(**config)
    perturb_zero_init(transformer)
    pipe = NanoSoraPipeline(tokenizer, text_encoder, transformer, ChronosFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipeline(tiny_tokenizer) -> NanoSoraPipeline:
    return make_tiny_pipeline(tiny_tokenizer)


@pytest.fixture
def single_thread():
    """Tiny ops run far faster on one thread than two contending ones on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_train_script(module_name: str = "chronos_train"):
    """`training/train.py` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
