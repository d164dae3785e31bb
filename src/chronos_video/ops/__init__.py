"""Compute kernels shared by the models: Chronos-V's selective scan and SSD scans (mamba-ssm compatible).

Nothing here imports mamba-ssm at module load: its CUDA/Triton kernels are resolved lazily, on first use.
"""

from .selective_scan import has_mamba_kernel, selective_scan, selective_scan_reference, selective_scan_torch
from .ssd_scan import complex_ssd_scan, complex_ssd_scan_reference, has_mamba_ssd_kernel, ssd_scan, ssd_scan_reference


__all__ = [
    "complex_ssd_scan",
    "complex_ssd_scan_reference",
    "has_mamba_kernel",
    "has_mamba_ssd_kernel",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
    "ssd_scan",
    "ssd_scan_reference",
]
