#!/usr/bin/env python
"""Train a chronos-video text-to-video model with Accelerate.

    accelerate launch training/train.py --config training/configs/smoke.yaml [--key value ...]

Two CPU processes (DDP over gloo):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train.py --config ...

Every config key can be overridden on the command line (`--max_train_steps 10`,
`--model.hidden_size 64`). The run ends with a Hub-ready pipeline folder in `output_dir`
(safetensors weights, EMA if enabled, a model card with the oracle table and a sample GIF).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chronos_video.import_utils import quiet_backend_imports

with quiet_backend_imports():  # accelerate, diffusers and peft import the optional quantisation backends
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from chronos_video.data import is_shapes_data, load_training_clips
    from chronos_video.evaluation.pipeline_eval import learning_curve_metrics
    from chronos_video.flow_matching import (
        frames_to_model_input,
        rectified_flow_inputs,
        sample_flow_sigmas,
        sigmas_to_timesteps,
    )
    from chronos_video.model_card import hardware_description, save_sample_gif, write_model_card
    from chronos_video.registry import get_architecture
    from chronos_video.training_ar import AR_ARCHITECTURES, train_autoregressive
    from chronos_video.training_builders import (
        TextToVideoModule,
        TrainingObjective,
        build_backbone,
        build_pipeline,
        build_text_model,
        freeze_except,
    )
    from chronos_video.training_config import TrainConfig
    from chronos_video.training_config import parse_config as _parse_config
    from chronos_video.training_utils import (
        evaluation_weights,
        log_learning_curve,
        optimizer_step,
        record_update,
        resolve_checkpoint,
        restore_training_states,
        save_checkpoint,
        start_trackers,
        step_batch,
        training_states,
    )
    from chronos_video.training_vae import VAE_ARCHITECTURE, encode_training_latents, train_video_vae

logger = get_logger("chronos_video.train")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The run's `TrainConfig`: defaults, then the `--config` YAML, then `--key value` overrides."""
    return _parse_config(argv, description=__doc__)


def load_training_frames(config: TrainConfig, overrides: dict[str, Any] | None = None) -> tuple[torch.Tensor, list[str]]:
    """The run's clips (shapes, moving_fashion, a video folder or a `datasets` dataset) as uint8 (N, F, H, W, 3) plus captions, cached on disk."""
    return load_training_clips({**config.data, **(overrides or {})})


def flow_usage(pipeline_class: str, repo_id: str) -> str:
    return f"""import torch
from diffusers.utils import export_to_video
from chronos_video import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{repo_id}")  # or a local folder
video = pipe("a small red circle moving left to right slowly", num_inference_steps=30,
             generator=torch.Generator().manual_seed(0)).frames[0]
export_to_video(video, "out.mp4", fps=8)"""


def data_description(config: TrainConfig) -> str:
    """One line for the model card: what the run trained on."""
    data = config.data
    size = f"{data.get('num_frames')}x{data.get('height')}x{data.get('width')}"
    if is_shapes_data(data):
        return f"the procedural *shapes* dataset ({data.get('num_clips')} clips of {size}, held-out attribute combinations excluded from training)"
    if data.get("type") == "moving_fashion":
        return (f"Moving Fashion-MNIST ({data.get('num_clips')} clips of {size} built from the Fashion-MNIST "
                f"{data.get('split', 'train')} images, MIT licence; `data.type: moving_fashion`)")
    return f"`{data.get('path')}` (`data.type: {data.get('type')}`, clips of {size})"


def flow_card_description(output_dir: Path, config: TrainConfig, scores_table: str | None, gif_name: str | None, num_params: int, vae=None) -> str:
    pipeline_class = get_architecture(config.architecture).pipeline_class.__name__
    sample = f"![samples]({gif_name})\n\n" if gif_name else ""
    if scores_table is None:
        scores = "Not scored: the library's oracle reads the procedural shapes clips only."
    else:
        scores = f"""Measured by `chronos-video evaluate --pipeline <this folder> --num-prompts {config.eval_num_prompts} --steps {config.eval_num_inference_steps} --guidance-scale {config.eval_guidance_scale}`
(the pixel oracle of `chronos_video.evaluation`; its ceiling on real clips is checked in the library's tests):

{scores_table}"""
    space = ""
    if vae is not None:
        vae_params = sum(p.numel() for p in vae.parameters()) / 1e6
        space = f" It generates in the latent space of its frozen `vae` component (a {vae_params:.2f} M-parameter `{type(vae).__name__}`), which decodes to pixels."
    return f"""# {output_dir.name}

A `{pipeline_class}` ({config.architecture}, {num_params / 1e6:.2f} M parameters incl. text encoder) trained with
chronos-video's `training/train.py` on {data_description(config)}.{space}

{sample}## Oracle evaluation on held-out attribute combinations

{scores}
"""


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(argv)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else output_dir / "checkpoints"
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(
        f"world size {accelerator.num_processes} ({accelerator.distributed_type}), device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}",
        main_process_only=False if accelerator.num_processes > 1 else True,
    )
    if config.architecture in AR_ARCHITECTURES:  # the video tokenizer or the autoregressive LM over its codes
        return train_autoregressive(config, accelerator)
    if config.architecture == VAE_ARCHITECTURE:  # the video autoencoder of latent training
        return train_video_vae(config, accelerator)
    architecture = get_architecture(config.architecture)
    set_seed(config.seed)

    frames, captions = load_training_frames(config)
    num_main_items = frames.shape[0]
    if config.curriculum_data:
        extra_frames, extra_captions = load_training_frames(config, config.curriculum_data)
        frames, captions = torch.cat([frames, extra_frames]), captions + extra_captions
    vae = latents = None  # latent training: the clips encoded once by the frozen autoencoder
    if config.vae:
        vae, latents = encode_training_latents(config, frames)
    if config.pretrained_pipeline:
        base = architecture.pipeline_class.from_pretrained(config.pretrained_pipeline)
        tokenizer, text_encoder, transformer = base.tokenizer, base.text_encoder, base.transformer
        if getattr(base, "vae", None) is not None and vae is None:
            vae, latents = encode_training_latents(config, frames, base.vae)
        scheduler_config = dict(base.scheduler.config)
        pipeline_config = dict(base.parameters)
    else:
        tokenizer, text_encoder, accuracy = build_text_model(config, captions)
        if accuracy is not None:
            logger.info(f"Text encoder pretrained for {config.text_encoder_pretrain_steps} steps: caption reconstruction accuracy {accuracy:.1%}.")
        sample_shape = None if latents is None else tuple(latents.shape[1:])
        transformer = build_backbone(config, text_embed_dim=text_encoder.config.hidden_size, sample_shape=sample_shape)
        scheduler_config = dict(config.scheduler)
        pipeline_config = {}

    if config.lora_rank:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        text_encoder.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, init_lora_weights="gaussian", target_modules=config.lora_target_modules)
        )
    if config.trainable_modules is not None:
        freeze_except(transformer, config.trainable_modules)
    if not config.text_encoder_trainable:
        text_encoder.requires_grad_(False)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    objective = TrainingObjective(config, transformer)  # flow loss, or deep supervision for recursive backbones

    module = TextToVideoModule(transformer, text_encoder)
    frozen_text = [p for p in text_encoder.parameters() if not p.requires_grad] if not config.text_encoder_trainable else []
    trainable = [p for p in module.parameters() if p.requires_grad]
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    ema = EMAModel(trainable, decay=config.ema_decay, use_ema_warmup=True, power=0.75) if config.use_ema else None
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    if ema is not None:  # its shadow copies were taken on the CPU, before `prepare` moved the model
        ema.to(accelerator.device)

    global_step = resumed_from_step = 0
    resume_path = resolve_checkpoint(checkpoint_dir, config.resume_from_checkpoint)
    if config.resume_from_checkpoint and resume_path is None:
        logger.info(f"No checkpoint in {checkpoint_dir}; starting from scratch.")
    if resume_path is not None:
        global_step = resumed_from_step = restore_training_states(resume_path, trainable, optimizer, lr_scheduler, ema, frozen_text)
        logger.info(f"Resumed from {resume_path} at step {global_step}.")

    start_trackers(accelerator, config)

    world, rank = accelerator.num_processes, accelerator.process_index
    unwrapped = accelerator.unwrap_model(module)
    progress = tqdm(range(config.max_train_steps), initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
    started = time.time()
    validation_seconds = 0.0
    micro_step = global_step * config.gradient_accumulation_steps
    module.train()
    while global_step < config.max_train_steps:
        indices, step_rng = step_batch(config, micro_step, global_step, num_main_items, frames.shape[0], rank, world)
        clip = frames_to_model_input(frames[indices]) if latents is None else latents[indices]
        batch_captions = [
            "" if float(torch.rand((), generator=step_rng)) < config.caption_dropout else captions[int(i)] for i in indices
        ]
        tokens = tokenizer(batch_captions, padding="max_length", max_length=config.tokenizer_max_length, truncation=True, return_tensors="pt")
        noise = torch.randn(clip.shape, generator=step_rng)
        sigmas = sample_flow_sigmas(
            clip.shape[0], step_rng, config.weighting_scheme, config.logit_mean, config.logit_std, config.mode_scale,
            shift=float(scheduler_config.get("shift", 1.0)),
        )
        sigmas = objective.noise_levels(sigmas)  # all ones for the direct (seed) objective
        noisy, target = rectified_flow_inputs(clip, sigmas, noise)
        device = accelerator.device
        with accelerator.accumulate(module):
            with accelerator.autocast():
                prediction = module(noisy.to(device), sigmas_to_timesteps(sigmas).to(device), tokens.input_ids.to(device),
                                    tokens.attention_mask.to(device), **objective.forward_kwargs)
            loss, loss_stats = objective(prediction, target.to(device), sigmas)
            optimizer_step(accelerator, loss, trainable, optimizer, lr_scheduler, config.max_grad_norm)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema:
            ema.step(trainable)
        record_update(accelerator, progress, loss, lr_scheduler, global_step, config.logging_steps, config.report_to, loss_stats)
        if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
            if accelerator.is_main_process:
                states = training_states(trainable, optimizer, lr_scheduler, ema, frozen_text)
                path = save_checkpoint(checkpoint_dir, global_step, states, {"config": asdict(config)}, config.checkpoints_total_limit)
                logger.info(f"Saved {path}")
            accelerator.wait_for_everyone()
        if config.validation_steps and global_step % config.validation_steps == 0 and accelerator.is_main_process:
            validation_started = time.time()
            seconds_per_step = (validation_started - started - validation_seconds) / max(global_step - resumed_from_step, 1)
            log_validation(accelerator, architecture, tokenizer, unwrapped, scheduler_config, pipeline_config, config, ema, trainable, global_step,
                           seconds_per_step, vae)
            validation_seconds += time.time() - validation_started
    train_seconds = time.time() - started
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema:
            ema.copy_to(trainable)
        finalize(accelerator, architecture, tokenizer, unwrapped, scheduler_config, pipeline_config, config, output_dir, train_seconds, resumed_from_step, vae)
    accelerator.end_training()
    return output_dir


def log_validation(accelerator, architecture, tokenizer, unwrapped, scheduler_config, pipeline_config, config, ema, trainable, step, seconds_per_step, vae=None):
    """Samples the validation prompts with EMA weights and logs them as frame strips; with
    `validation_num_prompts` / `validation_swap_gap_clips`, adds a learning-curve point."""
    with evaluation_weights(unwrapped, trainable, ema):
        pipe = build_pipeline(architecture, tokenizer, unwrapped.text_encoder, unwrapped.transformer, scheduler_config, pipeline_config, vae)
        pipe.set_progress_bar_config(disable=True)
        videos = None
        if config.validation_prompts:
            videos = pipe(config.validation_prompts, num_inference_steps=config.eval_num_inference_steps, guidance_scale=config.eval_guidance_scale,
                          generator=torch.Generator().manual_seed(0)).frames
        metrics = {}
        if (config.validation_num_prompts or config.validation_swap_gap_clips) and is_shapes_data(config.data):
            metrics = learning_curve_metrics(
                pipe, config.data, num_prompts=config.validation_num_prompts, num_clips=config.validation_swap_gap_clips,
                num_inference_steps=config.eval_num_inference_steps, guidance_scale=config.eval_guidance_scale, seed=config.seed,
            )
    if metrics:
        log_learning_curve(accelerator, config.output_dir, step, metrics, seconds_per_step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard" and videos is not None:
            strips = np.concatenate(list(videos), axis=1)  # (frames, prompts*H, W, C)
            tracker.writer.add_images("validation", strips, step, dataformats="NHWC")


def finalize(
    accelerator, architecture, tokenizer, unwrapped, scheduler_config, pipeline_config, config, output_dir: Path, train_seconds: float, resumed_from_step: int = 0,
    vae=None,
) -> None:
    """Saves the pipeline, evaluates it with the oracle, writes the sample GIF and the model card."""
    from chronos_video.evaluation.pipeline_eval import evaluate_pipeline

    unwrapped.eval()
    transformer = unwrapped.transformer
    if config.lora_rank:
        from peft.utils import get_peft_model_state_dict

        pipe = build_pipeline(architecture, tokenizer, unwrapped.text_encoder, transformer, scheduler_config, pipeline_config, vae)
        architecture.pipeline_class.save_lora_weights(str(output_dir), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True)
    else:
        pipe = build_pipeline(architecture, tokenizer, unwrapped.text_encoder, transformer, scheduler_config, pipeline_config, vae)
        pipe.save_pretrained(str(output_dir), safe_serialization=True)
    (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
    summary = {"train_seconds": train_seconds, "steps": config.max_train_steps, "resumed_from_step": resumed_from_step,
               "hardware": hardware_description(accelerator)}
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    pipe.set_progress_bar_config(disable=True)

    table = None
    if is_shapes_data(config.data):  # the oracle reads shapes clips only
        scores, table = evaluate_pipeline(
            pipe, num_prompts=config.eval_num_prompts, num_inference_steps=config.eval_num_inference_steps,
            guidance_scale=config.eval_guidance_scale, seed=config.seed,
        )
        (output_dir / "oracle_scores.json").write_text(json.dumps(scores, indent=2))
        logger.info("Oracle scores on held-out combinations:\n" + table)

    gif_name = None
    if config.sample_prompts:
        videos = pipe(config.sample_prompts, num_inference_steps=config.eval_num_inference_steps, guidance_scale=config.eval_guidance_scale,
                      generator=torch.Generator().manual_seed(config.seed)).frames
        gif_name = save_sample_gif(videos, output_dir / "samples.gif")

    num_params = sum(p.numel() for p in unwrapped.parameters())
    description = flow_card_description(output_dir, config, table, gif_name, num_params, vae)
    usage = flow_usage(architecture.pipeline_class.__name__, config.hub_model_id or f"chronos-video/{output_dir.name}")
    write_model_card(output_dir, config, description, usage, train_seconds, hardware_description(accelerator), resumed_from_step)
    if config.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        create_repo(config.hub_model_id, exist_ok=True)
        upload_folder(repo_id=config.hub_model_id, folder_path=str(output_dir), ignore_patterns=["checkpoints/*", "logs/*"])


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # configuration mistakes: one clear line, no stack trace
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
