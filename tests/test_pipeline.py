"""NanoSoraPipeline (and so the shared FlowVideoPipeline base): outputs, determinism, I/O, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from chronos_video import NanoSoraPipeline
from conftest import make_tiny_pipeline

PROMPT = "a small red circle moving left to right slowly"


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs)


def test_output_types_and_shapes(tiny_pipeline):
    np_out = run(tiny_pipeline, prompt=PROMPT)
    assert np_out.frames.shape == (1, 4, 16, 16, 3) and np_out.frames.dtype == np.float32
    assert 0.0 <= np_out.frames.min() and np_out.frames.max() <= 1.0
    assert len(np_out.trace) == 2 and np_out.trace[0]["sigma"] == pytest.approx(1.0)
    pt = run(tiny_pipeline, prompt=PROMPT, output_type="pt").frames
    assert pt.shape == (1, 4, 3, 16, 16)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), np_out.frames, atol=1e-6)
    pil = run(tiny_pipeline, prompt=PROMPT, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 4 and pil[0][0].size == (16, 16)
    latent = run(tiny_pipeline, prompt=PROMPT, output_type="latent").frames
    assert latent.shape == (1, 3, 4, 16, 16)
    as_tuple = run(tiny_pipeline, prompt=PROMPT, return_dict=False)
    np.testing.assert_array_equal(as_tuple[0], np_out.frames)


def test_batching_and_videos_per_prompt(tiny_pipeline):
    out = run(tiny_pipeline, prompt=[PROMPT, "a large blue square"], num_videos_per_prompt=2, generator=None)
    assert out.frames.shape[0] == 4
    assert not np.allclose(out.frames[0], out.frames[1])


def test_same_generator_same_video_and_prompt_matters(tiny_pipeline):
    a = run(tiny_pipeline, prompt=PROMPT).frames
    b = run(tiny_pipeline, prompt=PROMPT).frames
    c = run(tiny_pipeline, prompt="a large blue square moving top to bottom quickly").frames
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_prompt_embeds_equal_prompt(tiny_pipeline):
    embeds, mask, neg, neg_mask = tiny_pipeline.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    from_text = run(tiny_pipeline, prompt=PROMPT).frames
    from_embeds = run(tiny_pipeline, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                      negative_prompt_attention_mask=neg_mask).frames
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-6)


def test_save_load_identical_and_bf16(tiny_pipeline, tmp_path):
    reference = run(tiny_pipeline, prompt=PROMPT).frames
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = NanoSoraPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded, prompt=PROMPT).frames, reference)
    bf16 = NanoSoraPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    assert bf16.transformer.dtype == torch.bfloat16
    frames = run(bf16, prompt=PROMPT).frames
    assert np.isfinite(frames).all() and np.abs(frames - reference).mean() < 0.1


def test_heun_solver_runs_two_evaluations_per_interior_step(tiny_pipeline):
    from chronos_video import ChronosFlowMatchScheduler

    tiny_pipeline.scheduler = ChronosFlowMatchScheduler(solver="heun")
    out = run(tiny_pipeline, prompt=PROMPT, num_inference_steps=3)
    assert len(out.trace) == 5 and np.isfinite(out.frames).all()


def test_callback_on_step_end_can_replace_latents(tiny_pipeline):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = run(tiny_pipeline, prompt=PROMPT, output_type="latent", callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [(0, ("latents", "prompt_embeds")), (1, ("latents", "prompt_embeds"))]
    assert torch.count_nonzero(out.frames) == 0


def test_any_transformers_encoder_works(tiny_tokenizer, tmp_path):
    encoder = BertModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32))
    encoder.save_pretrained(tmp_path)
    pipe = make_tiny_pipeline(tiny_tokenizer)
    pipe.text_encoder = BertModel.from_pretrained(tmp_path)
    out = run(pipe, prompt=PROMPT)
    assert out.frames.shape == (1, 4, 16, 16, 3) and np.isfinite(out.frames).all()


def test_lora_weights_save_and_load_through_the_pipeline(tiny_tokenizer, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_tiny_pipeline(tiny_tokenizer)
    base = run(pipe, prompt=PROMPT).frames
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapted = run(pipe, prompt=PROMPT).frames
    NanoSoraPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    fresh = make_tiny_pipeline(tiny_tokenizer)
    fresh.load_lora_weights(tmp_path)
    np.testing.assert_allclose(run(fresh, prompt=PROMPT).frames, adapted, atol=1e-5)
    assert not np.allclose(adapted, base, atol=1e-3)


BAD_INPUTS = [
    ({"prompt": None}, "one of `prompt` or `prompt_embeds`"),
    ({"prompt_embeds": torch.zeros(1, 3, 32)}, "either `prompt` or `prompt_embeds`"),
    ({"prompt": 3}, "`prompt` must be"),
    ({"height": 18}, "`height`"),
    ({"width": 18}, "`width`"),
    ({"num_frames": 0}, "`num_frames`"),
    ({"num_frames": 3}, "temporal patch size"),
    ({"num_inference_steps": 0}, "`num_inference_steps`"),
    ({"guidance_scale": -1.0}, "`guidance_scale`"),
    ({"num_videos_per_prompt": 0}, "`num_videos_per_prompt`"),
    ({"negative_prompt": ["a", "b"]}, "`negative_prompt` has 2 entries"),
    ({"generator": [torch.Generator(), torch.Generator()]}, "`generator` list has 2"),
    ({"latents": torch.zeros(1, 3, 4, 8, 8)}, "`latents` must have shape"),
    ({"output_type": "gif"}, "`output_type`"),
    ({"callback_on_step_end_tensor_inputs": ["noise"]}, "unknown names"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_the_argument(tiny_pipeline, overrides, message):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 1, **overrides}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_pipeline(**kwargs)


def test_prompt_embeds_shape_mismatches(tiny_pipeline):
    embeds = torch.zeros(2, 3, 32)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        tiny_pipeline(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros(1, 3, 32), num_inference_steps=1)
    with pytest.raises(ValueError, match="text_embed_dim"):
        tiny_pipeline(prompt_embeds=torch.zeros(2, 3, 16), num_inference_steps=1)
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        tiny_pipeline(prompt_embeds=embeds, prompt_attention_mask=torch.ones(2, 4), num_inference_steps=1)
