"""`TrainConfig`: every setting of a training run, and how YAML files and `--key value` flags become one.

`training/train.py` (the `accelerate launch` entry point) and the benchmarks read configs through
`parse_config`, so a config means the same to both; `training_builders` turns one into models.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .import_utils import quiet_backend_imports

__all__ = ["DEEP_SUPERVISION_KEYS", "OBJECTIVES", "TrainConfig", "parse_config"]

DEEP_SUPERVISION_KEYS = frozenset({"segments", "halt_tau", "halt_loss_weight", "halt_criterion"})
# "flow": rectified flow (every shipped pipeline). "direct": the TTV-HRM seed's objective, MSE of the
# clean video predicted from pure noise at sigma = 1 (see `TrainingObjective`).
OBJECTIVES: tuple[str, ...] = ("flow", "direct")


@dataclass
class TrainConfig:
    """Every setting of a training run; YAML keys and `--key value` overrides map onto these fields."""

    architecture: str = "nano-sora"
    output_dir: str = "outputs/run"
    checkpoint_dir: str | None = None  # default: {output_dir}/checkpoints
    seed: int = 0
    # data
    data: dict[str, Any] = field(default_factory=lambda: {"num_clips": 2000, "num_frames": 16, "height": 32, "width": 32, "split": "train", "seed": 0})
    caption_dropout: float = 0.1
    # Curriculum: a second set of clips (`data` overrides, e.g. one appearance so only the motion varies)
    # that makes up whole batches for the first `curriculum_steps` steps and `curriculum_mix` of each
    # batch afterwards. Motion is learned on it first instead of last (benchmarks/motion_learnability.py).
    curriculum_data: dict[str, Any] | None = None
    curriculum_steps: int = 0
    curriculum_mix: float = 0.0
    # model
    model: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"encoder_type": "clip", "d_model": 128, "num_layers": 2, "num_heads": 4})
    tokenizer_max_length: int = 24
    # Before the video model trains, teach the new text encoder to keep every caption word apart
    # (chronos_video.pretrain_text_encoder); then train it with the backbone or keep it frozen.
    text_encoder_pretrain_steps: int = 0
    train_text_encoder: bool = True
    scheduler: dict[str, Any] = field(default_factory=lambda: {"shift": 1.0, "solver": "euler"})
    # Recursive backbones (architecture "hrm"): deep supervision over `segments` segments (default: the
    # model's max_segments) with the carry detached, plus the halting BCE of weight `halt_loss_weight` on
    # "the next segment lowers the flow loss by less than the fraction `halt_tau`" (`halt_criterion: loss`)
    # or "changes the predicted velocity by less than the fraction `halt_tau`" (`velocity_change`).
    deep_supervision: dict[str, Any] = field(default_factory=dict)
    # "flow" (rectified flow, sigma drawn per sample) or "direct": every sample at sigma = 1, i.e. MSE
    # regression of the clean video from text (the input is pure noise, which carries no information
    # about the clip). Needs `model.prediction_type: sample` and one-step evaluation
    # (`eval_num_inference_steps: 1`), which then returns exactly the regressed video.
    objective: str = "flow"
    video_tokenizer: str | None = None  # ar-video: folder of the trained FSQVideoTokenizer
    generation: dict[str, Any] = field(default_factory=dict)  # ar-video: sampling options for evaluation (top_k, ...)
    foreground_weight: float = 0.0  # fsq-tokenizer, video-vae: extra loss weight on object pixels (the background dominates plain MSE)
    foreground_dilation: int = 0  # fsq-tokenizer, video-vae: that weight also covers pixels this close to the object
    # fsq-tokenizer, video-vae: reconstruction loss ("l1" or "l2"); video-vae adds kl_weight x the KL divergence
    # per latent element
    reconstruction_loss: str = "l1"
    kl_weight: float = 1.0e-4
    # Latent training: folder of a trained diffusers video autoencoder (a `video-vae` run's output_dir). The clips
    # are encoded once (posterior mean, cached), the backbone trains on the normalised latents, and the saved
    # pipeline carries the autoencoder as its `vae` component.
    vae: str | None = None
    # optimisation
    max_train_steps: int = 1000
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 50
    use_8bit_adam: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # EMA
    use_ema: bool = True
    ema_decay: float = 0.999
    # LoRA fine-tuning of a trained pipeline
    pretrained_pipeline: str | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out"])
    # Fine-tune only these submodules of the pretrained backbone (names as in `named_modules()`, e.g.
    # `halt_head`); everything else, the text encoder included, stays frozen.
    trainable_modules: list[str] | None = None
    # checkpoints, logging, validation
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    report_to: str | None = "tensorboard"
    logging_steps: int = 10
    validation_steps: int = 0
    validation_prompts: list[str] = field(default_factory=lambda: ["a small red circle moving left to right slowly"])
    # learning curve: at every validation step, oracle accuracy of sampled videos and caption swap gaps,
    # logged to the trackers and appended to {output_dir}/logs/learning_curve.jsonl
    validation_num_prompts: int = 0
    validation_swap_gap_clips: int = 0
    # final evaluation and model card
    eval_num_prompts: int = 32
    eval_num_inference_steps: int = 20
    eval_guidance_scale: float = 4.0
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a large blue square moving top to bottom quickly",
            "a small yellow triangle moving right to left slowly",
            "a large green circle moving diagonally down and right quickly",
            "a small magenta square moving bottom to top quickly",
        ]
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    num_threads: int | None = None

    @property
    def text_encoder_trainable(self) -> bool:
        """Whether the text encoder trains with the backbone: a pretrained one (`text_encoder.pretrained`)
        stays frozen unless `text_encoder.trainable: true`; a new one follows `train_text_encoder`;
        with `trainable_modules` only those backbone modules train."""
        if self.trainable_modules is not None:
            return False
        if self.text_encoder.get("pretrained"):
            return bool(self.text_encoder.get("trainable", False))
        return self.train_text_encoder

    def validate(self) -> None:
        if self.max_train_steps < 1:
            raise ValueError(f"`max_train_steps` must be >= 1, got {self.max_train_steps}.")
        if self.train_batch_size < 1:
            raise ValueError(f"`train_batch_size` must be >= 1, got {self.train_batch_size}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"`gradient_accumulation_steps` must be >= 1, got {self.gradient_accumulation_steps}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate}.")
        if self.mixed_precision not in ("no", "fp16", "bf16", "fp8"):
            raise ValueError(f"`mixed_precision` must be one of no/fp16/bf16/fp8, got {self.mixed_precision!r}.")
        if not 0.0 <= self.curriculum_mix < 1.0:
            raise ValueError(f"`curriculum_mix` must be in [0, 1), got {self.curriculum_mix}.")
        if self.curriculum_steps < 0:
            raise ValueError(f"`curriculum_steps` must be >= 0, got {self.curriculum_steps}.")
        if (self.curriculum_steps or self.curriculum_mix) and not self.curriculum_data:
            raise ValueError("`curriculum_steps` / `curriculum_mix` need `curriculum_data`.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout}.")
        if self.checkpointing_steps < 1:
            raise ValueError(f"`checkpointing_steps` must be >= 1, got {self.checkpointing_steps}.")
        # checked here, not after training: the final evaluation runs once the weights are already saved
        for name in ("eval_num_prompts", "eval_num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("validation_steps", "validation_num_prompts", "validation_swap_gap_clips"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.lora_rank and not self.pretrained_pipeline:
            raise ValueError("`lora_rank` > 0 fine-tunes a trained pipeline: set `pretrained_pipeline` too.")
        if self.trainable_modules is not None:
            if not self.pretrained_pipeline:
                raise ValueError("`trainable_modules` fine-tunes parts of a trained pipeline: set `pretrained_pipeline` too.")
            if self.lora_rank:
                raise ValueError("`trainable_modules` and `lora_rank` are two ways to fine-tune; pick one.")
            names = self.trainable_modules
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(name, str) and name for name in names):
                raise ValueError(f"`trainable_modules` must be a non-empty list of module names, got {self.trainable_modules!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id`.")
        from .data.cached import DATA_TYPES

        if self.data.get("type", "shapes") not in DATA_TYPES:
            raise ValueError(f"`data.type` must be one of {list(DATA_TYPES)}, got {self.data.get('type')!r}.")
        if self.data.get("type", "shapes") in ("videofolder", "hub") and not self.data.get("path"):
            raise ValueError(f"`data.type: {self.data['type']}` needs `data.path` (a video folder, dataset name or local dataset path).")
        if self.text_encoder.get("pretrained"):
            if not isinstance(self.text_encoder["pretrained"], str):
                raise ValueError(f"`text_encoder.pretrained` must be a folder or Hub id, got {self.text_encoder['pretrained']!r}.")
            if self.text_encoder_pretrain_steps:
                raise ValueError("`text_encoder_pretrain_steps` pretrains a new encoder; it cannot be combined with `text_encoder.pretrained`.")
        if self.foreground_weight < 0:
            raise ValueError(f"`foreground_weight` must be >= 0, got {self.foreground_weight}.")
        if self.foreground_dilation < 0:
            raise ValueError(f"`foreground_dilation` must be >= 0, got {self.foreground_dilation}.")
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"`reconstruction_loss` must be 'l1' or 'l2', got {self.reconstruction_loss!r}.")
        if self.kl_weight < 0:
            raise ValueError(f"`kl_weight` must be >= 0, got {self.kl_weight}.")
        if self.vae is not None:
            self._validate_vae()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {list(OBJECTIVES)}, got {self.objective!r}.")
        if self.objective == "direct":
            if self.model.get("prediction_type", "velocity") != "sample":
                raise ValueError("`objective: direct` regresses the clean video: set `model.prediction_type` to 'sample'.")
            if self.eval_num_inference_steps != 1:
                raise ValueError(
                    "`objective: direct` trains at sigma = 1 only, so it is sampled in one step: set `eval_num_inference_steps` to 1, "
                    f"got {self.eval_num_inference_steps}."
                )
        unknown = set(self.deep_supervision) - DEEP_SUPERVISION_KEYS
        if unknown:
            raise ValueError(f"Unknown `deep_supervision` keys {sorted(unknown)}; known: {sorted(DEEP_SUPERVISION_KEYS)}.")
        with quiet_backend_imports():  # the registry imports every model family
            from .registry import get_architecture

        model_class = get_architecture(self.architecture).model_class
        if self.architecture == "ar-video" and not (self.video_tokenizer or self.pretrained_pipeline):
            raise ValueError("`architecture: ar-video` needs `video_tokenizer` (a folder saved by an `fsq-tokenizer` run) or `pretrained_pipeline`.")
        if self.video_tokenizer and not (Path(self.video_tokenizer) / "config.json").is_file():
            raise ValueError(f"`video_tokenizer`={self.video_tokenizer!r} is not a saved FSQVideoTokenizer folder (no config.json).")
        if self.deep_supervision and not getattr(model_class, "_supports_deep_supervision", False):
            raise ValueError(f"`deep_supervision` needs a recursive backbone; architecture {self.architecture!r} has none.")

    def _validate_vae(self) -> None:
        """`vae` (latent training) must name a saved autoencoder and suit the run; the data size is checked
        against the autoencoder when it is loaded (`training_vae.encode_training_latents`)."""
        if not isinstance(self.vae, str) or not (Path(self.vae) / "config.json").is_file():
            raise ValueError(f"`vae`={self.vae!r} is not a saved diffusers autoencoder folder (no config.json); "
                             "train one with `architecture: video-vae` and pass its output_dir.")
        if self.architecture in ("fsq-tokenizer", "ar-video", "video-vae"):
            raise ValueError(f"`vae` trains a flow backbone on latents; architecture {self.architecture!r} does not use it.")
        if self.validation_swap_gap_clips:
            raise ValueError("`validation_swap_gap_clips` scores the denoising loss of pixel-space pipelines; set it to 0 with `vae`.")


# YAML 1.1 (PyYAML) reads `6e-4` and `1e5`, with no decimal point, as strings; both are numbers to a user.
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers(value: Any) -> Any:
    """`value` with strings such as "6e-4" (at any depth) turned into floats."""
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _set_nested(config: dict[str, Any], dotted_key: str, raw_value: str) -> None:
    names = dotted_key.split(".")
    known = {f.name for f in fields(TrainConfig)}
    if names[0] not in known:
        raise ValueError(f"Unknown option `--{dotted_key}`; known options: {sorted(known)}.")
    target = config
    for name in names[:-1]:
        target = target.setdefault(name, {})
        if not isinstance(target, dict):
            raise ValueError(f"`--{dotted_key}`: `{name}` is not a mapping.")
    target[names[-1]] = _numbers(yaml.safe_load(raw_value))


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """YAML config (`--config`) overlaid on the defaults, then `--key value` overrides; validated.

    `description` is the `--help` text (the training script passes its own docstring).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file with TrainConfig keys.")
    args, rest = parser.parse_known_args(argv)
    values: dict[str, Any] = asdict(TrainConfig())
    if args.config:
        loaded = _numbers(yaml.safe_load(Path(args.config).read_text()) or {})
        if not isinstance(loaded, dict):
            raise ValueError(f"`--config` {args.config} must hold a YAML mapping.")
        for key, value in loaded.items():
            if key not in values:
                raise ValueError(f"Unknown key {key!r} in {args.config}.")
            if isinstance(values[key], dict) and isinstance(value, dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ValueError(f"Expected `--key value`, got {token!r}.")
        key, _, inline = token[2:].partition("=")
        if inline:
            raw = inline
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ValueError(f"`--{key}` needs a value.")
            raw = rest[i + 1]
            i += 2
        _set_nested(values, key.replace("-", "_"), raw)
    config = TrainConfig(**values)
    config.validate()
    return config
