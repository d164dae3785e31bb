"""What a `TrainConfig` builds: the caption tokenizer and text encoder, the backbone, the pipeline.

`training/train.py` and `benchmarks/train_throughput.py` both build through these, so a benchmark
measures exactly the model a config trains.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import get_architecture
from .schedulers import ChronosFlowMatchScheduler
from .text import build_text_encoder, pretrain_text_encoder, train_caption_tokenizer
from .training_config import OBJECTIVES, TrainConfig

__all__ = [
    "TextToVideoModule",
    "TrainingObjective",
    "backbone_kwargs",
    "build_backbone",
    "build_pipeline",
    "build_text_model",
    "freeze_except",
    "load_pretrained_text_model",
]


class TextToVideoModule(torch.nn.Module):
    """Text encoder + backbone as one module, so DDP, autocast and accumulation wrap both."""

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **transformer_kwargs):
        """The predicted velocity; with `transformer_kwargs` (e.g. `deep_supervision=True`), the backbone's full output."""
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        output = self.transformer(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text, encoder_attention_mask=attention_mask,
            return_dict=bool(transformer_kwargs), **transformer_kwargs,
        )
        return output if transformer_kwargs else output[0]


class TrainingObjective:
    """The loss a config trains its backbone with, so `training/train.py` has one code path.

    Flow matching (`flow_matching_loss`) for every backbone; a recursive backbone (`HRMVideoModel`,
    `_supports_deep_supervision`) is run with `deep_supervision=True` over `config.deep_supervision`'s
    segments and trained with `deep_supervision_loss` (flow loss per segment + halting BCE).

    `config.objective == "direct"` is the TTV-HRM seed's objective: every sample is drawn at sigma = 1
    (`noise_levels`), where the input is pure noise and, for a clean-sample (`prediction_type="sample"`)
    backbone, the velocity error `((z - x0_hat) / 1 - (z - x0))^2` *is* the MSE of the regressed video
    `x0_hat` against the clip. The same loss code serves both objectives, and one Euler step of the
    pipeline from sigma = 1 returns `z - v = x0_hat` exactly: the direct model's output.
    """

    def __init__(self, config: TrainConfig, transformer: torch.nn.Module):
        self.weighting_scheme = config.weighting_scheme
        self.objective = getattr(config, "objective", "flow")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {list(OBJECTIVES)}, got {self.objective!r}.")
        if self.objective == "direct" and transformer.config.get("prediction_type", "velocity") != "sample":
            raise ValueError("`objective: direct` regresses the clean video: the backbone needs `prediction_type='sample'`.")
        self.deep_supervision: dict[str, Any] | None = None
        if getattr(transformer, "_supports_deep_supervision", False):
            settings = {"segments": transformer.config.max_segments, "halt_tau": 0.01, "halt_loss_weight": 0.5, "halt_criterion": "loss",
                        **config.deep_supervision}
            segments = settings["segments"]
            if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
                raise ValueError(f"`deep_supervision.segments` must be a positive integer, got {segments!r}.")
            for key in ("halt_tau", "halt_loss_weight"):
                if not isinstance(settings[key], (int, float)) or settings[key] < 0:
                    raise ValueError(f"`deep_supervision.{key}` must be a non-negative number, got {settings[key]!r}.")
            from .models.hrm_video import HALT_CRITERIA

            if settings["halt_criterion"] not in HALT_CRITERIA:
                raise ValueError(f"`deep_supervision.halt_criterion` must be one of {list(HALT_CRITERIA)}, got {settings['halt_criterion']!r}.")
            self.deep_supervision = settings

    def noise_levels(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The training noise levels: the drawn `sigmas` (flow), or all ones (direct regression)."""
        return torch.ones_like(sigmas) if self.objective == "direct" else sigmas

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the backbone's training forward (through `TextToVideoModule`)."""
        if self.deep_supervision is None:
            return {}
        return {"deep_supervision": True, "max_segments": self.deep_supervision["segments"]}

    def __call__(self, prediction, target: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, float statistics to log) for the module's output on one batch."""
        if self.deep_supervision is None:
            from .flow_matching import flow_matching_loss

            return flow_matching_loss(prediction, target, sigmas, self.weighting_scheme), {}
        from .models.hrm_video import deep_supervision_loss

        return deep_supervision_loss(
            prediction, target, sigmas, self.weighting_scheme,
            halt_tau=float(self.deep_supervision["halt_tau"]), halt_loss_weight=float(self.deep_supervision["halt_loss_weight"]),
            halt_criterion=self.deep_supervision["halt_criterion"],
        )


def freeze_except(model: torch.nn.Module, module_names: list[str]) -> None:
    """Freeze `model` except the named submodules (`trainable_modules`): the cheap way to refit one part,
    e.g. the halting head of a trained HRM backbone, without touching what the rest has learned."""
    modules = dict(model.named_modules())
    missing = [name for name in module_names if name not in modules or name == ""]
    if missing:
        heads = sorted({name.split(".")[0] for name in modules if name})
        raise ValueError(f"`trainable_modules` names {missing}, which {type(model).__name__} does not have; its top-level modules are {heads}.")
    model.requires_grad_(False)
    for name in module_names:
        modules[name].requires_grad_(True)


def load_pretrained_text_model(path: str, max_length: int):
    """A saved transformers text encoder and its tokenizer (a local folder, or a Hub id already in the cache).

    The encoder class is the one its config names (`architectures[0]`: `T5EncoderModel`, `CLIPTextModel`,
    `BertModel`, ...), else `AutoModel`; an encoder-decoder keeps only its encoder. The tokenizer pads to
    `max_length`, which the saved pipeline then uses too.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        encoder_config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise ValueError(f"`text_encoder.pretrained`={path!r} is not a saved transformers text encoder with its tokenizer: {error}") from error
    names = getattr(encoder_config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    text_encoder = (model_class or AutoModel).from_pretrained(path)
    if getattr(text_encoder.config, "is_encoder_decoder", False) and hasattr(text_encoder, "get_encoder"):
        text_encoder = text_encoder.get_encoder()
    tokenizer.model_max_length = max_length
    return tokenizer, text_encoder


def build_text_model(config: TrainConfig, captions: list[str]):
    """The run's caption tokenizer and text encoder.

    With `text_encoder.pretrained` (a folder or cached Hub id), that encoder and its tokenizer
    (`load_pretrained_text_model`); otherwise a caption tokenizer trained on `captions` and a fresh text
    encoder for it, pretrained for `config.text_encoder_pretrain_steps` steps when set.

    Returns `(tokenizer, text_encoder, pretrain_accuracy)`; the accuracy is None without pretraining.
    """
    if config.text_encoder.get("pretrained"):
        tokenizer, text_encoder = load_pretrained_text_model(config.text_encoder["pretrained"], config.tokenizer_max_length)
        return tokenizer, text_encoder, None
    tokenizer = train_caption_tokenizer(captions, model_max_length=config.tokenizer_max_length)
    text_encoder = build_text_encoder(
        len(tokenizer),
        **{
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": config.tokenizer_max_length,
            **config.text_encoder,
        },
    )
    accuracy = None
    if config.text_encoder_pretrain_steps:
        accuracy = pretrain_text_encoder(
            text_encoder, tokenizer, captions, num_steps=config.text_encoder_pretrain_steps, seed=config.seed,
            text_pooling=config.model.get("text_pooling", "mean"),
        )
    return tokenizer, text_encoder, accuracy


def backbone_kwargs(config: TrainConfig, text_embed_dim: int | None = None, sample_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The backbone's constructor arguments for a fresh run: the clip size of `config.data` (or, for latent
    training, `sample_shape` = the latents' (channels, frames, height, width)), the text width (default: the
    config's text encoder `d_model`) and `config.model` on top."""
    if sample_shape is None:
        geometry = {"sample_frames": config.data.get("num_frames", 16), "sample_height": config.data.get("height", 32),
                    "sample_width": config.data.get("width", 32)}
    else:
        channels, frames, height, width = sample_shape
        geometry = {"in_channels": channels, "sample_frames": frames, "sample_height": height, "sample_width": width}
    return {
        **geometry,
        "text_embed_dim": text_embed_dim if text_embed_dim is not None else config.text_encoder.get("d_model", 128),
        **config.model,
    }


def build_backbone(config: TrainConfig, text_embed_dim: int | None = None, sample_shape: tuple[int, ...] | None = None) -> torch.nn.Module:
    """A freshly initialised backbone of `config.architecture` (seed the global RNG first for a fixed init);
    `sample_shape` (C, F, H, W) sizes it for latents instead of pixels."""
    return get_architecture(config.architecture).model_class(**backbone_kwargs(config, text_embed_dim, sample_shape))


def build_pipeline(
    architecture, tokenizer, text_encoder, transformer, scheduler_config: dict[str, Any], pipeline_config: dict[str, Any] | None = None,
    vae: torch.nn.Module | None = None,
):
    """The architecture's pipeline around trained (or training) components, with a new scheduler.

    `pipeline_config` carries sampling policy (precision / constraint settings) over from a base
    pipeline when fine-tuning, so the fine-tuned folder samples the way its base did. `vae` (latent
    training) becomes the pipeline's `vae` component, which decodes its latents to pixels.
    """
    extra = {"vae": vae} if vae is not None else {}
    return architecture.pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=ChronosFlowMatchScheduler(**scheduler_config),
        **extra,
        **(pipeline_config or {}),
    )
