"""The precision controller: which layers a gauge may touch, and :class:`PrecisionController`, which
swaps pre-quantized weight banks into a model so a sampler can change gauge every step.

The number formats live in :mod:`.formats`, the native matmul paths in :mod:`.native`.

Two backends run a gauge:

* ``"emulate"``: weights *and* activations are quantize-dequantized onto the exact grid of
  the format and the matmul runs in the model's dtype. Works on any device; it measures the
  numerical effect of a gauge, not its speed.
* ``"native"``: real low-precision matmuls (``torch._scaled_mm`` for FP8 on CUDA compute
  capability >= 8.9, torchao's ``NVFP4Tensor`` on >= 10.0, plain bf16/fp16 matmuls anywhere).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import FULL_PRECISION, _check_fp8_scaling, get_gauge, nvfp4_tensor_scale, quantize_activation, quantize_weight
from .native import check_native_support, fp8_codes, fp8_linear_native

BACKENDS = ("emulate", "native")


# --------------------------------------------------------------------------------------------
# Which layers a gauge may touch
# --------------------------------------------------------------------------------------------

# Name fragments (regular expressions, case-insensitive, searched in the full dotted module
# name) that keep a layer in full precision. The timestep/conditioning path sets the
# modulation of every block, so its error is broadcast everywhere; norms and embeddings are
# cheap and outlier-heavy; the first (patch embedding) and last (output projection) layers
# map between pixels/latents and features and are the classic layers PTQ keeps high.
DEFAULT_EXCLUDE_PATTERNS: tuple[str, ...] = (
    "time",  # timestep embedders (time_embed, timestep_embedder, time_proj)
    "adaln",
    "ada_ln",
    "modulation",  # AdaLN(-Zero) modulation MLPs driven by the conditioning vector
    "norm",
    "embed",  # patch/position/text/timestep embedders
    "caption",
    "condition",
    "proj_out",
    "final_layer",
    "lm_head",
    "halt",  # HRM halting head: a tiny layer whose decision gates all computation
    "skip_scale",  # InputSkip: a conditioning-driven scale of the whole input
)


def default_exclude_types() -> tuple[type, ...]:
    """Module types whose whole subtree stays in full precision (torch's and diffusers' norms/embeddings)."""
    types: list[type] = [
        nn.Embedding,
        nn.EmbeddingBag,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    ]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    try:
        from diffusers.models import embeddings as diffusers_embeddings
        from diffusers.models import normalization as diffusers_norms

        names = ("TimestepEmbedding", "Timesteps", "AdaLayerNorm", "AdaLayerNormZero", "AdaLayerNormSingle",
                 "AdaLayerNormContinuous", "AdaGroupNorm", "RMSNorm", "LayerNorm")
        for module in (diffusers_embeddings, diffusers_norms):
            types.extend(getattr(module, name) for name in names if isinstance(getattr(module, name, None), type))
    except Exception:  # diffusers is a dependency, but the grids must not need it
        pass
    return tuple(dict.fromkeys(types))


ExcludeSpec = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


def select_layers(
    model: nn.Module,
    exclude: ExcludeSpec = None,
    exclude_types: Optional[Sequence[type]] = None,
    include_conv: bool = False,
) -> dict[str, nn.Module]:
    """Returns {name: module} of the nn.Linear (and optionally Conv1d/2d/3d) layers a gauge may quantize.

    Args:
        exclude: ``None`` uses :data:`DEFAULT_EXCLUDE_PATTERNS` plus the model's diffusers
            ``_skip_layerwise_casting_patterns``; a sequence of regular expressions replaces
            those patterns (``()`` excludes nothing by name); a callable ``(name, module) ->
            bool`` decides alone (types are still applied).
        exclude_types: module types whose subtree is skipped; ``None`` = :func:`default_exclude_types`.
        include_conv: also quantize convolutions (emulate backend).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kinds: tuple[type, ...] = (nn.Linear,) + ((nn.Conv1d, nn.Conv2d, nn.Conv3d) if include_conv else ())
    types = default_exclude_types() if exclude_types is None else tuple(exclude_types)
    if not all(isinstance(t, type) for t in types):
        raise TypeError("exclude_types must be a sequence of classes")

    if callable(exclude):
        is_excluded_name = exclude
    else:
        if exclude is None:
            patterns = list(DEFAULT_EXCLUDE_PATTERNS) + list(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
        elif isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise TypeError("exclude must be None, a sequence of regex strings, or a callable (name, module) -> bool")
        else:
            patterns = list(exclude)
        compiled = [re.compile(p, re.IGNORECASE) for p in patterns]

        def is_excluded_name(name: str, module: nn.Module) -> bool:
            return any(p.search(name) for p in compiled)

    excluded_prefixes = [name for name, module in model.named_modules() if types and isinstance(module, types)]
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or not name:
            continue
        if any(name == p or name.startswith(p + ".") or p == "" for p in excluded_prefixes):
            continue
        if is_excluded_name(name, module):
            continue
        layers[name] = module
    return layers


def _reduction_size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight[0].numel()


# --------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------


class PrecisionController:
    """Runs a model's eligible layers in a chosen gauge by swapping pre-quantized weight banks.

    Weights are quantized ONCE, at construction, into one bank per gauge; :meth:`set_gauge`
    only repoints ``weight.data`` at a bank tensor (microseconds per layer), so a sampler can
    change gauge every step without re-quantizing. In the ``emulate`` backend a forward
    pre-hook also quantize-dequantizes each layer's input while its gauge is low precision.
    :meth:`restore` points every weight back at its original tensor, bit for bit.

    Embeddings, norms and the timestep/conditioning path stay in full precision (see
    :func:`select_layers` and :data:`DEFAULT_EXCLUDE_PATTERNS`); biases are never quantized.
    Intended for inference: build it after moving the model to its device and dtype.

    Example::

        controller = PrecisionController(transformer, gauges=("bf16", "fp8", "nvfp4"))
        controller.set_gauge("fp8", overrides={"blocks.0.attn.to_q": "bf16"})
        ...
        controller.restore()          # or: with controller.use("fp8"): ...
    """

    def __init__(
        self,
        model: nn.Module,
        gauges: Sequence[str] = ("bf16", "fp8"),
        backend: str = "emulate",
        exclude: ExcludeSpec = None,
        exclude_types: Optional[Sequence[type]] = None,
        include_conv: bool = False,
        fp8_scaling: str = "row",
        quantize_activations: bool = True,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(gauges, str) or not isinstance(gauges, Sequence):
            raise TypeError(f"gauges must be a sequence of gauge names, got {gauges!r}")
        for gauge in gauges:
            get_gauge(gauge)
        _check_fp8_scaling(fp8_scaling)
        if backend == "native" and include_conv:
            raise ValueError("include_conv=True is only supported by backend='emulate' (no native FP8/FP4 convolutions)")

        self.model = model
        self.backend = backend
        self.fp8_scaling = fp8_scaling
        self.quantize_activations = quantize_activations
        self.gauges: tuple[str, ...] = tuple(dict.fromkeys([FULL_PRECISION, *gauges]))
        self.layers = select_layers(model, exclude=exclude, exclude_types=exclude_types, include_conv=include_conv)
        self.skipped_layers: dict[str, str] = {}
        owners: dict[int, str] = {}
        for name in list(self.layers):  # a tied weight can only be swapped once: keep its first user
            first = owners.setdefault(id(self.layers[name].weight), name)
            if first != name:
                self.skipped_layers[name] = f"shares its weight with {first!r} (follows that layer's weight bank, inputs unquantized)"
                del self.layers[name]
        if backend == "native":
            for gauge in self.gauges:
                check_native_support(gauge, self._model_device())
            self._drop_layers_unfit_for_native()
            if "fp8" in self.gauges:
                self._probe_native_fp8()

        self._originals: dict[str, torch.Tensor] = {name: m.weight.data for name, m in self.layers.items()}
        self._banks: dict[str, dict[str, object]] = {FULL_PRECISION: dict(self._originals)}
        self.num_quantized_tensors = 0
        with torch.no_grad():
            for gauge in self.gauges:
                if gauge != FULL_PRECISION:
                    self._banks[gauge] = {name: self._build_bank_entry(name, gauge) for name in self.layers}

        self._active: dict[str, str] = {name: FULL_PRECISION for name in self.layers}
        self._current: Optional[tuple[str, tuple[tuple[str, str], ...]]] = (FULL_PRECISION, ())
        self._hooks = []
        for name, module in self.layers.items():
            if backend == "emulate":
                self._hooks.append(module.register_forward_pre_hook(self._make_activation_hook(name, module)))
            else:
                module.forward = self._make_native_forward(name, module)
        self._closed = False

    # -- construction helpers --------------------------------------------------------------

    def _model_device(self) -> torch.device:
        for module in self.layers.values():
            return module.weight.device
        return torch.device("cpu")

    def _drop_layers_unfit_for_native(self) -> None:
        if not any(g in ("fp8", "nvfp4") for g in self.gauges):
            return
        for name in list(self.layers):
            module = self.layers[name]
            if module.in_features % 16 or module.out_features % 16:
                self.skipped_layers[name] = "native fp8/nvfp4 matmuls need in/out features divisible by 16"
                del self.layers[name]

    def _probe_native_fp8(self) -> None:
        """One tiny matmul, so an unsupported scaling mode fails here and not mid-sampling."""
        device = self._model_device()
        probe = torch.randn(16, 16, device=device)
        try:
            codes, scale = fp8_codes(probe, self.fp8_scaling)
            fp8_linear_native(probe, codes, scale, None, self.fp8_scaling)
        except Exception as error:
            raise RuntimeError(
                f"torch._scaled_mm with fp8_scaling={self.fp8_scaling!r} failed on {torch.cuda.get_device_name(device)} "
                f"(row-wise scaling needs a recent torch and, on older releases, compute capability >= 9.0); "
                f"try fp8_scaling='tensor'. Original error: {error}"
            ) from error

    def _build_bank_entry(self, name: str, gauge: str) -> object:
        weight = self._originals[name]
        self.num_quantized_tensors += 1
        if self.backend == "emulate":
            return quantize_weight(weight, gauge, self.fp8_scaling).contiguous()
        if gauge in ("bf16", "fp16"):
            return weight.to(torch.bfloat16 if gauge == "bf16" else torch.float16)
        if gauge == "fp8":
            return fp8_codes(weight, self.fp8_scaling)
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, QuantizeTensorToNVFP4Kwargs

        weight_bf16 = weight.to(torch.bfloat16).contiguous()
        return NVFP4Tensor.to_nvfp4(
            weight_bf16,
            per_tensor_scale=nvfp4_tensor_scale(weight_bf16),
            is_swizzled_scales=True,
            act_quant_kwargs=QuantizeTensorToNVFP4Kwargs(is_swizzled_scales=True, use_dynamic_per_tensor_scale=True),
        )

    def _make_activation_hook(self, name: str, module: nn.Module):
        channel_dim = -1 if isinstance(module, nn.Linear) else 1

        def hook(_module: nn.Module, args: tuple):
            gauge = self._active[name]
            if gauge == FULL_PRECISION or not self.quantize_activations or not args:
                return None
            return (quantize_activation(args[0], gauge, self.fp8_scaling, channel_dim), *args[1:])

        return hook

    def _make_native_forward(self, name: str, module: nn.Linear):
        default_forward = type(module).forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            gauge = self._active[name]
            if gauge == FULL_PRECISION:
                return default_forward(x)
            entry = self._banks[gauge][name]
            if gauge in ("bf16", "fp16"):
                bias = module.bias.to(entry.dtype) if module.bias is not None else None
                return F.linear(x.to(entry.dtype), entry, bias).to(x.dtype)
            if gauge == "fp8":
                codes, scale = entry
                return fp8_linear_native(x, codes, scale, module.bias, self.fp8_scaling)
            bias = module.bias.to(torch.bfloat16) if module.bias is not None else None
            return F.linear(x.to(torch.bfloat16).contiguous(), entry, bias).to(x.dtype)

        return forward

    # -- public API -------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def current_gauge(self) -> Optional[str]:
        """The gauge of the last :meth:`set_gauge` call (overrides not included)."""
        return self._current[0] if self._current else None

    @property
    def layer_gauges(self) -> dict[str, str]:
        """The gauge each controlled layer runs in right now."""
        return dict(self._active)

    def bank(self, gauge: str) -> dict[str, object]:
        """The pre-quantized weights of `gauge` (emulate: tensors in the model dtype)."""
        self._check_available(gauge)
        return dict(self._banks[gauge])

    def _check_available(self, gauge: str) -> None:
        get_gauge(gauge)
        if gauge not in self._banks:
            raise ValueError(
                f"gauge {gauge!r} has no weight bank; this controller was built with gauges={self.gauges}. "
                "Pass every gauge a schedule uses at construction (e.g. gauges=schedule.gauges())"
            )

    def _resolve_overrides(self, overrides: Optional[Mapping[str, str]]) -> dict[str, str]:
        if not overrides:
            return {}
        if not isinstance(overrides, Mapping):
            raise TypeError(f"overrides must be a mapping layer name -> gauge, got {type(overrides).__name__}")
        resolved: dict[str, str] = {}
        for key, gauge in overrides.items():
            self._check_available(gauge)
            if key in self.layers:
                resolved[key] = gauge
                continue
            matches = [name for name in self.layers if fnmatch.fnmatchcase(name, key)] if any(c in key for c in "*?[") else []
            if not matches:
                hint = " (it is excluded from quantization)" if key in dict(self.model.named_modules()) else ""
                raise ValueError(f"override {key!r} matches no controlled layer{hint}")
            for name in matches:
                resolved[name] = gauge
        return resolved

    def set_gauge(self, gauge: str, overrides: Optional[Mapping[str, str]] = None) -> None:
        """Runs every controlled layer in `gauge`, except the layers named in `overrides`
        (exact names or fnmatch patterns -> gauge). Only repoints weights; never re-quantizes."""
        if self._closed:
            raise RuntimeError("this PrecisionController was removed; build a new one")
        self._check_available(gauge)
        resolved = self._resolve_overrides(overrides)
        key = (gauge, tuple(sorted(resolved.items())))
        if key == self._current:
            return
        for name, module in self.layers.items():
            target = resolved.get(name, gauge)
            self._swap(name, module, target)
        self._current = key

    def _swap(self, name: str, module: nn.Module, gauge: str) -> None:
        previous = self._active[name]
        if self.backend == "emulate":
            expected = self._banks[previous][name]
            if module.weight.data_ptr() != expected.data_ptr():
                raise RuntimeError(
                    f"the weight of {name!r} was replaced outside the controller (e.g. .to() or load_state_dict "
                    "after construction); call restore() before such changes and rebuild the controller"
                )
            module.weight.data = self._banks[gauge][name]
        self._active[name] = gauge

    def restore(self) -> None:
        """Points every weight back at its original tensor and stops activation quantization."""
        if self._closed:
            return
        self.set_gauge(FULL_PRECISION)

    @contextlib.contextmanager
    def use(self, gauge: str, overrides: Optional[Mapping[str, str]] = None) -> Iterator["PrecisionController"]:
        """Context manager: runs in `gauge`, then returns to the previous gauge."""
        previous = self._current
        self.set_gauge(gauge, overrides)
        try:
            yield self
        finally:
            if previous is not None:
                self.set_gauge(previous[0], dict(previous[1]))

    def apply_schedule(self, schedule, sigma: float, entropy: Optional[float] = None):
        """Selects the gauge of `schedule` (a :class:`PrecisionSchedule`) at `sigma` and applies it."""
        decision = schedule.select(sigma, entropy)
        self.set_gauge(decision.gauge, decision.layer_gauges or None)
        return decision

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by each gauge's bank (the full-precision bank is the model's own weights)."""
        sizes = {}
        for gauge, bank in self._banks.items():
            total = 0
            for entry in bank.values():
                tensors = entry if isinstance(entry, tuple) else (entry,)
                for tensor in tensors:
                    total += tensor.numel() * tensor.element_size()
            sizes[gauge] = total
        return sizes

    def remove(self) -> None:
        """Restores full precision, removes hooks/forward overrides and frees the banks."""
        if self._closed:
            return
        self.restore()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self.backend == "native":
            for module in self.layers.values():
                module.__dict__.pop("forward", None)
        self._banks = {FULL_PRECISION: self._banks[FULL_PRECISION]}
        self._closed = True

    def __enter__(self) -> "PrecisionController":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, gauges={self.gauges}, layers={len(self.layers)}, "
            f"current={self.current_gauge!r})"
        )
