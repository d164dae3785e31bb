"""Per-layer, per-noise-level sensitivity to quantization: gradient energy times format error.

Accumulating only the gradient energy E||dL/da||^2 (and then assigning gauges by timestep
alone) misses half of the story: quantizing layer l at gauge g perturbs its output y_l by
delta = y_hat - y, and to first order the loss moves by <dL/dy_l, delta>. If delta behaves
like noise of per-element variance s2_q(l, g), uncorrelated with the gradient, then

    E[(Delta L)^2] ~= S(l, g, sigma) = E||dL/dy_l||^2 * s2_q(l, g, sigma),

the quantity profiled here. s2_q is *measured*: each eligible layer's output is recomputed
from the quantize-dequantized weight and input (exactly what the emulate backend runs), so
activation statistics at each sigma are part of it.

With the default loss (a random Gaussian probe <r, f(x)>, r ~ N(0, I) drawn per batch),
E_r||dL/dy||^2 = ||J_l||_F^2 and S estimates the expected squared change of the model output
E||f_q(x) - f(x)||^2 when layer l alone is quantized (Hutchinson's trick). Pass your own loss
(e.g. the flow-matching loss) to estimate its change instead.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import GAUGES, get_gauge, quantize_activation, quantize_weight
from .gauges import ExcludeSpec, _reduction_size, select_layers
from .schedule import PrecisionRule, PrecisionSchedule


Batch = Any
InputsSpec = Union[Callable[[float], Iterable[Batch]], Mapping[float, Iterable[Batch]]]
BUDGET_KINDS = ("low_fraction", "mean_bits", "max_error")


def _first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (tensor, diffusers/transformers output, or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    for attribute in ("sample", "logits", "last_hidden_state"):
        value = getattr(output, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return _first_tensor(output.to_tuple())
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}; pass loss_fn")


def default_call_model(model: nn.Module, batch: Batch) -> Any:
    """dict -> model(**batch), tuple/list -> model(*batch), anything else -> model(batch)."""
    if isinstance(batch, MappingABC):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _ProbeLoss:
    """L = <r, f(x)> with a fresh r ~ N(0, I) per call, from a seeded generator (reproducible)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, output: Any, batch: Batch) -> torch.Tensor:
        out = _first_tensor(output)
        probe = torch.randn(out.shape, generator=self.generator, dtype=torch.float32).to(out.device, out.dtype)
        return (out * probe).sum()


@dataclass
class SensitivityReport:
    """Profiled sensitivities. Arrays are indexed [layer, gauge, sigma bucket] (float64).

    Attributes:
        layers: profiled layer names (as in ``model.named_modules()``).
        gauges: profiled gauges.
        sigmas: bucket representatives, in the order given.
        grad_energy: [L, S] mean over batches of ||dL/dy_l||^2 (summed over the batch).
        error_variance: [L, G, S] mean per-element variance of y_hat - y.
        sensitivity: [L, G, S] grad_energy * error_variance.
        macs: [L] multiply-accumulates per batch (the cost weight of a layer).
        num_batches: batches seen per bucket.
    """

    layers: list[str]
    gauges: tuple[str, ...]
    sigmas: list[float]
    grad_energy: torch.Tensor
    error_variance: torch.Tensor
    sensitivity: torch.Tensor
    macs: torch.Tensor
    num_batches: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def ranking(self, gauge: str, sigma: Optional[float] = None) -> list[str]:
        """Layers from most to least sensitive at `gauge` (at one bucket, or summed over buckets)."""
        values = self._values(gauge, sigma)
        return [self.layers[i] for i in torch.argsort(values, descending=True).tolist()]

    def _values(self, gauge: str, sigma: Optional[float]) -> torch.Tensor:
        if gauge not in self.gauges:
            raise ValueError(f"gauge {gauge!r} was not profiled; profiled gauges: {self.gauges}")
        g = self.gauges.index(gauge)
        if sigma is None:
            return self.sensitivity[:, g, :].sum(dim=1)
        if sigma not in self.sigmas:
            raise ValueError(f"sigma {sigma} is not a profiled bucket; buckets: {self.sigmas}")
        return self.sensitivity[:, g, self.sigmas.index(sigma)]

    def table(self, max_rows: Optional[int] = None) -> str:
        """Markdown table of S(layer, gauge, sigma), most sensitive layers first."""
        order = torch.argsort(self.sensitivity.sum(dim=(1, 2)), descending=True).tolist()
        if max_rows is not None:
            order = order[:max_rows]
        columns = [(g, s) for g in range(len(self.gauges)) for s in range(len(self.sigmas))]
        header = ["layer", "MACs"] + [f"S {self.gauges[g]} σ={self.sigmas[s]:g}" for g, s in columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for i in order:
            cells = [f"`{self.layers[i]}`", f"{int(self.macs[i]):,}"]
            cells += [f"{self.sensitivity[i, g, s].item():.3e}" for g, s in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "gauges": list(self.gauges),
            "sigmas": list(self.sigmas),
            "grad_energy": self.grad_energy.tolist(),
            "error_variance": self.error_variance.tolist(),
            "macs": self.macs.tolist(),
            "num_batches": list(self.num_batches),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SensitivityReport":
        grad = torch.tensor(data["grad_energy"], dtype=torch.float64)
        error = torch.tensor(data["error_variance"], dtype=torch.float64)
        return cls(
            layers=list(data["layers"]),
            gauges=tuple(data["gauges"]),
            sigmas=[float(s) for s in data["sigmas"]],
            grad_energy=grad,
            error_variance=error,
            sensitivity=grad.unsqueeze(1) * error,
            macs=torch.tensor(data["macs"], dtype=torch.float64),
            num_batches=list(data["num_batches"]),
            metadata=dict(data.get("metadata", {})),
        )

    # -- schedule synthesis -----------------------------------------------------------------

    def to_schedule(self, budget: float = 0.5, kind: str = "low_fraction", high_gauge: str = "bf16") -> PrecisionSchedule:
        """A calibrated schedule: per sigma bucket, a gauge per layer meeting `budget`.

        Every (layer, bucket) slot starts at `high_gauge` and is lowered greedily, cheapest
        predicted error first:

        * ``kind="low_fraction"``: at least `budget` (0..1) of all MACs over all buckets run
          in a profiled low-bit gauge; each chosen slot gets its least sensitive low gauge.
        * ``kind="mean_bits"``: lower (through FP8 to NVFP4) until the MAC-weighted mean
          bit width is <= `budget`, by smallest added error per bit saved.
        * ``kind="max_error"``: same moves, while the summed predicted error S stays <= `budget`.

        Bucket boundaries lie halfway between neighbouring profiled sigmas. Each bucket's rule
        uses its most common gauge (by MACs) and lists the other layers as overrides.
        """
        if kind not in BUDGET_KINDS:
            raise ValueError(f"kind must be one of {BUDGET_KINDS}, got {kind!r}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise TypeError(f"budget must be a finite number, got {budget!r}")
        if kind == "low_fraction" and not 0 <= budget <= 1:
            raise ValueError(f"budget for kind='low_fraction' is a fraction in [0, 1], got {budget}")
        high_bits = get_gauge(high_gauge).bits
        ladder = sorted((g for g in self.gauges if GAUGES[g].bits < high_bits), key=lambda g: -GAUGES[g].bits)
        if not ladder:
            raise ValueError(f"no profiled gauge {self.gauges} has fewer bits than high_gauge={high_gauge!r}")
        if kind == "mean_bits" and not GAUGES[ladder[-1]].bits <= budget <= high_bits:
            raise ValueError(f"budget for kind='mean_bits' must lie in [{GAUGES[ladder[-1]].bits}, {high_bits}], got {budget}")
        if kind == "max_error" and budget < 0:
            raise ValueError(f"budget for kind='max_error' must be >= 0, got {budget}")

        num_layers, num_buckets = len(self.layers), len(self.sigmas)
        macs = self.macs.clamp(min=1.0)
        total_macs = float(macs.sum()) * num_buckets

        def error(layer: int, gauge: str, bucket: int) -> float:
            if gauge == high_gauge and gauge not in self.gauges:
                return 0.0
            return float(self.sensitivity[layer, self.gauges.index(gauge), bucket])

        levels = [[high_gauge] + ladder for _ in range(num_layers)]
        assignment = {(l, b): high_gauge for l in range(num_layers) for b in range(num_buckets)}
        predicted = sum(error(l, high_gauge, b) for l, b in assignment)

        if kind == "low_fraction":
            candidates = []
            for (l, b) in assignment:
                best = min(ladder, key=lambda g: error(l, g, b))
                added = error(l, best, b) - error(l, high_gauge, b)
                candidates.append((added / float(macs[l]), l, b, best, added))
            candidates.sort()
            lowered = 0.0
            for _, l, b, gauge, added in candidates:
                if lowered >= budget * total_macs - 1e-9 * total_macs:
                    break
                assignment[(l, b)] = gauge
                lowered += float(macs[l])
                predicted += added
        else:
            bits_total = high_bits * total_macs
            position = {key: 0 for key in assignment}
            heap = []

            def push(l: int, b: int) -> None:
                step = position[(l, b)]
                if step + 1 < len(levels[l]):
                    current, nxt = levels[l][step], levels[l][step + 1]
                    added = error(l, nxt, b) - error(l, current, b)
                    saved = (GAUGES[current].bits - GAUGES[nxt].bits) * float(macs[l])
                    heapq.heappush(heap, (added / saved, l, b, added, saved))

            for l, b in assignment:
                push(l, b)
            while heap:
                if kind == "mean_bits" and bits_total / total_macs <= budget + 1e-12:
                    break
                _, l, b, added, saved = heapq.heappop(heap)
                if kind == "max_error" and predicted + added > budget:
                    continue  # too costly; a cheaper move elsewhere may still fit
                position[(l, b)] += 1
                assignment[(l, b)] = levels[l][position[(l, b)]]
                predicted += added
                bits_total -= saved
                push(l, b)

        return self._schedule_from_assignment(assignment, high_gauge, budget, kind, predicted, macs)

    def _schedule_from_assignment(self, assignment, high_gauge, budget, kind, predicted, macs) -> PrecisionSchedule:
        order = sorted(range(len(self.sigmas)), key=lambda b: -self.sigmas[b])
        rules = []
        for position, b in enumerate(order):
            upper = None if position == 0 else (self.sigmas[order[position - 1]] + self.sigmas[b]) / 2
            lower = None if position == len(order) - 1 else (self.sigmas[b] + self.sigmas[order[position + 1]]) / 2
            weight_per_gauge: dict[str, float] = {}
            for l in range(len(self.layers)):
                gauge = assignment[(l, b)]
                weight_per_gauge[gauge] = weight_per_gauge.get(gauge, 0.0) + float(macs[l])
            default = max(sorted(weight_per_gauge), key=lambda g: weight_per_gauge[g])
            overrides = {self.layers[l]: assignment[(l, b)] for l in range(len(self.layers)) if assignment[(l, b)] != default}
            rules.append(PrecisionRule(default, sigma_range=(lower, upper), layer_gauges=overrides))
        low_macs = sum(float(macs[l]) for (l, b), g in assignment.items() if GAUGES[g].bits < GAUGES[high_gauge].bits)
        mean_bits = sum(float(macs[l]) * GAUGES[g].bits for (l, b), g in assignment.items())
        total = float(macs.sum()) * len(self.sigmas)
        return PrecisionSchedule(
            rules,
            default_gauge=high_gauge,
            name="calibrated",
            description=f"Sensitivity-profiled schedule ({kind} budget {budget:g}) over sigma buckets {self.sigmas}.",
            metadata={
                "budget": float(budget),
                "budget_kind": kind,
                "high_gauge": high_gauge,
                "profiled_sigmas": [float(s) for s in self.sigmas],
                "predicted_error": float(predicted),
                "low_precision_fraction": low_macs / total,
                "mean_bits": mean_bits / total,
            },
        )


def _normalise_inputs(inputs: InputsSpec, sigmas: Optional[Sequence[float]]) -> tuple[list[float], Callable[[float], Iterable[Batch]]]:
    if isinstance(inputs, MappingABC):
        keys = [float(k) for k in inputs]
        if sigmas is not None and sorted(float(s) for s in sigmas) != sorted(keys):
            raise ValueError(f"sigmas {list(sigmas)} do not match the keys of inputs {keys}")
        lookup = {float(k): v for k, v in inputs.items()}
        return (list(sigmas) if sigmas is not None else keys), (lambda s: lookup[float(s)])
    if callable(inputs):
        if sigmas is None:
            raise ValueError("sigmas is required when inputs is a callable sigma -> batches")
        return list(sigmas), inputs
    raise TypeError("inputs must be a callable sigma -> iterable of batches, or a mapping sigma -> iterable of batches")


def profile_sensitivity(
    model: nn.Module,
    inputs: InputsSpec,
    loss_fn: Optional[Callable[[Any, Batch], torch.Tensor]] = None,
    sigmas: Optional[Sequence[float]] = None,
    gauges: Sequence[str] = ("fp8", "nvfp4"),
    *,
    exclude: ExcludeSpec = None,
    exclude_types: Optional[Sequence[type]] = None,
    include_conv: bool = False,
    fp8_scaling: str = "row",
    call_model: Callable[[nn.Module, Batch], Any] = default_call_model,
    seed: int = 0,
) -> SensitivityReport:
    """Estimates S(l, g, sigma) = E||dL/dy_l||^2 * s2_q(l, g) for every eligible layer.

    Args:
        model: the network (put it in eval mode first; it is not modified).
        inputs: ``inputs(sigma) -> iterable of batches`` or ``{sigma: iterable of batches}``;
            a batch is passed through `call_model` (dict -> kwargs, tuple -> args).
        loss_fn: ``loss_fn(output, batch) -> scalar``; None = random output probe (S then
            predicts the squared output change, see the module docstring).
        sigmas: bucket representatives (required with a callable `inputs`).
        gauges: low-precision gauges to profile.
        exclude, exclude_types, include_conv: layer selection, as in :class:`PrecisionController`.
        fp8_scaling: "row" or "tensor", as the controller will run.
        seed: seeds the probe vectors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(gauges, str) or not gauges:
        raise ValueError(f"gauges must be a non-empty sequence of gauge names, got {gauges!r}")
    gauges = tuple(gauges)
    for gauge in gauges:
        get_gauge(gauge)
    sigma_list, batches_for = _normalise_inputs(inputs, sigmas)
    if not sigma_list:
        raise ValueError("at least one sigma bucket is needed")
    loss = loss_fn if loss_fn is not None else _ProbeLoss(seed)
    layers = select_layers(model, exclude=exclude, exclude_types=exclude_types, include_conv=include_conv)
    if not layers:
        raise ValueError("no eligible layers to profile (check exclude / exclude_types)")
    names = list(layers)
    index_of = {name: i for i, name in enumerate(names)}
    num_layers, num_gauges, num_buckets = len(names), len(gauges), len(sigma_list)

    grad_energy = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    error_sum = torch.zeros(num_layers, num_gauges, num_buckets, dtype=torch.float64)
    element_count = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    macs = torch.zeros(num_layers, dtype=torch.float64)
    batch_counts = [0] * num_buckets
    quantized_weights = {(name, g): quantize_weight(layers[name].weight.detach(), g, fp8_scaling) for name in names for g in gauges}

    captured: dict[str, list[torch.Tensor]] = {}
    bucket_state = {"bucket": 0}

    def make_hook(index: int, name: str, module: nn.Module):
        is_linear = isinstance(module, nn.Linear)

        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            b = bucket_state["bucket"]
            with torch.no_grad():
                reference = output.detach().float()
                for g_index, gauge in enumerate(gauges):
                    xq = quantize_activation(x, gauge, fp8_scaling, -1 if is_linear else 1)
                    wq = quantized_weights[(name, gauge)]
                    yq = F.linear(xq, wq, module.bias) if is_linear else module._conv_forward(xq, wq, module.bias)
                    error_sum[index, g_index, b] += float((yq.float() - reference).square().sum())
                element_count[index, b] += output.numel()
                if b == 0 and batch_counts[0] == 0:  # cost of one batch (every call of the layer)
                    macs[index] += output.numel() * _reduction_size(module)
            if output.requires_grad:
                captured.setdefault(name, []).append(output)

        return hook

    weights_requires_grad = {name: m.weight.requires_grad for name, m in layers.items()}
    handles = [layers[name].register_forward_hook(make_hook(i, name, layers[name])) for i, name in enumerate(names)]
    try:
        for module in layers.values():
            module.weight.requires_grad_(True)  # so every layer output joins the graph
        with torch.enable_grad():
            for b, sigma in enumerate(sigma_list):
                bucket_state["bucket"] = b
                for batch in batches_for(sigma):
                    captured.clear()
                    output = call_model(model, batch)
                    value = loss(output, batch)
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        raise TypeError("loss_fn must return a scalar tensor")
                    flat = [(name, y) for name, ys in captured.items() for y in ys]
                    grads = torch.autograd.grad(value, [y for _, y in flat], allow_unused=True) if flat else []
                    for (name, _), grad in zip(flat, grads):
                        if grad is not None:
                            grad_energy[index_of[name], b] += float(grad.double().square().sum())
                    batch_counts[b] += 1
                if batch_counts[b] == 0:
                    raise ValueError(f"inputs gave no batches for sigma={sigma}")
    finally:
        for handle in handles:
            handle.remove()
        for name, module in layers.items():
            module.weight.requires_grad_(weights_requires_grad[name])
        captured.clear()

    counts = torch.tensor(batch_counts, dtype=torch.float64)
    grad_energy /= counts
    error_variance = error_sum / element_count.clamp(min=1).unsqueeze(1)
    return SensitivityReport(
        layers=names,
        gauges=gauges,
        sigmas=[float(s) for s in sigma_list],
        grad_energy=grad_energy,
        error_variance=error_variance,
        sensitivity=grad_energy.unsqueeze(1) * error_variance,
        macs=macs,
        num_batches=batch_counts,
        metadata={"loss": "output_probe" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__),
                  "fp8_scaling": fp8_scaling},
    )
