"""Moving Fashion-MNIST: real Fashion-MNIST items moving in a straight line on black, with captions.

A Moving-MNIST-style source of captioned clips ("a sandal moving left to right quickly") whose
objects are real photographs of clothing rather than rendered shapes, while the motion stays exactly
the one the shapes clips use: the same eight directions, the same two speeds (in `H / 64` pixels per
frame along the path) and the same start placement (`chronos_video.data.motion`).

The images are read from the IDX files of Debian's `dataset-fashion-mnist` package (Fashion-MNIST,
Zalando Research, MIT licence), installed with `apt-get install dataset-fashion-mnist`; nothing is
downloaded. `split="train"` draws items from the 60 000 training images, `"test"` from the 10 000
`t10k` images, so a model can be checked on clothing photographs it never saw.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .motion import DIRECTIONS, SPEEDS, check_positive_int, check_start_spread, place_starts, start_range, velocity
from .shapes import COLORS

__all__ = [
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "MOVING_FASHION_CAPTION_TEMPLATES",
    "build_moving_fashion_dataset",
    "load_fashion_mnist",
    "moving_fashion_features",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_COMMAND = "apt-get install dataset-fashion-mnist"
# Label order of the Fashion-MNIST files, worded for captions ("T-shirt/top" becomes "t-shirt").
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# Template 0 is the canonical caption; the others vary the wording, as the shapes captions do.
MOVING_FASHION_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{article} {item} moving {direction} {speed}",
    "{speed}, {article} {item} travels {direction}",
    "the {item} glides {direction} {speed}",
)
_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MIN_SIDE = 8
_MIN_ITEM_PIXELS = 4


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (the MNIST family's format), gzip-compressed or not.

    Header: two zero bytes, a type code, the number of dimensions, then each size as a big-endian uint32.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read the IDX file ({error}).") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}).")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes for {ndim} dimensions).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: the header announces {shape} {dtype} ({expected} bytes), the file holds {len(raw)} bytes.")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _find(folder: Path, name: str, split: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    prefix = _SPLIT_PREFIXES[split]
    raise ValueError(
        f"`data.type: moving_fashion` reads Fashion-MNIST from Debian's `dataset-fashion-mnist` package (MIT licence), "
        f"but {folder} has no {name}.gz (or {name}). Install it with `{INSTALL_COMMAND}`, or set `data.path` to a folder "
        f"holding {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz."
    )


def load_fashion_mnist(split: str = "train", path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train": 60 000 items, "test": the 10 000 t10k items) as read-only uint8
    images (N, 28, 28) and labels (N,) indexing `FASHION_CLASSES`, from `path` (default `FASHION_MNIST_DIR`)."""
    if split not in _SPLIT_PREFIXES:
        raise ValueError(f"`split` must be one of {list(_SPLIT_PREFIXES)} for moving_fashion, got {split!r}.")
    folder = Path(path) if path is not None else FASHION_MNIST_DIR
    return _load_split(str(folder.resolve()), split)


@functools.lru_cache(maxsize=2)
def _load_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads (and keeps) one split: decompressing the 60 000 training images takes a noticeable moment."""
    prefix = _SPLIT_PREFIXES[split]
    images_file = _find(Path(folder), f"{prefix}-images-idx3-ubyte", split)
    labels_file = _find(Path(folder), f"{prefix}-labels-idx1-ubyte", split)
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_file}: expected uint8 images (N, rows, columns), got {images.dtype} {images.shape}.")
    if labels.shape != (len(images),) or labels.dtype != np.uint8 or (labels.size and labels.max() >= len(FASHION_CLASSES)):
        raise ValueError(f"{labels_file}: expected {len(images)} uint8 labels below {len(FASHION_CLASSES)}, got {labels.dtype} {labels.shape}.")
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller of the cache
    return images, labels


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(items: Sequence[str], directions: Sequence[str], speeds: Sequence[str], template: int) -> str:
    """One clause per item: template `template` for a single item, the canonical one joined by "and" otherwise."""
    if len(items) > 1:
        template = 0
    clauses = []
    for item, direction, speed in zip(items, directions, speeds):
        article = _with_article(item).split(" ", 1)[0]
        clauses.append(MOVING_FASHION_CAPTION_TEMPLATES[template].format(article=article, item=item, direction=direction, speed=speed))
    return " and ".join(clauses)


def moving_fashion_features(num_frames: int = 16, height: int = 32, width: int = 32, num_items: int = 1):
    """The `datasets.Features` of a moving_fashion dataset with the given clip geometry."""
    import datasets

    return datasets.Features(
        {
            "frames": datasets.Array4D(shape=(num_frames, height, width, 3), dtype="uint8"),
            "caption": datasets.Value("string"),
            **{name: datasets.List(datasets.Value("string")) for name in ("items", "colors", "directions", "speeds")},
            "image_indices": datasets.List(datasets.Value("int64")),  # into the split's IDX image file
            "centers": datasets.Array3D(shape=(num_items, num_frames, 2), dtype="float32"),
        }
    )


def _item_side(item_size: float, height: int, width: int) -> int:
    return max(_MIN_ITEM_PIXELS, round(item_size * min(height, width)))


def _check_fits(side: int, num_frames: int, height: int, width: int, item_size: float) -> None:
    """Every direction at the higher speed must keep the item inside the frame for the whole clip."""

    def fits(frames: int) -> bool:
        return all(
            np.all(low <= high + 1e-9)
            for low, high in (start_range((side / 2,) * 4, velocity(d, "quickly", height), frames, height, width) for d in DIRECTIONS)
        )

    if not fits(num_frames):
        longest = 1
        while fits(longest + 1):
            longest += 1
        raise ValueError(
            f"`num_frames`={num_frames} is too long for a {height}x{width} frame with `item_size`={item_size} "
            f"({side} px items): an item moving quickly would leave it. Use num_frames <= {longest} or a smaller item_size."
        )


def _scale_items(images: np.ndarray, side: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, side, side) float32 in [0, 1], antialiased."""
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    scaled = torch.nn.functional.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return scaled[:, 0].clamp(0.0, 1.0)


def _render(sprites: torch.Tensor, centres: np.ndarray, tints: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clips (N, F, H, W, 3) uint8 from sprites (N, K, s, s), centres (N, K, F, 2) and tints (N, K, 3).

    Each frame samples the sprite bilinearly at sub-pixel offsets (zero outside it), which shifts its
    mass exactly, so slow (half-pixel-per-frame) motion stays smooth; overlapping items keep the brighter pixel.
    """
    count, items, side = sprites.shape[:3]
    num_frames = centres.shape[2]
    # Output pixel centre (j + 0.5) in sprite pixels from the sprite's left edge, normalised for align_corners=False.
    top_left = torch.from_numpy(centres.reshape(-1, 2) - side / 2).float()  # (N*K*F, 2)
    xs = (torch.arange(width, dtype=torch.float32) + 0.5)[None, :] - top_left[:, :1]
    ys = (torch.arange(height, dtype=torch.float32) + 0.5)[None, :] - top_left[:, 1:]
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1) * (2.0 / side) - 1.0
    source = sprites[:, :, None].expand(count, items, num_frames, side, side).reshape(-1, 1, side, side)
    coverage = torch.nn.functional.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    coverage = coverage.reshape(count, items, num_frames, height, width, 1).numpy()
    frames = (coverage * tints[:, :, None, None, None, :]).max(axis=1)
    return np.rint(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def _iter_chunks(
    images: np.ndarray, labels: np.ndarray, num_clips: int, num_frames: int, height: int, width: int, seed: int, num_items: int,
    side: int, colors: tuple[str, ...] | None, start_spread: float, chunk_size: int,
) -> Iterator[dict]:
    """Columns in chunks; every random draw happens up front, so the content depends only on the settings."""
    rng = np.random.default_rng(seed)
    shape = (num_clips, num_items)
    image_index = rng.integers(len(images), size=shape)
    direction_names, speed_names = tuple(DIRECTIONS), tuple(SPEEDS)
    direction_index = rng.integers(len(direction_names), size=shape)
    speed_index = rng.integers(len(speed_names), size=shape)
    template_index = rng.integers(len(MOVING_FASHION_CAPTION_TEMPLATES), size=num_clips)
    start_fraction = rng.random((*shape, 2))
    color_index = rng.integers(len(colors), size=shape) if colors else None  # drawn last: colours leave the rest unchanged
    steps = np.arange(num_frames, dtype=np.float64)
    for begin in range(0, num_clips, chunk_size):
        chunk = slice(begin, min(begin + chunk_size, num_clips))
        directions = [[direction_names[i] for i in row] for row in direction_index[chunk]]
        speeds = [[speed_names[i] for i in row] for row in speed_index[chunk]]
        tint_names = [[colors[i] for i in row] for row in color_index[chunk]] if colors else [[""] * num_items for _ in directions]
        step = np.array([[velocity(d, s, height) for d, s in zip(*row)] for row in zip(directions, speeds)])  # (n, K, 2)
        bounds = [start_range((side / 2,) * 4, v, num_frames, height, width) for v in step.reshape(-1, 2)]
        low = np.stack([b[0] for b in bounds]).reshape(step.shape)
        high = np.stack([b[1] for b in bounds]).reshape(step.shape)
        starts = place_starts(low, high, start_fraction[chunk], start_spread)
        centres = starts[:, :, None, :] + steps[None, None, :, None] * step[:, :, None, :]  # (n, K, F, 2)
        indices = image_index[chunk]
        sprites = _scale_items(images[indices.reshape(-1)], side).reshape(*indices.shape, side, side)
        tints = np.array([[np.asarray(COLORS[c], dtype=np.float32) / 255.0 if c else np.ones(3, np.float32) for c in row] for row in tint_names])
        items = [[(f"{c} " if c else "") + FASHION_CLASSES[labels[i]] for c, i in zip(colour_row, row)] for colour_row, row in zip(tint_names, indices)]
        yield {
            "frames": _render(sprites, centres, tints, height, width),
            "caption": [_caption(*clip, int(t)) for clip, t in zip(zip(items, directions, speeds), template_index[chunk])],
            "items": [[FASHION_CLASSES[labels[i]] for i in row] for row in indices],
            "colors": tint_names,
            "directions": directions,
            "speeds": speeds,
            "image_indices": indices.tolist(),
            "centers": centres.astype(np.float32),
        }


def build_moving_fashion_dataset(
    num_clips: int,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    split: str = "train",
    seed: int = 0,
    path: str | os.PathLike | None = None,
    num_items: int = 1,
    item_size: float = 0.5,
    colors: Sequence[str] | None = None,
    start_spread: float = 1.0,
    chunk_size: int = 256,
):
    """Build a `datasets.Dataset` of Moving Fashion-MNIST clips.

    Each clip shows `num_items` Fashion-MNIST items from `split`, scaled to `item_size` of the shorter
    frame side (16 px in a 32 px frame) and moving in one of the shapes data's `DIRECTIONS` at one of its
    `SPEEDS`, fully inside the frame; `start_spread` places paths as for the shapes clips. With `colors`
    (names from the shapes `COLORS`), each item is tinted with one of them and the caption names it
    ("a red sandal ..."); otherwise items keep their grey levels. Columns: "frames" (uint8 F x H x W x 3),
    "caption", per item "items", "colors" ("" when untinted), "directions", "speeds", "image_indices", and
    "centers" (float32 K x F x 2, `(x, y)` centres of each item's box). The same arguments give the same dataset.
    """
    import datasets

    num_clips = check_positive_int("num_clips", num_clips)
    num_frames = check_positive_int("num_frames", num_frames, 2)
    height = check_positive_int("height", height, _MIN_SIDE)
    width = check_positive_int("width", width, _MIN_SIDE)
    num_items = check_positive_int("num_items", num_items)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    if isinstance(item_size, bool) or not isinstance(item_size, (int, float)) or not 0.0 < item_size <= 1.0:
        raise ValueError(f"`item_size` must be a fraction of the frame side in (0, 1], got {item_size!r}.")
    if colors is not None:
        colors = (colors,) if isinstance(colors, str) else tuple(colors)
        if not colors or any(c not in COLORS for c in colors):
            raise ValueError(f"`colors` must be a non-empty list of {list(COLORS)}, got {list(colors)!r}.")
    start_spread = check_start_spread(start_spread)
    side = _item_side(float(item_size), height, width)
    _check_fits(side, num_frames, height, width, item_size)
    images, labels = load_fashion_mnist(split, path)
    features = moving_fashion_features(num_frames, height, width, num_items)
    parts = [
        datasets.Dataset.from_dict(columns, features=features)
        for columns in _iter_chunks(
            images, labels, num_clips, num_frames, height, width, int(seed), num_items, side, colors, start_spread, chunk_size
        )
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
