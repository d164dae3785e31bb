"""Precision gauges for flow-model sampling (seed 002, Algorithms 1 and 4).

* :mod:`.gauges`: exact quantize-dequantize grids (fp32, bf16, fp16, fp8 E4M3, NVFP4), the
  native FP8/NVFP4 matmul paths, and :class:`PrecisionController`, which swaps
  pre-quantized weight banks into a model.
* :mod:`.entropy`: histogram / KDE entropy and Haar wavelet energy of latents.
* :mod:`.schedule`: :class:`PrecisionSchedule` (sigma, entropy) -> gauge, presets, JSON.
* :mod:`.profiler`: per-layer sensitivity S = E||dL/dy||^2 * s2_q and calibrated schedules.

Typical use in a sampler::

    schedule = resolve_precision("sigma")              # or a calibrated schedule / its dict
    controller = PrecisionController(transformer, gauges=schedule.gauges())
    for sigma in sigmas:
        controller.apply_schedule(schedule, sigma)      # pointer swaps only
        velocity = transformer(latents, ...)
    controller.restore()
"""

from .entropy import ENTROPY_ESTIMATORS, estimate_entropy, haar_highpass_2d, histogram_entropy, kde_entropy, wavelet_energy
from .gauges import (
    BACKENDS,
    BF16,
    DEFAULT_EXCLUDE_PATTERNS,
    E2M1,
    E4M3,
    FP16,
    FULL_PRECISION,
    GAUGES,
    FloatFormat,
    Gauge,
    NVFP4Parts,
    PrecisionController,
    check_native_support,
    default_exclude_types,
    fp8_codes,
    fp8_linear_native,
    get_gauge,
    quantize_activation,
    quantize_dequantize,
    quantize_fp8,
    quantize_nvfp4,
    quantize_weight,
    round_to_format,
    select_layers,
)
from .profiler import SensitivityReport, profile_sensitivity
from .calibration import (
    DEFAULT_SIGMA_BUCKETS,
    GuidedVelocityProbe,
    calibrate_pipeline,
    collect_calibration_inputs,
    guided_velocity,
    measure_layer_errors,
    profile_pipeline,
    ranking_agreement,
)
from .schedule import PRESETS, PrecisionDecision, PrecisionRule, PrecisionSchedule, resolve_precision


__all__ = [
    "DEFAULT_SIGMA_BUCKETS",
    "GuidedVelocityProbe",
    "calibrate_pipeline",
    "collect_calibration_inputs",
    "guided_velocity",
    "measure_layer_errors",
    "profile_pipeline",
    "ranking_agreement",
    "BACKENDS",
    "BF16",
    "DEFAULT_EXCLUDE_PATTERNS",
    "E2M1",
    "E4M3",
    "ENTROPY_ESTIMATORS",
    "FP16",
    "FULL_PRECISION",
    "GAUGES",
    "PRESETS",
    "FloatFormat",
    "Gauge",
    "NVFP4Parts",
    "PrecisionController",
    "PrecisionDecision",
    "PrecisionRule",
    "PrecisionSchedule",
    "SensitivityReport",
    "check_native_support",
    "default_exclude_types",
    "estimate_entropy",
    "fp8_codes",
    "fp8_linear_native",
    "get_gauge",
    "haar_highpass_2d",
    "histogram_entropy",
    "kde_entropy",
    "profile_sensitivity",
    "quantize_activation",
    "quantize_dequantize",
    "quantize_fp8",
    "quantize_nvfp4",
    "quantize_weight",
    "resolve_precision",
    "round_to_format",
    "select_layers",
    "wavelet_energy",
]
