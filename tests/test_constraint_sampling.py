"""Constraint transport and precision gauges inside every flow pipeline (through the shared base)."""

from __future__ import annotations

import pytest
import torch

from chronos_video import ChronosFlowMatchScheduler, NanoSoraPipeline
from chronos_video.guidance import ConstraintTransport, RegionConstraint
from chronos_video.precision import PrecisionSchedule

PROMPT = "a small red circle moving left to right slowly"


def keyframe_constraint(epsilon: float = 0.05) -> RegionConstraint:
    target = torch.zeros(4, 3, 16, 16)
    target[:, 0, 4:12, 4:12] = 0.9  # a red square
    mask = torch.zeros(4, 3, 16, 16, dtype=torch.bool)
    mask[0] = True  # the whole first frame is a keyframe
    return RegionConstraint(target, mask, epsilon=epsilon)


def sample(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


@pytest.mark.parametrize("method", ["natural", "dps", "repaint"])
def test_constrained_video_satisfies_the_constraint(tiny_pipeline, method):
    constraint = keyframe_constraint()
    out = sample(tiny_pipeline, constraints=[constraint], constraint_settings={"method": method})
    video = out.frames[0]  # (F, C, H, W) in [0, 1]
    rms = (video[constraint.mask] - constraint.target[constraint.mask]).pow(2).mean().sqrt()
    assert out.constraints_satisfied == [True] and rms <= constraint.epsilon
    assert all("constraint_violation" in step and "barrier" in step for step in out.trace)
    free = sample(tiny_pipeline).frames[0]
    assert (free[constraint.mask] - constraint.target[constraint.mask]).pow(2).mean().sqrt() > constraint.epsilon


def test_constraint_settings_come_from_the_scheduler_config(tiny_pipeline, tmp_path):
    settings = ConstraintTransport(method="natural", cbf=False, cg_iters=7).to_config()
    tiny_pipeline.scheduler = ChronosFlowMatchScheduler(constraint_settings=settings, precision_schedule=PrecisionSchedule.preset("sigma").to_dict())
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = NanoSoraPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.constraint_settings == settings
    assert PrecisionSchedule.from_dict(loaded.scheduler.config.precision_schedule).to_dict() == PrecisionSchedule.preset("sigma").to_dict()
    a = sample(tiny_pipeline, constraints=[keyframe_constraint()])
    b = sample(loaded, constraints=[keyframe_constraint()])
    torch.testing.assert_close(a.frames, b.frames)
    assert [s["gauge"] for s in a.trace] == [s["gauge"] for s in b.trace]


def test_precision_schedule_switches_gauges_and_restores_weights(tiny_pipeline):
    before = {k: v.clone() for k, v in tiny_pipeline.transformer.state_dict().items()}
    full = sample(tiny_pipeline, precision=None)
    seed = sample(tiny_pipeline, precision="seed")
    assert [s["gauge"] for s in seed.trace] == [PrecisionSchedule.preset("seed").select(s["sigma"]).gauge for s in seed.trace]
    assert len({s["gauge"] for s in seed.trace}) > 1 and "gauge" not in full.trace[0]
    assert not torch.equal(seed.frames, full.frames)
    assert (seed.frames - full.frames).abs().mean() < 0.05  # quantization noise, not a different video
    for key, value in tiny_pipeline.transformer.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(sample(tiny_pipeline, precision=None).frames, full.frames, rtol=0, atol=0)


def test_precision_and_constraint_errors(tiny_pipeline):
    with pytest.raises(ValueError, match="calibrated"):
        sample(tiny_pipeline, precision="calibrated")
    with pytest.raises(ValueError):
        sample(tiny_pipeline, precision="fp3")
    wrong = RegionConstraint(torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"constraints\[0\]"):
        sample(tiny_pipeline, constraints=[wrong])
    with pytest.raises(ValueError, match="constraints"):
        sample(tiny_pipeline, constraints=[])
    with pytest.raises(ValueError, match="method"):
        sample(tiny_pipeline, constraints=[keyframe_constraint()], constraint_settings={"method": "magic"})
    with pytest.raises(ValueError, match="precision_backend"):
        ChronosFlowMatchScheduler(precision_backend="gpu")
