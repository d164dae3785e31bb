"""State-space duality (SSD) scans: the chunked, matmul-based form of a scan whose decay is shared within a head.

When the decay `exp(dt_t A_h)` of a diagonal state is the same for every state of a head (Mamba-2), the
scan over a sequence equals a block computation made of matrix products (Dao & Gu, "Transformers are
SSMs", 2024): inside a chunk of `c` steps, `Y = (L * C B^T) X` with `L` the causal matrix of decays; across
chunks, a short recurrence carries one state per chunk. On CPUs and GPUs alike those products run on the
matmul units, in bf16 when asked, instead of the memory-bound elementwise recurrence of `selective_scan`.

Two public ops:

* `ssd_scan`: the real SSD with mamba-ssm's `mamba_chunk_scan_combined` signature and semantics. It runs
  that Triton kernel when mamba-ssm is importable and the tensors live on a GPU (resolved lazily, once),
  else a pure-PyTorch chunked scan differentiated by autograd.
* `complex_ssd_scan`: Chronos-V's complex diagonal state with a decay shared within a head and a rotation per
  state, `A[h, n] = A_h + i omega[h, n]`:

      h_t = exp(dt_t A_h) exp(i dt_t omega_n) h_{t-1} + dt_t B_t x_t,    y_t = 2 Re(sum_n C_tn h_tn) + D x_t

  (the output convention of the complex `selective_scan`). The rotation folds into B and C as a
  data-dependent rotary embedding: with the cumulative phase theta_t = sum_{s<=t} dt_s omega, the scan is a
  real SSD with 2N states on conj(B_s) e^{i theta_s} and 2 C_t e^{i theta_t} (as real (re, im) pairs). An
  optional positional phase (3D RoPE) adds to theta, so B and C are turned once for both.

Numerics: decays are accumulated in float32 (float64 for float64 inputs) whatever the matmul dtype. Within a
chunk only differences of chunk-local cumulative sums are exponentiated, masked to the causal triangle
before `exp` (nothing above the diagonal can overflow); across chunks the state is carried by products of
per-chunk decays, never by an exponentiated global cumulative sum. The cumulative phase is summed in float64
and wrapped to [-pi, pi) before cos/sin, so the angles stay exact at any length.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._common import accumulation_dtype, check_one_device, check_tensor, complex_dtype_for, optional_kernel


__all__ = ["complex_ssd_scan", "complex_ssd_scan_reference", "has_mamba_ssd_kernel", "ssd_scan", "ssd_scan_reference"]

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mamba_chunk_scan_fn() -> Optional[Callable]:
    """mamba-ssm's Triton `mamba_chunk_scan_combined`, or None (resolved once)."""
    return optional_kernel("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def has_mamba_ssd_kernel() -> bool:
    """True when mamba-ssm's chunked SSD kernel can be imported (checked once, lazily)."""
    return _mamba_chunk_scan_fn() is not None


# ----------------------------------------------------------------------------------------------------
# Validation (at the user boundary, naming the argument)
# ----------------------------------------------------------------------------------------------------


def _check_shape(name: str, x: Optional[torch.Tensor], shapes: tuple, allow_complex: bool = False) -> None:
    if x is None:
        return
    check_tensor(name, x, allow_complex)
    if tuple(x.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(x.shape)}.")


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, complex_bc: bool) -> int:
    """Checks the common arguments; returns the state size N (complex states for `complex_bc`)."""
    check_tensor("x", x)
    if x.dim() != 4 or x.shape[1] < 1:
        raise ValueError(f"`x` must have shape (batch, length >= 1, heads, head_dim), got {tuple(x.shape)}.")
    batch, length, heads, head_dim = x.shape
    _check_shape("dt", dt, ((batch, length, heads),))
    _check_shape("A", A, ((heads,),))
    for name, mat in (("B", B), ("C", C)):
        check_tensor(name, mat, allow_complex=complex_bc)
        if mat.dim() != 4 or tuple(mat.shape[:2]) != (batch, length):
            raise ValueError(f"`{name}` must have shape (batch, length, groups, state) = ({batch}, {length}, G, N), got {tuple(mat.shape)}.")
        if heads % mat.shape[2]:
            raise ValueError(f"`{name}` has {mat.shape[2]} groups, which must divide the {heads} heads.")
    if B.shape != C.shape or B.dtype.is_complex != C.dtype.is_complex:
        raise ValueError(f"`B` and `C` must have the same shape and kind, got {tuple(B.shape)} and {tuple(C.shape)}.")
    n_state = B.shape[3]
    if complex_bc and not B.is_complex():
        if n_state % 2:
            raise ValueError(f"real `B`/`C` hold interleaved (re, im) pairs, so their last dim must be even, got {n_state}.")
        n_state //= 2
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    _check_shape("D", D, ((heads,), (heads, head_dim)))
    _check_shape("z", z, (tuple(x.shape),))
    _check_shape("dt_bias", dt_bias, ((heads,),))
    _check_shape("initial_states", initial_states, ((batch, heads, head_dim, n_state),), allow_complex=complex_bc)
    if complex_bc and initial_states is not None and not initial_states.is_complex():
        raise TypeError(f"`initial_states` of a complex scan must be complex, got {initial_states.dtype}.")
    check_one_device(x, dt, A, B, C, D, z, dt_bias, initial_states)
    return n_state


def _dtypes(*tensors: Optional[torch.Tensor]) -> Tuple[torch.dtype, torch.dtype]:
    """(accumulation dtype, matmul dtype): float64 when any input is, else float32; matmuls in x's half dtype."""
    acc = accumulation_dtype(*tensors)
    return acc, (tensors[0].dtype if tensors[0].dtype in _HALF_DTYPES else acc)


def _prepare_dt(dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool, acc: torch.dtype) -> torch.Tensor:
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    return F.softplus(dt) if dt_softplus else dt


def _finish(y: torch.Tensor, x: torch.Tensor, D, z, out_dtype: torch.dtype) -> torch.Tensor:
    """y + D x, gated by silu(z), in x's dtype (mamba-ssm's output convention)."""
    if D is not None:
        skip = D.to(y.dtype)
        y = y + x.to(y.dtype) * (skip[:, None] if skip.dim() == 1 else skip)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# Pure-PyTorch chunked core (autograd differentiates it: every step is a matmul or an elementwise op)
# ----------------------------------------------------------------------------------------------------


def _chunks(t: torch.Tensor, chunk: int, padded: int) -> torch.Tensor:
    """(batch, L, ...) -> (batch, n_chunks, chunk, ...), zero padded at the end (dt = 0 steps are transparent)."""
    pad = padded - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.unflatten(1, (padded // chunk, chunk))


def _chunked_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_states: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real SSD on prepared inputs; returns (y without the D skip (batch, L, H, P) in `dt`'s dtype, final state).

    x, B, C are in the matmul dtype; dt (batch, L, H) and A (H,) in the accumulation dtype.
    """
    batch, length, heads, head_dim = x.shape
    groups, n_state = B.shape[2], B.shape[3]
    per_group = heads // groups
    acc, mm = dt.dtype, x.dtype
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    padded = n_chunks * chunk

    # Decays, chunk-local, in the accumulation dtype: (batch, H, n_chunks, chunk).
    log_decay = _chunks(dt * A, chunk, padded).permute(0, 3, 1, 2)
    cum = log_decay.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    segment = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, -math.inf)
    decay_in = torch.exp(segment)  # (b, H, nc, c, c): decay from step s to step t >= s
    decay_to_end = torch.exp(cum[..., -1:] - cum)  # from each step to the chunk's end
    decay_from_start = torch.exp(cum)  # from the chunk's start (state before its first step) to each step
    chunk_decay = decay_from_start[..., -1]  # (b, H, nc)

    # Inputs grouped by head group: (b, G, r, nc, c, P) and (b, G, 1, nc, c, N).
    xd = _chunks(x * dt.to(mm).unsqueeze(-1), chunk, padded)  # dt_s x_s
    xd = xd.unflatten(3, (groups, per_group)).permute(0, 3, 4, 1, 2, 5)
    Bc = _chunks(B, chunk, padded).permute(0, 3, 1, 2, 4).unsqueeze(2)
    Cc = _chunks(C, chunk, padded).permute(0, 3, 1, 2, 4).unsqueeze(2)
    grouped = (batch, groups, per_group, n_chunks, chunk)

    # Intra-chunk: Y = (L * C B^T) X, the scores shared by the heads of a group.
    scores = Cc @ Bc.transpose(-1, -2)  # (b, G, 1, nc, c, c)
    weights = (scores * decay_in.view(*grouped, chunk).to(mm)).to(mm)
    y = (weights @ xd).to(acc)

    # Chunk states: sum_s decay(s -> end) dt_s x_s B_s^T, (b, G, r, nc, P, N).
    states = (xd * decay_to_end.view(grouped).unsqueeze(-1).to(mm)).transpose(-1, -2) @ Bc
    states = states.to(acc).reshape(batch, heads, n_chunks, head_dim, n_state)

    # Across chunks: carry one state per chunk with products of chunk decays (a short sequential loop).
    carry = (initial_states.to(acc) if initial_states is not None
             else torch.zeros(batch, heads, head_dim, n_state, dtype=acc, device=x.device))
    starts = []
    # unbind, not indexing: the backward of k index ops would zero-fill k full-size gradients (quadratic).
    for decay_k, state_k in zip(chunk_decay.unbind(2), states.unbind(2)):
        starts.append(carry)
        carry = torch.addcmul(state_k, decay_k[..., None, None], carry)
    starts = torch.stack(starts, dim=2).view(*grouped[:4], head_dim, n_state)

    # Contribution of the carried state: decay(start -> t) C_t h_start.
    y_carry = (Cc @ starts.to(mm).transpose(-1, -2)).to(acc) * decay_from_start.view(grouped).unsqueeze(-1)
    y = (y + y_carry).permute(0, 3, 4, 1, 2, 5).reshape(batch, padded, heads, head_dim)[:, :length]
    return y, carry


# Working set per segment: one (batch, heads, tokens, chunk) float32 decay matrix. Whole-sequence tensors at
# 16k tokens (67 MB each for 4 scan orders x 8 heads) ran about twice as slow per element as cache-sized ones.
_SEGMENT_BYTES = 16 * 2**20


def _segments(length: int, batch: int, heads: int, chunk_size: int) -> list:
    """Token ranges (start, end), whole chunks each, scanned one after another with the state carried across."""
    chunk = min(chunk_size, length)
    most = max(1, _SEGMENT_BYTES // (batch * heads * chunk * chunk * 4)) * chunk
    count = -(-length // most)
    size = -(-length // (count * chunk)) * chunk  # balanced: no short tail segment
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _scan_segments(length: int, batch: int, heads: int, chunk_size: int, scan_segment, initial_states):
    """Runs `scan_segment(start, end, state) -> (y, state)` over `_segments`; returns (y, final state)."""
    outputs, state = [], initial_states
    for start, end in _segments(length, batch, heads, chunk_size):
        y, state = scan_segment(start, end, state)
        outputs.append(y)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), state


def _ssd_torch(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states) -> ScanOutput:
    acc, mm = _dtypes(x, dt, A, B, C)
    dt_c = _prepare_dt(dt, dt_bias, dt_softplus, acc)
    x_mm, A_acc, B_mm, C_mm = x.to(mm), A.to(acc), B.to(mm), C.to(mm)

    def scan_segment(start, end, state):
        part = slice(start, end)
        return _chunked_ssd(x_mm[:, part], dt_c[:, part], A_acc, B_mm[:, part], C_mm[:, part], chunk_size, state)

    y, final = _scan_segments(x.shape[1], x.shape[0], x.shape[2], chunk_size, scan_segment, initial_states)
    out = _finish(y, x, D, z, x.dtype)
    return (out, final) if return_final_states else out


def _kernel_supports(x, dt, A, B, C, initial_states) -> bool:
    if not (x.is_cuda and has_mamba_ssd_kernel()):
        return False
    return all(t is None or t.dtype in _KERNEL_DTYPES for t in (x, dt, A, B, C, initial_states))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
) -> ScanOutput:
    """Real SSD `h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t x_t^T`, `y_t = C_t h_t + D x_t`, gated by silu(z).

    The signature and semantics of mamba-ssm's `mamba_chunk_scan_combined`: x (batch, L, heads, head_dim),
    dt (batch, L, heads), A (heads,), B and C (batch, L, groups, N) shared by heads/groups heads each, D
    (heads,) or (heads, head_dim), z like x, initial and final states (batch, heads, head_dim, N). Output in
    x's dtype; half-precision inputs run the matmuls in that dtype and the decays in float32. Runs the
    mamba-ssm kernel for GPU tensors when it is installed, else the PyTorch chunked scan.
    """
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, complex_bc=False)
    if _kernel_supports(x, dt, A, B, C, initial_states):
        return _mamba_chunk_scan_fn()(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, return_final_states=return_final_states,
        )
    return _ssd_torch(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, return_final_states)


# ----------------------------------------------------------------------------------------------------
# Complex state: the rotation folded into B and C
# ----------------------------------------------------------------------------------------------------


def _complex_parts(M: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(re, im) of complex (.., N) or of real interleaved pairs (.., 2N), in `dtype`."""
    if M.is_complex():
        return M.real.to(dtype), M.imag.to(dtype)
    pairs = M.to(dtype).unflatten(-1, (-1, 2))
    return pairs[..., 0], pairs[..., 1]


def _pairs(M: torch.Tensor) -> torch.Tensor:
    """Complex (.., N) -> real interleaved (re, im) pairs (.., 2N), a view."""
    return torch.view_as_real(M).flatten(-2)


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    """Angles to [-pi, pi) (gradient 1), so the float32 cos/sin downstream keep full precision."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def cumulative_phase(dt: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """theta_t = sum_{s<=t} dt_s omega = (sum_{s<=t} dt_s) omega, (batch, L, H, N) in dt's dtype, wrapped to [-pi, pi).

    omega is constant in time, so only the elapsed time sum dt (batch, L, H) is accumulated, in float64, and
    the product is wrapped before the cast: a float32 running phase would lose ~1e-7 of its size per step,
    and its size grows with L (a phase of 1e4 rad would be off by ~1e-3 rad).
    """
    return _phase(dt.double().cumsum(1), omega, dt.dtype)


def _phase(elapsed: torch.Tensor, omega: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Wrapped elapsed * omega: float64 (batch, L, H) elapsed times -> (batch, L, H, N) angles in `dtype`."""
    return _wrap(elapsed.unsqueeze(-1) * omega.double()).to(dtype)


def _interleave(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """(re, im) (.., N) -> real interleaved pairs (.., 2N)."""
    return torch.stack((re, im), dim=-1).flatten(-2)


def _fold_rotation(elapsed, omega, phase, B, C, heads: int, acc: torch.dtype):
    """B' = pairs(conj(B) e^{i alpha}), C' = 2 pairs(C e^{i alpha}), alpha = elapsed * omega + phase.

    Pairs are interleaved (re, im), so the real SSD state h' (.., 2N) is, as complex numbers, the conjugate
    of the complex state turned back by theta: y = C' . h' = 2 Re(sum_n C e^{i theta} conj(h')) = 2 Re(sum_n C h).
    `elapsed` is the float64 running sum of dt from the sequence start, so a segment of the sequence is
    folded exactly as the whole. Written in real arithmetic (cos, sin and four products): complex autograd
    through `polar` and complex products cost about as much as the chunked scan itself.
    """
    b_re, b_im = _complex_parts(B, acc)
    c_re, c_im = _complex_parts(C, acc)
    angle = _phase(elapsed, omega, acc) if omega is not None else None
    if phase is not None:
        phase = phase.to(acc) if phase.dim() == 4 else phase.to(acc).unsqueeze(2)
        if angle is not None and 1 < angle.shape[2] < phase.shape[2]:  # group clocks, per-head positions
            angle = angle.repeat_interleave(phase.shape[2] // angle.shape[2], dim=2)
        angle = phase if angle is None else angle + phase
    if angle is None:
        return _interleave(b_re, -b_im), _interleave(2 * c_re, 2 * c_im)
    cos, sin = angle.cos(), angle.sin()  # (b, L, H or 1, N)
    groups = B.shape[2]
    if cos.shape[2] != groups and groups != 1:  # per-head angles: every head gets its own turned copy of its group's B/C
        b_re, b_im, c_re, c_im = (m.repeat_interleave(heads // groups, dim=2) for m in (b_re, b_im, c_re, c_im))
    B_fold = _interleave(b_re * cos + b_im * sin, b_re * sin - b_im * cos)
    C_fold = _interleave(2 * (c_re * cos - c_im * sin), 2 * (c_re * sin + c_im * cos))
    return B_fold, C_fold


def complex_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    omega: Optional[torch.Tensor] = None,
    phase: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    return_final_states: bool = False,
    rotation_dt: Optional[torch.Tensor] = None,
) -> ScanOutput:
    """Complex diagonal SSD, decay shared within a head, one rotation frequency per state (module docstring).

    Args:
        x: (batch, L, heads, head_dim) real inputs; dt: (batch, L, heads) step sizes (after `dt_bias` and
            softplus when `dt_softplus`); A: (heads,) real decay rates (negative for a stable scan).
        B, C: (batch, L, groups, N) complex, or real (batch, L, groups, 2N) with interleaved (re, im) pairs
            (the form that can be bf16); groups divide heads.
        omega: (heads, N) rotation frequencies, A[h, n] = A_h + i omega[h, n]; None for no rotation.
        phase: (batch, L, N) or (batch, L, heads, N) positional angles phi (3D RoPE): B_s is turned by
            -phi_s and C_t by +phi_t, in the same rotation as the data-dependent phase.
        chunk_size: steps per chunk of the matmul form (any L; the last chunk is padded).
        D: (heads,) or (heads, head_dim) skip; z: like x, output gate silu(z).
        initial_states / final states: complex (batch, heads, head_dim, N).
        rotation_dt: (batch, L, groups) step sizes of a rotation clock shared by the heads of each group, with
            `omega` (groups, N): A[h, n] steps as exp(dt[h] A_h + i rotation_dt[g] omega[g, n]). B and C then
            stay one copy per group after the turn, which halves the scan's time and memory (the default,
            None, turns them per head by dt: heads x the size).

    Returns y = (2 Re(sum_n C h) + D x) * silu(z) in x's dtype, and the final state when `return_final_states`.
    """
    n_state = _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, complex_bc=True)
    heads, groups = x.shape[2], B.shape[2]
    if rotation_dt is not None:
        if omega is None:
            raise ValueError("`rotation_dt` is the clock of the rotation `omega`; pass `omega` (groups, N) with it.")
        _check_shape("rotation_dt", rotation_dt, ((x.shape[0], x.shape[1], groups),))
        _check_shape("omega", omega, ((groups, n_state),))
    else:
        _check_shape("omega", omega, ((heads, n_state),))
    _check_shape("phase", phase, ((x.shape[0], x.shape[1], n_state), (x.shape[0], x.shape[1], heads, n_state)))
    acc, mm = _dtypes(x, dt, A, B, C, omega, phase, initial_states)
    dt_c = _prepare_dt(dt, dt_bias, dt_softplus, acc)
    elapsed = None
    if omega is not None:
        elapsed = (dt_c if rotation_dt is None else rotation_dt).double().cumsum(1)
    init = None
    if initial_states is not None:  # the real state is conj(h) (theta = 0 before the first step)
        init = _pairs(initial_states.conj().resolve_conj()).to(acc)
    use_kernel = x.is_cuda and has_mamba_ssd_kernel()
    if use_kernel:  # the folded scan is a real SSD: mamba-ssm's kernel runs it
        B_fold, C_fold = _fold_rotation(elapsed, omega, phase, B, C, heads, acc)
        use_kernel = _kernel_supports(x, dt_c, A, B_fold, C_fold, init)
    if use_kernel:
        y, final = _mamba_chunk_scan_fn()(
            x.contiguous(), dt_c.float().contiguous(), A.float(), B_fold.to(x.dtype).contiguous(),
            C_fold.to(x.dtype).contiguous(), chunk_size, initial_states=init, return_final_states=True,
        )
        y, final = y.to(acc), final.to(acc)
    else:  # segment by segment: the fold's (batch, L, heads, 2N) tensors stay cache-sized too
        x_mm, A_acc = x.to(mm), A.to(acc)

        def scan_segment(start, end, state):
            part = slice(start, end)
            B_fold, C_fold = _fold_rotation(
                None if elapsed is None else elapsed[:, part], omega, None if phase is None else phase[:, part],
                B[:, part], C[:, part], heads, acc,
            )
            return _chunked_ssd(x_mm[:, part], dt_c[:, part], A_acc, B_fold.to(mm), C_fold.to(mm), chunk_size, state)

        y, final = _scan_segments(x.shape[1], x.shape[0], heads, chunk_size, scan_segment, init)
    out = _finish(y, x, D, z, x.dtype)
    if not return_final_states:
        return out
    state = torch.view_as_complex(final.unflatten(-1, (-1, 2)).contiguous()).conj()  # h = conj(h') e^{i theta_L}
    if omega is not None:
        last_phase = _phase(elapsed[:, -1:], omega, acc)[:, 0]  # theta_L (batch, H or G, N)
        last_phase = last_phase.repeat_interleave(heads // last_phase.shape[1], dim=1)
        state = state * torch.polar(torch.ones_like(last_phase), last_phase).unsqueeze(2)
    return out, state


# ----------------------------------------------------------------------------------------------------
# Sequential references (test oracles): one step after another, ordinary autograd
# ----------------------------------------------------------------------------------------------------


def ssd_scan_reference(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                       return_final_states=False) -> ScanOutput:
    """The plain loop of `ssd_scan` (no chunking); use in float64 on small problems."""
    _validate(x, dt, A, B, C, 1, D, z, dt_bias, initial_states, complex_bc=False)
    acc, _ = _dtypes(x, dt, A, B, C)
    dt_c = _prepare_dt(dt, dt_bias, dt_softplus, acc)
    per_group = x.shape[2] // B.shape[2]
    B_h, C_h = (m.to(acc).repeat_interleave(per_group, dim=2) for m in (B, C))
    state = (initial_states.to(acc) if initial_states is not None
             else x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3], dtype=acc))
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt_c[:, t] * A.to(acc))[..., None, None]
        state = decay * state + (dt_c[:, t, :, None] * x[:, t].to(acc)).unsqueeze(-1) * B_h[:, t].unsqueeze(-2)
        outputs.append((state * C_h[:, t].unsqueeze(-2)).sum(-1))
    out = _finish(torch.stack(outputs, 1), x, D, z, x.dtype)
    return (out, state) if return_final_states else out


def complex_ssd_scan_reference(x, dt, A, B, C, omega=None, phase=None, D=None, z=None, dt_bias=None, initial_states=None,
                               dt_softplus=False, return_final_states=False, rotation_dt=None) -> ScanOutput:
    """The complex recurrence itself, step by step (no folding, no chunks): the oracle of `complex_ssd_scan`."""
    n_state = _validate(x, dt, A, B, C, 1, D, z, dt_bias, initial_states, complex_bc=True)
    acc, _ = _dtypes(x, dt, A, B, C, omega, phase, initial_states)
    cplx = complex_dtype_for(acc)
    dt_c = _prepare_dt(dt, dt_bias, dt_softplus, acc)
    per_group = x.shape[2] // B.shape[2]
    b_re, b_im = _complex_parts(B, acc)
    c_re, c_im = _complex_parts(C, acc)
    B_h, C_h = (torch.complex(r, i).repeat_interleave(per_group, dim=2) for r, i in ((b_re, b_im), (c_re, c_im)))
    if phase is not None:
        turn = torch.polar(torch.ones_like(phase.to(acc)), phase.to(acc))
        turn = turn if phase.dim() == 4 else turn.unsqueeze(2)
        B_h, C_h = B_h * turn.conj(), C_h * turn
    rate = A.to(acc)[:, None].expand(-1, n_state)
    omega_h = torch.zeros_like(rate) if omega is None else omega.to(acc).repeat_interleave(rate.shape[0] // omega.shape[0], dim=0)
    clock = dt_c if rotation_dt is None else rotation_dt.to(acc).repeat_interleave(per_group, dim=2)
    state = (initial_states.to(cplx) if initial_states is not None
             else torch.zeros(x.shape[0], x.shape[2], x.shape[3], n_state, dtype=cplx, device=x.device))
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.polar(torch.exp(dt_c[:, t, :, None] * rate), clock[:, t, :, None] * omega_h).unsqueeze(-2)  # (b, H, 1, N)
        state = decay * state + (dt_c[:, t, :, None] * x[:, t].to(acc)).unsqueeze(-1) * B_h[:, t].unsqueeze(-2)
        outputs.append(2 * (state * C_h[:, t].unsqueeze(-2)).sum(-1).real)
    out = _finish(torch.stack(outputs, 1), x, D, z, x.dtype)
    return (out, state) if return_final_states else out
