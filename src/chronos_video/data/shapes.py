"""Procedural "shapes" clips: one anti-aliased coloured shape moving in a straight line on black.

Every clip is fully described by five attributes (colour, shape, size, direction, speed), so a
generator's output can be checked from its pixels alone (see `chronos_video.evaluation.oracle`),
and a fixed set of attribute combinations is held out of training to test compositional
generalisation.

Conventions (other tools rely on them):

- Positions are continuous `(x, y)` pixel coordinates with the image covering `[0, W] x [0, H]`
  and `y` pointing down, so pixel `(row i, column j)` has its centre at `(j + 0.5, i + 0.5)`.
- The object "centre" is the centroid of its area. For circles and squares that is the middle
  of the shape; for the triangle (apex up, base and height both equal to the diameter) it lies
  `diameter / 6` below the middle of its bounding box.
- `SIZES` are diameters as a fraction of the frame height: circle diameter, square side, and
  triangle base and height.
- `SPEEDS` are multiples of `H / 64` pixels per frame measured **along the path**: a diagonal
  clip moves `speed / sqrt(2)` pixels per frame along each axis, so every direction has the same
  speed magnitude.
- Anti-aliasing is analytic coverage: exact area for the axis-aligned square, a one-pixel linear
  ramp of the signed distance for the circle, and 4 x 4 supersampling (each sub-pixel with its
  own quarter-pixel ramp) for the triangle, whose sharp apex a distance ramp would blunt.
  Pixels fully inside the shape have exactly the palette colour.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import string
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

from .motion import DIRECTIONS, SPEEDS, check_positive_int, check_start_spread, place_starts, start_range, velocity

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "DIRECTIONS",
    "SPEEDS",
    "CAPTION_TEMPLATES",
    "HELDOUT_COMBINATIONS",
    "ATTRIBUTE_NAMES",
    "ShapeAttributes",
    "render_clip",
    "sample_attributes",
    "is_heldout",
    "parse_caption",
    "build_shapes_dataset",
    "heldout_prompts",
    "save_shapes_dataset",
    "shapes_features",
    "max_num_frames",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.20, "large": 0.34}
# DIRECTIONS and SPEEDS (shared with `moving_fashion`) live in `chronos_video.data.motion`.

# Template 0 is the canonical caption used for evaluation prompts; the others add wording variety
# so a text encoder has to learn attributes rather than positions in one fixed sentence.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} moving {direction} {speed}",
    "a {color} {shape}, {size}, moves {speed} {direction}",
    "{speed}, a {size} {color} {shape} travels {direction}",
    "the {size} {color} {shape} glides {direction} {speed}",
)

# A clip is held out when it matches every (attribute, value) pair of any entry. Each colour,
# shape and direction still appears in training, only these pairings never do.
HELDOUT_COMBINATIONS: tuple[dict[str, str], ...] = (
    {"color": "red", "shape": "triangle"},
    {"color": "blue", "shape": "circle"},
    {"color": "yellow", "shape": "square"},
    {"shape": "circle", "direction": "top to bottom"},
    {"shape": "square", "direction": "diagonally up and left"},
    {"shape": "triangle", "direction": "right to left"},
)

ATTRIBUTE_NAMES: tuple[str, ...] = ("color", "shape", "size", "direction", "speed")
_VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "direction": tuple(DIRECTIONS),
    "speed": tuple(SPEEDS),
}
_SPLITS = ("train", "heldout", "all")
_MIN_SIDE = 16


@dataclass(frozen=True)
class ShapeAttributes:
    """The five attributes that fully describe a shapes clip (apart from its start position)."""

    color: str
    shape: str
    size: str
    direction: str
    speed: str

    def __post_init__(self) -> None:
        for name in ATTRIBUTE_NAMES:
            value = getattr(self, name)
            if value not in _VOCABULARY[name]:
                raise ValueError(f"`{name}` must be one of {list(_VOCABULARY[name])}, got {value!r}.")

    def caption(self, template_index: int = 0) -> str:
        """Caption of this clip written with `CAPTION_TEMPLATES[template_index]`."""
        if (
            isinstance(template_index, bool)
            or not isinstance(template_index, (int, np.integer))
            or not 0 <= template_index < len(CAPTION_TEMPLATES)
        ):
            raise ValueError(
                f"`template_index` must be an int in [0, {len(CAPTION_TEMPLATES) - 1}], got {template_index!r}."
            )
        return CAPTION_TEMPLATES[int(template_index)].format(**self.to_dict())

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, mapping: dict) -> "ShapeAttributes":
        """Build from any mapping holding the five attribute names (extra keys are ignored)."""
        missing = [name for name in ATTRIBUTE_NAMES if name not in mapping]
        if missing:
            raise ValueError(f"Attribute mapping is missing {missing}; expected keys {list(ATTRIBUTE_NAMES)}.")
        return cls(**{name: mapping[name] for name in ATTRIBUTE_NAMES})


# All 672 combinations in a fixed order; splits are uniform over the combinations they allow.
_ALL_COMBINATIONS: tuple[ShapeAttributes, ...] = tuple(
    ShapeAttributes(*values) for values in itertools.product(*(_VOCABULARY[name] for name in ATTRIBUTE_NAMES))
)


def is_heldout(attrs: ShapeAttributes | dict) -> bool:
    """Whether `attrs` matches one of `HELDOUT_COMBINATIONS` (and so never appears in training)."""
    values = attrs.to_dict() if isinstance(attrs, ShapeAttributes) else attrs
    return any(all(values[key] == value for key, value in combo.items()) for combo in HELDOUT_COMBINATIONS)


_SPLIT_COMBINATIONS: dict[str, tuple[ShapeAttributes, ...]] = {
    "all": _ALL_COMBINATIONS,
    "train": tuple(a for a in _ALL_COMBINATIONS if not is_heldout(a)),
    "heldout": tuple(a for a in _ALL_COMBINATIONS if is_heldout(a)),
}


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {list(_SPLITS)}, got {split!r}.")
    return split


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0):
        return np.random.default_rng(rng)
    raise TypeError(f"`rng` must be a numpy Generator, a non-negative int seed or None, got {type(rng).__name__}.")


def sample_attributes(rng: np.random.Generator | int | None = None, split: str = "train") -> ShapeAttributes:
    """Draw one attribute combination uniformly among those the split allows.

    `rng` is a numpy Generator or a seed; None draws fresh entropy (not reproducible).
    """
    combos = _SPLIT_COMBINATIONS[_check_split(split)]
    return combos[int(_as_generator(rng).integers(len(combos)))]


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def _template_regex(template: str) -> re.Pattern:
    pattern = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += r"\s*".join(re.escape(part) for part in literal.split(" "))
        if field is not None:
            choices = sorted(_VOCABULARY[field], key=len, reverse=True)
            pattern += f"(?P<{field}>" + "|".join(re.escape(c).replace(r"\ ", r"\s+") for c in choices) + ")"
    return re.compile(pattern + r"\s*\.?", re.IGNORECASE)


_CAPTION_PATTERNS = tuple(_template_regex(t) for t in CAPTION_TEMPLATES)


def parse_caption(caption: str) -> ShapeAttributes:
    """Recover the attributes from a caption written with any of `CAPTION_TEMPLATES`.

    Matching ignores case, surrounding whitespace, repeated spaces and a trailing full stop.
    """
    if not isinstance(caption, str):
        raise TypeError(f"`caption` must be a str, got {type(caption).__name__}.")
    text = caption.strip()
    for pattern in _CAPTION_PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            values = {k: " ".join(v.lower().split()) for k, v in match.groupdict().items()}
            return ShapeAttributes(**values)
    raise ValueError(
        f"Caption {caption!r} matches none of the shapes caption templates {list(CAPTION_TEMPLATES)}."
    )


# ----------------------------------------------------------------------------------------------
# Geometry and rendering
# ----------------------------------------------------------------------------------------------


def _extents(shape: str, diameter: float) -> tuple[float, float, float, float]:
    """Distances from the centre to the (left, right, top, bottom) edges of the shape."""
    half = diameter / 2.0
    if shape == "triangle":
        return half, half, 2.0 * diameter / 3.0, diameter / 3.0
    return half, half, half, half


def _velocity(attrs: ShapeAttributes, height: int) -> np.ndarray:
    return velocity(attrs.direction, attrs.speed, height)


def _start_range(attrs: ShapeAttributes, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest valid start centre so that the whole shape stays inside the frame."""
    return start_range(_extents(attrs.shape, SIZES[attrs.size] * height), _velocity(attrs, height), num_frames, height, width)


def max_num_frames(height: int = 32, width: int = 32) -> int:
    """Longest clip for which every attribute combination fits inside a `height x width` frame."""
    height = check_positive_int("height", height, _MIN_SIDE)
    width = check_positive_int("width", width, _MIN_SIDE)
    return _longest_clip(height, width)


@functools.lru_cache(maxsize=64)
def _longest_clip(height: int, width: int) -> int:
    """The geometry search behind `max_num_frames`, run once per frame size: it tries every
    span case for each candidate length and was nearly all of `render_clip`'s time."""
    frames = 2
    while all(
        np.all(low <= high + 1e-9)
        for low, high in (_start_range(a, frames + 1, height, width) for a in _SPAN_CASES)
    ):
        frames += 1
    return frames


# The combinations with the largest travel and extent bound the clip length for every other one.
_SPAN_CASES = tuple(
    ShapeAttributes("white", shape, "large", direction, "quickly") for shape in SHAPES for direction in DIRECTIONS
)


def _check_geometry(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    num_frames = check_positive_int("num_frames", num_frames, 2)
    height = check_positive_int("height", height, _MIN_SIDE)
    width = check_positive_int("width", width, _MIN_SIDE)
    longest = max_num_frames(height, width)
    if num_frames > longest:
        raise ValueError(
            f"`num_frames`={num_frames} is too long for a {height}x{width} frame: a large shape moving quickly "
            f"would leave it. Use num_frames <= {longest} or a larger frame."
        )
    return num_frames, height, width


def _axis_coverage(coords: np.ndarray, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Exact overlap of unit pixels [c - 0.5, c + 0.5] with the interval [centre - half, centre + half]."""
    return np.clip(np.minimum(coords + 0.5, centre + half) - np.maximum(coords - 0.5, centre - half), 0.0, 1.0)


_TRIANGLE_SUBSAMPLES = 4


def _coverage(shape: str, centres: np.ndarray, diameters: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fraction of every pixel covered by the shape, for a batch of centres.

    `centres` is (N, 2) and `diameters` is (N,); returns float32 (N, H, W).
    """
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    cx = centres[:, 0, None].astype(np.float32)
    cy = centres[:, 1, None].astype(np.float32)
    diameters = diameters[:, None].astype(np.float32)
    dx = xs[None, :] - cx  # (N, W)
    dy = ys[None, :] - cy  # (N, H)
    if shape == "square":
        half = diameters / 2
        cov_x = _axis_coverage(xs[None, :], cx, half)
        cov_y = _axis_coverage(ys[None, :], cy, half)
        return cov_y[:, :, None] * cov_x[:, None, :]
    if shape == "circle":
        distance = np.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)
        return np.clip(diameters[:, :, None] / 2 + 0.5 - distance, 0.0, 1.0)
    if shape == "triangle":
        # Apex up at (0, -2d/3), base at y = +d/3, base width d: the sides have outward normals
        # (+-2, -1)/sqrt(5) and pass through the apex. The max over the edge half-planes is the
        # signed distance inside but overshoots past the sharp apex, so each pixel averages
        # 4 x 4 sub-pixels, each with a quarter-pixel ramp (area error < 1% at 6 px wide).
        d = diameters[:, :, None]
        coverage = np.zeros((len(centres), height, width), dtype=np.float32)
        offsets = (np.arange(_TRIANGLE_SUBSAMPLES, dtype=np.float32) + 0.5) / _TRIANGLE_SUBSAMPLES - 0.5
        for oy in offsets:
            y_rel = (dy + oy)[:, :, None]
            base = y_rel - d / 3.0
            apex_term = y_rel + 2.0 * d / 3.0
            for ox in offsets:
                x_abs = np.abs(dx + ox)[:, None, :]
                side = (2.0 * x_abs - apex_term) / math.sqrt(5.0)
                coverage += np.clip(0.5 - _TRIANGLE_SUBSAMPLES * np.maximum(side, base), 0.0, 1.0)
        return coverage / _TRIANGLE_SUBSAMPLES**2
    raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}.")


def _render_batch(
    attrs: Sequence[ShapeAttributes], starts: np.ndarray, num_frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render many clips at once; clips of the same shape share one vectorised coverage call."""
    count = len(attrs)
    velocities = np.stack([_velocity(a, height) for a in attrs]) if count else np.zeros((0, 2))
    steps = np.arange(num_frames, dtype=np.float64)
    centres = starts[:, None, :] + steps[None, :, None] * velocities[:, None, :]  # (N, F, 2)
    frames = np.zeros((count, num_frames, height, width, 3), dtype=np.uint8)
    shape_names = np.array([a.shape for a in attrs])
    diameters = np.array([SIZES[a.size] * height for a in attrs], dtype=np.float64)
    rgb = np.array([COLORS[a.color] for a in attrs], dtype=np.float32)
    for shape in SHAPES:
        index = np.flatnonzero(shape_names == shape)
        if index.size == 0:
            continue
        flat_centres = centres[index].reshape(-1, 2)
        flat_diameters = np.repeat(diameters[index], num_frames)
        coverage = _coverage(shape, flat_centres, flat_diameters, height, width)
        coverage = coverage.reshape(index.size, num_frames, height, width, 1)
        frames[index] = np.rint(coverage * rgb[index][:, None, None, None, :]).astype(np.uint8)
    return frames, centres.astype(np.float32)


def render_clip(
    attrs: ShapeAttributes,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    rng: np.random.Generator | int | None = None,
    start: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one clip.

    The first-frame centre is `start` when given (it must keep the whole trajectory inside the
    frame), else drawn uniformly among valid positions with `rng`, else (both None) the middle
    of the valid range, so the default is deterministic.

    Returns `frames` uint8 (F, H, W, 3) and `centers` float32 (F, 2) as `(x, y)` pixels.
    """
    if isinstance(attrs, dict):
        attrs = ShapeAttributes.from_dict(attrs)
    if not isinstance(attrs, ShapeAttributes):
        raise TypeError(f"`attrs` must be a ShapeAttributes, got {type(attrs).__name__}.")
    num_frames, height, width = _check_geometry(num_frames, height, width)
    low, high = _start_range(attrs, num_frames, height, width)
    if start is not None:
        if rng is not None:
            raise ValueError("Pass either `rng` or `start`, not both.")
        start_xy = np.asarray(start, dtype=np.float64)
        if start_xy.shape != (2,) or not np.all(np.isfinite(start_xy)):
            raise ValueError(f"`start` must be a finite (x, y) pair, got {start!r}.")
        if np.any(start_xy < low - 1e-6) or np.any(start_xy > high + 1e-6):
            raise ValueError(
                f"`start`={tuple(start_xy)} would move the {attrs.size} {attrs.shape} out of the frame; valid "
                f"starts have x in [{low[0]:.3f}, {high[0]:.3f}] and y in [{low[1]:.3f}, {high[1]:.3f}]."
            )
    elif rng is None:
        start_xy = (low + high) / 2
    else:
        start_xy = low + _as_generator(rng).random(2) * (high - low)
    frames, centres = _render_batch([attrs], start_xy[None], num_frames, height, width)
    return frames[0], centres[0]


# ----------------------------------------------------------------------------------------------
# datasets integration
# ----------------------------------------------------------------------------------------------


def shapes_features(num_frames: int = 16, height: int = 32, width: int = 32):
    """The `datasets.Features` of a shapes dataset with the given clip geometry."""
    import datasets

    return datasets.Features(
        {
            "frames": datasets.Array4D(shape=(num_frames, height, width, 3), dtype="uint8"),
            "caption": datasets.Value("string"),
            **{name: datasets.Value("string") for name in ATTRIBUTE_NAMES},
            "centers": datasets.Array2D(shape=(num_frames, 2), dtype="float32"),
        }
    )


def _restricted_combinations(split: str, attributes: dict[str, Sequence[str]] | None) -> tuple[ShapeAttributes, ...]:
    """The split's combinations, keeping only the values `attributes` allows per attribute name."""
    combos = _SPLIT_COMBINATIONS[split]
    if not attributes:
        return combos
    if not isinstance(attributes, dict):
        raise ValueError(f"`attributes` must map attribute names to lists of values, got {type(attributes).__name__}.")
    allowed = {}
    for name, values in attributes.items():
        if name not in _VOCABULARY:
            raise ValueError(f"`attributes` has unknown attribute {name!r}; expected some of {list(ATTRIBUTE_NAMES)}.")
        values = [values] if isinstance(values, str) else list(values)
        unknown = [v for v in values if v not in _VOCABULARY[name]]
        if not values or unknown:
            raise ValueError(f"`attributes[{name!r}]` must be a non-empty list of {list(_VOCABULARY[name])}, got {values!r}.")
        allowed[name] = set(values)
    kept = tuple(a for a in combos if all(getattr(a, name) in values for name, values in allowed.items()))
    if not kept:
        raise ValueError(f"`attributes`={attributes!r} leaves no combination in split {split!r}.")
    return kept


def _iter_chunks(
    num_clips: int, num_frames: int, height: int, width: int, split: str, seed: int, chunk_size: int,
    start_spread: float = 1.0, attributes: dict[str, Sequence[str]] | None = None,
) -> Iterator[dict]:
    """Columns of the dataset in chunks. All random draws happen up front, so the content depends
    only on the seed, never on the chunk size."""
    rng = np.random.default_rng(seed)
    combos = _restricted_combinations(split, attributes)
    combo_index = rng.integers(len(combos), size=num_clips)
    template_index = rng.integers(len(CAPTION_TEMPLATES), size=num_clips)
    start_fraction = rng.random((num_clips, 2))
    for begin in range(0, num_clips, chunk_size):
        end = min(begin + chunk_size, num_clips)
        attrs = [combos[i] for i in combo_index[begin:end]]
        bounds = [_start_range(a, num_frames, height, width) for a in attrs]
        low = np.stack([b[0] for b in bounds])
        high = np.stack([b[1] for b in bounds])
        starts = place_starts(low, high, start_fraction[begin:end], start_spread)
        frames, centres = _render_batch(attrs, starts, num_frames, height, width)
        yield {
            "frames": frames,
            "caption": [a.caption(int(t)) for a, t in zip(attrs, template_index[begin:end])],
            **{name: [getattr(a, name) for a in attrs] for name in ATTRIBUTE_NAMES},
            "centers": centres,
        }


def build_shapes_dataset(
    num_clips: int,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    split: str = "train",
    seed: int = 0,
    chunk_size: int = 512,
    start_spread: float = 1.0,
    attributes: dict[str, Sequence[str]] | None = None,
):
    """Build a `datasets.Dataset` of procedural shapes clips.

    Columns: "frames" (Array4D uint8, F x H x W x 3), "caption", the five attribute strings and
    "centers" (Array2D float32, F x 2, `(x, y)` pixels). `split="train"` never contains a
    `HELDOUT_COMBINATIONS` match, `"heldout"` contains only those, `"all"` is unrestricted.
    The same arguments always give the same dataset.

    `start_spread` sets where paths lie: starts are drawn from that fraction of the valid range,
    centred on its middle, so 1.0 (default) places a path anywhere it fits and 0.0 centres every
    path on the frame (its position then follows from the caption alone, which is what lets a
    model learn which way to move early; see `benchmarks/motion_learnability.py`).
    `attributes` keeps only some values, e.g. `{"color": ["white"], "size": ["large"]}` for
    direction-rich clips.

    Frames are stored as uint8; note that `datasets`' numpy/torch formatting returns integer
    columns as int64, so cast back (`.astype(np.uint8)`) where memory matters.
    """
    import datasets

    num_clips = check_positive_int("num_clips", num_clips)
    num_frames, height, width = _check_geometry(num_frames, height, width)
    split = _check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    chunk_size = check_positive_int("chunk_size", chunk_size)
    start_spread = check_start_spread(start_spread)
    features = shapes_features(num_frames, height, width)
    parts = [
        datasets.Dataset.from_dict(columns, features=features)
        for columns in _iter_chunks(
            num_clips, num_frames, height, width, split, int(seed), chunk_size, start_spread, attributes
        )
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def save_shapes_dataset(
    path: str | os.PathLike,
    num_clips: int,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    split: str = "train",
    seed: int = 0,
):
    """Build a shapes dataset and write it with `Dataset.save_to_disk`; returns the dataset.

    Reload it with `datasets.load_from_disk(path)`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
    dataset = build_shapes_dataset(num_clips, num_frames, height, width, split=split, seed=seed)
    dataset.save_to_disk(os.fspath(path))
    return dataset


def heldout_prompts(
    num_prompts: int, seed: int = 0, template_index: int | None = 0
) -> list[tuple[str, ShapeAttributes]]:
    """Prompts whose attributes match held-out combinations, for compositional evaluation.

    Entries cycle through `HELDOUT_COMBINATIONS` so that any `num_prompts >= 6` covers every
    held-out pairing; the remaining attributes are drawn with `seed`. The caption uses
    `CAPTION_TEMPLATES[template_index]`, or a random template when `template_index` is None.
    """
    num_prompts = check_positive_int("num_prompts", num_prompts)
    if template_index is not None and (
        isinstance(template_index, bool)
        or not isinstance(template_index, (int, np.integer))
        or not 0 <= template_index < len(CAPTION_TEMPLATES)
    ):
        raise ValueError(
            f"`template_index` must be None or an int in [0, {len(CAPTION_TEMPLATES) - 1}], got {template_index!r}."
        )
    rng = np.random.default_rng(seed)
    heldout = _SPLIT_COMBINATIONS["heldout"]
    prompts = []
    for i in range(num_prompts):
        combo = HELDOUT_COMBINATIONS[i % len(HELDOUT_COMBINATIONS)]
        matching = [a for a in heldout if all(getattr(a, k) == v for k, v in combo.items())]
        attrs = matching[int(rng.integers(len(matching)))]
        template = int(rng.integers(len(CAPTION_TEMPLATES))) if template_index is None else int(template_index)
        prompts.append((attrs.caption(template), attrs))
    return prompts
