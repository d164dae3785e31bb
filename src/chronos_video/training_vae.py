"""Latent training: a small diffusers video autoencoder trained by our script, then any flow backbone on its latents.

Stage 1 (`architecture: video-vae`): `training/train.py` hands the run to `train_video_vae`, which trains an
existing diffusers class (`AutoencoderKLLTXVideo` by default, `AutoencoderKLWan` with `model.vae_class`) with a
reconstruction loss plus a small KL term, in the same loop as the autoregressive stages (`training_ar.train_stage`:
atomic safetensors checkpoints, exact resume, EMA, LR schedules). It saves the autoencoder with `save_pretrained`,
with per-channel latent statistics of its training clips in the diffusers convention of its class, and scores it
(reconstruction PSNR, and on shapes clips the oracle on the reconstructions).

Stage 2 (any flow backbone with `vae: DIR`): `encode_training_latents` checks that the clips round-trip through the
autoencoder, encodes them once (posterior mean, cached as safetensors keyed by the autoencoder's weights and the
clips) and normalises them the way `LatentDecoder` inverts at sampling time, so the saved pipeline's `vae`
component decodes what the backbone learned to generate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file

from .data import is_shapes_data, load_shapes_frames, load_training_clips
from .decoding import LatentDecoder, vae_compression
from .evaluation.pipeline_eval import evaluate_reconstructions
from .flow_matching import frames_to_model_input
from .model_card import save_sample_gif, write_model_card
from .training_ar import TrainingStage, reconstruction_error, train_stage
from .training_config import TrainConfig
from .training_utils import encoding_cache_path, save_file_atomic

__all__ = [
    "VAE_ARCHITECTURE",
    "VAE_CLASSES",
    "VideoVAEObjective",
    "build_video_vae",
    "check_latent_geometry",
    "encode_latents",
    "encode_training_latents",
    "load_video_vae",
    "set_latent_statistics",
    "train_video_vae",
]

VAE_ARCHITECTURE = "video-vae"
VAE_CLASSES: dict[str, type[ModelMixin]] = {"AutoencoderKLLTXVideo": AutoencoderKLLTXVideo, "AutoencoderKLWan": AutoencoderKLWan}
STATISTICS_CLIPS = 512  # clips whose latents give the per-channel mean and std stored with the autoencoder
logger = logging.getLogger("chronos_video.train")


def build_video_vae(model: dict[str, Any]) -> ModelMixin:
    """A fresh autoencoder from a config's `model` mapping: `vae_class` (default `AutoencoderKLLTXVideo`) and its
    constructor arguments. A Wan autoencoder gets identity latent statistics sized to its `z_dim` unless given."""
    settings = dict(model)
    name = settings.pop("vae_class", "AutoencoderKLLTXVideo")
    if name not in VAE_CLASSES:
        raise ValueError(f"`model.vae_class` must be one of {sorted(VAE_CLASSES)}, got {name!r}.")
    if name == "AutoencoderKLWan":
        channels = settings.get("z_dim", 16)
        settings.setdefault("latents_mean", [0.0] * channels)
        settings.setdefault("latents_std", [1.0] * channels)
    try:
        return VAE_CLASSES[name](**settings)
    except TypeError as error:
        raise ValueError(f"`model` holds an argument {name} does not take: {error}") from error


def load_video_vae(path: str | Path, key: str = "vae") -> ModelMixin:
    """The autoencoder saved in folder `path` (its class named by `config.json`); errors name the config `key`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"`{key}`={str(path)!r} is not a saved diffusers autoencoder folder (no config.json).")
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"`{key}`={str(path)!r} holds a {name!r}; latent training supports {sorted(VAE_CLASSES)}.")
    return VAE_CLASSES[name].from_pretrained(str(path))


@torch.no_grad()
def check_latent_geometry(vae: ModelMixin, clip_size: tuple[int, int, int], key: str = "vae") -> tuple[int, int, int, int]:
    """The latent shape (C, F', H', W') of clips of `clip_size` (F, H, W), after checking that they round-trip
    through `vae` to the same size and that the pipeline's sizing rule (`vae_compression`) predicts it.

    Causal video autoencoders (Wan, LTX) keep the first frame on its own, so with temporal factor t they take
    1 + k t frames; a clip of another length would decode shorter and the pipeline could not return the
    training size. One probe clip checks this whatever the class does internally.
    """
    frames, height, width = (int(v) for v in clip_size)
    temporal, spatial = vae_compression(vae)
    described = f"`{key}` ({type(vae).__name__}: {temporal}x temporal, {spatial}x spatial compression)"
    if height % spatial or width % spatial:
        raise ValueError(f"`data.height` and `data.width` ({height}x{width}) must be multiples of {spatial} for {described}.")
    if temporal > 1 and (frames - 1) % temporal:
        raise ValueError(f"`data.num_frames`={frames} does not suit {described}: a causal video autoencoder takes 1 + a multiple "
                         f"of {temporal} frames (e.g. {frames - (frames - 1) % temporal} or {frames - (frames - 1) % temporal + temporal}).")
    expected = (frames if temporal == 1 else (frames - 1) // temporal + 1, height // spatial, width // spatial)
    training = vae.training
    vae.eval()
    probe = torch.zeros(1, 3, frames, height, width, device=vae.device, dtype=vae.dtype)
    latents = vae.encode(probe).latent_dist.mode()
    decoded = vae.decode(latents).sample
    vae.train(training)
    if tuple(latents.shape[2:]) != expected or tuple(decoded.shape[2:]) != (frames, height, width):
        raise ValueError(f"`data` clips of {frames}x{height}x{width} do not round-trip through {described}: latents "
                         f"{tuple(latents.shape[2:])} (expected {expected}), decoded {tuple(decoded.shape[2:])}; "
                         "choose `data.num_frames`, `data.height` and `data.width` it accepts.")
    return (int(latents.shape[1]), *expected)


@torch.no_grad()
def encode_latents(vae: ModelMixin, frames: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Raw latents (N, C, F', H', W') float32 of uint8 clips (N, F, H, W, 3): the posterior mean, so the
    encoding is deterministic and can be cached."""
    out = []
    for start in range(0, frames.shape[0], batch_size):
        video = frames_to_model_input(frames[start : start + batch_size]).to(vae.device, vae.dtype)
        out.append(vae.encode(video).latent_dist.mode().float().cpu())
    return torch.cat(out)


def set_latent_statistics(vae: ModelMixin, raw_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stores the per-channel mean and std of `raw_latents` where the diffusers pipelines of `vae`'s class read them
    (LTX: the `latents_mean` / `latents_std` buffers; Wan: its config), so `LatentDecoder.normalize` gives unit-scale
    latents and `denormalize` inverts it before decoding. Returns (mean, std)."""
    mean = raw_latents.mean(dim=(0, 2, 3, 4))
    std = raw_latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)
    buffers = dict(vae.named_buffers())
    if "latents_mean" in buffers and "latents_std" in buffers:
        vae.latents_mean.copy_(mean)
        vae.latents_std.copy_(std)
    elif "latents_mean" in vae.config:
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    else:
        raise ValueError(f"{type(vae).__name__} has no per-channel latent statistics to store.")
    return mean, std


def _has_identity_statistics(vae: ModelMixin) -> bool:
    decoder = LatentDecoder(vae)
    if decoder.latents_mean is None:
        return False
    return bool((decoder.latents_mean == 0).all() and (decoder.latents_std == 1).all())


def encode_training_latents(config: TrainConfig, frames: torch.Tensor, vae: ModelMixin | None = None) -> tuple[ModelMixin, torch.Tensor]:
    """(frozen autoencoder, normalised latents (N, C, F', H', W')) for a flow run with `vae` set.

    The raw latents are computed once per (autoencoder weights, clips) and cached under `data.cache_dir/latents`
    (default `~/.cache/chronos_video/latents`). An autoencoder saved without statistics (all-zero mean, unit std)
    gets them from these latents; the pipeline saves it with them.
    """
    vae = vae if vae is not None else load_video_vae(config.vae)
    vae.requires_grad_(False).eval()
    check_latent_geometry(vae, tuple(frames.shape[1:4]))
    cache = config.data.get("cache_dir")
    root = Path(cache) / "latents" if cache else Path.home() / ".cache" / "chronos_video" / "latents"
    path = encoding_cache_path(vae, frames, root, tag="posterior-mean")
    if path.is_file():
        raw = load_file(str(path))["latents"]
        logger.info(f"Latents of {frames.shape[0]} clips read from {path}.")
    else:
        raw = encode_latents(vae, frames)
        save_file_atomic({"latents": raw}, path)
        logger.info(f"Encoded {frames.shape[0]} clips to latents {tuple(raw.shape[1:])}; cached in {path}.")
    if _has_identity_statistics(vae):
        set_latent_statistics(vae, raw[:STATISTICS_CLIPS])
        logger.info("The autoencoder had no latent statistics; computed them from the training latents.")
    return vae, LatentDecoder(vae).normalize(raw)


class VideoVAEObjective(torch.nn.Module):
    """The autoencoder's training forward: reconstruction error (`reconstruction_error`, L1 or L2, optional
    foreground weight) of the decoded posterior sample, plus `kl_weight` x the KL divergence to N(0, I) per latent
    element. The sample's noise is an input, drawn from the step's generator, so a resumed run is exact."""

    def __init__(
        self, vae: ModelMixin, reconstruction_loss: str = "l1", kl_weight: float = 1e-4, foreground_weight: float = 0.0, foreground_dilation: int = 0
    ):
        super().__init__()
        self.vae = vae
        self.reconstruction_loss = reconstruction_loss
        self.kl_weight = float(kl_weight)
        self.foreground_weight = float(foreground_weight)
        self.foreground_dilation = int(foreground_dilation)

    def forward(self, video: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(video).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        reconstruction = self.vae.decode(latents).sample
        loss = reconstruction_error(reconstruction, video, self.foreground_weight, self.reconstruction_loss, self.foreground_dilation)
        if self.kl_weight:
            kl = 0.5 * (posterior.mean.float().square() + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
            loss = loss + self.kl_weight * kl
        return loss


def _heldout_clips(config: TrainConfig, num_clips: int) -> tuple[torch.Tensor, list[str] | None, str]:
    """(clips, captions for the oracle or None, description) the autoencoder is scored on: held-out attribute
    combinations for shapes, the test images for Moving Fashion-MNIST, else the first training clips."""
    data = config.data
    if is_shapes_data(data):
        clips, captions = load_shapes_frames({**data, "num_clips": num_clips, "split": "heldout", "seed": config.seed + 1})
        return clips, captions, "held-out shapes clips (attribute combinations never trained on)"
    if data.get("type") == "moving_fashion":
        clips, _ = load_training_clips({**data, "num_clips": num_clips, "split": "test", "seed": config.seed + 1})
        return clips, None, "Moving Fashion-MNIST clips of the test images"
    clips, _ = load_training_clips(data)
    return clips[:num_clips], None, "training clips (this data type has no held-out split)"


class _VideoVAEStage(TrainingStage):
    def __init__(self, config: TrainConfig, frames: torch.Tensor, captions: list[str]):
        self.frames = frames
        self.vae = build_video_vae(config.model)
        self.latent_shape = check_latent_geometry(self.vae, tuple(frames.shape[1:4]), key="model")
        self.module = VideoVAEObjective(self.vae, config.reconstruction_loss, config.kl_weight, config.foreground_weight, config.foreground_dilation)
        self._validation_clips: torch.Tensor | None = None

    def batch(self, indices, rng):
        noise = torch.randn((len(indices), *self.latent_shape), generator=rng)
        return frames_to_model_input(self.frames[indices]), noise

    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        video = video.to(self.vae.device, self.vae.dtype)
        return self.vae.decode(self.vae.encode(video).latent_dist.mode()).sample

    def validate(self, config):
        if not config.validation_num_prompts:
            return {}
        if self._validation_clips is None:
            self._validation_clips = _heldout_clips(config, config.validation_num_prompts)[0]
        scores, _, _ = evaluate_reconstructions(self.reconstruct, self._validation_clips, None)
        return {"vae/psnr_db": scores["psnr_db"]}

    def finalize(self, config, output_dir, train_seconds, hardware, resumed_from_step):
        self.vae.eval()
        mean, std = set_latent_statistics(self.vae, encode_latents(self.vae, self.frames[:STATISTICS_CLIPS]))
        self.vae.save_pretrained(str(output_dir), safe_serialization=True)
        clips, captions, described = _heldout_clips(config, config.eval_num_prompts)
        scores, lines, reconstructions = evaluate_reconstructions(self.reconstruct, clips, captions)
        temporal, spatial = vae_compression(self.vae)
        scores.update(latent_shape=list(self.latent_shape), temporal_compression=temporal, spatial_compression=spatial,
                      latents_mean=mean.tolist(), latents_std=std.tolist())
        (output_dir / "vae_scores.json").write_text(json.dumps(scores, indent=2))
        table = "\n".join(lines)
        logger.info(f"Video autoencoder on {described}:\n{table}")
        pairs = torch.cat([clips[:4].float() / 255.0, torch.from_numpy(reconstructions[:4])], dim=3)  # original | reconstruction
        gif = save_sample_gif(pairs.numpy(), output_dir / "reconstructions.gif")
        name = type(self.vae).__name__
        frames, height, width = self.frames.shape[1:4]
        usage = f"""import torch
from diffusers import {name}

vae = {name}.from_pretrained("{config.hub_model_id or 'chronos-video/' + output_dir.name}")
video = torch.rand(1, 3, {frames}, {height}, {width}) * 2 - 1   # (batch, channels, frames, height, width) in [-1, 1]
latents = vae.encode(video).latent_dist.mode()           # {tuple(self.latent_shape)} per clip
reconstruction = vae.decode(latents).sample
# a text-to-video backbone on its latents:
#   accelerate launch training/train.py --config training/configs/nano_sora_latent_shapes.yaml --vae <this folder>"""
        params = sum(p.numel() for p in self.vae.parameters()) / 1e6
        description = f"""# {output_dir.name}

A `{name}` video autoencoder ({params:.2f} M parameters; {temporal}x temporal and {spatial}x spatial compression,
{self.latent_shape[0]} latent channels: clips of {frames}x{height}x{width} become latents of {tuple(self.latent_shape)})
trained with chronos-video's `training/train.py` (`architecture: {VAE_ARCHITECTURE}`; {config.reconstruction_loss.upper()}
reconstruction loss, KL weight {config.kl_weight}, foreground weight {config.foreground_weight}). Per-channel latent
statistics of {min(STATISTICS_CLIPS, self.frames.shape[0])} training clips are stored with it (the diffusers convention of its
class), so a pipeline that carries it as its `vae` component normalises and decodes latents consistently.

![original | reconstruction]({gif})

## Reconstruction on {len(clips)} {described}

{table}
"""
        write_model_card(output_dir, config, description, usage, train_seconds, hardware, resumed_from_step)


def train_video_vae(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Trains the video autoencoder described by `config` (`architecture: video-vae`) and saves it to `output_dir`."""
    return train_stage(config, accelerator, _VideoVAEStage)
