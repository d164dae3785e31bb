"""Held-out denoising loss and caption-swap loss gap: exact on models whose output is known,
deterministic, and validating."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chronos_video.data import DIRECTIONS, build_shapes_dataset
from chronos_video.data.shapes import ATTRIBUTE_NAMES, ShapeAttributes
from chronos_video.evaluation import caption_swap_loss_gap, caption_swap_loss_gaps, heldout_denoising_loss, swapped_attribute

from conftest import make_tiny_pipeline


def test_zero_velocity_model_scores_the_target_energy(tiny_tokenizer):
    pipe = make_tiny_pipeline(tiny_tokenizer)
    with torch.no_grad():  # undo the test perturbation of the zero-initialised output head: output is exactly 0
        pipe.transformer.final_layer.proj_out.weight.zero_()
        pipe.transformer.final_layer.proj_out.bias.zero_()
    sigmas = (0.2, 0.9)
    result = heldout_denoising_loss(pipe, num_clips=6, sigmas=sigmas, seed=3, batch_size=4, max_sequence_length=16)

    frames = np.asarray(build_shapes_dataset(6, num_frames=4, height=16, width=16, split="heldout", seed=3)
                        .with_format("numpy")["frames"]).astype(np.uint8)
    x0 = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
    noise = torch.randn((2, *x0.shape), generator=torch.Generator().manual_seed(3))
    expected = [((noise[i] - x0) ** 2).mean().item() for i in range(2)]
    assert result["loss@0.2"] == pytest.approx(expected[0], rel=1e-5)
    assert result["loss@0.9"] == pytest.approx(expected[1], rel=1e-5)
    assert result["loss"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert result["n"] == 6


def test_loss_is_deterministic_and_separates_models(tiny_tokenizer):
    first = heldout_denoising_loss(make_tiny_pipeline(tiny_tokenizer, seed=0), num_clips=4, max_sequence_length=16)
    again = heldout_denoising_loss(make_tiny_pipeline(tiny_tokenizer, seed=0), num_clips=4, max_sequence_length=16)
    other = heldout_denoising_loss(make_tiny_pipeline(tiny_tokenizer, seed=1), num_clips=4, max_sequence_length=16)
    assert first == again
    assert first["loss"] != other["loss"]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_clips": 0}, "num_clips"), ({"batch_size": 0}, "batch_size"), ({"sigmas": ()}, "sigmas"),
     ({"sigmas": (0.5, 1.5)}, "sigmas")],
)
def test_bad_arguments_name_the_argument(tiny_pipeline, kwargs, match):
    with pytest.raises(ValueError, match=match):
        heldout_denoising_loss(tiny_pipeline, **kwargs)


def test_swapped_attribute_changes_exactly_that_attribute():
    base = ShapeAttributes("red", "circle", "small", "left to right", "slowly")
    for attribute in ATTRIBUTE_NAMES:
        swapped = swapped_attribute(base, attribute)
        changed = [name for name in ATTRIBUTE_NAMES if getattr(swapped, name) != getattr(base, name)]
        assert changed == [attribute]
    for direction, (dx, dy) in DIRECTIONS.items():
        opposite = swapped_attribute(ShapeAttributes("red", "circle", "small", direction, "slowly"), "direction")
        assert DIRECTIONS[opposite.direction] == (-dx, -dy)


def test_swap_gap_is_zero_for_a_model_blind_to_the_caption(tiny_tokenizer):
    pipe = make_tiny_pipeline(tiny_tokenizer)
    with torch.no_grad():  # the backbone's text projection outputs zeros: every caption looks the same
        pipe.transformer.text_embed.proj[-1].weight.zero_()
        pipe.transformer.text_embed.proj[-1].bias.zero_()
    result = caption_swap_loss_gap(pipe, "color", num_clips=4, sigmas=(0.5, 0.9), max_sequence_length=16)
    assert result["gap"] == result["gap@0.5"] == result["gap@0.9"] == 0.0
    assert result["loss_true"] > 0 and result["n"] == 4


def test_swap_gap_sees_a_model_that_reads_the_caption(tiny_tokenizer):
    pipe = make_tiny_pipeline(tiny_tokenizer)
    first = caption_swap_loss_gap(pipe, "color", num_clips=4, max_sequence_length=16)
    assert first == caption_swap_loss_gap(pipe, "color", num_clips=4, max_sequence_length=16)
    assert first["gap"] != 0.0
    assert first["relative_gap"] == pytest.approx(first["gap"] / first["loss_true"])
    with pytest.raises(ValueError, match="`attribute` must be one of"):
        caption_swap_loss_gap(pipe, "texture")
    with pytest.raises(ValueError, match="num_clips"):
        caption_swap_loss_gap(pipe, "color", num_clips=0)


def test_several_attributes_at_once_match_one_at_a_time(tiny_tokenizer):
    pipe = make_tiny_pipeline(tiny_tokenizer)
    together = caption_swap_loss_gaps(pipe, ["color", "direction"], num_clips=3, max_sequence_length=16)
    for attribute in ("color", "direction"):
        assert together[attribute] == caption_swap_loss_gap(pipe, attribute, num_clips=3, max_sequence_length=16)
