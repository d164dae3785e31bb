"""Flow pipelines as diffusers users meet them: scheduler swaps, text-encoder-only loading,
sampling policy in the pipeline config (and the older scheduler-config layout), thin subclasses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from chronos_video import (
    ChronosFlowMatchScheduler,
    ChronosMambaModel,
    ChronosPipeline,
    HRMVideoModel,
    HRMVideoPipeline,
    NanoSoraPipeline,
    build_text_encoder,
)
from chronos_video.guidance import ConstraintTransport
from chronos_video.pipelines.pipeline_flow_video import FlowVideoPipeline
from chronos_video.precision import PrecisionSchedule
from chronos_video.schedulers import current_sigmas
from conftest import make_tiny_pipeline, perturb_zero_init

PROMPT = "a small red circle moving left to right slowly"
POLICY_KEYS = ("precision_schedule", "calibrated_precision_schedule", "precision_backend", "constraint_settings")


def make_tiny_chronos_pipeline(tokenizer) -> ChronosPipeline:
    torch.manual_seed(0)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    transformer = ChronosMambaModel(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_layers=2, state_size=4,
                                    num_attention_heads=4, num_kv_heads=2, text_embed_dim=32)
    pipe = ChronosPipeline(tokenizer, text_encoder, perturb_zero_init(transformer, std=0.05).eval(), ChronosFlowMatchScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_hrm_pipeline(tokenizer) -> HRMVideoPipeline:
    torch.manual_seed(0)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    transformer = HRMVideoModel(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_attention_heads=4,
                                text_embed_dim=32, h_layers=1, l_layers=1, max_segments=2)
    pipe = HRMVideoPipeline(tokenizer, text_encoder, perturb_zero_init(transformer, std=0.05).eval(), ChronosFlowMatchScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"nano-sora": make_tiny_pipeline, "chronos-v": make_tiny_chronos_pipeline, "hrm": make_tiny_hrm_pipeline}


def sample(pipe, steps: int = 3, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


# ----------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("builder", BUILDERS, ids=list(BUILDERS))
def test_diffusers_flow_match_schedulers_drop_in(tiny_tokenizer, builder):
    pipe = BUILDERS[builder](tiny_tokenizer)
    assert {c.__name__ for c in pipe.scheduler.compatibles} == {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
    ours_euler = sample(pipe)
    pipe.scheduler = ChronosFlowMatchScheduler.from_config(pipe.scheduler.config, solver="heun")
    ours_heun = sample(pipe)

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler = sample(pipe)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.config.scheduler[1] == "FlowMatchEulerDiscreteScheduler"
    # Our Euler solver is diffusers' Euler step: the same video, bit for bit, at the same sigmas.
    torch.testing.assert_close(euler.frames, ours_euler.frames, rtol=0, atol=0)
    assert [s["sigma"] for s in euler.trace] == [s["sigma"] for s in ours_euler.trace]

    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    heun = sample(pipe)
    assert len(heun.trace) == 5 and [s["sigma"] for s in heun.trace] == [s["sigma"] for s in ours_heun.trace]
    # Same Heun scheme written differently (diffusers divides through sigma): float32 rounding apart.
    torch.testing.assert_close(heun.frames, ours_heun.frames, rtol=0, atol=1e-5)
    assert not torch.allclose(heun.frames, euler.frames, atol=1e-3)


def test_swapped_scheduler_drives_constraints_and_precision(tiny_pipeline):
    from chronos_video.guidance import RegionConstraint

    target = torch.zeros(4, 3, 16, 16)
    mask = torch.zeros(4, 3, 16, 16, dtype=torch.bool)
    mask[0] = True
    tiny_pipeline.scheduler = FlowMatchHeunDiscreteScheduler.from_config(tiny_pipeline.scheduler.config)
    out = sample(tiny_pipeline, constraints=[RegionConstraint(target=target, mask=mask, epsilon=0.05)], precision="sigma")
    assert out.constraints_satisfied == [True]
    assert all("constraint_violation" in step and "gauge" in step for step in out.trace)


@pytest.mark.parametrize("scheduler_class", [ChronosFlowMatchScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_current_sigmas_reads_any_flow_match_scheduler(scheduler_class):
    scheduler = scheduler_class(shift=3.0)
    scheduler.set_timesteps(3)
    assert scheduler.step_index is None
    seen = []
    sample_ = torch.ones(1)
    for t in scheduler.timesteps:
        seen.append(current_sigmas(scheduler))
        sample_ = scheduler.step(-sample_, t, sample_, return_dict=False)[0]
    sigmas = [float(s) for s in scheduler.sigmas]
    distinct = sorted(set(sigmas), reverse=True)
    assert seen[0][0] == sigmas[0] == 1.0
    for sigma, sigma_next in seen:  # the next sigma is always the next *smaller* one, 0 after the last
        assert sigma_next == distinct[distinct.index(sigma) + 1]
    with pytest.raises(TypeError, match="sigmas"):
        current_sigmas(object())


# ----------------------------------------------------------------------------------------- text-encoder-only
def test_encode_prompt_without_transformer_uses_the_text_encoder_dtype(tiny_pipeline, tmp_path):
    reference = tiny_pipeline.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    tiny_pipeline.save_pretrained(tmp_path)
    text_only = NanoSoraPipeline.from_pretrained(tmp_path, transformer=None)
    assert text_only.transformer is None
    embeds = text_only.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    for got, expected in zip(embeds, reference):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    bf16 = NanoSoraPipeline.from_pretrained(tmp_path, transformer=None, dtype=torch.bfloat16)
    assert bf16.encode_prompt(PROMPT)[0].dtype == bf16.text_encoder.dtype == torch.bfloat16
    # the precomputed embeddings feed the full pipeline unchanged
    from_embeds = tiny_pipeline(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], negative_prompt_embeds=embeds[2],
                                negative_prompt_attention_mask=embeds[3], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    from_text = tiny_pipeline(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-6)  # as test_prompt_embeds_equal_prompt


def test_default_size_is_public_and_the_call_default(tiny_pipeline):
    assert tiny_pipeline.default_size == (4, 16, 16)
    assert tuple(sample(tiny_pipeline, steps=1).frames.shape[1:]) == (4, 3, 16, 16)


# ----------------------------------------------------------------------------------------- policy in the pipeline config
def policy():
    return {
        "precision_schedule": PrecisionSchedule.preset("sigma").to_dict(),
        "calibrated_precision_schedule": PrecisionSchedule.preset("seed").to_dict(),
        "precision_backend": "emulate",
        "constraint_settings": ConstraintTransport(method="natural", cbf=False, cg_iters=7).to_config(),
    }


def with_policy(pipe, **settings):
    return type(pipe)(**pipe.components, **settings)


def test_policy_is_pipeline_config_saved_in_model_index(tiny_pipeline, tmp_path):
    pipe = with_policy(tiny_pipeline, **policy())
    pipe.set_progress_bar_config(disable=True)
    assert {key: pipe.config[key] for key in POLICY_KEYS} == policy() == pipe.parameters
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    scheduler_config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert {key: model_index[key] for key in POLICY_KEYS} == policy()
    assert not set(POLICY_KEYS) & set(scheduler_config)  # the scheduler is only a sampler
    loaded = NanoSoraPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert {key: loaded.config[key] for key in POLICY_KEYS} == policy()
    a, b = sample(pipe), sample(loaded)  # default precision = the config's "sigma" schedule
    torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=0)
    assert [s["gauge"] for s in a.trace] == [PrecisionSchedule.preset("sigma").select(s["sigma"]).gauge for s in a.trace]
    calibrated = sample(loaded, precision="calibrated")
    assert [s["gauge"] for s in calibrated.trace] == [PrecisionSchedule.preset("seed").select(s["sigma"]).gauge for s in calibrated.trace]
    alias = sample(loaded, precision="scheduler")  # the old name of the default still means the default
    torch.testing.assert_close(alias.frames, b.frames, rtol=0, atol=0)
    assert "gauge" not in sample(loaded, precision=None).trace[0]


def write_old_layout(pipe, folder, **settings) -> None:
    """A pipeline folder as chronos-video wrote them before the policy moved: keys in the scheduler config."""
    pipe.save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update({"precision_schedule": None, "calibrated_precision_schedule": None, "precision_backend": "emulate",
                   "constraint_settings": None, **settings})
    path.write_text(json.dumps(config, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k not in POLICY_KEYS}, indent=2))


def test_old_layout_folder_loads_quietly_with_the_same_policy(tiny_pipeline, tmp_path, capfd):
    from chronos_video.guidance import RegionConstraint

    write_old_layout(tiny_pipeline, tmp_path / "old", **policy())
    capfd.readouterr()
    loaded = NanoSoraPipeline.from_pretrained(tmp_path / "old")
    assert "not expected" not in capfd.readouterr().err  # no diffusers "unknown config keys" warning
    loaded.set_progress_bar_config(disable=True)
    assert {key: loaded.config[key] for key in POLICY_KEYS} == policy()
    assert not set(POLICY_KEYS) & set(loaded.scheduler.config)

    new = with_policy(tiny_pipeline, **policy())
    new.set_progress_bar_config(disable=True)
    target = torch.zeros(4, 3, 16, 16)
    mask = torch.zeros(4, 3, 16, 16, dtype=torch.bool)
    mask[-1] = True
    constraint = RegionConstraint(target=target, mask=mask, epsilon=0.05)
    a, b = sample(new, constraints=[constraint]), sample(loaded, constraints=[constraint])
    torch.testing.assert_close(a.frames, b.frames, rtol=0, atol=0)
    assert [s["gauge"] for s in a.trace] == [s["gauge"] for s in b.trace]

    loaded.save_pretrained(tmp_path / "migrated")  # re-saving writes the new layout
    assert json.loads((tmp_path / "migrated" / "model_index.json").read_text())["constraint_settings"] == policy()["constraint_settings"]
    assert "constraint_settings" not in json.loads((tmp_path / "migrated" / "scheduler" / "scheduler_config.json").read_text())


def test_pipeline_policy_wins_over_an_old_scheduler_and_fills_its_gaps(tiny_pipeline):
    pipe = with_policy(tiny_pipeline, precision_schedule="seed")
    pipe.scheduler = ChronosFlowMatchScheduler(precision_schedule="sigma", precision_backend="native", constraint_settings={"method": "dps"})
    assert pipe.config.precision_schedule == "seed"  # set on the pipeline: kept
    assert pipe.config.precision_backend == "native" and pipe.config.constraint_settings == {"method": "dps"}
    assert pipe.scheduler.legacy_pipeline_config["precision_schedule"] == "sigma"
    assert not set(POLICY_KEYS) & set(pipe.scheduler.config)


def test_invalid_policy_is_named(tiny_pipeline):
    for key, value in (("precision_backend", "gpu"), ("precision_schedule", 3), ("constraint_settings", "natural")):
        with pytest.raises(ValueError, match=key):
            with_policy(tiny_pipeline, **{key: value})
        with pytest.raises(ValueError, match=key):
            ChronosFlowMatchScheduler(**{key: value})


def test_shipped_pipelines_keep_their_policy_in_either_layout():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "pipelines" / "nano-sora-shapes"
    stored = {**json.loads((root / "scheduler" / "scheduler_config.json").read_text()), **json.loads((root / "model_index.json").read_text())}
    pipe = NanoSoraPipeline.from_pretrained(root)
    assert stored["calibrated_precision_schedule"]["rules"]
    assert pipe.config.calibrated_precision_schedule == stored["calibrated_precision_schedule"]


# ----------------------------------------------------------------------------------------- one class, two names
def test_pipeline_classes_are_thin_and_load_like_diffusers_pipelines(tiny_tokenizer, tmp_path):
    for cls in (ChronosPipeline, HRMVideoPipeline, NanoSoraPipeline):
        assert cls.__init__ is FlowVideoPipeline.__init__
        modules, optional = cls._get_signature_keys(cls)
        assert modules == ["scheduler", "text_encoder", "tokenizer", "transformer", "vae"] and optional == sorted(POLICY_KEYS)
    pipe = make_tiny_chronos_pipeline(tiny_tokenizer)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "ChronosPipeline"
    loaded = ChronosPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.transformer, ChronosMambaModel) and set(loaded.components) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}
