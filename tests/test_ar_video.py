"""Autoregressive video stack: FSQ video tokenizer, ARVideoForCausalLM (Qwen2 + 3D RoPE + sliding window)
with transformers' `generate()`, and ARVideoPipeline."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessorList

from chronos_video import ARVideoConfig, ARVideoForCausalLM, ARVideoPipeline, FSQVideoTokenizer
from chronos_video.evaluation.pipeline_eval import evaluate_video_tokenizer
from chronos_video.models.ar_video import PlausibleGuidanceLogitsProcessor, VideoRotaryEmbedding, VisualTokensLogitsProcessor
from conftest import load_train_script


def tiny_video_tokenizer() -> FSQVideoTokenizer:
    torch.manual_seed(0)
    return FSQVideoTokenizer(block_out_channels=(8, 16), norm_num_groups=4, levels=(5, 4, 3))


def tiny_lm(text_vocab_size: int, codebook_size: int, window_frames: int | None = 2) -> ARVideoForCausalLM:
    torch.manual_seed(0)
    config = ARVideoConfig(
        text_vocab_size=text_vocab_size, codebook_size=codebook_size, text_length=16, frame_rows=4, frame_columns=4,
        window_frames=window_frames, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return ARVideoForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pipe(tiny_tokenizer):
    video_tokenizer = tiny_video_tokenizer().eval()
    pipeline = ARVideoPipeline(tiny_tokenizer, video_tokenizer, tiny_lm(len(tiny_tokenizer), video_tokenizer.codebook_size), num_frames=3)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- video tokenizer ---------------------------------------------------------------------------------


def test_fsq_tokenizer_round_trip_and_save(tmp_path):
    tokenizer = tiny_video_tokenizer().eval()
    assert tokenizer.codebook_size == 60 and tokenizer.spatial_compression_ratio == 2
    video = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    codes = tokenizer.encode(video)
    assert codes.shape == (2, 3, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 60
    reconstruction, forward_codes = tokenizer(video)
    assert torch.equal(forward_codes, codes)
    assert reconstruction.shape == video.shape
    torch.testing.assert_close(tokenizer.decode(codes), reconstruction, atol=1e-5, rtol=0)  # decode(encode(x)) is the forward
    tokenizer.save_pretrained(tmp_path)
    loaded = FSQVideoTokenizer.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.encode(video), codes)
    torch.testing.assert_close(loaded.decode(codes), tokenizer.decode(codes), atol=1e-5, rtol=0)


def test_fsq_tokenizer_straight_through_gradient():
    tokenizer = tiny_video_tokenizer()
    video = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    reconstruction, _ = tokenizer(video)
    reconstruction.square().mean().backward()
    assert tokenizer.encoder.conv_in.weight.grad.abs().sum() > 0  # the rounding passes gradients to the encoder


def test_fsq_tokenizer_rejects_bad_input():
    tokenizer = tiny_video_tokenizer()
    with pytest.raises(ValueError, match="`video`"):
        tokenizer.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        tokenizer.encode(torch.zeros(1, 3, 2, 9, 8))
    with pytest.raises(ValueError, match="`codes` must lie in"):
        tokenizer.decode(torch.full((1, 1, 4, 4), 60))
    with pytest.raises(ValueError, match="`levels`"):
        FSQVideoTokenizer(levels=(1, 5))
    with pytest.raises(ValueError, match="`norm_num_groups`"):
        FSQVideoTokenizer(block_out_channels=(6, 16), norm_num_groups=4)


def test_foreground_dilation_weighs_pixels_next_to_the_object():
    from chronos_video.training_ar import reconstruction_error

    video = -torch.ones(1, 3, 1, 8, 8)
    video[..., 3:5, 3:5] = 1.0  # a 2x2 object
    beside, far = video.clone(), video.clone()
    beside[..., 2, 3] = 1.0  # a corner painted in next to the object
    far[..., 0, 0] = 1.0  # the same error far from it
    # one wrong pixel (error 2 in each channel); object weight 1 + 4, 64 pixels
    plain = reconstruction_error(beside, video, foreground_weight=4.0)
    assert plain == reconstruction_error(far, video, foreground_weight=4.0) == pytest.approx(3 * 4 / (3 * (4 * 5 + 60)))
    dilated = reconstruction_error(beside, video, foreground_weight=4.0, foreground_dilation=1)  # object region now 4x4
    assert dilated == pytest.approx(3 * 4 * 5 / (3 * (16 * 5 + 48)))
    assert reconstruction_error(far, video, foreground_weight=4.0, foreground_dilation=1) == pytest.approx(3 * 4 / (3 * (16 * 5 + 48)))
    assert reconstruction_error(beside, video, foreground_weight=4.0, loss="l1") == pytest.approx(3 * 2 / (3 * (4 * 5 + 60)))


def test_evaluate_video_tokenizer_reports_usage_psnr_and_oracle():
    from chronos_video.data import load_shapes_frames

    clips, captions = load_shapes_frames({"num_clips": 2, "num_frames": 16, "height": 32, "width": 32, "split": "heldout", "seed": 0,
                                          "cache_dir": None})
    scores, table, reconstructions = evaluate_video_tokenizer(FSQVideoTokenizer(block_out_channels=(8, 16), norm_num_groups=4, levels=(3, 3)), clips, captions)
    assert reconstructions.shape == (2, 16, 32, 32, 3)
    assert scores["oracle_original"]["all"] == 1.0  # the oracle's ceiling on the clips themselves
    assert 0 < scores["codes_used"] <= 9 and scores["codebook_usage"] == scores["codes_used"] / 9
    assert "PSNR" in table and "reconstructed" in table


# --- language model -------------------------------------------------------------------------------------


def test_config_layout_and_validation():
    config = ARVideoConfig(text_vocab_size=10, codebook_size=60, text_length=5, frame_rows=2, frame_columns=3, window_frames=4,
                           hidden_size=32, num_attention_heads=2, num_hidden_layers=3)
    assert config.vocab_size == 10 + 1 + 60
    assert config.visual_token_offset == 11 and config.begin_of_video_token_id == 10 and config.prefix_length == 6
    assert config.sliding_window == 4 * 6 and config.layer_types == ["sliding_attention"] * 3
    assert sum(config.rope_axes) == 8
    assert ARVideoConfig(window_frames=None, hidden_size=32, num_attention_heads=2).sliding_window is None
    with pytest.raises(ValueError, match="`rope_axes`"):
        ARVideoConfig(hidden_size=32, num_attention_heads=2, rope_axes=[4, 4, 4])
    with pytest.raises(ValueError, match="`window_frames`"):
        ARVideoConfig(hidden_size=32, num_attention_heads=2, window_frames=0)


def test_rotary_positions_follow_frame_row_column():
    config = ARVideoConfig(text_length=3, frame_rows=2, frame_columns=3, hidden_size=32, num_attention_heads=2)
    positions = VideoRotaryEmbedding(config).axis_positions(torch.arange(4 + 2 * 6)[None])[:, 0]
    assert positions[:, :4].tolist() == [[0, 1, 2, 3]] * 3  # caption + begin-of-video: index on every axis
    frame, row, column = (positions[:, 4:] - 4).tolist()
    assert frame == [0] * 6 + [1] * 6
    assert row == [0, 0, 0, 1, 1, 1] * 2
    assert column == [0, 1, 2] * 4


def test_lm_saves_and_loads_through_auto_classes(tmp_path):
    model = tiny_lm(20, 30)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ARVideoForCausalLM) and isinstance(loaded.model.rotary_emb, VideoRotaryEmbedding)
    ids = torch.cat([torch.randint(0, 20, (2, 16)), torch.full((2, 1), 20), 21 + torch.randint(0, 30, (2, 20))], dim=1)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    loss = model.code_loss(ids)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # per-code log-likelihoods: the full forward's logits, renormalised over the visual codes, at each code
    expected = model(ids).logits[:, 16:-1, 21:].log_softmax(-1).gather(-1, (ids[:, 17:] - 21).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(model.code_log_likelihoods(ids), expected)
    torch.testing.assert_close(loss, -expected.mean())


SAMPLING = {
    "greedy": {"do_sample": False},
    "temperature": {"do_sample": True, "temperature": 0.7},
    "top_k": {"do_sample": True, "top_k": 5},
    "top_p": {"do_sample": True, "top_p": 0.8},
    "typical_p": {"do_sample": True, "typical_p": 0.8},
}


@pytest.mark.parametrize("name", sorted(SAMPLING))
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_generate_samples_only_visual_codes(name, guidance):
    model = tiny_lm(20, 30)
    prefix = torch.cat([torch.randint(0, 20, (2, 16)), torch.full((2, 1), 20)], dim=1)
    kwargs = dict(SAMPLING[name])
    if guidance:
        kwargs |= {"guidance_scale": guidance, "negative_prompt_ids": torch.cat([torch.zeros(2, 16, dtype=torch.long), torch.full((2, 1), 20)], 1)}
    torch.manual_seed(0)
    out = model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=40, pad_token_id=20,
                         logits_processor=LogitsProcessorList([VisualTokensLogitsProcessor(21)]), **kwargs)
    assert out.shape == (2, 17 + 40)
    assert torch.equal(out[:, :17], prefix)
    assert int(out[:, 17:].min()) >= 21 and int(out[:, 17:].max()) < 51


def test_plausible_guidance_is_transformers_guidance_on_the_plausible_codes():
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    model = tiny_lm(20, 30)
    prefix = torch.cat([torch.randint(0, 20, (2, 16)), torch.full((2, 1), 20)], dim=1)
    negative = torch.cat([torch.zeros(2, 16, dtype=torch.long), torch.full((2, 1), 20)], 1)
    scores = model(prefix).logits[:, -1]
    reference = UnbatchedClassifierFreeGuidanceLogitsProcessor(3.0, model, negative, torch.ones_like(negative))(prefix, scores)
    guided = PlausibleGuidanceLogitsProcessor(3.0, model, negative, torch.ones_like(negative), plausibility=0.5)(prefix, scores)
    probabilities = scores.softmax(-1)
    plausible = probabilities >= 0.5 * probabilities.amax(-1, keepdim=True)
    assert torch.equal(torch.isfinite(guided), plausible)  # the most likely code always stays
    torch.testing.assert_close(guided[plausible], reference[plausible])
    # with a negligible threshold, generate() samples exactly what transformers' own guidance samples
    common = dict(input_ids=prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=20, pad_token_id=20, do_sample=False)
    own = model.generate(**common, guidance_scale=3.0, negative_prompt_ids=negative, logits_processor=LogitsProcessorList([VisualTokensLogitsProcessor(21)]))
    processor = PlausibleGuidanceLogitsProcessor(3.0, model, negative, torch.ones_like(negative), plausibility=1e-30)
    ours = model.generate(**common, logits_processor=LogitsProcessorList([processor, VisualTokensLogitsProcessor(21)]))
    assert torch.equal(own, ours)


def test_pipeline_with_plausible_guidance(pipe):
    video = pipe("a small red circle", guidance_scale=3.0, guidance_plausibility=0.1, num_frames=2, output_type="codes",
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 2, 4, 4) and int(video.min()) >= 0


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_greedy_decoding_with_cache_equals_without(guidance):
    """The sliding-window KV cache changes the cost, not the result (48 new tokens > the 32-token window)."""
    model = tiny_lm(20, 30)
    prefix = torch.cat([torch.randint(0, 20, (1, 16)), torch.full((1, 1), 20)], dim=1)
    kwargs = {"guidance_scale": guidance, "negative_prompt_ids": torch.cat([torch.zeros(1, 16, dtype=torch.long), torch.full((1, 1), 20)], 1)} if guidance else {}
    runs = [model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=48, do_sample=False, pad_token_id=20,
                           use_cache=use_cache, **kwargs) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_sliding_window_cache_stays_bounded():
    model = tiny_lm(20, 30, window_frames=2)
    cache = DynamicCache(config=model.config)
    prefix = torch.cat([torch.randint(0, 20, (1, 16)), torch.full((1, 1), 20)], dim=1)
    model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=80, do_sample=False, pad_token_id=20,
                   cache=cache)
    assert cache.get_seq_length() == 17 + 80 - 1  # every token was seen (the last one is never fed back)...
    assert all(layer.keys.shape[-2] < model.config.sliding_window for layer in cache.layers)  # ...the window is what is kept


# --- pipeline ---------------------------------------------------------------------------------------------


def test_pipeline_outputs_callbacks_and_longer_videos(pipe):
    seen = []
    out = pipe(["a small red circle moving left to right slowly", "a large blue square"], num_frames=5, guidance_scale=2.0, top_k=10,
               generator=torch.Generator().manual_seed(0), callback_on_frame_end=lambda p, i, kw: seen.append((i, tuple(kw["codes"].shape))))
    assert out.frames.shape == (2, 5, 8, 8, 3)  # 5 frames from a 2-frame window (training length 3)
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    assert seen == [(i, (2, 4, 4)) for i in range(5)]
    again = pipe(["a small red circle moving left to right slowly", "a large blue square"], num_frames=5, guidance_scale=2.0, top_k=10,
                 generator=torch.Generator().manual_seed(0))
    assert (again.frames == out.frames).all()  # seeded
    codes = pipe("a small red circle", num_frames=2, num_videos_per_prompt=3, output_type="codes", do_sample=False).frames
    assert codes.shape == (3, 2, 4, 4) and (codes == codes[:1]).all()  # greedy: every copy identical
    assert pipe("a small red circle", output_type="pt").frames.shape == (1, 3, 3, 8, 8)  # default num_frames from the config
    pil = pipe("a small red circle", output_type="pil", num_frames=2).frames
    assert len(pil) == 1 and len(pil[0]) == 2 and pil[0][0].size == (8, 8)


def test_pipeline_save_and_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = ARVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.num_frames == 3
    kwargs = dict(num_frames=4, guidance_scale=3.0, negative_prompt="a large square", output_type="codes", generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded("a small red circle", **kwargs).frames, pipe("a small red circle", **{**kwargs, "generator": torch.Generator().manual_seed(1)}).frames)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"prompt": 3}, "`prompt`"),
        ({"negative_prompt": ["a", "b"]}, "`negative_prompt`"),
        ({"num_frames": 0}, "`num_frames`"),
        ({"num_videos_per_prompt": 0}, "`num_videos_per_prompt`"),
        ({"height": 16}, "`height`"),
        ({"width": 4}, "`width`"),
        ({"guidance_scale": 0.5}, "`guidance_scale`"),
        ({"output_type": "latent"}, "`output_type`"),
        ({"temperature": 0}, "`temperature`"),
        ({"top_k": 0}, "`top_k`"),
        ({"top_p": 1.5}, "`top_p`"),
        ({"typical_p": 0}, "`typical_p`"),
        ({"guidance_scale": 3.0, "guidance_plausibility": 1.5}, "`guidance_plausibility`"),
    ],
)
def test_pipeline_rejects_bad_arguments(pipe, kwargs, name):
    kwargs = {"prompt": "a small red circle", **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


# --- training and CLI ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_tokenizer_then_lm_then_generate_longer(tmp_path):
    """`training/train.py` trains both stages from the committed smoke configs; the saved pipeline loads
    and generates past its training length; a resumed LM run continues from its checkpoint."""
    import json
    from pathlib import Path

    from chronos_video.cli import main as cli_main

    root = Path(__file__).resolve().parents[1]
    train = load_train_script("chronos_train_ar")
    cache = ["--data.cache_dir", str(tmp_path / "cache"), "--report_to", "null"]
    tokenizer_dir = train.main(["--config", str(root / "training/configs/ar_tokenizer_smoke.yaml"), "--output_dir", str(tmp_path / "tok"), *cache])
    scores = json.loads((tokenizer_dir / "tokenizer_scores.json").read_text())
    assert {"psnr_db", "codebook_usage", "oracle_reconstructed"} <= set(scores)
    assert (tokenizer_dir / "README.md").read_text().count("PSNR") >= 1

    lm_args = ["--config", str(root / "training/configs/ar_smoke.yaml"), "--video_tokenizer", str(tokenizer_dir), *cache]
    lm_dir = train.main([*lm_args, "--output_dir", str(tmp_path / "lm")])
    assert json.loads((lm_dir / "oracle_scores.json").read_text())["n"] == 4
    assert "ARVideoPipeline" in (lm_dir / "README.md").read_text()
    pipe = ARVideoPipeline.from_pretrained(lm_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a small red circle moving left to right slowly", num_frames=8, top_p=0.9).frames.shape == (1, 8, 16, 16, 3)

    # stop after 3 steps, resume to 6: same weights as the uninterrupted run
    partial = ["--output_dir", str(tmp_path / "lm2"), "--checkpoint_dir", str(tmp_path / "lm2-ckpt")]
    train.main([*lm_args, *partial, "--max_train_steps", "3", "--checkpointing_steps", "3"])
    resumed = train.main([*lm_args, *partial, "--resume_from_checkpoint", "latest"])
    first = ARVideoPipeline.from_pretrained(lm_dir).language_model.state_dict()
    second = ARVideoPipeline.from_pretrained(resumed).language_model.state_dict()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, msg=name)

    assert cli_main(["evaluate", "--pipeline", str(lm_dir), "--num-prompts", "2", "--guidance-scale", "2", "--top-k", "5"]) == 0
    assert cli_main(["evaluate", "--pipeline", str(lm_dir), "--num-prompts", "2", "--guidance-scale", "2", "--guidance-plausibility", "0.1"]) == 0

    # the benchmarks that read a saved AR pipeline: decoding speed/memory, and the LM as a direction classifier
    import importlib.util
    import subprocess
    import sys

    decoding = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_ar_decoding.py"), "--pipeline", str(lm_dir), "--frames", "2",
                               "--no_cache_max_frames", "2", "--oracle_prompts", "0", "--time_prompts", "1"],
                              capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert decoding.returncode == 0, decoding.stderr[-2000:]
    assert "| 2 | on |" in decoding.stdout and "| 2 | off |" in decoding.stdout, decoding.stdout[-2000:]
    spec = importlib.util.spec_from_file_location("ar_direction_probe", root / "benchmarks" / "ar_direction_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    result = probe.main(["--pipeline", str(lm_dir), "--num_prompts", "6", "--early_frames", "2", "--output", str(tmp_path / "probe.json")])
    assert len(result["rows"]) == 6 and result["scores"]["all held-out prompts"]["n"] == 6
    assert all(0 <= row["whole"] <= 1 and 0 <= row["early"] <= 1 for row in result["scores"].values())
    assert json.loads((tmp_path / "probe.json").read_text())["scores"] == result["scores"]
