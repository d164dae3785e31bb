"""Precision schedules: which gauge a sampler runs at noise level sigma (and latent entropy H).

A :class:`PrecisionSchedule` is an ordered list of :class:`PrecisionRule` s; the first rule
whose sigma interval (lo, hi] and entropy interval [lo, hi) contain the current step wins,
otherwise `default_gauge` applies. A rule may carry per-layer overrides (layer name -> gauge),
which is how the profiler's calibrated schedules keep sensitive layers high. Schedules are
plain data with an exact JSON round trip, so a scheduler can keep one in its config.

sigma follows the rectified-flow convention x_t = (1 - sigma) x_0 + sigma * noise, so sigma is
the flow time t (t = 1 is pure noise, sampling runs from high to low sigma).

Presets (:meth:`PrecisionSchedule.preset`):

* ``"seed"``: the timestep table chronos-video was first proposed with:
  NVFP4 for t > 0.8, FP16 for 0.4 < t <= 0.8, FP8 for t <= 0.4. Published evidence
  (PTQD; PAB) finds the *last*, low-noise steps the most sensitive to quantization, the
  opposite of giving them FP8 after FP16; the preset is kept to test that claim.
* ``"seed_entropy"``: the entropy gate it was first proposed with: NVFP4 for H < 4 bits, FP16 for
  4 <= H < 8, FP8 for H >= 8, with H the histogram entropy of z_t (256 bins by default; a
  256-bin histogram reaches 8 bits only when perfectly flat, so the FP8 branch practically
  never fires; pass ``bins=`` to change it). Pure noise has high, not low, histogram entropy,
  so this gate disagrees with the ``"seed"`` table.
* ``"sigma"``: plain sigma thresholds with precision increasing toward the end of sampling:
  NVFP4 for sigma > 0.8, FP8 for 0.4 < sigma <= 0.8, BF16 for sigma <= 0.4 (the ``"seed"``
  thresholds with the evidence-based ordering).
* ``"calibrated"``: produced by :meth:`SensitivityReport.to_schedule` for a specific model;
  there is no generic one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .entropy import ENTROPY_ESTIMATORS, estimate_entropy
from .formats import FULL_PRECISION, GAUGES, get_gauge


SCHEDULE_FORMAT = "chronos_video.precision_schedule"
SCHEDULE_VERSION = 1
PRESETS = ("seed", "seed_entropy", "sigma", "calibrated")

Bound = Optional[float]


def _check_bound(value: Any, what: str) -> Bound:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite (use None for an open end), got {value}")
    return value


def _check_range(value: Any, what: str) -> tuple[Bound, Bound]:
    if value is None:
        return (None, None)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{what} must be a pair (low, high) with None for an open end, got {value!r}")
    low, high = _check_bound(value[0], f"{what}[0]"), _check_bound(value[1], f"{what}[1]")
    if low is not None and high is not None and not low < high:
        raise ValueError(f"{what} must have low < high, got {value!r}")
    return (low, high)


def _check_layer_gauges(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping layer name -> gauge, got {type(value).__name__}")
    checked = {}
    for name, gauge in value.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be layer names (str), got {name!r}")
        get_gauge(gauge)
        checked[name] = gauge
    return checked


@dataclass
class PrecisionRule:
    """Run `gauge` (with optional per-layer overrides) when lo < sigma <= hi and lo <= H < hi.

    ``None`` leaves an end open. Sigma intervals are open below and closed above so that a
    threshold step belongs to the lower-noise side, as in "t > 0.8 -> NVFP4".
    """

    gauge: str
    sigma_range: tuple[Bound, Bound] = (None, None)
    entropy_range: tuple[Bound, Bound] = (None, None)
    layer_gauges: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        get_gauge(self.gauge)
        self.sigma_range = _check_range(self.sigma_range, "sigma_range")
        self.entropy_range = _check_range(self.entropy_range, "entropy_range")
        self.layer_gauges = _check_layer_gauges(self.layer_gauges, "layer_gauges")

    @property
    def uses_entropy(self) -> bool:
        return self.entropy_range != (None, None)

    def matches(self, sigma: float, entropy: Optional[float]) -> bool:
        low, high = self.sigma_range
        if (low is not None and not sigma > low) or (high is not None and not sigma <= high):
            return False
        if self.uses_entropy:
            low, high = self.entropy_range
            if (low is not None and not entropy >= low) or (high is not None and not entropy < high):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "gauge": self.gauge,
            "sigma_range": list(self.sigma_range),
            "entropy_range": list(self.entropy_range),
            "layer_gauges": dict(sorted(self.layer_gauges.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrecisionRule":
        if not isinstance(data, Mapping):
            raise TypeError(f"a rule must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"gauge", "sigma_range", "entropy_range", "layer_gauges"}
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}")
        if "gauge" not in data:
            raise ValueError("a rule needs a 'gauge'")
        return cls(
            gauge=data["gauge"],
            sigma_range=tuple(data.get("sigma_range") or (None, None)),
            entropy_range=tuple(data.get("entropy_range") or (None, None)),
            layer_gauges=dict(data.get("layer_gauges") or {}),
        )


@dataclass(frozen=True)
class PrecisionDecision:
    """What a schedule chose for one step: a gauge, per-layer overrides, and the rule index
    (``None`` when the default applied)."""

    gauge: str
    layer_gauges: dict[str, str]
    rule_index: Optional[int]


class PrecisionSchedule:
    """Maps (sigma, entropy) to a gauge and optional per-layer overrides.

    Args:
        rules: evaluated in order; the first match wins.
        default_gauge: used when no rule matches ("fp32" = the model's full precision).
        entropy_estimator: how H is measured when a rule gates on it, e.g.
            ``{"method": "histogram", "bins": 256}`` (see :mod:`.entropy`); required then.
        name, description: free text recorded with the schedule.
        metadata: JSON-serialisable extras (e.g. the profiler's budget and predicted error).
    """

    def __init__(
        self,
        rules: Sequence[Union[PrecisionRule, Mapping[str, Any]]] = (),
        default_gauge: str = FULL_PRECISION,
        entropy_estimator: Optional[Mapping[str, Any]] = None,
        name: str = "custom",
        description: str = "",
        metadata: Optional[Mapping[str, Any]] = None,
    ):
        if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Sequence):
            raise TypeError(f"rules must be a sequence of PrecisionRule or dicts, got {type(rules).__name__}")
        self.rules = [r if isinstance(r, PrecisionRule) else PrecisionRule.from_dict(r) for r in rules]
        get_gauge(default_gauge)
        self.default_gauge = default_gauge
        if not isinstance(name, str) or not isinstance(description, str):
            raise TypeError("name and description must be strings")
        self.name = name
        self.description = description
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata must be JSON-serialisable with finite numbers: {error}") from error
        if entropy_estimator is not None:
            if not isinstance(entropy_estimator, Mapping) or entropy_estimator.get("method") not in ENTROPY_ESTIMATORS:
                raise ValueError(
                    f"entropy_estimator must be a dict with 'method' in {sorted(ENTROPY_ESTIMATORS)}, got {entropy_estimator!r}"
                )
            entropy_estimator = dict(entropy_estimator)
        elif self.requires_entropy_rules():
            raise ValueError("a rule gates on entropy, so entropy_estimator (e.g. {'method': 'histogram'}) is required")
        self.entropy_estimator = entropy_estimator

    # -- selection --------------------------------------------------------------------------

    def requires_entropy_rules(self) -> bool:
        return any(rule.uses_entropy for rule in self.rules)

    @property
    def requires_entropy(self) -> bool:
        """Whether :meth:`select` needs an entropy value (measure it with :meth:`measure_entropy`)."""
        return self.requires_entropy_rules()

    def measure_entropy(self, latents: torch.Tensor) -> float:
        """The schedule's entropy estimator on a batch of latents, averaged over the batch."""
        if self.entropy_estimator is None:
            raise ValueError(f"schedule {self.name!r} does not gate on entropy (entropy_estimator is None)")
        options = {k: v for k, v in self.entropy_estimator.items() if k != "method"}
        return float(estimate_entropy(latents, self.entropy_estimator["method"], **options).mean())

    def select(self, sigma: Union[float, torch.Tensor], entropy: Optional[Union[float, torch.Tensor]] = None) -> PrecisionDecision:
        """The decision for a step at `sigma` (a float or a tensor, averaged) and `entropy`."""
        sigma = self._as_float(sigma, "sigma")
        entropy = None if entropy is None else self._as_float(entropy, "entropy")
        for index, rule in enumerate(self.rules):
            if rule.uses_entropy and entropy is None:
                raise ValueError(
                    f"schedule {self.name!r} gates on entropy: pass entropy= (e.g. schedule.measure_entropy(latents))"
                )
            if rule.matches(sigma, entropy):
                return PrecisionDecision(rule.gauge, dict(rule.layer_gauges), index)
        return PrecisionDecision(self.default_gauge, {}, None)

    def __call__(self, sigma: Union[float, torch.Tensor], entropy: Optional[Union[float, torch.Tensor]] = None) -> str:
        return self.select(sigma, entropy).gauge

    @staticmethod
    def _as_float(value: Union[float, torch.Tensor], what: str) -> float:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{what} must be a number or tensor, got {type(value).__name__}")
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"{what} is NaN")
        return value

    def gauges(self) -> tuple[str, ...]:
        """Every gauge this schedule can select, for ``PrecisionController(gauges=...)``."""
        used = {self.default_gauge}
        for rule in self.rules:
            used.add(rule.gauge)
            used.update(rule.layer_gauges.values())
        return tuple(g for g in GAUGES if g in used)

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCHEDULE_FORMAT,
            "version": SCHEDULE_VERSION,
            "name": self.name,
            "description": self.description,
            "default_gauge": self.default_gauge,
            "entropy_estimator": None if self.entropy_estimator is None else dict(sorted(self.entropy_estimator.items())),
            "rules": [rule.to_dict() for rule in self.rules],
            "metadata": json.loads(json.dumps(self.metadata)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrecisionSchedule":
        if not isinstance(data, Mapping):
            raise TypeError(f"a schedule must be a mapping, got {type(data).__name__}")
        if data.get("format", SCHEDULE_FORMAT) != SCHEDULE_FORMAT:
            raise ValueError(f"not a precision schedule: format={data.get('format')!r}")
        if data.get("version", SCHEDULE_VERSION) != SCHEDULE_VERSION:
            raise ValueError(f"unsupported schedule version {data.get('version')!r} (this library reads {SCHEDULE_VERSION})")
        known = {"format", "version", "name", "description", "default_gauge", "entropy_estimator", "rules", "metadata"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(unknown)}")
        return cls(
            rules=list(data.get("rules") or []),
            default_gauge=data.get("default_gauge", FULL_PRECISION),
            entropy_estimator=data.get("entropy_estimator"),
            name=data.get("name", "custom"),
            description=data.get("description", ""),
            metadata=data.get("metadata"),
        )

    def to_json_string(self) -> str:
        """Deterministic JSON (sorted keys; floats written with their shortest exact repr)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "PrecisionSchedule":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PrecisionSchedule":
        with open(path, encoding="utf-8") as handle:
            return cls.from_json_string(handle.read())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrecisionSchedule) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"PrecisionSchedule(name={self.name!r}, rules={len(self.rules)}, default_gauge={self.default_gauge!r})"

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_sigma_thresholds(
        cls, thresholds: Sequence[tuple[float, str]], final_gauge: str, name: str = "sigma", description: str = ""
    ) -> "PrecisionSchedule":
        """[(0.8, "nvfp4"), (0.4, "fp8")], "bf16" means: sigma > 0.8 -> nvfp4, 0.4 < sigma <= 0.8
        -> fp8, sigma <= 0.4 -> bf16. Thresholds must decrease."""
        rules, upper = [], None
        for index, item in enumerate(thresholds):
            if not isinstance(item, Sequence) or len(item) != 2:
                raise TypeError(f"thresholds[{index}] must be a (sigma, gauge) pair, got {item!r}")
            threshold, gauge = _check_bound(item[0], f"thresholds[{index}][0]"), item[1]
            if upper is not None and not threshold < upper:
                raise ValueError(f"thresholds must decrease, got {[t for t, _ in thresholds]}")
            rules.append(PrecisionRule(gauge, sigma_range=(threshold, upper)))
            upper = threshold
        return cls(rules, default_gauge=final_gauge, name=name, description=description)

    @classmethod
    def preset(cls, name: str, *, bins: int = 256) -> "PrecisionSchedule":
        """A named preset (see the module docstring). `bins` sets the histogram of "seed_entropy"."""
        if name == "seed":
            return cls.from_sigma_thresholds(
                [(0.8, "nvfp4"), (0.4, "fp16")],
                final_gauge="fp8",
                name="seed",
                description=(
                    "Seed 002 table / Algorithm 4: NVFP4 for t > 0.8, FP16 for 0.4 < t <= 0.8, FP8 for t <= 0.4. "
                    "Published evidence (PTQD, PAB) finds the last low-noise steps the most sensitive, the opposite ordering."
                ),
            )
        if name == "seed_entropy":
            return cls(
                [
                    PrecisionRule("nvfp4", entropy_range=(None, 4.0)),
                    PrecisionRule("fp16", entropy_range=(4.0, 8.0)),
                    PrecisionRule("fp8", entropy_range=(8.0, None)),
                ],
                default_gauge="fp16",
                entropy_estimator={"method": "histogram", "bins": bins},
                name="seed_entropy",
                description=(
                    "Seed 002 Algorithm 1: histogram entropy H(z_t) in bits; NVFP4 if H < 4, FP16 if H < 8, else FP8."
                ),
            )
        if name == "sigma":
            return cls.from_sigma_thresholds(
                [(0.8, "nvfp4"), (0.4, "fp8")],
                final_gauge="bf16",
                name="sigma",
                description="Precision rises toward the end of sampling: NVFP4 for sigma > 0.8, FP8 down to 0.4, then BF16.",
            )
        if name == "calibrated":
            raise ValueError(
                "a 'calibrated' schedule is model-specific: build it with "
                "profile_sensitivity(...).to_schedule(...) and pass the schedule (or its dict) instead"
            )
        raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


def resolve_precision(
    spec: Union[None, str, PrecisionSchedule, Mapping[str, Any]],
    calibrated: Union[None, PrecisionSchedule, Mapping[str, Any]] = None,
) -> Optional[PrecisionSchedule]:
    """Turns a user/config value into a schedule (or None = no precision switching).

    Accepts None, a preset name ("seed", "seed_entropy", "sigma"), "calibrated" (returns
    `calibrated`, which must then be given, e.g. the schedule a scheduler stored in its
    config), a path to a saved ``.json`` schedule, a :class:`PrecisionSchedule`, or its dict.
    """
    if spec is None:
        return None
    if isinstance(spec, PrecisionSchedule):
        return spec
    if isinstance(spec, Mapping):
        return PrecisionSchedule.from_dict(spec)
    if isinstance(spec, str):
        if spec == "calibrated":
            if calibrated is None:
                raise ValueError(
                    "precision='calibrated' needs a stored calibrated schedule: run "
                    "profile_sensitivity(...).to_schedule(...) and pass it as calibrated= (or pass the schedule itself)"
                )
            return resolve_precision(calibrated)
        if spec in PRESETS:
            return PrecisionSchedule.preset(spec)
        if spec.endswith(".json"):
            if not os.path.isfile(spec):
                raise ValueError(f"precision schedule file {spec!r} does not exist")
            return PrecisionSchedule.load(spec)
        raise ValueError(f"unknown precision spec {spec!r}; expected None, one of {PRESETS}, a .json path, a schedule or a dict")
    raise TypeError(f"precision spec must be None, a str, a PrecisionSchedule or a dict, got {type(spec).__name__}")
