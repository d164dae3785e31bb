"""Native low-precision matmuls: real FP8 (``torch._scaled_mm``) and the hardware checks for FP8/NVFP4.

The ``"native"`` backend of :class:`~chronos_video.precision.PrecisionController` runs through these; the
``"emulate"`` backend needs none of them (see :mod:`.formats`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .formats import FP8_MAX, fp8_scale, get_gauge


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
