"""Pipeline-level calibration: profile a sampler on its own trajectories and store the schedule.

:func:`profile_sensitivity` needs model inputs at each noise level. Synthetic inputs (random
latents, random text states) miss what matters for quantization error: the activation ranges a
trained model sees along its real sampling trajectory, with real prompts and classifier-free
guidance. This module records exactly those inputs by running the pipeline's own sampler at
full precision, profiles ``pipe.transformer`` on them, and stores the resulting schedule in the
pipeline config (``model_index.json``), so ``pipe(prompt, precision="calibrated")`` uses it and
``save_pretrained``/``from_pretrained`` keep it.

Loss. The sampler integrates the *guided* velocity ``v = v_u + s (v_c - v_u)``, so the default
loss is a random Gaussian probe of that guided velocity (Hutchinson's trick, as in the profiler):
the profiled S then predicts ``E||v_q - v||^2``, the squared deviation of the velocity the sampler
actually uses when one layer is quantized. Guidance amplifies errors in the conditional branch by
``s`` and in the unconditional one by ``s - 1``; a probe of the raw batched output would miss that.
(MSE to the full-precision velocity is not usable as a gradient loss: its gradient vanishes at the
full-precision point.) :func:`measure_layer_errors` measures the same quantity directly, one layer
at a time, so a calibration can be checked (:func:`ranking_agreement`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..flow_matching import classifier_free_guidance
from ..schedulers.scheduling_chronos_flow_match import current_sigmas
from .gauges import FULL_PRECISION, PrecisionController, get_gauge
from .profiler import BUDGET_KINDS, SensitivityReport, _first_tensor, profile_sensitivity
from .schedule import PrecisionSchedule


DEFAULT_SIGMA_BUCKETS: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3, 0.1)



class CalibrationInputs(dict):
    """``{bucket sigma: [transformer kwargs, ...]}`` plus ``settings``: how it was recorded
    (prompts, steps, guidance scale, seed), so a profile of it is labelled correctly."""

    def __init__(self, data: Mapping[float, list[dict[str, Any]]], settings: Optional[Mapping[str, Any]] = None):
        super().__init__(data)
        self.settings = dict(settings or {})


# ---------------------------------------------------------------------------------------------
# guided velocity and its probe
# ---------------------------------------------------------------------------------------------
def guided_velocity(output: Any, guidance_scale: float) -> torch.Tensor:
    """The velocity the sampler integrates from one transformer output.

    With guidance (> 1) the pipeline evaluates ``[unconditional; conditional]`` in one batch and
    combines them as ``u + s (c - u)``; without it the output is used as is.
    """
    velocity = _first_tensor(output).float()
    if guidance_scale > 1.0:
        if velocity.shape[0] % 2:
            raise ValueError(f"a guided batch has an even size ([uncond; cond]), got {velocity.shape[0]}")
        velocity = classifier_free_guidance(*velocity.chunk(2), guidance_scale)
    return velocity


class GuidedVelocityProbe:
    """Loss ``<r, v_guided>`` with a fresh ``r ~ N(0, I)`` per call from a seeded generator.

    ``E_r ||dL/dy_l||^2 = ||dv_guided/dy_l||_F^2``, so the profiler's S estimates the expected
    squared change of the guided velocity when layer l is quantized.
    """

    def __init__(self, guidance_scale: float, seed: int = 0):
        self.guidance_scale = float(guidance_scale)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.__name__ = "guided_velocity_probe"

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        velocity = guided_velocity(output, self.guidance_scale)
        probe = torch.randn(velocity.shape, generator=self.generator, dtype=torch.float32).to(velocity.device)
        return (velocity * probe).sum()


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_pipeline(pipe: Any) -> nn.Module:
    transformer = getattr(pipe, "transformer", None)
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(transformer, nn.Module) or scheduler is None or not callable(pipe):
        raise TypeError(
            f"`pipe` must be a chronos-video flow pipeline (callable, with `transformer` and `scheduler`), got {type(pipe).__name__}"
        )
    return transformer


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"`prompts` must be a non-empty string or a non-empty list of non-empty strings, got {prompts!r}")
    return list(prompts)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def _check_buckets(sigma_buckets: Any) -> list[float]:
    if isinstance(sigma_buckets, (str, bytes)) or not isinstance(sigma_buckets, Sequence) or not sigma_buckets:
        raise ValueError(f"`sigma_buckets` must be a non-empty sequence of noise levels in (0, 1], got {sigma_buckets!r}")
    buckets = []
    for value in sigma_buckets:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"`sigma_buckets` entries must be numbers in (0, 1], got {value!r}")
        buckets.append(float(value))
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"`sigma_buckets` must be distinct, got {buckets}")
    return buckets


def _check_guidance(guidance_scale: Any) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
        raise ValueError(f"`guidance_scale` must be a non-negative number, got {guidance_scale!r}")
    return float(guidance_scale)


def _current_sigma(pipe: Any, kwargs: Mapping[str, Any]) -> float:
    """Noise level of the transformer call in progress (the scheduler's sigmas, else timestep / T)."""
    if getattr(pipe.scheduler, "sigmas", None) is not None:
        return current_sigmas(pipe.scheduler)[0]
    timestep = kwargs.get("timestep")
    value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    return value / float(pipe.scheduler.config.num_train_timesteps)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_calibration_inputs(
    pipe: Any,
    prompts: str | Sequence[str],
    num_inference_steps: int = 20,
    sigma_buckets: Sequence[float] = DEFAULT_SIGMA_BUCKETS,
    guidance_scale: float = 4.0,
    batch_size: int = 8,
    seed: int = 0,
    max_batches_per_bucket: Optional[int] = None,
    **pipeline_kwargs: Any,
) -> CalibrationInputs:
    """Runs the pipeline's sampler at full precision and records every transformer call.

    Each call's keyword arguments (latents z_t, timestep, text states and mask: the real
    inputs, classifier-free guidance batch included) are filed under the nearest of
    `sigma_buckets`. Returns ``{bucket sigma: [transformer kwargs, ...]}``, ready for
    ``profile_sensitivity(pipe.transformer, inputs)``. `max_batches_per_bucket` keeps that many
    calls per bucket, evenly spread over the bucket's steps (None keeps all).
    """
    transformer = _check_pipeline(pipe)
    prompts = _check_prompts(prompts)
    num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
    batch_size = _check_positive_int("batch_size", batch_size)
    buckets = _check_buckets(sigma_buckets)
    guidance_scale = _check_guidance(guidance_scale)
    if max_batches_per_bucket is not None:
        max_batches_per_bucket = _check_positive_int("max_batches_per_bucket", max_batches_per_bucket)
    for reserved in ("prompt", "generator", "guidance_scale", "num_inference_steps", "precision", "output_type"):
        if reserved in pipeline_kwargs:
            raise ValueError(f"`{reserved}` is set by calibration and cannot be passed in pipeline_kwargs")

    recorded: dict[float, list[tuple[float, dict[str, Any]]]] = {b: [] for b in buckets}

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            raise TypeError("calibration expects the pipeline to call its transformer with keyword arguments")
        sigma = _current_sigma(pipe, kwargs)
        bucket = min(buckets, key=lambda b: (abs(b - sigma), -b))
        batch = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        batch["return_dict"] = False
        recorded[bucket].append((sigma, batch))

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 100_003 + start + i) for i in range(len(chunk))]
            pipe(
                chunk,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent",
                precision=None,
                **pipeline_kwargs,
            )
    finally:
        handle.remove()

    empty = [b for b, calls in recorded.items() if not calls]
    if empty:
        raise ValueError(
            f"no sampling step fell nearest to sigma buckets {empty} with num_inference_steps={num_inference_steps}; "
            "use fewer buckets or more steps"
        )
    inputs = {}
    for bucket, calls in recorded.items():
        calls.sort(key=lambda item: -item[0])
        if max_batches_per_bucket is not None and len(calls) > max_batches_per_bucket:
            picks = torch.linspace(0, len(calls) - 1, max_batches_per_bucket).round().long().unique().tolist()
            calls = [calls[i] for i in picks]
        inputs[bucket] = [batch for _, batch in calls]
    settings = {"num_prompts": len(prompts), "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": int(seed)}
    return CalibrationInputs(inputs, settings)


def profile_pipeline(
    pipe: Any,
    prompts: str | Sequence[str],
    num_inference_steps: int = 20,
    sigma_buckets: Sequence[float] = DEFAULT_SIGMA_BUCKETS,
    gauges: Sequence[str] = ("fp8", "nvfp4"),
    guidance_scale: float = 4.0,
    batch_size: int = 8,
    seed: int = 0,
    max_batches_per_bucket: Optional[int] = None,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    inputs: Optional[CalibrationInputs] = None,
    **pipeline_kwargs: Any,
) -> SensitivityReport:
    """Sensitivity report of ``pipe.transformer`` on the pipeline's own sampling trajectories.

    `loss_fn` defaults to :class:`GuidedVelocityProbe` (S predicts the squared change of the
    guided velocity). Pass `inputs` from :func:`collect_calibration_inputs` to reuse a recording.
    """
    transformer = _check_pipeline(pipe)
    guidance_scale = _check_guidance(guidance_scale)
    if inputs is None:
        inputs = collect_calibration_inputs(
            pipe, prompts, num_inference_steps, sigma_buckets, guidance_scale, batch_size, seed, max_batches_per_bucket,
            **pipeline_kwargs,
        )
    elif not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("`inputs` must be the non-empty dict returned by collect_calibration_inputs")
    settings = {"num_prompts": len(_check_prompts(prompts)), "num_inference_steps": int(num_inference_steps),
                "guidance_scale": guidance_scale, "seed": int(seed)}
    recorded = getattr(inputs, "settings", {})
    if recorded.get("guidance_scale", guidance_scale) != guidance_scale:
        raise ValueError(
            f"`inputs` were recorded with guidance_scale={recorded['guidance_scale']}, but guidance_scale={guidance_scale} "
            "was passed; the loss must combine the batch as the sampler did"
        )
    settings.update(recorded)
    settings["probe_seed"] = int(seed)
    loss = loss_fn if loss_fn is not None else GuidedVelocityProbe(guidance_scale, seed)
    was_training = transformer.training
    transformer.eval()
    try:
        report = profile_sensitivity(transformer, inputs, loss_fn=loss, sigmas=list(inputs), gauges=gauges, seed=seed)
    finally:
        transformer.train(was_training)
    report.metadata.update(source="pipeline_trajectories", **settings)
    return report


def calibrate_pipeline(
    pipe: Any,
    prompts: str | Sequence[str],
    num_inference_steps: int = 20,
    sigma_buckets: Sequence[float] = DEFAULT_SIGMA_BUCKETS,
    gauges: Sequence[str] = ("fp8", "nvfp4"),
    budget: float = 0.5,
    budget_kind: str = "low_fraction",
    high_gauge: str = "bf16",
    guidance_scale: float = 4.0,
    batch_size: int = 8,
    seed: int = 0,
    max_batches_per_bucket: Optional[int] = None,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    register: bool = True,
    inputs: Optional[CalibrationInputs] = None,
    report: Optional[SensitivityReport] = None,
    **pipeline_kwargs: Any,
) -> PrecisionSchedule:
    """Profiles the pipeline on its own trajectories and returns (and stores) a calibrated schedule.

    Steps: :func:`collect_calibration_inputs` (full-precision sampling of `prompts`),
    :func:`profile_pipeline` on ``pipe.transformer``, then
    ``report.to_schedule(budget, budget_kind, high_gauge)``. With ``register=True`` the schedule
    is written to the pipeline config as ``calibrated_precision_schedule``, so
    ``pipe(prompt, precision="calibrated")`` runs it and ``save_pretrained`` keeps it (in
    ``model_index.json``; ``pipe.save_policy(folder)`` updates just that file).

    Args:
        prompts: calibration prompts (use prompts like those the pipeline will serve).
        num_inference_steps, guidance_scale: as you will sample; guidance shapes the inputs and the loss.
        sigma_buckets: noise levels at which the profile is resolved; each sampling step is filed
            under the nearest one, and the schedule switches halfway between neighbours.
        gauges: low-precision gauges to consider; `high_gauge` is used for everything not lowered.
        budget, budget_kind: see :meth:`SensitivityReport.to_schedule` ("low_fraction": the
            fraction of MACs in low precision; "mean_bits"; "max_error").
        seed: seeds the calibration noise and the probe vectors (calibration is deterministic).
        inputs: a recording from :func:`collect_calibration_inputs` to reuse (skips sampling).
        report: a profile from :func:`profile_pipeline` to reuse (skips sampling and profiling),
            e.g. to try several budgets; `prompts` and the sampling arguments are then ignored.
    """
    if budget_kind not in BUDGET_KINDS:
        raise ValueError(f"`budget_kind` must be one of {BUDGET_KINDS}, got {budget_kind!r}")
    get_gauge(high_gauge)
    if not isinstance(register, bool):
        raise TypeError(f"`register` must be a bool, got {type(register).__name__}")
    if report is None:
        report = profile_pipeline(
            pipe, prompts, num_inference_steps, sigma_buckets, gauges, guidance_scale, batch_size, seed,
            max_batches_per_bucket, loss_fn, inputs, **pipeline_kwargs,
        )
    elif not isinstance(report, SensitivityReport):
        raise TypeError(f"`report` must be a SensitivityReport (from profile_pipeline), got {type(report).__name__}")
    else:
        _check_pipeline(pipe)
    schedule = report.to_schedule(budget=budget, kind=budget_kind, high_gauge=high_gauge)
    recorded = ("loss", "num_prompts", "num_inference_steps", "guidance_scale", "seed")
    schedule.metadata.update(
        calibration={
            **{key: report.metadata.get(key) for key in recorded},
            "batches_per_bucket": list(report.num_batches),
            "gauges": list(report.gauges),
        }
    )
    if register:
        pipe.register_to_config(calibrated_precision_schedule=schedule.to_dict())
    return schedule


@torch.no_grad()
def measure_layer_errors(
    model: nn.Module,
    inputs: CalibrationInputs,
    gauge: str,
    layers: Optional[Sequence[str]] = None,
    guidance_scale: float = 4.0,
    max_batches_per_bucket: Optional[int] = None,
) -> tuple[list[str], torch.Tensor]:
    """Measured squared guided-velocity change when ONE layer runs in `gauge` (emulated).

    For every controlled layer (or `layers`) and bucket: the mean over batches of
    ``||v_guided(layer l in gauge) - v_guided(full precision)||^2``, the quantity the profiler's
    default calibration loss predicts. Returns ``(layer names, tensor [layers, buckets])``, the
    buckets in the order of `inputs`. Costs one forward per (layer, batch): a check, not a step
    of calibration.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError("`inputs` must be the non-empty dict returned by collect_calibration_inputs")
    get_gauge(gauge)
    if gauge == FULL_PRECISION:
        raise ValueError(f"`gauge` must be a reduced precision, got {gauge!r}")
    guidance_scale = _check_guidance(guidance_scale)
    if max_batches_per_bucket is not None:
        max_batches_per_bucket = _check_positive_int("max_batches_per_bucket", max_batches_per_bucket)
    was_training = model.training
    model.eval()
    controller = PrecisionController(model, gauges=(gauge,))
    try:
        names = list(controller.layer_names) if layers is None else list(layers)
        unknown = [n for n in names if n not in controller.layers]
        if unknown:
            raise ValueError(f"`layers` {unknown} are not quantizable layers of the model")
        errors = torch.zeros(len(names), len(inputs), dtype=torch.float64)
        for b, (_, batches) in enumerate(inputs.items()):
            batches = list(batches)[:max_batches_per_bucket]
            for batch in batches:
                controller.set_gauge(FULL_PRECISION)
                reference = guided_velocity(model(**batch), guidance_scale)
                for index, name in enumerate(names):
                    controller.set_gauge(FULL_PRECISION, overrides={name: gauge})
                    quantized = guided_velocity(model(**batch), guidance_scale)
                    errors[index, b] += float((quantized - reference).double().square().sum())
            errors[:, b] /= max(len(batches), 1)
    finally:
        controller.remove()
        model.train(was_training)
    return names, errors


def ranking_agreement(report: SensitivityReport, layer_names: Sequence[str], measured: torch.Tensor, gauge: str) -> float:
    """Spearman rank correlation between profiled S and measured errors (summed over buckets)."""
    from scipy.stats import spearmanr

    if gauge not in report.gauges:
        raise ValueError(f"gauge {gauge!r} was not profiled; profiled gauges: {report.gauges}")
    if measured.ndim != 2 or measured.shape[0] != len(layer_names):
        raise ValueError(f"`measured` must be [len(layer_names), buckets], got {tuple(measured.shape)}")
    predicted = report.sensitivity[:, report.gauges.index(gauge), :].sum(dim=1)
    index = {name: i for i, name in enumerate(report.layers)}
    missing = [n for n in layer_names if n not in index]
    if missing:
        raise ValueError(f"layers {missing} are not in the report")
    predicted = predicted[[index[n] for n in layer_names]]
    rho = spearmanr(predicted.numpy(), measured.sum(dim=1).numpy()).statistic
    return float(rho) if math.isfinite(rho) else float("nan")
