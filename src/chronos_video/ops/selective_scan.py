"""Selective scan with mamba-ssm's `selective_scan_fn` signature and semantics, on any device.

Two paths behind one function, the way transformers' Mamba resolves its ops: mamba-ssm's CUDA kernel
when it is importable and the tensors live on a GPU, otherwise a pure-PyTorch scan (`_scan_torch`) that
is exact for long sequences and memory-linear in L. mamba-ssm is imported lazily, once, inside
`except Exception`: importing it fails on machines without its CUDA extension, and `import
chronos_video` must work everywhere.

Shapes (mamba-ssm convention): u, delta (batch, D, L); A (D, N) real or complex; B, C constant (D, N) or
variable (batch, N, L) / (batch, G, N, L). For complex A, variable B/C are real tensors with time
doubled, (batch, [G,] N, 2L), holding interleaved (re, im) pairs (`torch.view_as_real(Bc).flatten(-2)`);
complex tensors (batch, [G,] N, L) are accepted too. With complex A the output is 2 Re(sum_n C h)
(conjugate-pair convention of S4D).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._common import accumulation_dtype, check_one_device, check_tensor, complex_dtype_for, optional_kernel
from ._scan_torch import chunked_scan, sequential_scan


__all__ = ["selective_scan", "selective_scan_torch", "selective_scan_reference", "has_mamba_kernel"]

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

_KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_MAX_STATE = 256


def _mamba_selective_scan_fn() -> Optional[Callable]:
    """mamba-ssm's CUDA `selective_scan_fn`, or None (resolved once)."""
    return optional_kernel("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


def has_mamba_kernel() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel can be imported (checked once, lazily)."""
    return _mamba_selective_scan_fn() is not None


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _check_state_matrix(name: str, x: torch.Tensor, A: torch.Tensor, batch: int, dim: int, length: int) -> bool:
    """Validates B or C; returns True when it is variable (time-dependent)."""
    check_tensor(name, x, allow_complex=True)
    n_state = A.shape[1]
    if x.is_complex() and not A.is_complex():
        raise TypeError(f"`{name}` is complex but `A` is real; complex B/C need a complex `A`.")
    if x.dim() == 2:
        if tuple(x.shape) != (dim, n_state):
            raise ValueError(f"constant `{name}` must have shape (D, N) = {(dim, n_state)}, got {tuple(x.shape)}.")
        return False
    if x.dim() not in (3, 4):
        raise ValueError(
            f"`{name}` must be (D, N), (batch, N, L) or (batch, G, N, L), got a {x.dim()}-D tensor {tuple(x.shape)}."
        )
    groups = 1 if x.dim() == 3 else x.shape[1]
    time = 2 * length if (A.is_complex() and not x.is_complex()) else length
    expected = (batch, n_state, time) if x.dim() == 3 else (batch, groups, n_state, time)
    if tuple(x.shape) != expected:
        hint = " (complex A: real B/C interleave re/im along time, so the last dim is 2L)" if time != length else ""
        raise ValueError(f"variable `{name}` must have shape {expected}{hint}, got {tuple(x.shape)}.")
    if groups < 1 or dim % groups != 0:
        raise ValueError(f"`{name}` has {groups} groups, which must divide D = {dim}.")
    return True


def _validate(u, delta, A, B, C, D, z, delta_bias) -> None:
    check_tensor("u", u)
    if u.dim() != 3:
        raise ValueError(f"`u` must have shape (batch, D, L), got {tuple(u.shape)}.")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError("`u` must have a sequence length L >= 1.")
    check_tensor("delta", delta)
    if delta.shape != u.shape:
        raise ValueError(f"`delta` must have the shape of `u` {tuple(u.shape)}, got {tuple(delta.shape)}.")
    check_tensor("A", A, allow_complex=True)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"`A` must have shape (D, N) with D = {dim}, got {tuple(A.shape)}.")
    _check_state_matrix("B", B, A, batch, dim, length)
    _check_state_matrix("C", C, A, batch, dim, length)
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None:
            check_tensor(name, vec)
            if tuple(vec.shape) != (dim,):
                raise ValueError(f"`{name}` must have shape (D,) = ({dim},), got {tuple(vec.shape)}.")
    if z is not None:
        check_tensor("z", z)
        if z.shape != u.shape:
            raise ValueError(f"`z` must have the shape of `u` {tuple(u.shape)}, got {tuple(z.shape)}.")
    check_one_device(u, delta, A, B, C, D, z, delta_bias)


# ----------------------------------------------------------------------------------------------------
# Pure-PyTorch path
# ----------------------------------------------------------------------------------------------------


def _as_scan_matrix(x: torch.Tensor, A: torch.Tensor, real_dtype: torch.dtype) -> torch.Tensor:
    """B/C -> constant (D, N) or variable (batch, G, N, L), in A's (real or complex) compute dtype."""
    complex_dtype = complex_dtype_for(real_dtype)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if not A.is_complex():
        return x.to(real_dtype)
    if x.dim() == 4 and not x.is_complex():
        # Real (batch, G, N, 2L) with interleaved (re, im) pairs along time.
        return torch.view_as_complex(x.to(real_dtype).unflatten(-1, (-1, 2)).contiguous())
    return x.to(complex_dtype)


def _scan(
    core: Callable,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    return_last_state: bool,
) -> ScanOutput:
    """Shared wrapper around a scan core (inputs already validated): dtype handling, delta bias and
    softplus, B/C layout, D skip and z gate, all as ordinary autograd ops on (batch, D, L) tensors."""
    real_dtype = accumulation_dtype(u, delta, A, B, C)
    complex_dtype = complex_dtype_for(real_dtype)
    dtype_in = u.dtype
    u_c = u.to(real_dtype)
    delta_c = delta.to(real_dtype)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(real_dtype).unsqueeze(-1)
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    A_c = A.to(complex_dtype if A.is_complex() else real_dtype)
    y, last_state = core(u_c, delta_c, A_c, _as_scan_matrix(B, A, real_dtype), _as_scan_matrix(C, A, real_dtype))
    out = y if D is None else y + u_c * D.to(real_dtype).unsqueeze(-1)
    if z is not None:
        out = out * F.silu(z.to(real_dtype))
    out = out.to(dtype_in)
    return (out, last_state) if return_last_state else out


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanOutput:
    """The pure-PyTorch path of `selective_scan` (any device): blocked, chunked, recomputing backward."""
    _validate(u, delta, A, B, C, D, z, delta_bias)
    return _scan(chunked_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanOutput:
    """Plain sequential loop with ordinary autograd, as mamba-ssm's `selective_scan_ref`: the test oracle.

    Memory grows as batch*D*N*L for both the forward and the autograd graph; use it in float64 on small
    problems to check the fast paths.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    return _scan(sequential_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ----------------------------------------------------------------------------------------------------
# Kernel path
# ----------------------------------------------------------------------------------------------------


def _kernel_supports(u, delta, A, B, C, z) -> bool:
    if not (u.is_cuda and has_mamba_kernel()):
        return False
    if u.dtype not in _KERNEL_INPUT_DTYPES or delta.dtype not in _KERNEL_INPUT_DTYPES:
        return False
    if A.dtype not in (torch.float32, torch.complex64) or A.shape[1] > _KERNEL_MAX_STATE:
        return False
    if z is not None and z.dtype not in _KERNEL_INPUT_DTYPES:
        return False
    return all(x.dtype in _KERNEL_INPUT_DTYPES + (torch.complex64,) for x in (B, C))


def _kernel_matrix(x: torch.Tensor, A: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """B/C in the layout and dtype the CUDA kernel expects: constant in A's dtype, variable in u's dtype."""
    if x.dim() == 2:
        return x.to(A.dtype).contiguous()
    if x.is_complex():  # convenience form (batch, [G,] N, L) complex -> interleaved real (.., 2L)
        x = torch.view_as_real(x).flatten(-2)
    return x.to(input_dtype).contiguous()


def _selective_scan_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) -> ScanOutput:
    selective_scan_fn = _mamba_selective_scan_fn()
    delta = delta.to(u.dtype)
    if z is not None:
        z = z.to(u.dtype)
    return selective_scan_fn(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        _kernel_matrix(B, A, u.dtype),
        _kernel_matrix(C, A, u.dtype),
        None if D is None else D.float(),
        z,
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
        return_last_state,
    )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanOutput:
    """Selective scan `h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`, `y_t = C_t h_t`, as mamba-ssm's
    `selective_scan_fn`: out = (y + D u) * silu(z) in u's dtype, plus the last state (batch, D, N) when
    `return_last_state`. Runs mamba-ssm's CUDA kernel for GPU tensors when it is installed, else the
    pure-PyTorch chunked scan.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    if _kernel_supports(u, delta, A, B, C, z):
        return _selective_scan_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return _scan(chunked_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
