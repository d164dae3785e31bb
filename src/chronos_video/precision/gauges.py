"""Precision gauges: exact quantize-dequantize grids, native low-precision matmuls, and the
controller that swaps pre-quantized weight banks into a model.

A *gauge* is the number format a layer computes in. Five are supported:

================  =====================================================================
``"fp32"``        full precision: the model's own weights and activations, untouched
``"bf16"``        bfloat16 (8 exponent bits, 7 mantissa bits), round-to-nearest-even
``"fp16"``        IEEE half (5 exponent bits, 10 mantissa bits), overflow to +-inf
``"fp8"``         E4M3 (``float8_e4m3fn``) with one fp32 scale per row (or per tensor),
                  saturating at +-448
``"nvfp4"``       NVFP4: E2M1 elements, one E4M3 scale per 16 consecutive elements and one
                  fp32 scale per tensor
================  =====================================================================

Two backends run them:

* ``"emulate"``: weights *and* activations are quantize-dequantized onto the exact grid of
  the format and the matmul runs in the model's dtype. Works on any device; it measures the
  numerical effect of a gauge, not its speed.
* ``"native"``: real low-precision matmuls (``torch._scaled_mm`` for FP8 on CUDA compute
  capability >= 8.9, torchao's ``NVFP4Tensor`` on >= 10.0, plain bf16/fp16 matmuls anywhere).

The grid functions compute in plain fp32 arithmetic (``frexp`` + ``round``), independent of
torch's float8 dtypes, so the same code runs on every device and is tested bit for bit against
torch's own casts and torchao's NVFP4 reference.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Number formats and element-level rounding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with `exponent_bits`/`mantissa_bits` and IEEE-style
    subnormals. `max_value` is the largest finite magnitude (E4M3 "fn" and E2M1 have no inf)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    exponent_bias: int
    max_value: float

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (subnormals share its quantum)."""
        return 1 - self.exponent_bias


E4M3 = FloatFormat("e4m3", exponent_bits=4, mantissa_bits=3, exponent_bias=7, max_value=448.0)
E2M1 = FloatFormat("e2m1", exponent_bits=2, mantissa_bits=1, exponent_bias=1, max_value=6.0)
BF16 = FloatFormat("bf16", exponent_bits=8, mantissa_bits=7, exponent_bias=127, max_value=float(torch.finfo(torch.bfloat16).max))
FP16 = FloatFormat("fp16", exponent_bits=5, mantissa_bits=10, exponent_bias=15, max_value=65504.0)

FP8_MAX = E4M3.max_value
FP4_MAX = E2M1.max_value
NVFP4_BLOCK_SIZE = 16
# Smallest normal E4M3 number: NVFP4 block scales are clamped to [2**-6, 448] (as in the
# NVIDIA/torchao reference) so a block scale is never subnormal.
NVFP4_MIN_BLOCK_SCALE = 2.0**-6


def _exact_pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**exponent built from its bit pattern (exact, including subnormal results)."""
    if dtype == torch.float64:
        mbits, bias, int_dtype = 52, 1023, torch.int64
    else:
        mbits, bias, int_dtype = 23, 127, torch.int32
    exponent = exponent.to(int_dtype)
    normal = (exponent + bias).clamp(min=1) << mbits
    subnormal = torch.ones_like(exponent) << (exponent + bias + mbits - 1).clamp(min=0, max=mbits - 1)
    return torch.where(exponent >= 1 - bias, normal, subnormal).view(dtype)


def round_to_format(x: torch.Tensor, fmt: FloatFormat, *, saturate: bool = True) -> torch.Tensor:
    """Rounds every element of `x` to the nearest value of `fmt` (ties to even).

    Out-of-range values clamp to +-`fmt.max_value` when `saturate` (the E4M3/E2M1 convention,
    also for +-inf) and become +-inf otherwise (IEEE half/bfloat16). NaN stays NaN and the
    sign of zero is kept. Returns fp32 (fp64 for fp64 input); every value is exactly
    representable in `fmt`.
    """
    work = x if x.dtype == torch.float64 else x.float()
    magnitude = work.abs()
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1)
    # Exponent of the leading bit, floored at the subnormal range where the quantum is fixed.
    leading = (exponent.to(torch.int64) - 1).clamp(min=fmt.min_exponent)
    quantum = _exact_pow2(leading - fmt.mantissa_bits, work.dtype)
    # Division and multiplication by a power of two are exact; torch.round is half-to-even.
    rounded = torch.round(magnitude / quantum) * quantum
    if saturate:
        rounded = rounded.clamp(max=fmt.max_value)
    else:
        rounded = torch.where(rounded > fmt.max_value, torch.full_like(rounded, float("inf")), rounded)
    return torch.copysign(rounded, work)


# --------------------------------------------------------------------------------------------
# Gauges and scaled quantization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gauge:
    """A precision gauge: `bits` is the nominal element width (used as the cost model)."""

    name: str
    bits: float
    description: str


GAUGES: dict[str, Gauge] = {
    "fp32": Gauge("fp32", 32, "full precision (the model's own weights and activations)"),
    "bf16": Gauge("bf16", 16, "bfloat16 grid"),
    "fp16": Gauge("fp16", 16, "IEEE half grid"),
    "fp8": Gauge("fp8", 8, "E4M3 with fp32 per-row (or per-tensor) scales"),
    "nvfp4": Gauge("nvfp4", 4, "E2M1 with an E4M3 scale per 16 elements and an fp32 tensor scale"),
}
FULL_PRECISION = "fp32"
FP8_SCALINGS = ("row", "tensor")
BACKENDS = ("emulate", "native")


def get_gauge(name: str) -> Gauge:
    """Looks a gauge up by name, with a clear error listing the valid names."""
    if not isinstance(name, str):
        raise TypeError(f"gauge must be a string, one of {sorted(GAUGES)}; got {type(name).__name__}")
    if name not in GAUGES:
        raise ValueError(f"unknown gauge {name!r}; expected one of {sorted(GAUGES)}")
    return GAUGES[name]


def _check_fp8_scaling(fp8_scaling: str) -> None:
    if fp8_scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8_scaling must be one of {FP8_SCALINGS}, got {fp8_scaling!r}")


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN/inf replaced by 0, so a stray non-finite value cannot poison a scale."""
    magnitude = x.abs()
    return torch.where(torch.isfinite(magnitude), magnitude, torch.zeros_like(magnitude))


def fp8_scale(x: torch.Tensor, fp8_scaling: str = "row") -> torch.Tensor:
    """fp32 dequantization scale amax/448, per row (last dim, keepdim) or per tensor (0-dim).

    All-zero rows get scale 1 so that they stay exactly zero.
    """
    _check_fp8_scaling(fp8_scaling)
    magnitude = _finite_abs(x.float())
    if fp8_scaling == "row" and x.dim() > 0:
        amax = magnitude.amax(dim=-1, keepdim=True)
    else:
        amax = magnitude.amax()
    scale = amax / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, fp8_scaling: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes to E4M3: returns (element values on the E4M3 grid as fp32, fp32 scale)."""
    scale = fp8_scale(x, fp8_scaling)
    return round_to_format(x.float() / scale, E4M3, saturate=True), scale


@dataclass
class NVFP4Parts:
    """The three levels of an NVFP4 tensor, all as fp32 values.

    `elements` (..., num_blocks, 16) are E2M1 values, `block_scales` (..., num_blocks) are E4M3
    values, `tensor_scale` is a 0-dim fp32 tensor. The value of element i of a block is
    ``elements[i] * (tensor_scale * block_scale)``.
    """

    elements: torch.Tensor
    block_scales: torch.Tensor
    tensor_scale: torch.Tensor
    shape: torch.Size

    def dequantize(self) -> torch.Tensor:
        combined = self.tensor_scale * self.block_scales
        values = (self.elements * combined.unsqueeze(-1)).flatten(-2)
        return values[..., : self.shape[-1]].reshape(self.shape)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp32 scale amax / (448 * 6): lets the largest block scale use the whole E4M3 range."""
    scale = _finite_abs(x.float()).amax() / (FP8_MAX * FP4_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_nvfp4(x: torch.Tensor, tensor_scale: Optional[Union[torch.Tensor, float]] = None) -> NVFP4Parts:
    """Quantizes to NVFP4 along the last dimension (zero-padded to a multiple of 16).

    The operation order (block amax / 6, divided by the tensor scale, clamped to [2**-6, 448],
    rounded to E4M3; elements multiplied by the reciprocal of the combined scale, clamped to
    +-6, rounded to E2M1) follows the NVIDIA reference recipe, so results match torchao's
    ``NVFP4Tensor`` bit for bit. `tensor_scale` defaults to :func:`nvfp4_tensor_scale`; pass a
    calibrated one to reuse a fixed activation scale.
    """
    shape = x.shape if x.dim() > 0 else torch.Size([1])
    work = x.float().reshape(shape)
    pad = (-shape[-1]) % NVFP4_BLOCK_SIZE
    if pad:
        work = F.pad(work, (0, pad))
    blocks = work.reshape(*shape[:-1], -1, NVFP4_BLOCK_SIZE)
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(x)
    else:  # user-provided (e.g. calibrated): validate once here, never on the hot path
        tensor_scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
        if not bool(torch.isfinite(tensor_scale)) or float(tensor_scale) <= 0:
            raise ValueError(f"tensor_scale must be a positive finite number, got {float(tensor_scale)}")

    block_scale = _finite_abs(blocks).amax(dim=-1) / FP4_MAX
    block_scale = (block_scale / tensor_scale).clamp(min=NVFP4_MIN_BLOCK_SCALE, max=FP8_MAX)
    block_scale = round_to_format(block_scale, E4M3, saturate=True)
    reciprocal = (1.0 / tensor_scale) / block_scale
    scaled = (blocks * reciprocal.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)
    elements = round_to_format(scaled, E2M1, saturate=True)
    return NVFP4Parts(elements, block_scale, tensor_scale, x.shape)


def quantize_dequantize(
    x: torch.Tensor,
    gauge: str,
    *,
    fp8_scaling: str = "row",
    nvfp4_tensor_scale: Optional[Union[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """Projects `x` onto the grid of `gauge` (the ``emulate`` backend) and returns it in x's dtype.

    Scales are computed from `x` itself: per row = along the last dimension (one scale per
    output channel for an (out, in) weight, one per token for activations). The result is
    computed in fp32 and cast back to x's dtype, which for a bf16/fp16 `x` rounds once more.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    get_gauge(gauge)
    if gauge == "fp32":
        return x if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.float().to(x.dtype)
    if gauge == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if gauge == "fp16":
        return x.to(torch.float16).to(x.dtype)
    if gauge == "fp8":
        values, scale = quantize_fp8(x, fp8_scaling)
        return (values * scale).to(x.dtype)
    return quantize_nvfp4(x, nvfp4_tensor_scale).dequantize().to(x.dtype)


def quantize_weight(weight: torch.Tensor, gauge: str, fp8_scaling: str = "row") -> torch.Tensor:
    """Quantize-dequantizes a Linear (out, in) or Conv (out, in/groups, *kernel) weight.

    Scales run along the reduction dimension: a conv kernel is flattened to (out, in*k...) as
    in the implicit GEMM, so per-row means per output channel and NVFP4 blocks cover 16
    consecutive reduction elements.
    """
    flat = weight.reshape(weight.shape[0], -1) if weight.dim() > 2 else weight
    return quantize_dequantize(flat, gauge, fp8_scaling=fp8_scaling).reshape(weight.shape)


def quantize_activation(x: torch.Tensor, gauge: str, fp8_scaling: str = "row", channel_dim: int = -1) -> torch.Tensor:
    """Quantize-dequantizes a layer input whose reduction (channel) dimension is `channel_dim`.

    For a conv input (B, C, ...) pass ``channel_dim=1``: scales and NVFP4 blocks then run over
    channels at each position (an approximation of the im2col rows a GPU kernel would see).
    """
    if channel_dim in (-1, x.dim() - 1):
        return quantize_dequantize(x, gauge, fp8_scaling=fp8_scaling)
    moved = x.movedim(channel_dim, -1)
    return quantize_dequantize(moved, gauge, fp8_scaling=fp8_scaling).movedim(-1, channel_dim)


# --------------------------------------------------------------------------------------------
# Native backend
# --------------------------------------------------------------------------------------------

_NATIVE_REQUIREMENTS = {
    "fp8": ((8, 9), "a CUDA GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell) for torch._scaled_mm"),
    "nvfp4": ((10, 0), "a CUDA GPU with compute capability >= 10.0 (Blackwell) and torchao for NVFP4 tensor cores"),
}


def check_native_support(gauge: str, device: Optional[Union[str, torch.device]] = None) -> None:
    """Raises a RuntimeError naming the requirement when `gauge` cannot run natively on `device`.

    bf16/fp16/fp32 run natively everywhere; FP8 and NVFP4 need specific CUDA hardware.
    """
    get_gauge(gauge)
    if gauge not in _NATIVE_REQUIREMENTS:
        return
    min_capability, requirement = _NATIVE_REQUIREMENTS[gauge]
    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        where = "no CUDA device is available" if not torch.cuda.is_available() else f"the model is on {device}"
        raise RuntimeError(f"native {gauge} needs {requirement}, but {where}; use backend='emulate' instead")
    capability = torch.cuda.get_device_capability(device)
    if capability < min_capability:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"native {gauge} needs {requirement}; {name} has compute capability "
            f"{capability[0]}.{capability[1]}. Use backend='emulate' instead"
        )
    if gauge == "fp8" and not hasattr(torch, "_scaled_mm"):
        raise RuntimeError(f"native fp8 needs torch._scaled_mm (torch >= 2.4); found torch {torch.__version__}")
    if gauge == "nvfp4":
        try:
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor  # noqa: F401
        except Exception as error:  # torchao missing or built for another torch
            raise RuntimeError(f"native nvfp4 needs torchao with NVFP4Tensor (pip install torchao): {error}") from error


def fp8_codes(x: torch.Tensor, fp8_scaling: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Real ``float8_e4m3fn`` codes and fp32 scales of `x` (2D), in the layout torch._scaled_mm wants."""
    scale = fp8_scale(x, fp8_scaling)
    # Clamp first: the exact grid saturates, but a device cast of values above 448 may not.
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes.contiguous(), scale.float()


def fp8_linear_native(
    x: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fp8_scaling: str = "row",
) -> torch.Tensor:
    """y = x W^T + b with x quantized dynamically to FP8 and a real FP8 tensor-core matmul.

    `weight_codes` (out, in) float8_e4m3fn and `weight_scale` (out, 1) or 0-dim come from
    :func:`fp8_codes`. Accumulates in fp32 and returns bf16 (cast to x's dtype).
    """
    leading, in_features = x.shape[:-1], x.shape[-1]
    x_codes, x_scale = fp8_codes(x.reshape(-1, in_features), fp8_scaling)
    if fp8_scaling == "row":
        scale_a, scale_b = x_scale, weight_scale.reshape(1, -1)
    else:
        scale_a, scale_b = x_scale.reshape(()), weight_scale.reshape(())
    out = torch._scaled_mm(x_codes, weight_codes.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*leading, -1)


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
