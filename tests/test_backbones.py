"""What both velocity backbones (Nano-Sora, Chronos-V) share: the forward skeleton, LoRA, checkpointing,
save/load, input validation, diffusers' attention dispatch and diffusers' cache hooks in the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
from peft import LoraConfig

from chronos_video import (
    ChronosFlowMatchScheduler,
    ChronosMambaModel,
    ChronosPipeline,
    HRMVideoModel,
    NanoSoraPipeline,
    NanoSoraTransformer3DModel,
    build_text_encoder,
)
from conftest import backbone_inputs, check_attention_dispatch, perturb_zero_init

FAMILIES = {
    "nano-sora": (NanoSoraTransformer3DModel, NanoSoraPipeline, {}, ["to_q", "to_k", "to_v", "to_out"]),
    "chronos-v": (ChronosMambaModel, ChronosPipeline, {"state_size": 4}, ["to_q", "to_v", "in_proj", "out_proj"]),
}
PROMPT = "a small red circle moving left to right slowly"


def tiny_model(family: str, **kwargs):
    model_class, _, family_kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = dict(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_kv_heads=2, text_embed_dim=24, **family_kwargs)
    config.update(kwargs)
    return perturb_zero_init(model_class(**config), std=0.05)


def tiny_pipeline(family: str, tokenizer, **kwargs):
    _, pipeline_class, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    transformer = tiny_model(family, text_embed_dim=32, num_layers=3, **kwargs).eval()
    pipe = pipeline_class(tokenizer, text_encoder, transformer, ChronosFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 4, **kwargs) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).frames


# ---------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("family, kwargs", [("nano-sora", {}), ("chronos-v", {"text_conditioning": "cross_attention"}),
                                            ("chronos-v", {"text_conditioning": "scan_prefix"})])
def test_forward_shape_and_dependence_on_every_input(family, kwargs):
    model = tiny_model(family, **kwargs)
    video, timestep, text, mask = backbone_inputs()
    out = model(video, timestep, text, mask).sample
    assert out.shape == video.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, model(video, timestep * 0.5, text, mask).sample)
    assert not torch.allclose(out, model(video, timestep, text + 1, mask).sample)
    text_changed_padding = text.clone()  # padded text tokens must not matter
    text_changed_padding[0, 3:] = 100.0
    text_changed_padding[1, 1:] = -50.0
    torch.testing.assert_close(model(video, timestep, text_changed_padding, mask).sample, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, kwargs", [("nano-sora", {}), ("chronos-v", {}),
                                            ("chronos-v", {"scan_type": "ssd", "scan_head_dim": 8, "text_conditioning": "scan_prefix"})])
def test_gradient_checkpointing_gives_same_gradients(family, kwargs):
    model = tiny_model(family, **kwargs).train()
    video, timestep, text, mask = backbone_inputs()
    model(video, timestep, text, mask).sample.square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    if family == "chronos-v":  # blocks and, inside them, each scan order are recomputed
        assert all(block.mixer.gradient_checkpointing for block in model.blocks)
    model(video, timestep, text, mask).sample.square().mean().backward()
    for expected, param in zip(reference, model.parameters()):
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_scale_through_attention_kwargs(family):
    model = tiny_model(family)
    video, timestep, text, mask = backbone_inputs()
    base = model(video, timestep, text, mask).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=FAMILIES[family][3]))
    with torch.no_grad():  # LoRA's B matrices start at zero; give the adapter an effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    with_lora = model(video, timestep, text, mask).sample
    scaled_off = model(video, timestep, text, mask, attention_kwargs={"scale": 0.0}).sample
    assert not torch.allclose(with_lora, base, atol=1e-4)
    torch.testing.assert_close(scaled_off, base, rtol=1e-4, atol=1e-5)


# Chronos-V round-trips its less common settings (text as a scan prefix, real state, two orders).
ROUNDTRIP_KWARGS = {"nano-sora": {}, "chronos-v": dict(text_conditioning="scan_prefix", num_scan_orders=2, complex_state=False, state_size=6)}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family, tmp_path):
    model = tiny_model(family, **ROUNDTRIP_KWARGS[family]).eval()
    video, timestep, text, mask = backbone_inputs()
    model.save_pretrained(tmp_path)
    loaded = FAMILIES[family][0].from_pretrained(tmp_path)
    assert not loaded.training

    def public(config):  # JSON turns tuples into lists; keys starting with "_" are bookkeeping
        return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))

    assert public(loaded.config) == public(model.config)
    with torch.no_grad():
        assert torch.equal(model(video, timestep, text, mask).sample, loaded(video, timestep, text, mask).sample)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_errors(family):
    model = tiny_model(family)
    video, timestep, text, mask = backbone_inputs()
    with pytest.raises(ValueError, match="5D"):
        model(video[0], timestep, text, mask)
    with pytest.raises(ValueError, match="channels"):
        model(video[:, :2], timestep, text, mask)
    with pytest.raises(ValueError, match="height=15"):
        model(video[..., :15, :], timestep, text, mask)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(video, timestep, text[0], mask)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(video, timestep, text, mask[:, :3])


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_goes_through_diffusers_dispatch(family):
    """The attention modules are diffusers `AttentionModuleMixin`s: backends and processors can be set."""
    check_attention_dispatch(tiny_model(family).eval())


# ---------------------------------------------------------------------------------------------- cache hooks

@pytest.mark.parametrize("family", FAMILIES)
def test_first_block_cache_in_the_pipeline(family, tiny_tokenizer):
    pipe = tiny_pipeline(family, tiny_tokenizer)
    base = generate(pipe)
    tail_calls = []
    pipe.transformer.blocks[-1].ff.register_forward_hook(lambda *args: tail_calls.append(1))

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # nothing is close enough to reuse
    assert pipe.transformer.is_cache_enabled
    np.testing.assert_array_equal(generate(pipe), base)
    assert len(tail_calls) == 4
    pipe.transformer.disable_cache()

    tail_calls.clear()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # everything after the first step is reused
    cached = generate(pipe)
    assert len(tail_calls) == 1 and cached.shape == base.shape and np.isfinite(cached).all()
    assert not np.array_equal(cached, base)
    pipe.transformer.disable_cache()
    np.testing.assert_array_equal(generate(pipe), base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["taylorseer", "magcache", "pyramid_attention_broadcast"])
def test_other_diffusers_caches_run_and_disable_cleanly(family, method, tiny_tokenizer):
    pipe = tiny_pipeline(family, tiny_tokenizer)
    base = generate(pipe, steps=6)
    timesteps = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: timesteps.append(float(kwargs["timestep"][0])), with_kwargs=True)
    config = {
        "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32),
        "magcache": lambda: MagCacheConfig(mag_ratios=[1.0] * 6, num_inference_steps=6, threshold=1.0, retention_ratio=0.2),
        "pyramid_attention_broadcast": lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
            cross_attention_timestep_skip_range=(0, 1000), current_timestep_callback=lambda: timesteps[-1],
        ),
    }[method]()
    pipe.transformer.enable_cache(config)
    cached = generate(pipe, steps=6)
    assert cached.shape == base.shape and np.isfinite(cached).all() and not np.array_equal(cached, base)
    pipe.transformer.disable_cache()
    np.testing.assert_array_equal(generate(pipe, steps=6), base)


SHIPPED = sorted(  # the flow pipelines (the autoregressive one has no velocity backbone; tests/test_ar_video.py covers it)
    p for p in (Path(__file__).resolve().parents[1] / "pipelines").iterdir()
    if (p / "model_index.json").is_file() and json.loads((p / "model_index.json").read_text())["_class_name"] != "ARVideoPipeline"
)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_pipelines_sample_the_same_in_train_mode_and_accept_a_cache(path):
    from chronos_video.cli import load_pipeline

    pipe = load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    evaluated = generate(pipe, steps=3)
    pipe.transformer.train()  # as during validation inside a training run
    np.testing.assert_array_equal(generate(pipe, steps=3), evaluated)
    pipe.transformer.eval()
    if isinstance(pipe.transformer, HRMVideoModel):  # the recursion re-enters its blocks; HRM reuses its carry instead
        with pytest.raises(NotImplementedError, match="warm"):
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
        return
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    cached = generate(pipe, steps=3)
    assert cached.shape == evaluated.shape and np.isfinite(cached).all()
    pipe.transformer.disable_cache()
