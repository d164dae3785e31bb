"""Precision gauges for flow-model sampling: per-step number formats chosen by sigma or latent entropy.

* :mod:`.formats`: exact quantize-dequantize grids (fp32, bf16, fp16, fp8 E4M3, NVFP4).
* :mod:`.native`: the native FP8/NVFP4 matmul paths and their hardware checks.
* :mod:`.gauges`: :class:`PrecisionController`, which swaps pre-quantized weight banks into a
  model, and the rules for which layers it may touch.
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
from .formats import (
    BF16,
    E2M1,
    E4M3,
    FP16,
    FULL_PRECISION,
    GAUGES,
    FloatFormat,
    Gauge,
    NVFP4Parts,
    get_gauge,
    quantize_activation,
    quantize_dequantize,
    quantize_fp8,
    quantize_nvfp4,
    quantize_weight,
    round_to_format,
)
from .gauges import BACKENDS, DEFAULT_EXCLUDE_PATTERNS, PrecisionController, default_exclude_types, select_layers
from .native import check_native_support, fp8_codes, fp8_linear_native
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
