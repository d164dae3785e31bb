"""Straight-line motion shared by the procedural clip sources (`shapes`, `moving_fashion`).

One copy of the direction / speed vocabulary and of the trajectory geometry, so that "moving left to
right quickly" means the same path in every source. Conventions are those of `chronos_video.data.shapes`:
positions are continuous `(x, y)` pixels with `y` pointing down, and `SPEEDS` are multiples of
`H / 64` pixels per frame measured along the path (diagonals move `speed / sqrt(2)` per axis).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DIRECTIONS", "SPEEDS", "check_positive_int", "check_start_spread", "place_starts", "start_range", "velocity"]

_DIAGONAL = 1.0 / math.sqrt(2.0)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left to right": (1.0, 0.0),
    "right to left": (-1.0, 0.0),
    "top to bottom": (0.0, 1.0),
    "bottom to top": (0.0, -1.0),
    "diagonally down and right": (_DIAGONAL, _DIAGONAL),
    "diagonally up and left": (-_DIAGONAL, -_DIAGONAL),
    "diagonally down and left": (-_DIAGONAL, _DIAGONAL),
    "diagonally up and right": (_DIAGONAL, -_DIAGONAL),
}
SPEEDS: dict[str, float] = {"slowly": 1.0, "quickly": 2.0}


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """`value` as an int, or a ValueError naming the argument when it is not an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_start_spread(start_spread) -> float:
    """`start_spread` as a float, or a ValueError when it is not a number in [0, 1]."""
    if isinstance(start_spread, bool) or not isinstance(start_spread, (int, float, np.floating)) or not 0.0 <= start_spread <= 1.0:
        raise ValueError(f"`start_spread` must be a number in [0, 1], got {start_spread!r}.")
    return float(start_spread)


def velocity(direction: str, speed: str, height: int) -> np.ndarray:
    """Displacement per frame `(dx, dy)` in pixels of an object moving `direction` at `speed`."""
    return np.asarray(DIRECTIONS[direction], dtype=np.float64) * SPEEDS[speed] * height / 64.0


def start_range(
    extents: tuple[float, float, float, float], step: np.ndarray, num_frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest first-frame centre keeping an object inside the frame for the whole clip.

    `extents` are the distances from the centre to the object's (left, right, top, bottom) edges and
    `step` its `velocity`; an empty range (low > high on an axis) means the path does not fit.
    """
    left, right, top, bottom = extents
    travel = step * (num_frames - 1)
    low = np.array([left - min(travel[0], 0.0), top - min(travel[1], 0.0)])
    high = np.array([width - right - max(travel[0], 0.0), height - bottom - max(travel[1], 0.0)])
    return low, high


def place_starts(low: np.ndarray, high: np.ndarray, fraction: np.ndarray, start_spread: float) -> np.ndarray:
    """Start centres from uniform draws in [0, 1): anywhere valid at spread 1, the middle at 0.

    The middle of the valid range puts the midpoint of the path at the centre of the frame.
    """
    if start_spread == 1.0:  # bit-identical to datasets built before the option existed
        return low + fraction * (high - low)
    return low + (0.5 + start_spread * (fraction - 0.5)) * (high - low)
