"""Training the autoregressive video stack with Accelerate: the FSQ video tokenizer, then the LM over its codes.

`training/train.py` hands every run whose `architecture` is `fsq-tokenizer` or `ar-video` to
`train_autoregressive`, so both stages are trained by the same script, from committed configs, with
the same checkpointing (atomic, resumable), EMA, LR schedules and mixed precision as the flow models.
Each stage is a small `nn.Module` whose forward returns the loss, so DDP and autocast wrap it whole.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .data import load_shapes_frames, load_training_clips
from .evaluation.pipeline_eval import evaluate_pipeline, evaluate_video_tokenizer, evaluation_prompts
from .flow_matching import frames_to_model_input
from .model_card import hardware_description, save_sample_gif, write_model_card
from .models.ar_video import ARVideoConfig, ARVideoForCausalLM
from .models.fsq_tokenizer import FSQVideoTokenizer
from .pipelines.pipeline_ar import ARVideoPipeline
from .text import train_caption_tokenizer
from .training_config import TrainConfig
from .training_utils import (
    encoding_cache_path,
    evaluation_weights,
    log_learning_curve,
    optimizer_step,
    record_update,
    resolve_checkpoint,
    restore_training_states,
    save_checkpoint,
    save_file_atomic,
    start_trackers,
    step_batch,
    training_states,
)

__all__ = ["AR_ARCHITECTURES", "TrainingStage", "encode_clips", "reconstruction_error", "train_autoregressive", "train_stage"]

AR_ARCHITECTURES = ("fsq-tokenizer", "ar-video")
logger = logging.getLogger("chronos_video.train")


def reconstruction_error(
    reconstruction: torch.Tensor, video: torch.Tensor, foreground_weight: float = 0.0, loss: str = "l2", foreground_dilation: int = 0
) -> torch.Tensor:
    """Mean squared (`l2`) or absolute (`l1`) error of a reconstruction of `video` (B, C, F, H, W) in [-1, 1].

    With `foreground_weight` w, pixels brighter than the oracle's threshold (0.3 of full scale, any channel)
    count 1 + w times: on mostly black clips the plain mean is dominated by the background, and the colour
    and outline of the object are what a text-to-video model must keep. `foreground_dilation` d widens
    that region by d pixels in each frame, so background pixels next to the object weigh as much: painting
    a small circle's corners in (a square, to the oracle) then costs what erasing its edge does.
    """
    difference = reconstruction.float() - video.float()
    error = difference.square() if loss == "l2" else difference.abs()
    if not foreground_weight:
        return error.mean()
    foreground = (video.amax(dim=1, keepdim=True) > -0.4).float()  # [-1, 1] scale: brightness 0.3
    if foreground_dilation:
        size = 2 * foreground_dilation + 1
        foreground = torch.nn.functional.max_pool3d(foreground, (1, size, size), stride=1, padding=(0, foreground_dilation, foreground_dilation))
    weight = 1.0 + foreground_weight * foreground
    return (error * weight).sum() / (weight.sum() * video.shape[1])


class ReconstructionObjective(torch.nn.Module):
    """The tokenizer's training forward: `reconstruction_error` of the straight-through FSQ reconstruction."""

    def __init__(self, tokenizer: FSQVideoTokenizer, foreground_weight: float = 0.0, loss: str = "l2", foreground_dilation: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.foreground_weight = float(foreground_weight)
        self.loss = loss
        self.foreground_dilation = int(foreground_dilation)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        reconstruction, _ = self.tokenizer(video)
        return reconstruction_error(reconstruction, video, self.foreground_weight, self.loss, self.foreground_dilation)


class NextCodeObjective(torch.nn.Module):
    """The LM's training forward: next-code cross-entropy over the video part of caption + code sequences."""

    def __init__(self, language_model: ARVideoForCausalLM):
        super().__init__()
        self.language_model = language_model

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.language_model.code_loss(input_ids)


def encode_clips(video_tokenizer: FSQVideoTokenizer, frames: torch.Tensor, cache_dir: str | os.PathLike | None = None, batch_size: int = 32) -> torch.LongTensor:
    """Codes (N, F, rows, columns) of uint8 clips (N, F, H, W, 3), computed once per (tokenizer weights,
    clips) and cached as safetensors, so the LM's epochs never run the encoder."""
    path = encoding_cache_path(video_tokenizer, frames, cache_dir or Path.home() / ".cache" / "chronos_video" / "codes")
    if path.is_file():
        return load_file(str(path))["codes"]
    codes = []
    with torch.no_grad():
        for start in range(0, frames.shape[0], batch_size):
            codes.append(video_tokenizer.encode(frames_to_model_input(frames[start : start + batch_size]).to(video_tokenizer.device)).cpu())
    codes = torch.cat(codes).to(torch.int32)
    save_file_atomic({"codes": codes}, path)
    return codes.long()


class TrainingStage:
    """One trainable stage: its loss module, how a batch of clip indices becomes the module's input,
    what a validation measures, and what the finished run saves."""

    module: torch.nn.Module

    def batch(self, indices: torch.Tensor, rng: torch.Generator) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The module's input(s) for these clips; all randomness from `rng`, so resume is exact."""
        raise NotImplementedError

    def validate(self, config: TrainConfig) -> dict[str, float]:
        return {}

    def finalize(self, config: TrainConfig, output_dir: Path, train_seconds: float, hardware: str, resumed_from_step: int) -> None:
        raise NotImplementedError


class _TokenizerStage(TrainingStage):
    def __init__(self, config: TrainConfig, frames: torch.Tensor):
        self.frames = frames
        self.tokenizer = FSQVideoTokenizer(**config.model)
        self.module = ReconstructionObjective(self.tokenizer, config.foreground_weight, config.reconstruction_loss, config.foreground_dilation)

    def batch(self, indices, rng):
        return frames_to_model_input(self.frames[indices])

    def finalize(self, config, output_dir, train_seconds, hardware, resumed_from_step):
        self.tokenizer.eval()
        self.tokenizer.save_pretrained(str(output_dir), safe_serialization=True)
        heldout = {**config.data, "num_clips": config.eval_num_prompts, "split": "heldout", "seed": config.seed + 1}
        clips, captions = load_shapes_frames(heldout)
        scores, table, reconstructions = evaluate_video_tokenizer(self.tokenizer, clips, captions)
        (output_dir / "tokenizer_scores.json").write_text(json.dumps(scores, indent=2))
        logger.info("Video tokenizer on held-out clips:\n" + table)
        pairs = torch.cat([clips[:4].float() / 255.0, torch.from_numpy(reconstructions[:4])], dim=3)  # original | reconstruction
        gif = save_sample_gif(pairs.numpy(), output_dir / "reconstructions.gif")
        usage = f"""import torch
from chronos_video import FSQVideoTokenizer

tokenizer = FSQVideoTokenizer.from_pretrained("{config.hub_model_id or 'chronos-video/' + output_dir.name}")
video = torch.rand(1, 3, 16, 32, 32) * 2 - 1          # (batch, channels, frames, height, width) in [-1, 1]
codes = tokenizer.encode(video)                       # (1, 16, rows, columns) integers
reconstruction = tokenizer.decode(codes)"""
        description = f"""# {output_dir.name}

An `FSQVideoTokenizer` ({sum(p.numel() for p in self.tokenizer.parameters()) / 1e6:.2f} M parameters, FSQ levels
{list(self.tokenizer.config.levels)} = {self.tokenizer.codebook_size} codes, {self.tokenizer.spatial_compression_ratio}x spatial
compression per frame) trained with chronos-video's `training/train.py` on the procedural *shapes* clips. It is the
video tokenizer of the autoregressive `ARVideoPipeline`.

![original | reconstruction]({gif})

## Held-out clips ({config.eval_num_prompts}, attribute combinations never trained on)

{table}
"""
        write_model_card(output_dir, config, description, usage, train_seconds, hardware, resumed_from_step)


class _LanguageModelStage(TrainingStage):
    def __init__(self, config: TrainConfig, frames: torch.Tensor, captions: list[str]):
        self.captions = captions
        if config.pretrained_pipeline:
            base = ARVideoPipeline.from_pretrained(config.pretrained_pipeline)
            tokenizer, video_tokenizer, language_model = base.tokenizer, base.video_tokenizer, base.language_model
        else:
            video_tokenizer = FSQVideoTokenizer.from_pretrained(config.video_tokenizer)
            tokenizer = train_caption_tokenizer(captions, model_max_length=config.tokenizer_max_length)
            rows, columns = video_tokenizer.code_grid(*frames.shape[2:4])
            lm_config = ARVideoConfig(
                text_vocab_size=len(tokenizer), codebook_size=video_tokenizer.codebook_size, text_length=config.tokenizer_max_length,
                frame_rows=rows, frame_columns=columns, **config.model,
            )
            language_model = ARVideoForCausalLM(lm_config)
        # On the run's device (a GPU under `accelerate launch`): it encodes every clip once, then decodes validation samples.
        video_tokenizer.requires_grad_(False).eval().to(PartialState().device)
        cache = config.data.get("cache_dir")  # codes are cached beside the rendered clips
        self.codes = encode_clips(video_tokenizer, frames, cache_dir=Path(cache) / "codes" if cache else None)
        self.pipeline = ARVideoPipeline(tokenizer, video_tokenizer, language_model, num_frames=frames.shape[1])
        self.pipeline.set_progress_bar_config(disable=True)
        self.language_model = language_model
        self.module = NextCodeObjective(language_model)
        self.caption_dropout = config.caption_dropout

    def batch(self, indices, rng):
        captions = ["" if float(torch.rand((), generator=rng)) < self.caption_dropout else self.captions[int(i)] for i in indices]
        prefix = self.pipeline.prompt_ids(captions).cpu()
        return torch.cat([prefix, self.codes[indices].flatten(1) + self.language_model.config.visual_token_offset], dim=1)

    def _evaluate(self, config: TrainConfig, prompts=None, num_prompts: int | None = None):
        return evaluate_pipeline(
            self.pipeline, num_prompts=num_prompts or config.eval_num_prompts, num_inference_steps=None,
            guidance_scale=config.eval_guidance_scale, seed=config.seed, prompts=prompts, **config.generation,
        )

    def validate(self, config):
        if not config.validation_num_prompts:
            return {}
        prompts = evaluation_prompts(config.validation_num_prompts, seed=config.seed, attributes=config.data.get("attributes"))
        scores, _ = self._evaluate(config, prompts=prompts, num_prompts=len(prompts))
        return {f"oracle/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "n"}

    def finalize(self, config, output_dir, train_seconds, hardware, resumed_from_step):
        self.language_model.eval()
        self.pipeline.save_pretrained(str(output_dir), safe_serialization=True)
        started = time.time()
        scores, table = self._evaluate(config)
        seconds_per_video = (time.time() - started) / config.eval_num_prompts
        (output_dir / "oracle_scores.json").write_text(json.dumps({**scores, "seconds_per_video": seconds_per_video}, indent=2))
        logger.info("Oracle scores on held-out combinations:\n" + table)
        gif = None
        if config.sample_prompts:
            videos = self.pipeline(config.sample_prompts, guidance_scale=config.eval_guidance_scale,
                                   generator=torch.Generator().manual_seed(config.seed), **config.generation).frames
            gif = save_sample_gif(videos, output_dir / "samples.gif")
        repo_id = config.hub_model_id or f"chronos-video/{output_dir.name}"
        options = ", ".join(f"{k}={v!r}" for k, v in config.generation.items())
        usage = f"""import torch
from diffusers.utils import export_to_video
from chronos_video import ARVideoPipeline

pipe = ARVideoPipeline.from_pretrained("{repo_id}")  # or a local folder
video = pipe("a small red circle moving left to right slowly", num_frames=32, guidance_scale={config.eval_guidance_scale}{', ' + options if options else ''},
             generator=torch.Generator().manual_seed(0)).frames[0]   # 32 frames: twice the training length
export_to_video(video, "out.mp4", fps=8)"""
        lm_params = sum(p.numel() for p in self.language_model.parameters())
        sample = f"![samples]({gif})\n\n" if gif else ""
        description = f"""# {output_dir.name}

An `ARVideoPipeline`: a {lm_params / 1e6:.2f} M-parameter `ARVideoForCausalLM` (Qwen2 blocks, 3D rotary positions,
a sliding window of {self.language_model.config.window_frames} frames) over the codes of an `FSQVideoTokenizer`
({self.pipeline.video_tokenizer.codebook_size} codes), trained with chronos-video's `training/train.py` on the
procedural *shapes* clips ({config.data.get('num_clips')} clips, held-out attribute combinations excluded).

{sample}## Oracle evaluation on held-out attribute combinations

{config.eval_num_prompts} prompts, guidance scale {config.eval_guidance_scale}, sampling {config.generation or 'plain (temperature 1)'};
{seconds_per_video:.2f} s per video on the training hardware:

{table}
"""
        write_model_card(output_dir, config, description, usage, train_seconds, hardware, resumed_from_step)


def _autoregressive_stage(config: TrainConfig, frames: torch.Tensor, captions: list[str]) -> TrainingStage:
    return _TokenizerStage(config, frames) if config.architecture == "fsq-tokenizer" else _LanguageModelStage(config, frames, captions)


def train_autoregressive(config: TrainConfig, accelerator: Accelerator) -> Path:
    """Trains the video tokenizer (`fsq-tokenizer`) or the video LM (`ar-video`) described by `config`."""
    return train_stage(config, accelerator, _autoregressive_stage)


def train_stage(config: TrainConfig, accelerator: Accelerator, build_stage: Callable[[TrainConfig, torch.Tensor, list[str]], TrainingStage]) -> Path:
    """The training loop of a stage whose module returns its own loss (`build_stage(config, clips, captions)`):
    checkpoints, resume, EMA, LR schedule, validation and the final save are those of every training run."""
    output_dir = Path(config.output_dir)
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else output_dir / "checkpoints"
    set_seed(config.seed)
    frames, captions = load_training_clips(config.data)
    num_main_items = frames.shape[0]
    if config.curriculum_data:
        extra_frames, extra_captions = load_training_clips({**config.data, **config.curriculum_data})
        frames, captions = torch.cat([frames, extra_frames]), captions + extra_captions
    stage = build_stage(config, frames, captions)

    module = stage.module
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    ema = EMAModel(trainable, decay=config.ema_decay, use_ema_warmup=True, power=0.75) if config.use_ema else None
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    if ema is not None:  # its shadow copies were taken on the CPU, before `prepare` moved the model
        ema.to(accelerator.device)

    global_step = resumed_from_step = 0
    resume_path = resolve_checkpoint(checkpoint_dir, config.resume_from_checkpoint)
    if resume_path is not None:
        global_step = resumed_from_step = restore_training_states(resume_path, trainable, optimizer, lr_scheduler, ema)
        logger.info(f"Resumed from {resume_path} at step {global_step}.")
    start_trackers(accelerator, config)

    world, rank = accelerator.num_processes, accelerator.process_index
    progress = tqdm(range(config.max_train_steps), initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
    started, validation_seconds = time.time(), 0.0
    micro_step = global_step * config.gradient_accumulation_steps
    module.train()
    while global_step < config.max_train_steps:
        indices, step_rng = step_batch(config, micro_step, global_step, num_main_items, frames.shape[0], rank, world)
        inputs = stage.batch(indices, step_rng)
        inputs = tuple(x.to(accelerator.device) for x in (inputs if isinstance(inputs, tuple) else (inputs,)))
        with accelerator.accumulate(module):
            with accelerator.autocast():
                loss = module(*inputs)
            optimizer_step(accelerator, loss, trainable, optimizer, lr_scheduler, config.max_grad_norm)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema:
            ema.step(trainable)
        record_update(accelerator, progress, loss, lr_scheduler, global_step, config.logging_steps, config.report_to)
        if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
            if accelerator.is_main_process:
                path = save_checkpoint(checkpoint_dir, global_step, training_states(trainable, optimizer, lr_scheduler, ema),
                                       {"config": asdict(config)}, config.checkpoints_total_limit)
                logger.info(f"Saved {path}")
            accelerator.wait_for_everyone()
        if config.validation_steps and global_step % config.validation_steps == 0 and accelerator.is_main_process:
            validation_started = time.time()
            with evaluation_weights(module, trainable, ema):
                metrics = stage.validate(config)
            if metrics:
                seconds_per_step = (validation_started - started - validation_seconds) / max(global_step - resumed_from_step, 1)
                log_learning_curve(accelerator, output_dir, global_step, metrics, seconds_per_step)
            validation_seconds += time.time() - validation_started
    train_seconds = time.time() - started  # wall-clock, validations included (as train.py reports it)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema:
            ema.copy_to(trainable)
        output_dir.mkdir(parents=True, exist_ok=True)
        hardware = hardware_description(accelerator)
        stage.finalize(config, output_dir, train_seconds, hardware, resumed_from_step)
        (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
        summary = {"train_seconds": train_seconds, "steps": config.max_train_steps, "resumed_from_step": resumed_from_step, "hardware": hardware}
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return output_dir

