"""Motion learnability: path placement and restricted attributes in the shapes data, the clean-sample
(JiT) parametrisation of the backbones, learning-curve logging in train.py and its benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chronos_video import ChronosMambaModel, NanoSoraTransformer3DModel
from chronos_video.data import SIZES, build_shapes_dataset
from chronos_video.evaluation import caption_swap_loss_gaps
from chronos_video.evaluation.pipeline_eval import evaluate_pipeline, evaluation_prompts
from chronos_video.models.embeddings import SAMPLE_PREDICTION_MIN_SIGMA
from conftest import backbone_inputs, make_tiny_pipeline, perturb_zero_init

ROOT = Path(__file__).resolve().parents[1]


BACKBONES = pytest.mark.parametrize(
    "model_class, extra", [(NanoSoraTransformer3DModel, {"num_attention_heads": 2}), (ChronosMambaModel, {"state_size": 4, "num_attention_heads": 2})]
)


def plain_and_variant(model_class, extra, **variant):
    """A tiny backbone with perturbed zero-initialised layers, and the same config plus `variant`."""
    torch.manual_seed(0)
    common = dict(sample_frames=4, sample_height=16, sample_width=16, patch_size=(2, 4, 4), hidden_size=32, num_layers=1,
                  text_embed_dim=24, **extra)
    return perturb_zero_init(model_class(**common)).eval(), model_class(**common, **variant).eval()


def test_start_spread_zero_centres_every_path_on_the_frame():
    data = build_shapes_dataset(24, num_frames=8, height=32, width=32, split="all", seed=4, start_spread=0.0)
    centres = np.asarray(data.with_format("numpy")["centers"])  # (N, F, 2)
    midpoints = (centres[:, 0] + centres[:, -1]) / 2
    for midpoint, shape, size in zip(midpoints, data["shape"], data["size"]):
        # The bounding box is centred; the triangle's area centroid lies diameter / 6 below its middle.
        below = SIZES[size] * 32 / 6 if shape == "triangle" else 0.0
        np.testing.assert_allclose(midpoint, [16.0, 16.0 + below], atol=1e-4)


def test_start_spread_one_is_the_original_dataset_and_half_narrows_it():
    kwargs = dict(num_clips=64, num_frames=8, height=32, width=32, split="train", seed=9)
    default = build_shapes_dataset(**kwargs)
    spread_one = build_shapes_dataset(**kwargs, start_spread=1.0)
    assert np.array_equal(np.asarray(default.with_format("numpy")["frames"]), np.asarray(spread_one.with_format("numpy")["frames"]))
    full = np.asarray(default.with_format("numpy")["centers"])[:, 0]
    half = np.asarray(build_shapes_dataset(**kwargs, start_spread=0.5).with_format("numpy")["centers"])[:, 0]
    centred = np.asarray(build_shapes_dataset(**kwargs, start_spread=0.0).with_format("numpy")["centers"])[:, 0]
    # Same draws, pulled halfway towards the centred start.
    np.testing.assert_allclose(half, (full + centred) / 2, atol=1e-3)


def test_attribute_restriction_keeps_only_the_allowed_values():
    data = build_shapes_dataset(40, num_frames=4, split="all", seed=1,
                                attributes={"color": ["white"], "shape": "square", "size": ["large"], "speed": ["quickly"]})
    assert set(data["color"]) == {"white"} and set(data["shape"]) == {"square"} and set(data["speed"]) == {"quickly"}
    assert len(set(data["direction"])) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start_spread": 1.5}, "start_spread"),
        ({"start_spread": True}, "start_spread"),
        ({"attributes": {"colour": ["red"]}}, "unknown attribute 'colour'"),
        ({"attributes": {"color": ["purple"]}}, "attributes['color']"),
        ({"attributes": {"color": []}}, "attributes['color']"),
        ({"attributes": ["red"]}, "`attributes` must map"),
        ({"attributes": {"shape": ["square"], "direction": ["diagonally up and left"]}, "split": "train"}, "leaves no combination"),
    ],
)
def test_bad_placement_or_restriction_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_shapes_dataset(4, num_frames=4, **kwargs)


def test_evaluation_prompts_cover_a_restricted_set_evenly():
    prompts = evaluation_prompts(16, attributes={"color": ["white"], "shape": ["square"], "size": ["large"], "speed": ["quickly"]})
    directions = [attrs.direction for _, attrs in prompts]
    assert sorted(set(directions)) == sorted(set(directions)) and len(set(directions)) == 8
    assert all(directions.count(d) == 2 for d in set(directions))
    assert all(caption == attrs.caption() for caption, attrs in prompts)
    heldout = evaluation_prompts(6)
    assert [attrs.to_dict() for _, attrs in heldout] == [attrs.to_dict() for _, attrs in evaluation_prompts(6, attributes=None)]


@BACKBONES
def test_sample_prediction_returns_the_velocity_of_the_predicted_clean_video(model_class, extra):
    velocity_model, sample_model = plain_and_variant(model_class, extra, prediction_type="sample")
    sample_model.load_state_dict(velocity_model.state_dict())
    video, timesteps, text, mask = backbone_inputs()
    with torch.no_grad():
        head = velocity_model(video, timesteps, text, mask).sample  # the same head, read as x0 by the other model
        velocity = sample_model(video, timesteps, text, mask).sample
    sigma = (timesteps / 1000).clamp_min(SAMPLE_PREDICTION_MIN_SIGMA).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(velocity, (video - head) / sigma, rtol=1e-4, atol=1e-4)
    assert sample_model.config.prediction_type == "sample"


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        NanoSoraTransformer3DModel(hidden_size=32, num_layers=1, num_attention_heads=2, prediction_type="epsilon")


def test_sample_prediction_survives_save_and_load(tiny_tokenizer, tmp_path):
    pipe = make_tiny_pipeline(tiny_tokenizer, prediction_type="sample")
    pipe.save_pretrained(tmp_path / "p")
    loaded = type(pipe).from_pretrained(tmp_path / "p")
    assert loaded.transformer.config.prediction_type == "sample"
    loaded.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    first = pipe("a small red circle moving left to right slowly", num_inference_steps=3, generator=generator, output_type="np").frames
    generator = torch.Generator().manual_seed(0)
    second = loaded("a small red circle moving left to right slowly", num_inference_steps=3, generator=generator, output_type="np").frames
    np.testing.assert_allclose(first, second, atol=1e-5)


def test_swap_gap_and_oracle_run_on_the_runs_own_clips(tiny_tokenizer):
    pipe = make_tiny_pipeline(tiny_tokenizer)
    restriction = {"color": ["white"], "shape": ["square"], "size": ["large"], "speed": ["quickly"]}
    gaps = caption_swap_loss_gaps(pipe, ["direction"], num_clips=4, split="all", start_spread=0.0, data_attributes=restriction)
    assert gaps["direction"]["n"] == 4 and gaps["direction"]["loss_true"] > 0 and gaps["direction"]["gap"] != 0
    prompts = evaluation_prompts(2, attributes=restriction)
    scores, table = evaluate_pipeline(pipe, num_prompts=2, num_inference_steps=2, prompts=prompts)
    assert scores["n"] == 2 and "| generated |" in table


@pytest.mark.slow
def test_learnability_benchmark_writes_a_learning_curve(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "motion_learnability.py"), "--config", str(ROOT / "training" / "configs" / "smoke.yaml"),
               "--variants", "today", "text+abs-pos+centred+x0", "--data", "direction-only", "--steps", "2", "--eval-every", "1",
               "--num-prompts", "2", "--num-clips", "2", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "learnability.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["today", "text+abs-pos+centred+x0"]
    for row in rows:
        assert [point["step"] for point in row["curve"]] == [1, 2]
        point = row["curve"][-1]
        assert 0.0 <= point["oracle/direction"] <= 1.0 and point["swap_gap/loss_true"] > 0 and point["seconds_per_step"] > 0
        assert set(point) >= {"oracle/all", "swap_gap/direction"} and "swap_gap/color" not in point  # only direction varies
    assert "| text+abs-pos+centred+x0 | direction-only | 2 |" in result.stdout


def test_learnability_benchmark_rejects_unknown_variant(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "motion_learnability.py"), "--variants", "bogus",
                             "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown variant 'bogus'" in result.stderr


@BACKBONES
def test_frame_conditioning_starts_as_the_plain_model_and_then_acts_per_frame(model_class, extra):
    plain, framed = plain_and_variant(model_class, extra, frame_conditioning=True)
    missing, unexpected = framed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("frame_embed.") for name in missing)
    video, timesteps, text, mask = backbone_inputs()
    with torch.no_grad():
        torch.testing.assert_close(framed(video, timesteps, text, mask).sample, plain(video, timesteps, text, mask).sample)
        perturb_zero_init(framed)
        tokens = torch.zeros(2, 2 * 4 * 4, 32)
        conditioning = torch.randn(2, 32)
        added = framed.frame_embed(tokens, (2, 4, 4), conditioning).view(2, 2, 16, 32)
    # One vector per (sample, latent frame), shared by the frame's tokens, different across frames and prompts.
    assert torch.equal(added[:, :, :1].expand_as(added), added)
    assert not torch.allclose(added[:, 0], added[:, 1]) and not torch.allclose(added[0], added[1])


def test_frame_conditioning_survives_save_and_load(tiny_tokenizer, tmp_path):
    pipe = make_tiny_pipeline(tiny_tokenizer, frame_conditioning=True, absolute_pos_embed=True)
    pipe.save_pretrained(tmp_path / "p")
    loaded = type(pipe).from_pretrained(tmp_path / "p")
    assert loaded.transformer.config.frame_conditioning is True and loaded.transformer.frame_embed is not None
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(loaded.transformer.state_dict()[key], value)
