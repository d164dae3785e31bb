"""ARVideoForCausalLM: an autoregressive video LM over FSQ codes, built on transformers' Qwen2.

One sequence holds the caption's tokens (padded to a fixed length), a begin-of-video token and the
video's codes in raster order within a frame, frame after frame. The model is Qwen2 (RMSNorm,
SwiGLU, grouped-query attention, optional weight tying) with two changes made by configuration or
one small module:

* **3D rotary positions.** Each rotary pair of a head is assigned to one axis (frame, row, column)
  and rotated by that axis' coordinate, so a code "knows" where it sits in the video; caption
  tokens use their index on all three axes (as Qwen2-VL does), so positions stay relative and a
  video longer than the training clips only needs larger frame coordinates.
* **Sliding window.** `window_frames` sets Qwen2's `sliding_window` to that many frames of codes
  on every layer, so transformers' own `DynamicCache` keeps `DynamicSlidingWindowLayer`s and the
  cache (and the attention cost per token) stops growing once the window is full.

Everything else, including `generate()` with greedy / temperature / top-k / top-p / typical
sampling and classifier-free guidance against a negative prompt, is transformers' unchanged.
Token ids: `[0, text_vocab_size)` caption tokens (the caption tokenizer's ids), `text_vocab_size`
the begin-of-video token, then `codebook_size` visual codes.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessor, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor
from transformers import PreTrainedModel  # noqa: F401  (diffusers' pipeline loader looks the base class up in this module)

__all__ = ["ARVideoConfig", "ARVideoForCausalLM", "PlausibleGuidanceLogitsProcessor", "VideoRotaryEmbedding", "VisualTokensLogitsProcessor"]


class ARVideoConfig(Qwen2Config):
    """Qwen2's config plus the video layout.

    Args (beyond `Qwen2Config`'s, e.g. `hidden_size`, `num_hidden_layers`, `num_attention_heads`,
    `num_key_value_heads`, `intermediate_size`, `tie_word_embeddings`, `rope_parameters`):
        text_vocab_size: size of the caption tokenizer's vocabulary.
        codebook_size: number of visual codes (the video tokenizer's `codebook_size`).
        text_length: caption tokens before the begin-of-video token (captions are padded to it).
        frame_rows, frame_columns: the code grid of one frame.
        window_frames: frames of codes each token attends to (sliding window); None: full attention.
        rope_axes: rotary pairs per axis (frame, row, column), summing to head_dim / 2; default
            half for time, a quarter each for rows and columns.
    """

    model_type = "chronos_ar_video"

    text_vocab_size: int = 64
    codebook_size: int = 1000
    text_length: int = 24
    frame_rows: int = 8
    frame_columns: int = 8
    window_frames: int | None = 16
    rope_axes: list[int] | None = None

    def __post_init__(self, **kwargs):
        for name in ("text_vocab_size", "codebook_size", "text_length", "frame_rows", "frame_columns"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        self.vocab_size = self.text_vocab_size + 1 + self.codebook_size
        if self.window_frames is not None:
            if int(self.window_frames) < 1:
                raise ValueError(f"`window_frames` must be >= 1 or None, got {self.window_frames}.")
            self.use_sliding_window = True
            self.sliding_window = int(self.window_frames) * self.tokens_per_frame
            self.max_window_layers = 0
            self.layer_types = ["sliding_attention"] * self.num_hidden_layers
        else:
            self.use_sliding_window = False
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        if self.rope_axes is None:
            pairs = head_dim // 2
            self.rope_axes = [pairs - 2 * (pairs // 4), pairs // 4, pairs // 4]
        if len(self.rope_axes) != 3 or sum(self.rope_axes) != head_dim // 2 or min(self.rope_axes) < 1:
            raise ValueError(f"`rope_axes` must be three positive counts summing to head_dim / 2 = {head_dim // 2}, got {self.rope_axes}.")
        super().__post_init__(**kwargs)

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_rows * self.frame_columns

    @property
    def begin_of_video_token_id(self) -> int:
        return self.text_vocab_size

    @property
    def visual_token_offset(self) -> int:
        """Id of visual code 0; code c is token `visual_token_offset + c`."""
        return self.text_vocab_size + 1

    @property
    def prefix_length(self) -> int:
        """Tokens before the first code: the padded caption and the begin-of-video token."""
        return self.text_length + 1


class VideoRotaryEmbedding(torch.nn.Module):
    """Qwen2's rotary embedding with each rotary pair assigned to the frame, row or column axis.

    Takes the same 1D `position_ids` as Qwen2 (so `generate()`, the cache and the guidance
    processor need nothing new) and maps each to (frame, row, column) from the config's layout.
    Frequencies are computed per call (a few dozen numbers), so no buffer needs re-initialising
    when transformers loads the model on the meta device.
    """

    def __init__(self, config: ARVideoConfig):
        super().__init__()
        self.config = config

    def axis_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(3, batch, length) coordinates: caption tokens (p, p, p), codes offset past the prefix."""
        config = self.config
        prefix = config.prefix_length
        video_index = (position_ids - prefix).clamp(min=0)
        frame = video_index // config.tokens_per_frame
        within = video_index % config.tokens_per_frame
        is_prefix = position_ids < prefix
        axes = (prefix + frame, prefix + within // config.frame_columns, prefix + within % config.frame_columns)
        return torch.stack([torch.where(is_prefix, position_ids, axis) for axis in axes])

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        theta = float(config.rope_parameters["rope_theta"])
        inv_freq = torch.cat([theta ** (-torch.arange(n, dtype=torch.float32, device=x.device) / n) for n in config.rope_axes])
        axis_of_pair = torch.cat([torch.full((n,), axis, device=x.device) for axis, n in enumerate(config.rope_axes)])
        positions = self.axis_positions(position_ids).float().permute(1, 2, 0)  # (batch, length, 3)
        freqs = positions[..., axis_of_pair] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class ARVideoForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM over caption + video-code sequences with 3D rotary positions (see module docstring)."""

    config_class = ARVideoConfig

    def __init__(self, config: ARVideoConfig):
        super().__init__(config)
        self.model.rotary_emb = VideoRotaryEmbedding(config)

    def code_log_likelihoods(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(batch, codes) log-probability of every code of `input_ids` (prefix + codes) given what precedes it,
        over the visual codes only: caption tokens are given, never predicted."""
        config = self.config
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, config.prefix_length - 1 : -1]  # the states that predict each code
        logits = self.lm_head(hidden).float()[..., config.visual_token_offset :]
        targets = input_ids[:, config.prefix_length :] - config.visual_token_offset
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def code_loss(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Next-code cross-entropy over the video part of `input_ids` (the training objective)."""
        return -self.code_log_likelihoods(input_ids).mean()


class VisualTokensLogitsProcessor(LogitsProcessor):
    """Allows only visual codes at every generated position (caption and begin-of-video ids get -inf).

    Runs after classifier-free guidance in `generate()`'s processor list, so guidance mixes finite
    log-probabilities and the mask is applied to the mixed scores.
    """

    def __init__(self, visual_token_offset: int):
        self.visual_token_offset = int(visual_token_offset)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, : self.visual_token_offset] = -float("inf")
        return scores


class PlausibleGuidanceLogitsProcessor(UnbatchedClassifierFreeGuidanceLogitsProcessor):
    """Classifier-free guidance limited to the codes the conditional model itself finds plausible.

    Guidance extrapolates away from the unconditional branch, and at scales > 1 it also lifts codes that
    both branches give almost no probability (on ar-shapes at scale 3: ~1.6 codes per frame below 1e-3
    conditional probability, decoded as stray blobs). As in contrastive decoding's adaptive plausibility
    constraint (Li et al., 2023), codes whose conditional probability is below `plausibility` times the
    most likely code's are removed, then the branches are mixed exactly as transformers' processor does.
    Pass it in `logits_processor` (first) with `guidance_scale=None` in the generation config.
    """

    def __init__(
        self,
        guidance_scale: float,
        model,
        unconditional_ids: torch.LongTensor | None = None,
        unconditional_attention_mask: torch.LongTensor | None = None,
        use_cache: bool = True,
        plausibility: float = 0.1,
    ):
        super().__init__(guidance_scale, model, unconditional_ids, unconditional_attention_mask, use_cache)
        self.log_plausibility = math.log(plausibility)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        conditional = torch.log_softmax(scores.float(), dim=-1)
        guided = super().__call__(input_ids, scores)
        implausible = conditional < conditional.amax(dim=-1, keepdim=True) + self.log_plausibility
        return guided.masked_fill(implausible, -float("inf"))


AutoConfig.register(ARVideoConfig.model_type, ARVideoConfig, exist_ok=True)
AutoModelForCausalLM.register(ARVideoConfig, ARVideoForCausalLM, exist_ok=True)
