"""ChronosFlowMatchScheduler: config round trip, Euler parity with diffusers, Heun accuracy."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from chronos_video import ChronosFlowMatchScheduler


def test_config_roundtrip_is_exact(tmp_path):
    scheduler = ChronosFlowMatchScheduler(shift=3.0, solver="heun", use_dynamic_shifting=False, base_image_seq_len=128, shift_terminal=0.05)
    scheduler.save_pretrained(tmp_path)
    loaded = ChronosFlowMatchScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert loaded.config.solver == "heun" and loaded.config.shift == 3.0 and loaded.config.shift_terminal == 0.05


def test_euler_matches_diffusers_parent():
    ours, parent = ChronosFlowMatchScheduler(shift=2.0), FlowMatchEulerDiscreteScheduler(shift=2.0)
    ours.set_timesteps(6)
    parent.set_timesteps(6)
    torch.testing.assert_close(ours.timesteps, parent.timesteps)
    sample_a = sample_b = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        velocity = torch.sin(sample_a) + t / 1000
        sample_a = ours.step(velocity, t, sample_a).prev_sample
        sample_b = parent.step(torch.sin(sample_b) + t / 1000, t, sample_b).prev_sample
    torch.testing.assert_close(sample_a, sample_b)


def integrate(solver: str, steps: int) -> torch.Tensor:
    """dz/dsigma = -z (sigma from 1 to 0) has the exact solution z(0) = z(1) * e."""
    scheduler = ChronosFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(steps)
    z = torch.ones(1)
    for t in scheduler.timesteps:
        z = scheduler.step(-z, t, z).prev_sample
    return z


def test_heun_is_more_accurate_than_euler_per_step_count():
    exact = torch.exp(torch.tensor(1.0)) * (1.0)  # from sigma=1 to sigma=0: z(0) = e^{1} z(1)
    euler_error = (integrate("euler", 10) - exact).abs().item()
    heun_error = (integrate("heun", 10) - exact).abs().item()
    assert heun_error < euler_error / 3


def test_heun_timesteps_repeat_interior_points():
    scheduler = ChronosFlowMatchScheduler(solver="heun")
    scheduler.set_timesteps(4)
    assert scheduler.order == 2
    assert len(scheduler.timesteps) == 7 and scheduler.timesteps.is_floating_point()
    assert scheduler.timesteps[1] == scheduler.timesteps[2]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="solver"):
        ChronosFlowMatchScheduler(solver="rk4")
    scheduler = ChronosFlowMatchScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError):
        scheduler.step(torch.zeros(1), 1, torch.zeros(1))


def test_old_config_with_pipeline_policy_loads_it_outside_the_config(tmp_path):
    """scheduler_config.json files from before the policy moved to the pipeline still load, quietly."""
    import json

    ChronosFlowMatchScheduler(shift=2.0).save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(precision_schedule="sigma", calibrated_precision_schedule=None, precision_backend="native", constraint_settings=None)
    path.write_text(json.dumps(config))
    loaded = ChronosFlowMatchScheduler.from_pretrained(tmp_path)
    assert loaded.legacy_pipeline_config == {"precision_schedule": "sigma", "precision_backend": "native"}
    assert loaded.config.shift == 2.0 and "precision_schedule" not in loaded.config
    assert ChronosFlowMatchScheduler().legacy_pipeline_config == {}
