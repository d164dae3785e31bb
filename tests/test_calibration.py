"""Pipeline-level precision calibration: profile on real sampling trajectories, store, reload, verify."""

from __future__ import annotations

import pytest
import torch

from chronos_video import NanoSoraPipeline
from chronos_video.precision import (
    FULL_PRECISION,
    PrecisionSchedule,
    calibrate_pipeline,
    collect_calibration_inputs,
    measure_layer_errors,
    profile_pipeline,
    quantize_weight,
    ranking_agreement,
    select_layers,
)
from chronos_video.schedulers import current_sigmas

from conftest import CAPTIONS

STEPS = 4  # sigmas 1.0, 0.667, 0.334, 0.001
BUCKETS = (0.8, 0.2)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls on a shared 2-core machine: two threads contend (seen 100x slower), one does not."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sample(pipe, **kwargs):
    return pipe(CAPTIONS[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


def test_inputs_are_the_sampler_calls_filed_by_nearest_sigma(tiny_pipeline):
    inputs = collect_calibration_inputs(tiny_pipeline, CAPTIONS, num_inference_steps=STEPS, sigma_buckets=BUCKETS, batch_size=2)
    assert list(inputs) == list(BUCKETS)
    # 2 prompt chunks (2 + 1 prompts) x 2 steps per bucket; CFG doubles each batch
    assert [len(v) for v in inputs.values()] == [4, 4]
    assert sorted(b["hidden_states"].shape[0] for b in inputs[0.8]) == [2, 2, 4, 4]
    sigmas_high = {round(float(b["timestep"][0]) / 1000, 3) for b in inputs[0.8]}
    sigmas_low = {round(float(b["timestep"][0]) / 1000, 3) for b in inputs[0.2]}
    assert sigmas_high == {1.0, 0.667} and sigmas_low == {0.334, 0.001}
    assert all(b["return_dict"] is False for batches in inputs.values() for b in batches)
    thinned = collect_calibration_inputs(tiny_pipeline, CAPTIONS, num_inference_steps=STEPS, sigma_buckets=BUCKETS, max_batches_per_bucket=1)
    assert [len(v) for v in thinned.values()] == [1, 1]


def test_calibrated_schedule_runs_stores_and_round_trips(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline
    schedule = calibrate_pipeline(pipe, CAPTIONS, num_inference_steps=STEPS, sigma_buckets=BUCKETS, budget=0.5)
    assert schedule.name == "calibrated" and schedule.metadata["low_precision_fraction"] >= 0.5
    assert schedule.metadata["calibration"]["loss"] == "guided_velocity_probe"
    assert pipe.config.calibrated_precision_schedule == schedule.to_dict()
    again = calibrate_pipeline(pipe, CAPTIONS, num_inference_steps=STEPS, sigma_buckets=BUCKETS, budget=0.5, register=False)
    assert again == schedule  # calibration is deterministic for a given seed

    # Every controlled layer runs, at every step, in exactly the gauge the schedule assigns it.
    originals = {name: m.weight.detach().clone() for name, m in select_layers(pipe.transformer).items()}
    mismatches, calls = [], []

    def check(name):
        def hook(module, args):
            decision = schedule.select(current_sigmas(pipe.scheduler)[0])
            gauge = decision.layer_gauges.get(name, decision.gauge)
            expected = originals[name] if gauge == FULL_PRECISION else quantize_weight(originals[name], gauge)
            calls.append(gauge)
            if not torch.equal(module.weight, expected):
                mismatches.append((name, gauge))
        return hook

    modules = dict(pipe.transformer.named_modules())
    handles = [modules[name].register_forward_pre_hook(check(name)) for name in originals]
    try:
        out = sample(pipe, precision="calibrated")
    finally:
        for handle in handles:
            handle.remove()
    assert not mismatches and len(calls) == STEPS * len(originals) and len(set(calls)) >= 2
    assert [s["gauge"] for s in out.trace] == [schedule.select(s["sigma"]).gauge for s in out.trace]
    full = sample(pipe, precision=None)
    assert 0 < (out.frames - full.frames).abs().mean() < 0.05  # quantization noise, not another video

    pipe.save_pretrained(tmp_path)
    loaded = NanoSoraPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert PrecisionSchedule.from_dict(loaded.config.calibrated_precision_schedule) == schedule
    reloaded = sample(loaded, precision="calibrated")
    torch.testing.assert_close(reloaded.frames, out.frames, rtol=0, atol=0)
    assert [s["gauge"] for s in reloaded.trace] == [s["gauge"] for s in out.trace]


def test_profiled_ranking_matches_measured_layer_errors(tiny_pipeline):
    inputs = collect_calibration_inputs(tiny_pipeline, CAPTIONS, num_inference_steps=STEPS, sigma_buckets=BUCKETS)
    report = profile_pipeline(tiny_pipeline, CAPTIONS, inputs=inputs)
    reused = calibrate_pipeline(tiny_pipeline, CAPTIONS, report=report, budget=0.3, register=False)
    assert reused.rules == report.to_schedule(budget=0.3).rules and reused.metadata["calibration"]["num_inference_steps"] == STEPS
    assert tiny_pipeline.config.calibrated_precision_schedule is None
    for gauge in ("fp8", "nvfp4"):
        names, measured = measure_layer_errors(tiny_pipeline.transformer, inputs, gauge)
        assert names == report.layers and measured.shape == (len(names), len(BUCKETS)) and bool((measured > 0).all())
        rho = ranking_agreement(report, names, measured, gauge)
        assert rho > 0.7, f"{gauge}: Spearman {rho:.3f} between profiled S and measured per-layer velocity error"
        # S predicts the squared velocity change itself, not just its order: same order of magnitude in total.
        ratio = float(report.sensitivity[:, report.gauges.index(gauge)].sum() / measured.sum())
        assert 0.1 < ratio < 10.0, f"{gauge}: predicted / measured = {ratio:.2f}"


def test_calibration_rejects_bad_arguments(tiny_pipeline):
    with pytest.raises(ValueError, match="prompts"):
        calibrate_pipeline(tiny_pipeline, [], num_inference_steps=STEPS, sigma_buckets=BUCKETS)
    with pytest.raises(ValueError, match="prompts"):
        calibrate_pipeline(tiny_pipeline, [CAPTIONS[0], 3], num_inference_steps=STEPS, sigma_buckets=BUCKETS)
    with pytest.raises(ValueError, match="sigma_buckets"):
        calibrate_pipeline(tiny_pipeline, CAPTIONS, sigma_buckets=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"no sampling step .* \[0\.5\]"):
        calibrate_pipeline(tiny_pipeline, CAPTIONS, num_inference_steps=2, sigma_buckets=(0.9, 0.5, 0.1))
    with pytest.raises(ValueError, match="budget_kind"):
        calibrate_pipeline(tiny_pipeline, CAPTIONS, budget_kind="speed")
    with pytest.raises(ValueError, match="precision"):
        calibrate_pipeline(tiny_pipeline, CAPTIONS, num_inference_steps=STEPS, sigma_buckets=BUCKETS, precision="seed")
    recording = collect_calibration_inputs(tiny_pipeline, CAPTIONS[:1], num_inference_steps=2, sigma_buckets=(0.9, 0.1))
    with pytest.raises(ValueError, match="guidance_scale=4.0"):
        profile_pipeline(tiny_pipeline, CAPTIONS[:1], guidance_scale=1.0, inputs=recording)
    with pytest.raises(TypeError, match="report"):
        calibrate_pipeline(tiny_pipeline, CAPTIONS, report={"layers": []})
    with pytest.raises(TypeError, match="pipe"):
        calibrate_pipeline(torch.nn.Linear(2, 2), CAPTIONS)
    assert tiny_pipeline.config.calibrated_precision_schedule is None  # nothing half-registered
