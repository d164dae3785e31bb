"""`chronos_video.flow_matching`: the one definition of the rectified-flow objective."""

from __future__ import annotations

import math

import pytest
import torch

from chronos_video import flow_matching as fm


def _pair(seed: int = 0, shape=(3, 2, 4, 5, 6)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_inputs_interpolate_between_clip_and_noise_and_target_is_the_velocity():
    x0, noise = _pair()
    noisy, target = fm.rectified_flow_inputs(x0, torch.tensor([0.0, 1.0, 0.25]), noise)
    torch.testing.assert_close(noisy[0], x0[0])
    torch.testing.assert_close(noisy[1], noise[1])
    torch.testing.assert_close(noisy[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(target, noise - x0)
    assert torch.equal(fm.sigmas_to_timesteps(torch.tensor([0.5])), torch.tensor([500.0]))


def test_sigmas_are_a_pure_function_of_the_generator_and_respect_the_shift():
    draw = lambda shift=1.0: fm.sample_flow_sigmas(64, torch.Generator().manual_seed(3), shift=shift)  # noqa: E731
    base = draw()
    assert torch.equal(base, draw()) and bool(((base > 0) & (base < 1)).all())
    torch.testing.assert_close(draw(3.0), 3.0 * base / (1 + 2.0 * base))
    before = torch.random.get_rng_state()
    draw()
    assert torch.equal(before, torch.random.get_rng_state()), "the global RNG must not advance"


def test_frames_to_model_input_scales_uint8_clips_to_minus_one_one_channels_first():
    frames = torch.randint(0, 256, (2, 4, 5, 6, 3), dtype=torch.uint8)
    frames[0, 0, 0, 0] = torch.tensor([0, 255, 0], dtype=torch.uint8)
    clips = fm.frames_to_model_input(frames)
    assert clips.shape == (2, 3, 4, 5, 6) and clips.dtype == torch.float32
    assert clips[0, :, 0, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    assert torch.equal(clips, frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0))
    assert fm.frames_to_model_input(frames[0]).shape == (3, 4, 5, 6)
    with pytest.raises(ValueError, match="frames"):
        fm.frames_to_model_input(frames[0, 0, 0])


def test_losses_agree_with_their_definitions():
    prediction, target = _pair(1)
    per_sample = fm.velocity_mse(prediction, target)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample, ((prediction - target) ** 2).flatten(1).mean(1))
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    torch.testing.assert_close(fm.flow_matching_loss(prediction, target), per_sample.mean())
    torch.testing.assert_close(fm.flow_matching_loss(prediction, target, sigmas, "logit_normal"), per_sample.mean())
    torch.testing.assert_close(fm.flow_matching_loss(prediction, target, sigmas, "sigma_sqrt"), (per_sample / sigmas**2).mean())
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(fm.flow_matching_loss(prediction, target, sigmas, "cosmap"), (per_sample * cosmap).mean())


def test_classifier_free_guidance():
    uncond, cond = _pair(2)
    torch.testing.assert_close(fm.classifier_free_guidance(uncond, cond, 1.0), cond)
    torch.testing.assert_close(fm.classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(fm.classifier_free_guidance(uncond, cond, 4.0), uncond + 4.0 * (cond - uncond))


def test_a_perfect_clean_sample_prediction_converts_to_the_velocity_target():
    x0, noise = _pair(4)
    sigmas = torch.tensor([0.1, 0.5, 1.0])
    noisy, target = fm.rectified_flow_inputs(x0, sigmas, noise)
    velocity = fm.sample_to_velocity(x0, noisy, fm.sigmas_to_timesteps(sigmas))
    torch.testing.assert_close(velocity, target, rtol=1e-4, atol=1e-4)
    assert fm.SAMPLE_PREDICTION_MIN_SIGMA > 0


def test_old_import_locations_still_work():
    from chronos_video.models.embeddings import sample_to_velocity
    from chronos_video.training_utils import rectified_flow_inputs, sample_flow_sigmas

    assert rectified_flow_inputs is fm.rectified_flow_inputs and sample_flow_sigmas is fm.sample_flow_sigmas
    assert fm.sample_to_velocity is sample_to_velocity
