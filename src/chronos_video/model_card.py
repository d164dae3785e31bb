"""Hub model cards for what `training/train.py` saves, built on diffusers' training card template."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["hardware_description", "save_sample_gif", "write_model_card"]

LIMITATIONS = (
    "A research-scale model: it only knows the shapes vocabulary (7 colours, 3 shapes, 2 sizes, 8 directions, 2 speeds) on a black background."
)


def hardware_description(accelerator) -> str:
    """What a run trained on, for the card: GPUs by name, or CPU processes and threads."""
    if torch.cuda.is_available():
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(0)}"
    return f"{accelerator.num_processes} CPU process(es), {torch.get_num_threads()} thread(s) each, {platform.processor() or platform.machine()}"


def save_sample_gif(videos, path: Path, fps: int = 8) -> str:
    """Writes the videos (N, F, H, W, 3) in [0, 1] side by side as one GIF, upscaled to ~128 px high; returns its file name."""
    import numpy as np
    from diffusers.utils import export_to_gif
    from PIL import Image

    grid = np.concatenate(list(videos), axis=2)  # frames side by side: (F, H, N*W, C)
    scale = max(1, 128 // grid.shape[1])
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    export_to_gif([Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in grid], str(path), fps=fps)
    return Path(path).name


def write_model_card(
    output_dir: Path,
    config,
    description: str,
    usage: str,
    train_seconds: float,
    hardware: str,
    resumed_from_step: int = 0,
    library_name: str = "diffusers",
) -> None:
    """Writes `output_dir/README.md`: `description` (markdown: what it is, scores), the `usage` snippet
    and the training summary (steps, batch, precision, wall-clock, hardware) in diffusers' template."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, load_or_create_model_card, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = config.hub_model_id or f"chronos-video/{output_dir.name}"
    if config.push_to_hub:  # merge with the card already on the Hub, if any
        card = load_or_create_model_card(repo_id, from_training=True, model_description=description, license="apache-2.0", inference=False)
    else:  # the same diffusers training template, without a Hub round trip
        card = ModelCard.from_template(
            ModelCardData(license="apache-2.0", library_name=library_name, inference=False),
            template_path=MODEL_CARD_TEMPLATE_PATH,
            model_description=description,
        )
    card = populate_model_card(card, tags=["text-to-video", "chronos-video", config.architecture, "diffusers-training"])
    card.data.pipeline_tag = "text-to-video"
    training = (
        f"Trained for {config.max_train_steps} steps, batch {config.train_batch_size} x {config.gradient_accumulation_steps} accumulation, "
        f"learning rate {config.learning_rate} ({config.lr_scheduler}), mixed precision `{config.mixed_precision}`, "
        f"EMA {'on (decay ' + str(config.ema_decay) + ')' if config.use_ema else 'off'}, seed {config.seed}. "
        f"Wall-clock {train_seconds / 60:.1f} min on {hardware}"
        + (f" for the steps after resuming from the step-{resumed_from_step} checkpoint" if resumed_from_step else "")
        + ". The full configuration is in `training_config.json`."
    )
    text = card.text
    text = text.replace("# TODO: add an example code snippet for running this diffusion pipeline", usage)
    text = text.replace("[TODO: provide examples of latent issues and potential remediations]", LIMITATIONS)
    text = text.replace("[TODO: describe the data used to train the model]", training)
    card.text = text
    card.save(str(output_dir / "README.md"))
