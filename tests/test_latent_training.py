"""Latent training: the video autoencoder stage (`architecture: video-vae`) and flow backbones on its cached latents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chronos_video import NanoSoraPipeline
from chronos_video.decoding import LatentDecoder
from chronos_video.evaluation.pipeline_eval import evaluate_reconstructions
from chronos_video.training_config import parse_config
from chronos_video.training_vae import (
    VideoVAEObjective,
    build_video_vae,
    check_latent_geometry,
    load_video_vae,
    set_latent_statistics,
)
from conftest import load_train_script

ROOT = Path(__file__).resolve().parents[1]
VAE_SMOKE = ROOT / "training" / "configs" / "video_vae_smoke.yaml"
LATENT_SMOKE = ROOT / "training" / "configs" / "latent_smoke.yaml"
PROMPT = "a small red circle moving left to right slowly"


def load_train_module():
    return load_train_script("chronos_train_latent")


@pytest.fixture(scope="module")
def train():
    return load_train_module()


def smoke_vae_model() -> dict:
    return yaml.safe_load(VAE_SMOKE.read_text())["model"]


def vae_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["--config", str(VAE_SMOKE), "--output_dir", str(tmp_path / name), "--data.cache_dir", str(tmp_path / "cache"), *extra]


def latent_args(tmp_path: Path, vae_dir: Path, name: str, *extra: str) -> list[str]:
    return ["--config", str(LATENT_SMOKE), "--vae", str(vae_dir), "--output_dir", str(tmp_path / name),
            "--data.cache_dir", str(tmp_path / "cache"), *extra]


def untrained_vae_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "untrained-vae"
    build_video_vae(smoke_vae_model()).save_pretrained(str(folder), safe_serialization=True)
    return folder


# --- the pieces ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vae_class", ["AutoencoderKLLTXVideo", "AutoencoderKLWan"])
def test_latent_statistics_are_stored_where_the_decoder_reads_them(vae_class):
    torch.manual_seed(0)
    if vae_class == "AutoencoderKLWan":
        vae = build_video_vae({"vae_class": vae_class, "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1,
                               "temperal_downsample": [False]})
    else:
        vae = build_video_vae(smoke_vae_model())
    raw = torch.randn(6, 4, 3, 2, 2) * torch.tensor([2.0, 0.5, 1.0, 3.0]).view(1, 4, 1, 1, 1) + torch.tensor([1.0, -2.0, 0.0, 0.5]).view(1, 4, 1, 1, 1)
    mean, std = set_latent_statistics(vae, raw)
    decoder = LatentDecoder(vae)
    torch.testing.assert_close(decoder.latents_mean, mean)
    torch.testing.assert_close(decoder.latents_std, std)
    normalised = decoder.normalize(raw)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder.denormalize(normalised), raw, atol=1e-5, rtol=1e-5)


def test_geometry_check_names_the_key_and_the_fix():
    vae = build_video_vae(smoke_vae_model())  # 2x temporal, 4x spatial
    assert check_latent_geometry(vae, (9, 16, 16)) == (4, 5, 4, 4)
    with pytest.raises(ValueError, match=r"`data.num_frames`=8 .*`vae`.*1 \+ a multiple of 2 frames \(e.g. 7 or 9\)"):
        check_latent_geometry(vae, (8, 16, 16))
    with pytest.raises(ValueError, match=r"`data.height` and `data.width` \(18x16\) must be multiples of 4"):
        check_latent_geometry(vae, (9, 18, 16))
    wan = build_video_vae({"vae_class": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1,
                           "temperal_downsample": [False]})
    with pytest.raises(ValueError, match="do not round-trip"):  # Wan encodes 1 + 4k frames whatever its temporal factor
        check_latent_geometry(wan, (8, 16, 16), key="model")
    with pytest.raises(ValueError, match="`model.vae_class`"):
        build_video_vae({"vae_class": "AutoencoderKL"})
    with pytest.raises(ValueError, match="`model` holds an argument"):
        build_video_vae({"not_an_argument": 1})


def test_vae_objective_is_a_pure_function_of_its_inputs():
    torch.manual_seed(0)
    objective = VideoVAEObjective(build_video_vae(smoke_vae_model()), "l1", kl_weight=1e-3, foreground_weight=4.0)
    video, noise = torch.rand(2, 3, 9, 16, 16) * 2 - 1, torch.randn(2, 4, 5, 4, 4)
    first = objective(video, noise)
    torch.manual_seed(123)  # the global RNG plays no part: the posterior noise is an input
    assert torch.equal(first, objective(video, noise)) and not torch.equal(first, objective(video, noise * 2))
    first.backward()
    assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)


def test_evaluate_reconstructions_scores_psnr_and_the_oracle():
    from chronos_video.data import load_shapes_frames

    clips, captions = load_shapes_frames({"num_clips": 2, "num_frames": 16, "height": 32, "width": 32, "split": "heldout", "seed": 0, "cache_dir": None})
    scores, lines, reconstructed = evaluate_reconstructions(lambda video: video, clips, captions)
    assert reconstructed.shape == (2, 16, 32, 32, 3) and scores["psnr_db"] > 60
    assert scores["oracle_reconstructed"]["all"] == scores["oracle_original"]["all"] == 1.0 and "PSNR" in lines[0]
    scores, lines, _ = evaluate_reconstructions(lambda video: torch.zeros_like(video), clips, None)  # mid-grey
    assert scores["psnr_db"] < 10 and "oracle_original" not in scores and len(lines) == 1


def test_bad_vae_settings_give_clear_errors(train, tmp_path):
    with pytest.raises(ValueError, match=r"`vae`='.*missing' is not a saved diffusers autoencoder folder"):
        parse_config(latent_args(tmp_path, tmp_path / "missing", "x"))
    folder = untrained_vae_folder(tmp_path)
    with pytest.raises(ValueError, match="`validation_swap_gap_clips`"):
        parse_config(latent_args(tmp_path, folder, "x", "--validation_swap_gap_clips", "4"))
    with pytest.raises(ValueError, match="architecture 'video-vae' does not use it"):
        parse_config([*vae_args(tmp_path, "x"), "--vae", str(folder)])
    with pytest.raises(ValueError, match="`reconstruction_loss`"):
        parse_config(vae_args(tmp_path, "x", "--reconstruction_loss", "l3"))
    # the data size is checked against the autoencoder before anything trains
    with pytest.raises(ValueError, match=r"`data.num_frames`=8 does not suit `vae`"):
        train.main(latent_args(tmp_path, folder, "bad-frames", "--data.num_frames", "8"))
    with pytest.raises(ValueError, match=r"`data.num_frames`=8 does not suit `model`"):
        train.main(vae_args(tmp_path, "bad-vae-frames", "--data.num_frames", "8"))
    other = tmp_path / "not-a-vae"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "NanoSoraTransformer3DModel"}))
    with pytest.raises(ValueError, match="holds a 'NanoSoraTransformer3DModel'"):
        load_video_vae(other)


# --- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vae_stage_trains_saves_scores_and_resumes_exactly(train, tmp_path):
    full = train.main(vae_args(tmp_path, "full"))
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "vae_scores.json", "reconstructions.gif", "training_summary.json"):
        assert (full / name).is_file(), name
    assert not list(full.rglob("*.bin")) and not list(full.rglob("*.pt"))
    scores = json.loads((full / "vae_scores.json").read_text())
    assert scores["num_clips"] == 4 and scores["psnr_db"] > 0 and scores["latent_shape"] == [4, 5, 4, 4]
    assert scores["temporal_compression"] == 2 and scores["spatial_compression"] == 4
    assert scores["oracle_original"]["all"] == 1.0 and "all" in scores["oracle_reconstructed"]
    card = (full / "README.md").read_text()
    assert "Reconstruction PSNR" in card and "| reconstructed |" in card and "TODO" not in card
    vae = load_video_vae(full)
    assert torch.allclose(vae.latents_mean, torch.tensor(scores["latents_mean"])) and not torch.all(vae.latents_std == 1)
    assert vae.decode(vae.encode(torch.zeros(1, 3, 9, 16, 16)).latent_dist.mode()).sample.shape == (1, 3, 9, 16, 16)

    # stop after 3 steps, resume to 6: the same weights as the uninterrupted run
    train.main(vae_args(tmp_path, "resumed", "--max_train_steps", "3"))
    resumed = train.main(vae_args(tmp_path, "resumed", "--resume_from_checkpoint", "latest"))
    assert json.loads((resumed / "training_summary.json").read_text())["resumed_from_step"] == 3
    expected = load_file(str(full / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(resumed / "diffusion_pytorch_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_latent_run_saves_a_pipeline_that_decodes_to_pixels(train, tmp_path):
    vae_dir = train.main(vae_args(tmp_path, "vae", "--max_train_steps", "2", "--eval_num_prompts", "2"))
    out = train.main(latent_args(tmp_path, vae_dir, "latent"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKLLTXVideo"] and (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "oracle_scores.json").is_file() and (out / "samples.gif").is_file()
    assert "latent space of its frozen `vae`" in (out / "README.md").read_text()
    cached = list((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert len(cached) == 1 and load_file(str(cached[0]))["latents"].shape == (32, 4, 5, 4, 4)

    pipe = NanoSoraPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 4 and pipe.default_size == (9, 16, 16)
    frames = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 16, 16, 3) and 0.0 <= frames.min() and frames.max() <= 1.0
    latents = pipe(PROMPT, num_inference_steps=2, output_type="latent").frames
    assert latents.shape == (1, 4, 5, 4, 4)

    # a second run reads the cached latents, and resuming it matches the uninterrupted run
    train.main(latent_args(tmp_path, vae_dir, "resumed", "--max_train_steps", "3"))
    resumed = train.main(latent_args(tmp_path, vae_dir, "resumed", "--resume_from_checkpoint", "latest"))
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 1
    expected = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(resumed / "transformer" / "diffusion_pytorch_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
