"""The pipeline folders shipped in pipelines/ load offline, generate, and their model cards tell the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chronos_video import ARVideoPipeline
from chronos_video.cli import load_pipeline
from chronos_video.evaluation.pipeline_eval import evaluate_pipeline

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "pipelines").iterdir() if (p / "model_index.json").is_file())


def test_something_is_shipped():
    assert any(p.name == "nano-sora-shapes" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_pipeline_generates_offline(path):
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    if isinstance(pipe, ARVideoPipeline):  # autoregressive: no sampling steps; its length is pipeline config
        frames = pipe("a large blue square moving left to right quickly", generator=torch.Generator().manual_seed(0)).frames
        assert frames.shape == (1, pipe.config.num_frames, *pipe.frame_size, 3)
    else:
        frames = pipe("a large blue square moving left to right quickly", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).frames
        assert frames.shape == (1, *pipe.default_size, 3)  # output pixels (through the `vae` for latent pipelines)
        if pipe.vae is None:
            config = pipe.transformer.config
            assert pipe.default_size == (config.sample_frames, config.sample_height, config.sample_width)
    assert np.isfinite(frames).all()
    weights = list(path.rglob("*.safetensors"))
    assert weights and not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 30 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_model_card_scores_are_reproducible(path):
    card = (path / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card
    recorded = json.loads((path / "oracle_scores.json").read_text())
    settings = json.loads((path / "training_config.json").read_text())
    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    is_ar = isinstance(pipe, ARVideoPipeline)
    scores, table = evaluate_pipeline(
        pipe, num_prompts=settings["eval_num_prompts"], num_inference_steps=None if is_ar else settings["eval_num_inference_steps"],
        guidance_scale=settings["eval_guidance_scale"], seed=settings["seed"], **(settings.get("generation") or {} if is_ar else {}),
    )
    for key in ("color", "shape", "size", "direction", "speed", "all"):
        # Sampling is deterministic up to float summation order (thread counts differ between the
        # training run and this test); allow a few borderline videos to flip.
        assert scores[key] == pytest.approx(recorded[key], abs=3.5 / recorded["n"]), key
        assert f"{100 * recorded[key]:.1f}%" in card, key
