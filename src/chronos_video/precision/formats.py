"""Number formats of the precision gauges: exact quantize-dequantize grids and scaled quantizers.

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

The grid functions compute in plain fp32 arithmetic (``frexp`` + ``round``), independent of
torch's float8 dtypes, so the same code runs on every device and is tested bit for bit against
torch's own casts and torchao's NVFP4 reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
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
