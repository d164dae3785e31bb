"""Compute kernels shared by the models: the selective scan of Chronos-V (mamba-ssm compatible).

Nothing here imports mamba-ssm at module load: its CUDA kernel is resolved lazily, on first use.
"""

from .selective_scan import has_mamba_kernel, selective_scan, selective_scan_reference, selective_scan_torch


__all__ = ["has_mamba_kernel", "selective_scan", "selective_scan_reference", "selective_scan_torch"]
