"""Where the Chronos-V mixers read their tokens from: scan orders, their inverses, per-token step scales and 3D RoPE.

All of it depends only on the token grid, the gate's decision and the text mask, so it is built once
per forward (`build_scan_route`) and shared by every block instead of being recomputed per mixer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .embeddings import rope_angles_3d
from .wavelet_gate import GateDecision


def scan_orders(grid: tuple[int, int, int], num_orders: int, device: torch.device | None = None) -> torch.Tensor:
    """Scan orders over a (T, H, W) token grid as permutations of the raster token indices.

    Row `k` lists the raster indices in the order the k-th scan visits them: raster (t, h, w),
    reversed raster, spatially transposed (t, w, h) and time-major (h, w, t). `num_orders` 1, 2 or 4
    takes the first rows, so 2 is the forward/backward pair of Vim.
    """
    if num_orders not in (1, 2, 4):
        raise ValueError(f"`num_scan_orders` must be 1, 2 or 4, got {num_orders}.")
    frames, height, width = grid
    raster = torch.arange(frames * height * width, device=device).view(frames, height, width)
    orders = [
        raster.flatten(),
        raster.flatten().flip(0),
        raster.transpose(1, 2).flatten(),
        raster.permute(1, 2, 0).flatten(),
    ]
    return torch.stack(orders[:num_orders])


def invert_permutation(order: torch.Tensor) -> torch.Tensor:
    """Inverse of permutations along the last dim: `x[..., order][..., inverse] == x`."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


@dataclass
class ScanRoute:
    """Everything the mixers of one forward share: which tokens they see and in which orders.

    The mixer's sequence has `prefix_length` text tokens first, then the video tokens it processes
    (all of them, or the kept ones padded to `mixer_length - prefix_length` in gather mode).
    """

    num_orders: int
    mixer_length: int  # tokens per mixer sequence (prefix + video, padding included)
    flat_order: torch.Tensor  # (S*B*L',) indices into the (B*L') rows: sequence -> scan orders
    flat_inverse: torch.Tensor  # (S*B*L',) indices into the (S*B*L') rows: scan orders -> sequence
    step_scale: torch.Tensor | None  # (S*B, L', 1) multiplies delta (soft mask, padding = 0)
    rotation: torch.Tensor | None  # complex state: (S*B, L', N) unit phasors e^{i theta p}
    angles: torch.Tensor | None  # (S*B, L', rope_dim/2) RoPE angles (real state: of state pairs; complex: of states)
    prefix_length: int = 0
    kept_index: torch.Tensor | None = None  # gather mode: (B, Lk) raster indices of the kept tokens
    kept_valid: torch.Tensor | None = None  # gather mode: (B, Lk, 1) 1 for kept tokens, 0 for padding
    update_scale: torch.Tensor | None = None  # (B, L, 1) soft or hard mask on the mixer's residual update

    def to_orders(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L', E) sequence -> (S*B, L', E), each scan order folded into the batch."""
        batch, length, channels = x.shape
        return x.reshape(batch * length, channels).index_select(0, self.flat_order).view(self.num_orders * batch, length, channels)

    def from_orders(self, y: torch.Tensor) -> torch.Tensor:
        """(S*B, L', E) scan outputs -> (S, B, L', E) back in sequence order."""
        rows, length, channels = y.shape
        restored = y.reshape(rows * length, channels).index_select(0, self.flat_inverse)
        return restored.view(self.num_orders, rows // self.num_orders, length, channels)

    def order(self, index: int) -> "ScanRoute":
        """The route of scan order `index` alone, so a mixer can run (and recompute) one order at a time."""
        rows = self.flat_order.numel() // self.num_orders  # B * L' gather indices per order
        batch = rows // self.mixer_length
        part = slice(index * rows, (index + 1) * rows)
        batch_rows = slice(index * batch, (index + 1) * batch)

        def rows_of(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[batch_rows]

        return replace(self, num_orders=1, flat_order=self.flat_order[part], flat_inverse=self.flat_inverse[part] - index * rows,
                       step_scale=rows_of(self.step_scale), rotation=rows_of(self.rotation), angles=rows_of(self.angles))

    def along_orders(self, values: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-token values (1 or B, L', C) in sequence order -> (S*B, L', C) in each scan order."""
        values = values.expand(batch, self.mixer_length, values.shape[-1])
        return self.to_orders(values)


def order_indices(
    grid: tuple[int, int, int], num_orders: int, gate: GateDecision, prefix: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat gather indices (sequence -> scan orders) and their inverse for a batch of mixer sequences.

    Each order sorts the mixer sequence as: text prefix first, then the video tokens ranked by that
    order's visit position, padding (gather mode) last.
    """
    device = gate.token_raster.device
    num_tokens = grid[0] * grid[1] * grid[2]
    length = prefix + gate.token_raster.shape[1]
    rank = invert_permutation(scan_orders(grid, num_orders, device))  # (S, L) position of each raster token in each order
    keys = rank[:, gate.token_raster]  # (S, 1 or B, Lv)
    if gate.kept_valid is not None:
        keys = keys.masked_fill(~gate.kept_valid.squeeze(-1)[None], num_tokens)
    if prefix:
        text_keys = torch.arange(-prefix, 0, device=device).expand(num_orders, keys.shape[1], prefix)
        keys = torch.cat([text_keys, keys], dim=-1)
    order = torch.sort(keys, dim=-1, stable=True).indices.expand(num_orders, batch, length)
    inverse = invert_permutation(order)
    rows = torch.arange(batch, device=device)[None, :, None] * length
    flat_order = (order + rows).reshape(-1)
    flat_inverse = (inverse + rows + torch.arange(num_orders, device=device)[:, None, None] * (batch * length)).reshape(-1)
    return flat_order, flat_inverse


def sequence_rope_angles(grid, token_raster: torch.Tensor, prefix: int, rope_dim: int, theta: float) -> torch.Tensor:
    """3D RoPE angles (1 or B, L', rope_dim / 2) of the mixer sequence; text prefix tokens sit at the origin."""
    angles = rope_angles_3d(grid, rope_dim, theta, device=token_raster.device)[token_raster]
    if prefix:
        angles = torch.cat([angles.new_zeros(angles.shape[0], prefix, angles.shape[-1]), angles], dim=1)
    return angles


def build_scan_route(
    grid: tuple[int, int, int],
    num_orders: int,
    gate: GateDecision,
    text_mask: torch.Tensor,
    prefix: int,
    rope: tuple[int, float, bool] | None,
) -> ScanRoute:
    """The route of one forward from the gate's decision.

    Args:
        prefix: number of text tokens prepended to every scan order (0 with cross-attention).
        rope: (rotary dimension, theta, complex_state) when the mixers use 3D RoPE, else None.
    """
    batch = text_mask.shape[0]
    video_length = gate.token_raster.shape[1]
    if video_length == 0:  # every token skipped: the mixers have nothing to do
        empty = gate.token_raster.new_empty(0)
        return ScanRoute(num_orders, 0, empty, empty, None, None, None, prefix, gate.kept_index, gate.kept_valid, gate.update_scale)

    flat_order, flat_inverse = order_indices(grid, num_orders, gate, prefix, batch)
    route = ScanRoute(num_orders, prefix + video_length, flat_order, flat_inverse, None, None, None, prefix, gate.kept_index,
                      gate.kept_valid, gate.update_scale)
    if gate.token_scale is not None or (prefix and not bool(text_mask.all())):
        video_scale = gate.token_scale if gate.token_scale is not None else torch.ones(batch, video_length, device=text_mask.device)
        parts = [text_mask.float(), video_scale] if prefix else [video_scale]
        route.step_scale = route.along_orders(torch.cat(parts, dim=1).unsqueeze(-1), batch)
    if rope is not None:
        rope_dim, theta, complex_state = rope
        angles = route.along_orders(sequence_rope_angles(grid, gate.token_raster, prefix, rope_dim, theta), batch)
        route.angles = angles  # the SSD form folds the angles into its own rotation of B and C
        if complex_state:
            route.rotation = torch.polar(torch.ones_like(angles), angles)
    return route
