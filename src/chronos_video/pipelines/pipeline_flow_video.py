"""The text-to-video pipeline every chronos-video flow model shares.

Backbones differ (DiT, complex Mamba, hierarchical reasoning); the sampling contract does not:
text in, velocity predictor plus any diffusers flow-match scheduler (`ChronosFlowMatchScheduler`
by default), pixel space by default or any diffusers video autoencoder, outputs through
diffusers' `VideoProcessor`. Sampling policy (precision schedules, constraint settings) is the
pipeline's own config, saved in `model_index.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import CogVideoXLoraLoaderMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..decoding import LatentDecoder, vae_compression
from ..flow_matching import classifier_free_guidance
from ..guidance import ConstraintTransport, RegionConstraint
from ..precision import PrecisionController, PrecisionSchedule, resolve_precision
from ..schedulers.scheduling_chronos_flow_match import LEGACY_PIPELINE_KEYS, current_sigmas

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
PRECISION_BACKENDS = ("emulate", "native")
# `precision` default: the pipeline config's `precision_schedule`. "scheduler" is the same (the
# name from when the schedule was stored in the scheduler config).
DEFAULT_PRECISION = "default"
_DEFAULT_PRECISION_ALIASES = (DEFAULT_PRECISION, "scheduler")


def check_pipeline_policy(
    precision_schedule=None, calibrated_precision_schedule=None, precision_backend=None, constraint_settings=None
) -> None:
    """Validates the sampling policy a flow pipeline keeps in its config, naming the bad argument."""
    for name, value in (("precision_schedule", precision_schedule), ("calibrated_precision_schedule", calibrated_precision_schedule)):
        if value is not None and not isinstance(value, (dict, str)):
            raise ValueError(f"`{name}` must be a dict (PrecisionSchedule.to_dict()), a preset name or None, got {type(value).__name__}.")
    if precision_backend is not None and precision_backend not in PRECISION_BACKENDS:
        raise ValueError(f"`precision_backend` must be one of {PRECISION_BACKENDS} or None, got {precision_backend!r}.")
    if constraint_settings is not None and not isinstance(constraint_settings, dict):
        raise ValueError(f"`constraint_settings` must be a dict (ConstraintTransport.to_config()) or None, got {type(constraint_settings).__name__}.")


@dataclass
class VideoPipelineOutput(BaseOutput):
    """Output of chronos-video pipelines.

    Args:
        frames: `np` (batch, frames, height, width, channels) in [0, 1], `pt` (batch, frames,
            channels, height, width), `pil` a list of lists of images, or latents.
        trace: one dict per model evaluation: timestep, sigma, and, when enabled, the precision
            gauge and entropy, the constraint violation (RMS over the mask) and barrier value.
        constraints_satisfied: with `constraints`, one bool per video: whether the final video is
            within every constraint's epsilon (None without constraints).
    """

    frames: np.ndarray | torch.Tensor | list
    trace: list[dict[str, Any]] | None = None
    constraints_satisfied: list[bool] | None = None


class FlowVideoPipeline(DiffusionPipeline, CogVideoXLoraLoaderMixin):
    """Shared base: prompt encoding, input checks, the rectified-flow sampling loop and decoding.

    Components: `tokenizer` and `text_encoder` (any transformers pair), `transformer` (the
    velocity predictor; the diffusers name is kept so LoRA loaders and offloading work),
    `scheduler` (`ChronosFlowMatchScheduler`, or diffusers' `FlowMatchEulerDiscreteScheduler` /
    `FlowMatchHeunDiscreteScheduler`) and an optional `vae` (None = pixel space).

    Sampling policy, stored in the pipeline config (`model_index.json`) like diffusers' pipeline
    flags, so a saved pipeline samples as it did:
        precision_schedule: what `precision="default"` means (a preset name or a
            `PrecisionSchedule.to_dict()`; None = full precision).
        calibrated_precision_schedule: what `precision="calibrated"` means (written by
            `chronos_video.precision.calibrate_pipeline`).
        precision_backend: "emulate" (default) or "native" low-precision kernels.
        constraint_settings: default `ConstraintTransport` options under `constraint_settings=`.
    A scheduler loaded from the older layout (these keys in `scheduler_config.json`) hands them
    over for every key left None here.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        transformer: ModelMixin,
        scheduler: SchedulerMixin,
        vae: ModelMixin | None = None,
        precision_schedule: dict | str | None = None,
        calibrated_precision_schedule: dict | None = None,
        precision_backend: str | None = None,
        constraint_settings: dict | None = None,
    ):
        super().__init__()
        policy = dict(
            precision_schedule=precision_schedule,
            calibrated_precision_schedule=calibrated_precision_schedule,
            precision_backend=precision_backend,
            constraint_settings=constraint_settings,
        )
        check_pipeline_policy(**policy)
        self.register_to_config(**policy)
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, vae=vae)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    def __setattr__(self, name: str, value: Any):
        super().__setattr__(name, value)
        if name == "scheduler":  # in __init__ and on `pipe.scheduler = ...`
            self._adopt_legacy_policy(value)

    def _adopt_legacy_policy(self, scheduler) -> None:
        """Takes the policy an old-layout scheduler carries for every key this pipeline left None."""
        legacy = getattr(scheduler, "legacy_pipeline_config", None)
        if not legacy:
            return
        unset = {key: legacy[key] for key in LEGACY_PIPELINE_KEYS if key in legacy and self.config.get(key) is None}
        if unset:
            self.register_to_config(**unset)

    def save_policy(self, save_directory: str | os.PathLike) -> Path:
        """Rewrites only `model_index.json` (e.g. after calibration), as `save_pretrained` writes it.

        The weights are left untouched; the file is replaced atomically, so an interrupted write
        never leaves a half-written index next to them.
        """
        folder = Path(save_directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"`save_directory` {str(folder)!r} is not a folder.")
        config = json.loads(self.to_json_string())
        config.pop("_name_or_path", None)
        target = folder / self.config_name
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, target)
        return target

    # ------------------------------------------------------------------ geometry
    @property
    def vae_scale_factor_spatial(self) -> int:
        return self._vae_compression()[1]

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self._vae_compression()[0]

    def _vae_compression(self) -> tuple[int, int]:
        """(temporal, spatial) compression of the autoencoder; (1, 1) in pixel space."""
        return vae_compression(getattr(self, "vae", None))

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        temporal, spatial = self._vae_compression()
        latent_frames = num_frames if temporal == 1 else (num_frames - 1) // temporal + 1
        return (batch, self._latent_channels, latent_frames, height // spatial, width // spatial)

    @property
    def default_size(self) -> tuple[int, int, int]:
        """(num_frames, height, width) in output pixels that the backbone was trained at: the
        defaults of `__call__`."""
        config = self.transformer.config
        temporal, spatial = self._vae_compression()
        frames = config.sample_frames if temporal == 1 else (config.sample_frames - 1) * temporal + 1
        return frames, config.sample_height * spatial, config.sample_width * spatial

    # ------------------------------------------------------------------ text
    def _max_sequence_length(self, max_sequence_length: int | None) -> int:
        model_max = getattr(self.tokenizer, "model_max_length", 128)
        length = max_sequence_length if max_sequence_length is not None else (int(model_max) if model_max <= 1024 else 128)
        # Encoders with learned absolute positions (CLIP, BERT) cannot read past their table.
        positions = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        if positions is not None and length > positions:
            raise ValueError(
                f"`max_sequence_length`={length} is longer than the text encoder's {positions} position embeddings; "
                f"pass max_sequence_length <= {positions}."
            )
        return length

    def _encode_text(self, prompts: list[str], max_sequence_length: int, device, dtype):
        inputs = self.tokenizer(
            prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        mask = inputs.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
        return hidden.to(dtype), mask

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Returns (prompt_embeds, prompt_mask, negative_embeds, negative_mask), repeated per video."""
        device = device or self._execution_device
        if dtype is None:  # the backbone reads the embeddings; a text-encoder-only pipeline keeps the encoder's dtype
            dtype = (self.transformer if self.transformer is not None else self.text_encoder).dtype
        max_len = self._max_sequence_length(max_sequence_length)
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds, prompt_attention_mask = self._encode_text(prompt, max_len, device, dtype)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = batch * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negative_prompt, max_len, device, dtype)
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long, device=device)

        def repeat(tensor):
            return None if tensor is None else tensor.to(device).repeat_interleave(num_videos_per_prompt, dim=0)

        return (
            repeat(prompt_embeds.to(dtype)),
            repeat(prompt_attention_mask),
            repeat(negative_prompt_embeds.to(dtype) if negative_prompt_embeds is not None else None),
            repeat(negative_prompt_attention_mask),
        )

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_frames,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_videos_per_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        prompt_attention_mask,
        negative_prompt_attention_mask,
        latents,
        generator,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> int:
        """Validates every argument, naming it in the error; returns the prompt batch size."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass one of `prompt` or `prompt_embeds`.")
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
                raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
            batch = 1 if isinstance(prompt, str) else len(prompt)
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise ValueError("`prompt_embeds` must be a tensor of shape (batch, seq_len, hidden_size).")
            batch = prompt_embeds.shape[0]
            expected = getattr(self.transformer.config, "text_embed_dim", None)
            if expected is not None and prompt_embeds.shape[-1] != expected:
                raise ValueError(f"`prompt_embeds` hidden size {prompt_embeds.shape[-1]} != transformer `text_embed_dim` {expected}.")
            if prompt_attention_mask is not None and tuple(prompt_attention_mask.shape) != tuple(prompt_embeds.shape[:2]):
                raise ValueError(
                    f"`prompt_attention_mask` shape {tuple(prompt_attention_mask.shape)} must equal `prompt_embeds`' (batch, seq_len) {tuple(prompt_embeds.shape[:2])}."
                )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but the prompt batch size is {batch}.")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(f"`negative_prompt` must be a string or list of strings, got {type(negative_prompt).__name__}.")
        if negative_prompt_embeds is not None:
            if prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` requires `prompt_embeds` (embeddings of the same encoder).")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` shape {tuple(negative_prompt_embeds.shape)} must equal `prompt_embeds` shape {tuple(prompt_embeds.shape)}."
                )
            if negative_prompt_attention_mask is not None and tuple(negative_prompt_attention_mask.shape) != tuple(negative_prompt_embeds.shape[:2]):
                raise ValueError("`negative_prompt_attention_mask` must have shape (batch, seq_len) of `negative_prompt_embeds`.")

        for name, value in (("num_frames", num_frames), ("height", height), ("width", width),
                            ("num_inference_steps", num_inference_steps), ("num_videos_per_prompt", num_videos_per_prompt)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a non-negative number, got {guidance_scale!r}.")

        temporal, spatial = self._vae_compression()
        patch_t, patch_h, patch_w = self.transformer.config.patch_size
        if height % (spatial * patch_h) != 0 or width % (spatial * patch_w) != 0:
            raise ValueError(
                f"`height` ({height}) and `width` ({width}) must be divisible by {spatial * patch_h} and {spatial * patch_w} "
                f"(autoencoder factor {spatial} x patch size {patch_h}x{patch_w})."
            )
        latent_frames = self._latent_shape(1, num_frames, height, width)[2]
        if temporal > 1 and (num_frames - 1) % temporal != 0:
            raise ValueError(f"`num_frames` ({num_frames}) must be 1 + a multiple of the autoencoder's temporal factor {temporal}.")
        if latent_frames % patch_t != 0:
            raise ValueError(f"`num_frames` ({num_frames}) gives {latent_frames} latent frames, not divisible by the temporal patch size {patch_t}.")

        total = batch * num_videos_per_prompt
        if latents is not None:
            expected_shape = self._latent_shape(total, num_frames, height, width)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected_shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"`latents` must have shape {expected_shape}, got {got}.")
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"`generator` list has {len(generator)} entries but batch_size * num_videos_per_prompt = {total}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has unknown names {unknown}; allowed: {self._callback_tensor_inputs}."
                )
        return batch

    # ------------------------------------------------------------------ latents
    def prepare_latents(self, batch, num_frames, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = self._latent_shape(batch, num_frames, height, width)
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video (B, C, F, H, W) in [-1, 1], through the same decoder the constraints are judged with."""
        return self._constraint_decoder().decode(latents)

    # ------------------------------------------------------------------ sampling
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ constraint transport
    def _constraint_decoder(self) -> LatentDecoder:
        """The one latent -> pixel map: `decode_latents` returns its `decode`, constraints see its
        (B, F, C, H, W) view in [0, 1], so the returned video is what the constraint was checked on."""
        return LatentDecoder(self.vae)

    def _build_transport(self, constraints, constraint_settings) -> ConstraintTransport | None:
        if constraints is None:
            return None
        if isinstance(constraints, RegionConstraint):
            constraints = [constraints]
        if not isinstance(constraints, (list, tuple)) or not constraints:
            raise ValueError("`constraints` must be a RegionConstraint or a non-empty list of them.")
        if constraint_settings is not None and not isinstance(constraint_settings, dict):
            raise ValueError(f"`constraint_settings` must be a dict of ConstraintTransport options, got {type(constraint_settings).__name__}.")
        settings = {**(self.config.get("constraint_settings") or {}), **(constraint_settings or {})}
        return ConstraintTransport.from_config(settings, list(constraints))

    def _check_constraint_shapes(self, transport: ConstraintTransport, num_frames: int, height: int, width: int) -> None:
        expected = (num_frames, 3, height, width)
        for index, constraint in enumerate(transport.constraints):
            if tuple(constraint.shape) != expected:
                raise ValueError(f"`constraints[{index}]` describes a video of shape {tuple(constraint.shape)}, the pipeline generates (F, C, H, W)={expected}.")

    # ------------------------------------------------------------------ precision gauges
    def _resolve_precision(self, precision) -> PrecisionSchedule | None:
        if isinstance(precision, str) and precision in _DEFAULT_PRECISION_ALIASES:
            precision = self.config.get("precision_schedule")
        return resolve_precision(precision, calibrated=self.config.get("calibrated_precision_schedule"))

    def transformer_inputs(self, model_input, timestep, prompt_embeds, prompt_mask, attention_kwargs) -> dict[str, Any]:
        """Keyword arguments of one backbone call on `model_input` (both guidance halves when guided); a
        pipeline whose backbone takes more (HRM's carry) extends them."""
        return {
            "hidden_states": model_input.to(self.transformer.dtype),
            "timestep": timestep.expand(model_input.shape[0]),
            "encoder_hidden_states": prompt_embeds,
            "encoder_attention_mask": prompt_mask,
            "attention_kwargs": attention_kwargs,
            "return_dict": False,
        }

    def velocity_from_output(self, output) -> torch.Tensor:
        """The (unguided) velocity in a backbone call's output; the hook for backbones that return more."""
        return output[0]

    def predict_velocity(self, latents, timestep, prompt_embeds, prompt_mask, attention_kwargs) -> torch.Tensor:
        """One (classifier-free guided) velocity evaluation of the backbone."""
        model_input = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
        # diffusers' cache hooks (`transformer.enable_cache(...)`) keep their state per named context, as in LTX.
        cache_context = getattr(self.transformer, "cache_context", None)
        with cache_context("cond_uncond") if cache_context is not None else nullcontext():
            output = self.transformer(**self.transformer_inputs(model_input, timestep, prompt_embeds, prompt_mask, attention_kwargs))
        velocity = self.velocity_from_output(output).float()
        if self.do_classifier_free_guidance:
            velocity = classifier_free_guidance(*velocity.chunk(2), self._guidance_scale)
        return velocity

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        constraints: RegionConstraint | list[RegionConstraint] | None = None,
        constraint_settings: dict[str, Any] | None = None,
        precision: str | PrecisionSchedule | dict | None = DEFAULT_PRECISION,
    ) -> VideoPipelineOutput | tuple:
        """Generates videos from text.

        Args:
            prompt / negative_prompt: text, or lists of texts (one per video in the batch).
            num_frames, height, width: output size; default to the backbone's training size.
            num_inference_steps: number of sampler steps (Heun evaluates the model ~2x per step).
            guidance_scale: classifier-free guidance weight; <= 1 disables the unconditional branch.
            num_videos_per_prompt: videos sampled for each prompt.
            generator / latents: randomness; the same generator gives the same video.
            prompt_embeds / negative_prompt_embeds (+ attention masks): precomputed text states.
            output_type: "np", "pt", "pil" or "latent".
            callback_on_step_end / callback_on_step_end_tensor_inputs: called after every step with the
                named tensors; it may return replacements for them.
            constraints: `RegionConstraint`s on the output pixels (keyframes, regions); every model
                evaluation's velocity is corrected (natural gradient + CBF filter by default) and the
                final video is projected into the constraint set, or the output says it could not be.
            constraint_settings: `ConstraintTransport` options (method "natural" | "dps" | "repaint" |
                "none", solver, cbf, strength, ...) over the pipeline config's `constraint_settings`.
            precision: numeric precision per step: a preset ("seed", "seed_entropy", "sigma"),
                "calibrated" (the profiler's schedule stored in the pipeline config), a
                `PrecisionSchedule` or its dict, or None for full precision. Default ("default"):
                the pipeline config's `precision_schedule` (None there = full precision).
        Returns:
            `VideoPipelineOutput` (frames, trace, constraints_satisfied) or a tuple `(frames,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        default_frames, default_height, default_width = self.default_size
        num_frames = default_frames if num_frames is None else num_frames
        height = default_height if height is None else height
        width = default_width if width is None else width

        batch = self.check_inputs(
            prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale, num_videos_per_prompt,
            prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, latents,
            generator, output_type, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        device = self._execution_device
        transport = self._build_transport(constraints, constraint_settings)
        if transport is not None:
            self._check_constraint_shapes(transport, num_frames, height, width)
            transport.constraints = [c.to(device) for c in transport.constraints]
            decoder = self._constraint_decoder()
        schedule = self._resolve_precision(precision)
        controller = None
        if schedule is not None:  # quantizes the weight banks once for this call; steps only swap pointers
            controller = PrecisionController(self.transformer, gauges=schedule.gauges(), backend=self.config.get("precision_backend") or "emulate")

        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
            negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, max_sequence_length, device,
        )
        if self.do_classifier_free_guidance:
            model_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            model_mask = torch.cat([negative_mask, prompt_mask])
        else:
            model_embeds, model_mask = prompt_embeds, prompt_mask

        latents = self.prepare_latents(
            batch * num_videos_per_prompt, num_frames, height, width, torch.float32, device, generator, latents
        )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        trace: list[dict[str, Any]] = []

        try:
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    sigma, sigma_next = current_sigmas(self.scheduler)
                    record: dict[str, Any] = {"step": i, "timestep": float(t), "sigma": sigma}
                    if controller is not None:
                        entropy = schedule.measure_entropy(latents) if schedule.entropy_estimator else None
                        decision = controller.apply_schedule(schedule, sigma, entropy)
                        record.update(gauge=decision.gauge, entropy=entropy)
                    velocity = self.predict_velocity(latents, t, model_embeds, model_mask, attention_kwargs)
                    if transport is not None and sigma > 0:
                        velocity, info = transport.correct(latents, velocity, sigma, sigma_next, decoder)
                        record.update(
                            constraint_violation=[float(v) for v in info.violation.max(dim=1).values],
                            barrier=[float(h) for h in info.barrier.min(dim=1).values],
                        )
                    latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                    trace.append(record)

                    if callback_on_step_end is not None:
                        callback_kwargs = {}
                        for name in callback_on_step_end_tensor_inputs:
                            callback_kwargs[name] = locals()[name]
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        if self.do_classifier_free_guidance:
                            model_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
                        else:
                            model_embeds = prompt_embeds
                    progress_bar.update()
        finally:
            if controller is not None:
                controller.remove()  # the model's own full-precision weights are back, bit for bit

        satisfied = None
        if transport is not None:
            projection = transport.finalize(latents, decoder)
            latents = projection.x0.to(latents.dtype)
            epsilons = torch.tensor([c.epsilon for c in transport.constraints], dtype=projection.violation.dtype)
            satisfied = [bool(ok) for ok in (projection.violation.cpu() <= epsilons * (1 + 1e-6)).all(dim=1)]
            if not all(satisfied):
                logger.warning(
                    f"Could not bring videos {[i for i, ok in enumerate(satisfied) if not ok]} within the constraints' epsilon; "
                    "see `constraints_satisfied` and the RMS violations in `trace`."
                )

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return VideoPipelineOutput(frames=video, trace=trace, constraints_satisfied=satisfied)
