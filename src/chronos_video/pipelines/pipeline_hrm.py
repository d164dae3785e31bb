"""HRMVideoPipeline: text-to-video with the hierarchical recursive-reasoning backbone (HRM-Video)."""

from __future__ import annotations

from typing import Any

import torch

from ..models.hrm_video import HRMCarry, HRMVideoModel
from .pipeline_flow_video import FlowVideoPipeline, VideoPipelineOutput

# recursion settings of a `predict_velocity` call made outside `__call__` (no warm start to keep)
_OUTSIDE_CALL = {"halting": True, "warm_start": False, "max_segments": None, "single_segment_above_sigma": None}


class HRMVideoPipeline(FlowVideoPipeline):
    """Text-to-video with [`HRMVideoModel`].

    Components, checks, sampling loop, outputs and config are [`FlowVideoPipeline`]'s. Only the model
    evaluation differs: every evaluation runs the backbone's recursion, segment by segment, until each
    sample's halting head fires (or `max_segments`), and may start from the previous evaluation's
    carry (z_H, z_L) instead of zeros, because neighbouring sampling steps see nearly the same input.

    Extra call arguments (everything else is [`FlowVideoPipeline.__call__`]'s):
        halting: stop each sample's recursion when its halting head says so (default True);
            False runs `max_segments` segments at every step.
        warm_start: start each evaluation from the previous one's carry (default False: the shipped
            model, trained from zero carries, lost 25 points of "all five" with it; `bench_hrm_halting.py`).
        max_segments: most segments per evaluation (default: the backbone config's).
        single_segment_above_sigma: evaluations at noise levels sigma above this run one segment; at or below
            it, up to `max_segments` (halting as set): a fixed schedule, for heads that halt in the wrong steps
            (at high noise one segment is enough for the shipped model, at low noise the second sharpens the
            shape; `bench_hrm_halting.py --single-segment-above-sigma`). Default None: no such limit.

    Every `trace` entry gains `segments` (one count per video of the conditional batch) and, under
    classifier-free guidance, `segments_unconditional`.

    Example:
        ```py
        >>> import torch
        >>> from chronos_video import HRMVideoPipeline

        >>> pipe = HRMVideoPipeline.from_pretrained("path/to/hrm-pipeline")
        >>> out = pipe("a small red circle moving left to right slowly", generator=torch.Generator().manual_seed(0))
        >>> [step["segments"] for step in out.trace]  # segments each video used at each sampling step
        ```
    """

    transformer: HRMVideoModel

    def __call__(
        self, *args, halting: bool = True, warm_start: bool = False, max_segments: int | None = None,
        single_segment_above_sigma: float | None = None, **kwargs,
    ):
        for name, value in (("halting", halting), ("warm_start", warm_start)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        if max_segments is not None and (not isinstance(max_segments, int) or isinstance(max_segments, bool) or max_segments < 1):
            raise ValueError(f"`max_segments` must be a positive integer or None, got {max_segments!r}.")
        if single_segment_above_sigma is not None and (
            isinstance(single_segment_above_sigma, bool) or not isinstance(single_segment_above_sigma, (int, float))
            or not 0.0 <= single_segment_above_sigma <= 1.0
        ):
            raise ValueError(f"`single_segment_above_sigma` must be a number in [0, 1] or None, got {single_segment_above_sigma!r}.")
        self._recursion = {"halting": halting, "warm_start": warm_start, "max_segments": max_segments,
                           "single_segment_above_sigma": single_segment_above_sigma}
        self._carry: HRMCarry | None = None
        self._segment_trace: list[dict[str, Any]] = []
        try:
            output = super().__call__(*args, **kwargs)
        finally:
            self._carry = None
            self._recursion = None
        if isinstance(output, VideoPipelineOutput) and output.trace is not None:
            # one model evaluation per trace entry, in order (interrupted steps add neither)
            for record, segments in zip(output.trace, self._segment_trace):
                record.update(segments)
        return output

    def transformer_inputs(self, model_input, timestep, prompt_embeds, prompt_mask, attention_kwargs) -> dict[str, Any]:
        """The base call's arguments plus the recursion settings and, with warm start, the previous carry."""
        settings = getattr(self, "_recursion", None) or _OUTSIDE_CALL
        carry = getattr(self, "_carry", None) if settings["warm_start"] else None
        if carry is not None and carry.high.shape[0] != model_input.shape[0]:
            carry = None
        inputs = super().transformer_inputs(model_input, timestep, prompt_embeds, prompt_mask, attention_kwargs)
        max_segments = settings["max_segments"]
        threshold = settings["single_segment_above_sigma"]
        if threshold is not None and float(timestep.reshape(-1)[0]) / self.scheduler.config.num_train_timesteps > threshold:
            max_segments = 1
        inputs.update(return_dict=True, carry=carry, max_segments=max_segments, halting=settings["halting"])
        return inputs

    def velocity_from_output(self, output) -> torch.Tensor:
        """The output's velocity; keeps its carry for the next evaluation and records the segments each row used."""
        settings = getattr(self, "_recursion", None) or _OUTSIDE_CALL
        self._carry = output.carry if settings["warm_start"] else None
        segments = [int(s) for s in output.segments]
        if self.do_classifier_free_guidance:
            half = len(segments) // 2
            record = {"segments": segments[half:], "segments_unconditional": segments[:half]}
        else:
            record = {"segments": segments}
        if getattr(self, "_segment_trace", None) is not None:
            self._segment_trace.append(record)
        return output.sample
