"""ARVideoPipeline: text-to-video by generating FSQ codes with a causal LM, then decoding them.

The caption becomes a fixed-length prefix, `language_model.generate()` (transformers' own loop, KV
cache and logits processors) writes `num_frames` frames of codes, and the video tokenizer decodes
them. Because the LM attends through a sliding window of frames, `num_frames` may exceed the
length it was trained on: the cache keeps only the window, so memory stays flat.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.video_processor import VideoProcessor
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from ..models.ar_video import ARVideoForCausalLM, PlausibleGuidanceLogitsProcessor, VisualTokensLogitsProcessor
from ..models.fsq_tokenizer import FSQVideoTokenizer
from .pipeline_flow_video import VideoPipelineOutput

__all__ = ["ARVideoPipeline"]

OUTPUT_TYPES = ("np", "pt", "pil", "codes")


class _FrameStreamer(BaseStreamer):
    """Receives `generate()`'s tokens and reports every completed frame of codes."""

    def __init__(self, tokens_per_frame: int, on_frame: Callable[[int, torch.Tensor], None]):
        self.tokens_per_frame = tokens_per_frame
        self.on_frame = on_frame
        self.prompt_seen = False
        self.pending: list[torch.Tensor] = []
        self.frame_index = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        self.pending.append(value.reshape(-1, 1))
        if len(self.pending) == self.tokens_per_frame:
            self.on_frame(self.frame_index, torch.cat(self.pending, dim=1))
            self.pending, self.frame_index = [], self.frame_index + 1

    def end(self) -> None:
        self.pending = []


class ARVideoPipeline(DiffusionPipeline):
    """Text-to-video with [`ARVideoForCausalLM`] over [`FSQVideoTokenizer`] codes.

    Components: `tokenizer` (the caption tokenizer whose ids the LM was trained on),
    `video_tokenizer` and `language_model`. `num_frames` (the default length) is pipeline config.

    Example:
        ```py
        >>> import torch
        >>> from chronos_video import ARVideoPipeline

        >>> pipe = ARVideoPipeline.from_pretrained("pipelines/ar-shapes")
        >>> video = pipe("a small red circle moving left to right slowly", num_frames=32, top_k=50,
        ...              generator=torch.Generator().manual_seed(0)).frames[0]
        ```
    """

    model_cpu_offload_seq = "language_model->video_tokenizer"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        video_tokenizer: FSQVideoTokenizer,
        language_model: ARVideoForCausalLM,
        num_frames: int = 16,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, video_tokenizer=video_tokenizer, language_model=language_model)
        self.register_to_config(num_frames=int(num_frames))
        ratio = video_tokenizer.spatial_compression_ratio if video_tokenizer is not None else 1
        self.video_processor = VideoProcessor(vae_scale_factor=ratio)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) in pixels the LM's code grid decodes to."""
        config, ratio = self.language_model.config, self.video_tokenizer.spatial_compression_ratio
        return config.frame_rows * ratio, config.frame_columns * ratio

    def prompt_ids(self, prompts: list[str]) -> torch.LongTensor:
        """Caption ids padded to the LM's `text_length`, then the begin-of-video token (the training layout)."""
        config = self.language_model.config
        ids = self.tokenizer(prompts, padding="max_length", max_length=config.text_length, truncation=True, return_tensors="pt").input_ids
        if int(ids.max()) >= config.text_vocab_size:
            raise ValueError(f"The tokenizer produced id {int(ids.max())} >= the LM's `text_vocab_size` {config.text_vocab_size}: mismatched components.")
        begin = torch.full((ids.shape[0], 1), config.begin_of_video_token_id, dtype=ids.dtype)
        return torch.cat([ids, begin], dim=1).to(self.language_model.device)

    def check_inputs(self, prompt, negative_prompt, num_frames, height, width, num_videos_per_prompt, guidance_scale,
                     output_type, temperature, top_k, top_p, typical_p, guidance_plausibility=None) -> list[str]:
        """Validates every argument, naming it in the error; returns the prompts as a list."""
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is not None:
            if not (isinstance(negative_prompt, str) or (isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt))):
                raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}.")
            if isinstance(negative_prompt, list) and len(negative_prompt) != len(prompts):
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries but there are {len(prompts)} prompts.")
        for name, value in (("num_frames", num_frames), ("num_videos_per_prompt", num_videos_per_prompt)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        expected = self.frame_size
        for name, value, size in (("height", height, expected[0]), ("width", width, expected[1])):
            if value is not None and value != size:
                raise ValueError(f"`{name}` must be {size} for this model (its code grid decodes to {expected[0]}x{expected[1]}), got {value!r}.")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 1:
            raise ValueError(f"`guidance_scale` must be a number >= 1 (1 turns guidance off), got {guidance_scale!r}.")
        if guidance_plausibility is not None and not (isinstance(guidance_plausibility, (int, float)) and 0 < guidance_plausibility < 1):
            raise ValueError(f"`guidance_plausibility` must be in (0, 1) or None, got {guidance_plausibility!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"`top_k` must be a positive integer or None, got {top_k!r}.")
        for name, value in (("top_p", top_p), ("typical_p", typical_p)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"`{name}` must be in (0, 1] or None, got {value!r}.")
        return prompts

    @staticmethod
    def _seed_from(generator: torch.Generator | list[torch.Generator] | None) -> int | None:
        """One seed for the batch: `generate()` samples from torch's global stream, so the pipeline
        seeds that stream (inside a forked RNG state) from the given generator(s)."""
        if generator is None:
            return None
        generators = generator if isinstance(generator, list) else [generator]
        draws = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in generators]
        return int(np.random.SeedSequence(draws).generate_state(1, dtype=np.uint64)[0] % (2**62))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_videos_per_prompt: int = 1,
        guidance_scale: float = 1.0,
        guidance_plausibility: float | None = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        typical_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_frame_end: Callable[["ARVideoPipeline", int, dict[str, torch.Tensor]], Any] | None = None,
    ) -> VideoPipelineOutput | tuple:
        """Generates videos.

        Args:
            prompt, negative_prompt: captions; the negative prompt (default: the empty caption) is
                the unconditional branch of classifier-free guidance.
            num_frames: frames per video (default: the pipeline config's); may exceed the training length.
            height, width: optional; must equal the size the LM's code grid decodes to.
            guidance_scale: classifier-free guidance on log-probabilities (transformers' `guidance_scale`); 1 = off.
            guidance_plausibility: with guidance, first drop the codes whose conditional probability is below
                this fraction of the most likely code's (`PlausibleGuidanceLogitsProcessor`); None: transformers'
                guidance unchanged.
            do_sample, temperature, top_k, top_p, typical_p: `GenerationConfig` sampling options
                (`do_sample=False` is greedy decoding).
            use_cache: decode with the KV cache (default) or recompute the whole sequence per token.
            generator: seeds the sampling (see `_seed_from`).
            output_type: "np" (batch, frames, H, W, 3) in [0, 1], "pt", "pil", or "codes" (batch, frames, rows, columns).
            callback_on_frame_end: called as `callback(pipe, frame_index, {"codes": (batch, rows, columns)})`
                after each generated frame.
        """
        num_frames = self.config.num_frames if num_frames is None else num_frames
        prompts = self.check_inputs(prompt, negative_prompt, num_frames, height, width, num_videos_per_prompt, guidance_scale,
                                    output_type, temperature, top_k, top_p, typical_p, guidance_plausibility)
        config = self.language_model.config
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        input_ids = self.prompt_ids(prompts)
        kwargs: dict[str, Any] = {}
        processors = LogitsProcessorList([VisualTokensLogitsProcessor(config.visual_token_offset)])
        if guidance_scale > 1:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * (len(prompts) // num_videos_per_prompt)
            negatives = [n for n in negatives for _ in range(num_videos_per_prompt)]
            negative_ids = self.prompt_ids(negatives)
            if guidance_plausibility is None:  # transformers' own guidance, driven by the generation config
                kwargs.update(negative_prompt_ids=negative_ids, negative_prompt_attention_mask=torch.ones_like(negative_ids))
            else:
                processors.insert(0, PlausibleGuidanceLogitsProcessor(
                    guidance_scale, self.language_model, negative_ids, torch.ones_like(negative_ids), use_cache, guidance_plausibility
                ))
        new_tokens = num_frames * config.tokens_per_frame
        generation_config = GenerationConfig(
            max_new_tokens=new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None, top_p=top_p if do_sample else None, typical_p=typical_p if do_sample else None,
            guidance_scale=guidance_scale if guidance_scale > 1 and guidance_plausibility is None else None, use_cache=use_cache,
            pad_token_id=config.begin_of_video_token_id, eos_token_id=None,
        )
        progress = self.progress_bar(total=num_frames)

        def on_frame(index: int, codes: torch.Tensor) -> None:
            progress.update(1)
            if callback_on_frame_end is not None:
                frame = (codes - config.visual_token_offset).reshape(-1, config.frame_rows, config.frame_columns)
                callback_on_frame_end(self, index, {"codes": frame})

        seed = self._seed_from(generator)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            sequences = self.language_model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config,
                logits_processor=processors,
                streamer=_FrameStreamer(config.tokens_per_frame, on_frame), **kwargs,
            )
        progress.close()
        codes = (sequences[:, input_ids.shape[1] :] - config.visual_token_offset).reshape(
            len(prompts), num_frames, config.frame_rows, config.frame_columns
        )
        if output_type == "codes":
            video = codes
        else:
            pixels = self.video_tokenizer.decode(codes.to(self.video_tokenizer.device)).float().clamp(-1, 1)
            video = self.video_processor.postprocess_video(pixels, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return VideoPipelineOutput(frames=video)
