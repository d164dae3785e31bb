"""HRM-Video: the recursive backbone (segments, carry, halting, gradient modes, shared weights), its
deep-supervision loss, HRMVideoPipeline (halting, warm start, per-step trace) and training end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig

from chronos_video import ChronosFlowMatchScheduler, HRMVideoModel, HRMVideoPipeline, build_text_encoder
from chronos_video.models.hrm_video import HRMCarry, HRMVideoModelOutput, deep_supervision_loss
from chronos_video.pipelines.pipeline_flow_video import FlowVideoPipeline
from conftest import backbone_inputs, check_attention_dispatch, load_train_script, perturb_zero_init

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red circle moving left to right slowly"


def tiny_hrm(**kwargs) -> HRMVideoModel:
    torch.manual_seed(0)
    config = dict(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                  text_embed_dim=24, h_layers=1, l_layers=1, h_cycles=2, l_cycles=2, max_segments=3)
    config.update(kwargs)
    model = HRMVideoModel(**config)
    with torch.no_grad():  # keep the halting head's late-halting init; give every other zero-init layer an effect
        bias = model.halt_head.proj.bias.clone()
        perturb_zero_init(model, std=0.05)
        model.halt_head.proj.weight.zero_()
        model.halt_head.proj.bias.copy_(bias)
    return model


def make_tiny_hrm_pipeline(tokenizer, **kwargs) -> HRMVideoPipeline:
    torch.manual_seed(0)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    transformer = tiny_hrm(text_embed_dim=32, **kwargs).eval()
    pipe = HRMVideoPipeline(tokenizer, text_encoder, transformer, ChronosFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def halt_on(model: HRMVideoModel, halt: bool) -> None:
    with torch.no_grad():
        model.halt_head.proj.weight.zero_()
        model.halt_head.proj.bias.fill_(5.0 if halt else -5.0)


# ---------------------------------------------------------------------------------------------- model
def test_forward_contract_and_dependence_on_every_input():
    model = tiny_hrm()
    video, timestep, text, mask = backbone_inputs()
    out = model(video, timestep, text, mask)
    assert isinstance(out, HRMVideoModelOutput) and out.sample.shape == video.shape and torch.isfinite(out.sample).all()
    assert out.segments.tolist() == [3, 3]  # halting head initialised to halt late: weight 0, bias -5
    assert model.halt_head.proj.bias.item() == -5.0
    assert out.carry.high.shape == out.carry.low.shape == (2, 2 * 4 * 4, 32) and not out.carry.high.requires_grad
    plain = model(video, timestep, text, mask, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1 and torch.equal(plain[0], out.sample)
    assert not torch.allclose(out.sample, model(video, timestep * 0.5, text, mask).sample)
    assert not torch.allclose(out.sample, model(video, timestep, text + 1, mask).sample)
    padded = text.clone()
    padded[0, 3:], padded[1, 1:] = 100.0, -50.0
    torch.testing.assert_close(model(video, timestep, padded, mask).sample, out.sample, rtol=1e-5, atol=1e-5)


def test_segments_continue_from_the_carry():
    model = tiny_hrm().eval()
    video, timestep, text, mask = backbone_inputs()
    with torch.no_grad():
        three = model(video, timestep, text, mask, max_segments=3, halting=False)
        one = model(video, timestep, text, mask, max_segments=1, halting=False)
        two_more = model(video, timestep, text, mask, max_segments=2, halting=False, carry=one.carry)
        assert not torch.allclose(one.sample, three.sample)
        torch.testing.assert_close(two_more.sample, three.sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two_more.carry.high, three.carry.high, rtol=1e-5, atol=1e-6)
        assert torch.equal(model(video, timestep, text, mask, carry=HRMCarry(*one.carry)).sample,
                           model(video, timestep, text, mask, carry=tuple(one.carry)).sample)


def test_halting_is_per_sample_and_matches_running_that_many_segments():
    model = tiny_hrm().eval()
    video, timestep, text, mask = backbone_inputs()
    halt_on(model, True)
    with torch.no_grad():
        assert model(video, timestep, text, mask).segments.tolist() == [1, 1]
        assert model(video, timestep, text, mask, halting=False).segments.tolist() == [3, 3]
        # halting weights that fire for sample 0 (t=900) only: the conditioning vectors differ by timestep
        conditioning = model.embed_inputs(video, timestep, text, mask)[3]
        features = torch.nn.functional.silu(conditioning)
        direction = features[0] - features[1]
        model.halt_head.proj.weight.zero_()
        model.halt_head.proj.weight[0, 32:] = direction
        model.halt_head.proj.bias.fill_(-float(direction @ (features[0] + features[1])) / 2)
        out = model(video, timestep, text, mask)
        assert out.segments.tolist() == [1, 3]
        first = model(video[:1], timestep[:1], text[:1], mask[:1], max_segments=1, halting=False)
        second = model(video[1:], timestep[1:], text[1:], mask[1:], max_segments=3, halting=False)
        torch.testing.assert_close(out.sample[:1], first.sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.sample[1:], second.sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.carry.high[:1], first.carry.high, rtol=1e-5, atol=1e-5)
        # min_segments: nobody is asked before then
        model.register_to_config(min_segments=2)
        assert model(video, timestep, text, mask).segments.tolist() == [2, 3]


def parameter_grads(model, mode: str, **forward_kwargs):
    model.register_to_config(gradient_mode=mode)
    model.zero_grad()
    video, timestep, text, mask = backbone_inputs()
    out = model(video, timestep, text, mask, **forward_kwargs)
    out.sample.square().mean().backward()
    return out.sample.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_modes_change_gradients_not_values():
    model = tiny_hrm(max_segments=1).train()
    one_value, one_step = parameter_grads(model, "one_step")
    full_value, full = parameter_grads(model, "full_recursion")
    torch.testing.assert_close(one_value, full_value, rtol=0, atol=0)
    assert one_step.keys() == full.keys()
    assert any(not torch.allclose(one_step[n], full[n]) for n in one_step if n.startswith("low_module"))
    # with a single L and H update per segment both modes differentiate the same graph
    single = tiny_hrm(max_segments=1, h_cycles=1, l_cycles=1).train()
    _, a = parameter_grads(single, "one_step")
    _, b = parameter_grads(single, "full_recursion")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["one_step", "full_recursion"])
def test_gradient_checkpointing_gives_same_gradients(mode):
    model = tiny_hrm(max_segments=2).train()
    _, reference = parameter_grads(model, mode, deep_supervision=True)
    model.enable_gradient_checkpointing()
    assert model.low_module.gradient_checkpointing and model.high_module.gradient_checkpointing
    _, checkpointed = parameter_grads(model, mode, deep_supervision=True)
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_deep_supervision_outputs_detach_the_carry_between_segments():
    model = tiny_hrm(max_segments=3).train()
    video, timestep, text, mask = backbone_inputs()
    out = model(video, timestep, text, mask, deep_supervision=True)
    assert len(out.segment_samples) == 3 and out.halt_logits.shape == (2, 3) and out.segments.tolist() == [3, 3]
    assert out.sample is out.segment_samples[-1]
    with torch.no_grad():
        for index, sample in enumerate(out.segment_samples):
            reference = model(video, timestep, text, mask, max_segments=index + 1, halting=False).sample
            torch.testing.assert_close(sample, reference, rtol=1e-5, atol=1e-6)
    # the last segment's loss reaches the patch embedding only through its own input injection: the same
    # gradient as a one-segment forward started from the second segment's carry
    second = model(video, timestep, text, mask, max_segments=2, halting=False)
    out.sample.square().mean().backward()
    grad = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    model(video, timestep, text, mask, max_segments=1, halting=False, carry=second.carry).sample.square().mean().backward()
    torch.testing.assert_close(model.patch_embed.proj.weight.grad, grad, rtol=1e-4, atol=1e-7)


def test_deep_supervision_loss_and_halting_targets():
    target = torch.zeros(2, 1, 1, 1, 1)
    # per-sample losses by segment: sample 0 improves 1 -> 0.25 -> 0.2475 (1%), sample 1 4 -> 3.99 -> 1
    samples = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.99 ** 0.5]), torch.tensor([0.2475 ** 0.5, 1.0])]
    segment_samples = [s.view(2, 1, 1, 1, 1) for s in samples]
    logits = torch.tensor([[3.0, 3.0, 0.0], [-3.0, -3.0, 0.0]])
    output = HRMVideoModelOutput(sample=segment_samples[-1], segment_samples=segment_samples, halt_logits=logits)
    loss, stats = deep_supervision_loss(output, target, halt_tau=0.05, halt_loss_weight=0.5)
    flow = (1 + 4 + 0.25 + 3.99 + 0.2475 + 1) / 6
    halt_targets = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # "stop" where the next segment gains < 5%
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], halt_targets)
    torch.testing.assert_close(loss, torch.tensor(flow) + 0.5 * bce)
    assert stats["halt_target_rate"] == 0.5 and stats["halt_accuracy"] == 0.5
    assert stats["flow_loss_segment_0"] == pytest.approx(2.5)
    no_halt, _ = deep_supervision_loss(output, target, halt_loss_weight=0.0)
    torch.testing.assert_close(no_halt, torch.tensor(flow))
    with pytest.raises(ValueError, match="deep_supervision=True"):
        deep_supervision_loss(HRMVideoModelOutput(sample=target), target)


def test_velocity_change_halting_target_needs_no_flow_target():
    # sample 0: the second segment flips the velocity (no loss gain, 200% change); sample 1: it barely moves it
    target = torch.zeros(2, 1, 1, 1, 1)
    first, second = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 2.02])
    output = HRMVideoModelOutput(sample=second.view(2, 1, 1, 1, 1), segment_samples=[first.view(2, 1, 1, 1, 1), second.view(2, 1, 1, 1, 1)],
                                 halt_logits=torch.zeros(2, 2))
    _, by_loss = deep_supervision_loss(output, target, halt_tau=0.05)
    _, by_change = deep_supervision_loss(output, target, halt_tau=0.05, halt_criterion="velocity_change")
    assert by_loss["halt_target_rate"] == 1.0  # neither lowers the loss by 5%
    assert by_change["halt_target_rate"] == 0.5  # only sample 1 has converged (1% change)
    with pytest.raises(ValueError, match="halt_criterion"):
        deep_supervision_loss(output, target, halt_criterion="entropy")


def test_halting_loss_trains_only_the_halting_head():
    # the halting BCE is a read-out: unchecked, its gradient on the shared (timestep + text) vector was
    # several times the flow loss's and slowed learning from the prompt (issue 12)
    model = tiny_hrm(max_segments=2).train()
    video, timestep, text, mask = backbone_inputs()
    out = model(video, timestep, text, mask, deep_supervision=True)
    out.halt_logits.sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"halt_head.proj.weight", "halt_head.proj.bias"}


def test_shared_weights_variant_roundtrips(tmp_path):
    shared = tiny_hrm(shared_weights=True)
    separate = tiny_hrm()
    assert shared.high_module is None and not any(n.startswith("high_module") for n, _ in shared.named_parameters())
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in separate.parameters())
    video, timestep, text, mask = backbone_inputs()
    shared.eval().save_pretrained(tmp_path)
    loaded = HRMVideoModel.from_pretrained(tmp_path)
    assert loaded.config.shared_weights and loaded.high_module is None
    public = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
    assert json.loads(json.dumps(public)) == json.loads(json.dumps({k: v for k, v in shared.config.items() if not k.startswith("_")}))
    with torch.no_grad():
        assert torch.equal(shared(video, timestep, text, mask).sample, loaded(video, timestep, text, mask).sample)


def test_lora_scale_through_attention_kwargs():
    model = tiny_hrm()
    video, timestep, text, mask = backbone_inputs()
    base = model(video, timestep, text, mask).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    assert not torch.allclose(model(video, timestep, text, mask).sample, base, atol=1e-4)
    torch.testing.assert_close(model(video, timestep, text, mask, attention_kwargs={"scale": 0.0}).sample, base, rtol=1e-4, atol=1e-5)


def test_attention_goes_through_diffusers_dispatch():
    check_attention_dispatch(tiny_hrm().eval())


def test_options_shared_with_the_other_backbones():
    video, timestep, text, mask = backbone_inputs()
    for options in (dict(prediction_type="sample"), dict(frame_conditioning=True, absolute_pos_embed=True, text_pooling="last", input_skip=True)):
        out = tiny_hrm(**options)(video, timestep, text, mask).sample
        assert out.shape == video.shape and torch.isfinite(out).all()


def test_bad_inputs_and_config_are_named():
    model = tiny_hrm()
    video, timestep, text, mask = backbone_inputs()
    with pytest.raises(ValueError, match="5D"):
        model(video[0], timestep, text, mask)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(video, timestep, text, mask[:, :3])
    with pytest.raises(ValueError, match="max_segments"):
        model(video, timestep, text, mask, max_segments=0)
    one = model(video, timestep, text, mask, max_segments=1)
    with pytest.raises(ValueError, match="carry.high"):
        model(video[:1], timestep[:1], text[:1], mask[:1], carry=one.carry)
    with pytest.raises(ValueError, match="carry"):
        model(video, timestep, text, mask, carry=one.carry.high)
    for kwargs, name in ((dict(h_cycles=0), "h_cycles"), (dict(gradient_mode="bptt"), "gradient_mode"),
                         (dict(min_segments=4), "min_segments"), (dict(halt_threshold=1.0), "halt_threshold")):
        with pytest.raises(ValueError, match=name):
            tiny_hrm(**kwargs)
    with pytest.raises(NotImplementedError, match="carry"):
        model.enable_cache(None)


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_is_a_thin_flow_pipeline_that_roundtrips(tiny_tokenizer, tmp_path):
    assert HRMVideoPipeline.__init__ is FlowVideoPipeline.__init__
    pipe = make_tiny_hrm_pipeline(tiny_tokenizer)
    frames = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, 16, 16, 3) and np.isfinite(frames).all()
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "HRMVideoPipeline"
    from chronos_video.cli import load_pipeline

    loaded = load_pipeline(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, HRMVideoPipeline) and isinstance(loaded.transformer, HRMVideoModel)
    np.testing.assert_array_equal(loaded(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames, frames)
    (video,) = pipe(PROMPT, num_inference_steps=2, return_dict=False)
    assert video.shape == frames.shape


def test_trace_reports_segments_and_halting_saves_them(tiny_tokenizer):
    pipe = make_tiny_hrm_pipeline(tiny_tokenizer)
    full = pipe([PROMPT, PROMPT], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert [step["segments"] for step in full.trace] == [[3, 3]] * 3
    assert [step["segments_unconditional"] for step in full.trace] == [[3, 3]] * 3
    halt_on(pipe.transformer, True)
    halted = pipe([PROMPT, PROMPT], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert [step["segments"] for step in halted.trace] == [[1, 1]] * 3
    always = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, halting=False, max_segments=2)
    assert [step["segments"] for step in always.trace] == [[2]] * 3 and "segments_unconditional" not in always.trace[0]
    # the same as a pipeline whose backbone never halts
    halt_on(pipe.transformer, False)
    never = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, max_segments=2, generator=torch.Generator().manual_seed(0)).frames
    halt_on(pipe.transformer, True)
    np.testing.assert_array_equal(pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, halting=False, max_segments=2,
                                       generator=torch.Generator().manual_seed(0)).frames, never)


def test_single_segment_above_sigma_limits_the_high_noise_steps(tiny_tokenizer):
    pipe = make_tiny_hrm_pipeline(tiny_tokenizer)
    out = pipe(PROMPT, num_inference_steps=3, halting=False, single_segment_above_sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert [step["segments"] for step in out.trace] == [[1] if step["sigma"] > 0.5 else [3] for step in out.trace]
    assert [1] in [step["segments"] for step in out.trace] and [3] in [step["segments"] for step in out.trace]
    # 1 limits no evaluation: the same videos as without the argument
    unlimited = pipe(PROMPT, num_inference_steps=3, halting=False, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(pipe(PROMPT, num_inference_steps=3, halting=False, single_segment_above_sigma=1.0,
                                       generator=torch.Generator().manual_seed(0)).frames, unlimited)
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="single_segment_above_sigma"):
            pipe(PROMPT, num_inference_steps=1, single_segment_above_sigma=bad)


def test_warm_start_threads_the_carry_between_sampling_steps(tiny_tokenizer):
    pipe = make_tiny_hrm_pipeline(tiny_tokenizer)
    carries = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: carries.append(kwargs.get("carry")), with_kwargs=True)
    warm = pipe(PROMPT, num_inference_steps=3, warm_start=True, generator=torch.Generator().manual_seed(0)).frames
    assert carries[0] is None and all(isinstance(c, HRMCarry) and c.high.shape[0] == 2 for c in carries[1:])
    carries.clear()
    cold = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).frames  # cold by default
    assert carries == [None] * 3
    assert not np.array_equal(warm, cold)
    # a later call starts cold again
    carries.clear()
    again = pipe(PROMPT, num_inference_steps=3, warm_start=True, generator=torch.Generator().manual_seed(0)).frames
    assert carries[0] is None
    np.testing.assert_array_equal(again, warm)


def test_pipeline_precision_and_bad_arguments(tiny_tokenizer):
    pipe = make_tiny_hrm_pipeline(tiny_tokenizer)
    out = pipe(PROMPT, num_inference_steps=2, precision="sigma", generator=torch.Generator().manual_seed(0))
    assert all("gauge" in step and "segments" in step for step in out.trace)
    for kwargs, name in ((dict(max_segments=0), "max_segments"), (dict(halting="yes"), "halting"), (dict(warm_start=1), "warm_start")):
        with pytest.raises(ValueError, match=name):
            pipe(PROMPT, num_inference_steps=1, **kwargs)
    with pytest.raises(ValueError, match="num_frames"):
        pipe(PROMPT, num_inference_steps=1, num_frames=3)


# ---------------------------------------------------------------------------------------------- training
def load_train_module():
    return load_train_script("chronos_train_hrm")


def test_deep_supervision_config_is_validated():
    from chronos_video.training_builders import TrainingObjective, build_backbone
    from chronos_video.training_config import parse_config

    smoke = str(ROOT / "training" / "configs" / "hrm_smoke.yaml")
    config = parse_config(["--config", smoke, "--deep_supervision.segments", "3", "--model.gradient_mode", "full_recursion"])
    model = build_backbone(config)
    assert type(model) is HRMVideoModel and model.config.gradient_mode == "full_recursion"
    objective = TrainingObjective(config, model)
    assert objective.forward_kwargs == {"deep_supervision": True, "max_segments": 3}
    with pytest.raises(ValueError, match="deep_supervision"):
        parse_config(["--config", smoke, "--deep_supervision.segmnts", "3"])
    with pytest.raises(ValueError, match="recursive backbone"):
        parse_config(["--config", str(ROOT / "training" / "configs" / "smoke.yaml"), "--deep_supervision.segments", "2"])
    with pytest.raises(ValueError, match="deep_supervision.segments"):
        TrainingObjective(parse_config(["--config", smoke, "--deep_supervision.segments", "0"]), model)
    nano = parse_config(["--config", str(ROOT / "training" / "configs" / "smoke.yaml")])
    assert TrainingObjective(nano, build_backbone(nano)).forward_kwargs == {}


def test_smoke_config_trains_30_steps_into_a_loadable_pipeline(tmp_path):
    out = load_train_module().main(["--config", str(ROOT / "training" / "configs" / "hrm_smoke.yaml"), "--max_train_steps", "30",
                                    "--output_dir", str(tmp_path / "run"), "--report_to", "null", "--data.cache_dir", str(tmp_path / "cache")])
    for name in ("model_index.json", "README.md", "samples.gif", "oracle_scores.json", "training_summary.json"):
        assert (out / name).is_file(), name
    assert "HRMVideoPipeline" in (out / "README.md").read_text()
    pipe = HRMVideoPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(PROMPT, num_inference_steps=2)
    assert result.frames.shape == (1, 8, 16, 16, 3) and all(step["segments"][0] in (1, 2) for step in result.trace)


def test_trainable_modules_refit_only_the_halting_head(tmp_path):
    from safetensors.torch import load_file

    train = load_train_module()
    args = ["--config", str(ROOT / "training" / "configs" / "hrm_smoke.yaml"), "--report_to", "null", "--data.cache_dir", str(tmp_path / "cache"),
            "--eval_num_prompts", "1", "--sample_prompts", "[]", "--max_train_steps", "2"]
    base = train.main([*args, "--output_dir", str(tmp_path / "base")])
    refit = train.main([*args, "--output_dir", str(tmp_path / "refit"), "--pretrained_pipeline", str(base), "--trainable_modules", "[halt_head]",
                        "--deep_supervision.halt_criterion", "velocity_change", "--learning_rate", "0.1"])
    for component in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        before, after = load_file(str(base / component)), load_file(str(refit / component))
        changed = {key for key in before if not torch.equal(before[key], after[key])}
        assert changed == ({"halt_head.proj.weight", "halt_head.proj.bias"} if component.startswith("transformer") else set()), component
    with pytest.raises(ValueError, match="trainable_modules.*halt_hed"):
        train.main([*args, "--output_dir", str(tmp_path / "bad"), "--pretrained_pipeline", str(base), "--trainable_modules", "[halt_hed]"])
    with pytest.raises(ValueError, match="pretrained_pipeline"):
        train.main([*args, "--output_dir", str(tmp_path / "bad"), "--trainable_modules", "[halt_head]"])
    with pytest.raises(ValueError, match="list of module names"):  # a bare string would be read letter by letter
        train.main([*args, "--output_dir", str(tmp_path / "bad"), "--pretrained_pipeline", str(base), "--trainable_modules", "halt_head"])
    with pytest.raises(ValueError, match="halt_criterion"):
        train.main([*args, "--output_dir", str(tmp_path / "bad"), "--deep_supervision.halt_criterion", "entropy"])


def test_smoke_config_trains_and_resumes_exactly(tmp_path):
    train = load_train_module()
    args = ["--config", str(ROOT / "training" / "configs" / "hrm_smoke.yaml"), "--report_to", "null", "--data.cache_dir", str(tmp_path / "cache"),
            "--eval_num_prompts", "1", "--sample_prompts", "[]"]
    full = train.main([*args, "--output_dir", str(tmp_path / "full"), "--max_train_steps", "4", "--checkpointing_steps", "2"])
    train.main([*args, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "2", "--checkpointing_steps", "2"])
    resumed = train.main([*args, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "4", "--checkpointing_steps", "2",
                          "--resume_from_checkpoint", "latest"])
    from safetensors.torch import load_file

    expected = load_file(str(full / "transformer" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(resumed / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert expected.keys() == got.keys() and any(k.startswith("halt_head") for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
