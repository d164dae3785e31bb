"""Pure-PyTorch selective scan: a blocked, chunked, recomputing scan and the plain sequential loop.

Both follow mamba-ssm's `selective_scan_ref` semantics. Inputs here are already normalised by
`selective_scan._scan`: `u`/`delta` are real `(batch, D, L)` in the compute dtype, `A` is `(D, N)` real or
complex, and `B`/`C` are either constant `(D, N)` or variable `(batch, G, N, L)`, with the same (real or
complex) dtype as `A`.

Why the fast path looks the way it does (measured on a 2-core CPU): every scan on CPU is
memory-bound, so the state tensor `(batch, D, N, L)` is never materialised whole. Channels are processed
in blocks of a few MB that reuse one set of buffers; the forward saves only its inputs and the backward
recomputes each block's states before running the reverse recurrence. Inside a block `h_t = a_t h_{t-1} +
b_t` is a two-level chunked scan: every chunk is scanned from zero (vectorised over chunks), the chunk end
states are carried across chunks, and the chunks are rescanned from their true carry. Only products of
decays occur -- nothing divides by a prefix product or exponentiates a cumulative sum -- so long sequences
cannot overflow, and underflow of a product is its correct limit.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


# Budget of one per-block state buffer (batch x channels x padded L x N values); 3-4 such buffers are
# allocated once per call and reused by every block, so no block pays fresh page faults. Up to 16 channels
# per block: per-step tensors must stay large enough to amortise the Python loop. Measured (1 thread,
# batch 2, D 256, N 16, complex64): at L = 4096, blocks of 16 and 32 channels ran fwd+bwd equally fast and
# 8 channels ~15% slower; at L = 16384, 4-channel blocks (a 2**21 budget) took 5.0 s against 4.1 s for
# 16-channel blocks (2**23). Beyond that, longer sequences get narrower blocks: buffer memory stays bounded
# until a block is a single channel, and grows linearly in L after that.
_BLOCK_ELEMENTS = 2**23
_MAX_CHANNELS_PER_BLOCK = 16


class _TimeLayout:
    """Chunk-transposed time order: step t = k*chunk + j lives at row j*n_chunks + k, padded to whole chunks.

    With this order the j-th step of every chunk is one contiguous slice, so the scan loops below stream
    dense memory (about 2x faster than strided slices). Padding steps have delta = 0 (decay 1, input 0),
    so they neither change the carried state nor contribute to any gradient.
    """

    def __init__(self, length: int):
        if length < 16:
            self.chunk, self.n_chunks = length, 1
        else:
            # ~sqrt(L), a power of two in [8, 128]: balances the within-chunk and the carry loops.
            self.chunk = int(min(128, max(8, 2 ** round(math.log2(math.sqrt(length))))))
            self.n_chunks = -(-length // self.chunk)
        self.length = length
        self.padded = self.chunk * self.n_chunks

    def arrange_last(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L) -> (..., padded) in chunk-transposed order, zero padded; a new contiguous tensor."""
        x = torch.nn.functional.pad(x, (0, self.padded - self.length))
        return x.unflatten(-1, (self.n_chunks, self.chunk)).transpose(-1, -2).reshape(*x.shape[:-1], self.padded)

    def restore_last(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `arrange_last` (drops the padding)."""
        x = x.unflatten(-1, (self.chunk, self.n_chunks)).transpose(-1, -2).reshape(*x.shape[:-1], self.padded)
        return x[..., : self.length]

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(padded, ...) -> (chunk, n_chunks, ...) view."""
        return x.unflatten(0, (self.chunk, self.n_chunks))


# ----------------------------------------------------------------------------------------------------
# Scan primitives on (chunk, n_chunks, ...) views. `out` may alias `x` (in-place scan).
# ----------------------------------------------------------------------------------------------------


def _scan_forward(a: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + x_t from h = 0, in time order (k, j); writes h to `out`, returns the last state."""
    chunk, n_chunks = a.shape[:2]
    if n_chunks > 1:
        # Level 1: every chunk scanned from a zero state (only its end state is kept) and its decay product.
        local = x[0].clone()
        decay = a[0].clone()
        for j in range(1, chunk):
            local = torch.addcmul(x[j], a[j], local)
            decay.mul_(a[j])
        # Level 2: carry the true state across chunk boundaries.
        state = torch.empty_like(local)
        state[0].zero_()
        for k in range(1, n_chunks):
            torch.addcmul(local[k - 1], decay[k - 1], state[k - 1], out=state[k])
    else:
        state = torch.zeros_like(x[0])
    # Level 3: rescan every chunk from its true incoming state, writing the states.
    for j in range(chunk):
        state = torch.addcmul(x[j], a[j], state, out=out[j])
    return out[chunk - 1, n_chunks - 1]


def _scan_reverse(a_next: torch.Tensor, x: torch.Tensor, out: torch.Tensor, init: Optional[torch.Tensor]) -> None:
    """g_t = a_next_t g_{t+1} + x_t backwards in time from g_end = init (or 0); writes g to `out`."""
    chunk, n_chunks = a_next.shape[:2]
    state = torch.zeros_like(x[0])
    if n_chunks > 1:
        local = x[chunk - 1].clone()
        decay = a_next[chunk - 1].clone()
        for j in range(chunk - 2, -1, -1):
            local = torch.addcmul(x[j], a_next[j], local)
            decay.mul_(a_next[j])
        if init is not None:
            state[-1].copy_(init)
        for k in range(n_chunks - 2, -1, -1):
            torch.addcmul(local[k + 1], decay[k + 1], state[k + 1], out=state[k])
    elif init is not None:
        state[0].copy_(init)
    for j in range(chunk - 1, -1, -1):
        state = torch.addcmul(x[j], a_next[j], state, out=out[j])


# ----------------------------------------------------------------------------------------------------
# Real-pair helpers: Re(sum_n X_n W_n) for complex X, W is a real dot product of X's (re, im) pairs with
# W's (re, -im) pairs, so contractions run as real multiply-and-sum or real batched matmuls (half the work
# of the complex ones, and no complex temporaries).
# ----------------------------------------------------------------------------------------------------


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., N) complex -> (..., 2N) real view of interleaved (re, im); real tensors pass through."""
    return torch.view_as_real(x).flatten(-2) if x.is_complex() else x


def _dot_weight(w: torch.Tensor) -> torch.Tensor:
    """Weights such that `_pairs(x) . _dot_weight(w) == Re(sum x * w)`."""
    if not w.is_complex():
        return w
    return torch.stack((w.real, -w.imag), dim=-1).flatten(-2)


def _unpairs(x: torch.Tensor, like_complex: bool) -> torch.Tensor:
    """Inverse of `_pairs` for freshly computed (contiguous) results."""
    if not like_complex:
        return x
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())


class _Workspace:
    """Per-call state buffers, reused by every block: allocated once, so blocks pay no fresh page faults."""

    def __init__(self, rows: int, batch: int, channels: int, n_state: int, dtype: torch.dtype, device, count: int):
        numel = rows * batch * channels * n_state
        self.buffers = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
        self.n_state = n_state

    def get(self, index: int, rows: int, batch: int, channels: int) -> torch.Tensor:
        numel = rows * batch * channels * self.n_state
        return self.buffers[index][:numel].view(rows, batch, channels, self.n_state)


def _block_plan(batch: int, channels_per_group: int, length: int, n_state: int) -> Tuple[int, int]:
    """(batch block, channel block) so that one state buffer holds about `_BLOCK_ELEMENTS` values."""
    pairs = max(1, _BLOCK_ELEMENTS // max(1, length * n_state))
    if pairs >= batch:
        return batch, max(1, min(channels_per_group, _MAX_CHANNELS_PER_BLOCK, pairs // batch))
    return pairs, 1


def _blocks(batch: int, dim: int, groups: int, length: int, n_state: int):
    """Yields (batch slice, channel slice, group index); a channel block never straddles two groups."""
    per_group = dim // groups
    bb, db = _block_plan(batch, per_group, length, n_state)
    for g in range(groups):
        for d0 in range(g * per_group, (g + 1) * per_group, db):
            d1 = min(d0 + db, (g + 1) * per_group)
            for b0 in range(0, batch, bb):
                yield slice(b0, min(b0 + bb, batch)), slice(d0, d1), g


def _decay(dt: torch.Tensor, A_parts, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """a = exp(dt * A) into `out`, A given as (A,) or dense (Re A, Im A).

    Complex A goes through polar(exp(dt Re A), dt Im A), about 3x cheaper than a complex exp.
    """
    dt4 = dt.unsqueeze(-1)
    if len(A_parts) == 1:
        return torch.exp(torch.mul(dt4, A_parts[0], out=out), out=out)
    magnitude = _real_scratch(scratch, out.shape)
    angle = _real_scratch(scratch, out.shape, offset=out.numel())
    torch.exp(torch.mul(dt4, A_parts[0], out=magnitude), out=magnitude)
    torch.mul(dt4, A_parts[1], out=angle)
    return torch.polar(magnitude, angle, out=out)


def _outer(v: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = v[..., None] * w for real v (L, batch, channels) and real/complex w broadcast to `out`.

    Complex w is multiplied through its real view, so v is never promoted to a complex copy.
    """
    if w.is_complex():
        torch.mul(v[..., None, None], torch.view_as_real(w), out=torch.view_as_real(out))
        return out
    return torch.mul(v.unsqueeze(-1), w, out=out)


def _real_scratch(buffer: torch.Tensor, shape: torch.Size, offset: int = 0) -> torch.Tensor:
    """A real tensor of `shape` inside a free workspace buffer (no fresh allocation, no page faults)."""
    flat = buffer.view(-1)  # must alias the buffer: a silent copy would defeat the reuse
    if flat.is_complex():
        flat = torch.view_as_real(flat).view(-1)
    return flat[offset : offset + math.prod(shape)].view(shape)


def _rowdot(x_pairs: torch.Tensor, w: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sum_k x_pairs[..., k] * w[..., k] (w broadcast), through a reused scratch buffer."""
    prod = torch.mul(x_pairs, w, out=_real_scratch(scratch, x_pairs.shape))
    return out.copy_(prod.sum(dim=-1))  # a strided `out=` makes the reduction itself several times slower


class _Arranged:
    """The small per-call tensors in chunk-transposed time order, shared by forward and backward."""

    def __init__(self, layout: _TimeLayout, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
        self.layout = layout
        # (padded, batch, D) views of (batch, D, padded) memory; `_block_steps` copies a block out densely.
        self.dt = layout.arrange_last(delta).permute(2, 0, 1)
        self.du = layout.arrange_last(delta * u).permute(2, 0, 1)
        # Variable B/C: (batch, G, N, L) -> (padded, batch, G, N) contiguous, so N is the dense dimension.
        self.B = layout.arrange_last(B).permute(3, 0, 1, 2).contiguous() if B.dim() == 4 else B
        self.C = layout.arrange_last(C).permute(3, 0, 1, 2).contiguous() if C.dim() == 4 else C

    def new_steps(self, batch: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        """An empty contiguous (padded, batch, D) result (reductions write fastest into dense outputs)."""
        return torch.empty(self.layout.padded, batch, dim, dtype=like.dtype, device=like.device)

    def restore_steps(self, x: torch.Tensor) -> torch.Tensor:
        """(padded, batch, D) -> (batch, D, L)."""
        return self.layout.restore_last(x.permute(1, 2, 0))

    def restore_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """(padded, batch, G, N) -> (batch, G, N, L)."""
        return self.layout.restore_last(x.permute(1, 2, 3, 0))


def _block_steps(x: torch.Tensor, bs: slice, ds: slice) -> torch.Tensor:
    """A dense (padded, batch block, channel block) copy: broadcasting against (.., N) runs ~2x faster."""
    return x[:, bs, ds].contiguous()


def _block_matrix(matrix: torch.Tensor, bs: slice, ds: slice, g: int) -> torch.Tensor:
    """B/C (or their dot weights) for one block, broadcastable to (padded, batch, channels, N)."""
    return matrix[:, bs, g].unsqueeze(2) if matrix.dim() == 4 else matrix[ds]


def _groups(B: torch.Tensor, C: torch.Tensor) -> int:
    return B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)


class _ChunkedSelectiveScan(torch.autograd.Function):
    """Scan core (no D, z, delta preprocessing): y_t = [2 Re] sum_n C_tn h_tn, and the last state.

    Saves only its inputs; the backward recomputes every block's states (checkpointing), so memory is
    O(batch*D*L + one block's states) rather than O(batch*D*N*L).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        n_state = A.shape[1]
        groups = _groups(B, C)
        layout = _TimeLayout(length)
        arr = _Arranged(layout, u, delta, B, C)
        C_w = _dot_weight(arr.C)
        P = layout.padded
        A_parts = (A.real.contiguous(), A.imag.contiguous()) if A.is_complex() else (A,)

        y = arr.new_steps(batch, dim, u)
        last_state = torch.empty(batch, dim, n_state, dtype=A.dtype, device=u.device)
        bb, db = _block_plan(batch, dim // groups, length, n_state)
        ws = _Workspace(P, bb, db, n_state, A.dtype, u.device, 3)
        with torch.no_grad():
            for bs, ds, g in _blocks(batch, dim, groups, length, n_state):
                nb, nd = bs.stop - bs.start, ds.stop - ds.start
                dt = _block_steps(arr.dt, bs, ds)
                a = _decay(dt, [p[ds] for p in A_parts], ws.get(0, P, nb, nd), ws.get(2, P, nb, nd))
                x = _outer(_block_steps(arr.du, bs, ds), _block_matrix(arr.B, bs, ds, g), ws.get(1, P, nb, nd))
                h = ws.get(2, P, nb, nd)
                last_state[bs, ds] = _scan_forward(layout.split(a), layout.split(x), layout.split(h))
                _rowdot(_pairs(h), _block_matrix(C_w, bs, ds, g), a, y[:, bs, ds])
        if A.is_complex():
            y.mul_(2.0)
        ctx.save_for_backward(u, delta, A, B, C)
        return arr.restore_steps(y).contiguous(), last_state

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C = ctx.saved_tensors
        batch, dim, length = u.shape
        n_state = A.shape[1]
        is_complex = A.is_complex()
        groups = _groups(B, C)
        layout = _TimeLayout(length)
        arr = _Arranged(layout, u, delta, B, C)
        P, c, nc = layout.padded, layout.chunk, layout.n_chunks
        scale = 2.0 if is_complex else 1.0
        if grad_y is None:
            grad_y = torch.zeros_like(u)
        gy_arr = layout.arrange_last(grad_y.to(u.dtype) * scale).permute(2, 0, 1)
        B_w, A_w = _dot_weight(arr.B), _dot_weight(A)
        A_parts = (A.real.contiguous(), A.imag.contiguous()) if is_complex else (A,)

        g_du = arr.new_steps(batch, dim, u)
        g_dt = arr.new_steps(batch, dim, u)
        g_A_pairs = torch.zeros(dim, _pairs(A).shape[-1], dtype=u.dtype, device=u.device)
        g_B_pairs = torch.zeros(_pairs(arr.B).shape, dtype=u.dtype, device=u.device)
        g_C_pairs = torch.zeros(_pairs(arr.C).shape, dtype=u.dtype, device=u.device)

        bb, db = _block_plan(batch, dim // groups, length, n_state)
        ws = _Workspace(P + nc, bb, db, n_state, A.dtype, u.device, 4)
        for bs, ds, g in _blocks(batch, dim, groups, length, n_state):
            nb, nd = bs.stop - bs.start, ds.stop - ds.start
            steps = P * nb
            # Recompute the block's decays with one spare chunk row, a_ext[c, k] = a[0, k+1] (and 1 past the
            # end), so that a_ext[1:] is the decay of the *next* step for the reverse scan; then the states.
            a_ext = ws.get(0, P + nc, nb, nd).unflatten(0, (c + 1, nc))
            dt, du = _block_steps(arr.dt, bs, ds), _block_steps(arr.du, bs, ds)
            a = _decay(dt, [p[ds] for p in A_parts], a_ext[:c].flatten(0, 1), ws.get(2, P, nb, nd))
            a_ext[c, : nc - 1].copy_(a_ext[0, 1:])
            a_ext[c, nc - 1].fill_(1.0)
            x = _outer(du, _block_matrix(arr.B, bs, ds, g), ws.get(1, P, nb, nd))
            h = ws.get(2, P, nb, nd)
            _scan_forward(layout.split(a), layout.split(x), layout.split(h))

            # Reverse recurrence on H = conj(dL/dh) (PyTorch's conjugate-Wirtinger gradient):
            # H_t = a_{t+1} H_{t+1} + [2] gy_t C_t from H_end = conj(g_last). No conjugation is ever needed.
            gy = _block_steps(gy_arr, bs, ds)
            H = _outer(gy, _block_matrix(arr.C, bs, ds, g), ws.get(3, P, nb, nd))
            init = None
            if grad_last is not None:
                init = grad_last[bs, ds].conj() if is_complex else grad_last[bs, ds]
            H_split = layout.split(H)
            _scan_reverse(a_ext[1:], H_split, H_split, init)

            # The decays are no longer needed: their buffer is the scratch space from here on.
            scratch = a_ext
            # dL/dC = [2] conj(sum_d gy h); dL/dB = conj(sum_d du H); dL/d(du) = Re(sum_n B H).
            gy_s, du_s = gy.view(steps, nd), du.view(steps, nd)
            h_pairs, H_pairs = _pairs(h).view(steps, nd, -1), _pairs(H).view(steps, nd, -1)
            if arr.C.dim() == 4:
                g_C_pairs[:, bs, g] += torch.bmm(gy_s.unsqueeze(1), h_pairs).view(P, nb, -1)
            else:
                prod = torch.mul(h_pairs, gy_s.unsqueeze(-1), out=_real_scratch(scratch, h_pairs.shape))
                g_C_pairs[ds] += prod.sum(0)
            if arr.B.dim() == 4:
                g_B_pairs[:, bs, g] += torch.bmm(du_s.unsqueeze(1), H_pairs).view(P, nb, -1)
            else:
                prod = torch.mul(H_pairs, du_s.unsqueeze(-1), out=_real_scratch(scratch, H_pairs.shape))
                g_B_pairs[ds] += prod.sum(0)
            _rowdot(_pairs(H), _block_matrix(B_w, bs, ds, g), scratch, g_du[:, bs, ds])

            # dL/d(delta A)_t = conj(H_t a_t h_{t-1}), and a_t h_{t-1} = h_t - x_t: no shifted copy of h.
            W = torch.mul(H, h.sub_(x), out=h)
            W_pairs = _pairs(W)
            _rowdot(W_pairs, A_w[ds], scratch, g_dt[:, bs, ds])
            W_pairs = W_pairs.view(steps, nd, -1)
            dt_s = dt.view(steps, nd, 1)
            g_A_pairs[ds] += torch.mul(W_pairs, dt_s, out=_real_scratch(scratch, W_pairs.shape)).sum(0)

        g_du = arr.restore_steps(g_du)
        g_u = g_du * delta
        g_delta = arr.restore_steps(g_dt) + g_du * u

        def finish(pairs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            grad = _unpairs(pairs, like.is_complex())
            return grad.conj().resolve_conj() if like.is_complex() else grad

        g_A = finish(g_A_pairs, A)
        g_B = finish(g_B_pairs, arr.B)
        g_C = finish(g_C_pairs, arr.C)
        if B.dim() == 4:
            g_B = arr.restore_matrix(g_B)
        if C.dim() == 4:
            g_C = arr.restore_matrix(g_C)
        return g_u, g_delta, g_A, g_B, g_C


def chunked_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scan core on normalised inputs: returns (y, last_state), y real (batch, D, L)."""
    return _ChunkedSelectiveScan.apply(u, delta, A, B, C)


def sequential_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain loop, one time step after another with ordinary autograd: the test oracle."""
    batch, dim, length = u.shape
    groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    per_group = dim // groups

    def per_channel(x: torch.Tensor) -> torch.Tensor:  # (batch, G, N, L) -> (batch, D, N, L)
        return x.repeat_interleave(per_group, dim=1)

    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (batch, D, L, N)
    if B.dim() == 4:
        inputs = (delta * u).unsqueeze(-1) * per_channel(B).transpose(-1, -2)
    else:
        inputs = (delta * u).unsqueeze(-1) * B.unsqueeze(1)
    C_steps = per_channel(C).unbind(-1) if C.dim() == 4 else None
    state = torch.zeros(batch, dim, A.shape[1], dtype=decay.dtype, device=u.device)
    outputs = []
    for t, (a_t, x_t) in enumerate(zip(decay.unbind(2), inputs.unbind(2))):
        state = a_t * state + x_t
        y_t = (state * (C_steps[t] if C_steps is not None else C)).sum(-1)
        outputs.append(2 * y_t.real if y_t.is_complex() else y_t)
    return torch.stack(outputs, dim=-1), state
