"""Pieces every scan op in `chronos_video.ops` needs: the lazy lookup of an optional mamba-ssm kernel,
argument checks that name the argument, and the dtype rules of the pure-PyTorch paths."""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=None)
def optional_kernel(module: str, name: str) -> Optional[Callable]:
    """`module.name` when it imports, else None; resolved once per name.

    Importing mamba-ssm can fail in many ways besides ImportError (no Triton, no CUDA driver, an ABI
    mismatch of its extension), and `import chronos_video` must work everywhere, so any exception means
    "no kernel" and the caller falls back to its PyTorch path.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def check_tensor(name: str, x, allow_complex: bool = False) -> None:
    """A real (or, with `allow_complex`, complex) floating-point tensor, else an error naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.is_complex() and not allow_complex:
        raise TypeError(f"`{name}` must be a real floating-point tensor, got {x.dtype}.")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}.")


def check_one_device(*tensors: Optional[torch.Tensor]) -> None:
    """All given tensors (None skipped) on one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}.")


def accumulation_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is double precision, else float32 (half inputs are upcast, as in mamba-ssm)."""
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t is not None and t.dtype in wide for t in tensors) else torch.float32


def complex_dtype_for(real_dtype: torch.dtype) -> torch.dtype:
    """The complex dtype whose parts are `real_dtype` (float64 -> complex128, else complex64)."""
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64
