"""The procedural clips a training run reads (shapes, moving_fashion), built once and cached on disk by their settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .shapes import build_shapes_dataset

__all__ = ["DATA_TYPES", "is_shapes_data", "load_moving_fashion_frames", "load_shapes_frames", "load_training_clips"]

DATA_TYPES = ("shapes", "videofolder", "hub", "moving_fashion")
_MOVING_FASHION_OPTIONS = frozenset(
    {"num_clips", "num_frames", "height", "width", "split", "seed", "path", "num_items", "item_size", "colors", "start_spread", "cache_dir"}
)


def _settings_key(settings: dict[str, Any]) -> str:
    """A folder name for `settings`: short scalars spelled out, anything else (lists, mappings, paths) hashed."""
    return "-".join(
        f"{k}{v}" if isinstance(v, (int, float, str)) and "/" not in str(v) and os.sep not in str(v)
        else f"{k}{hashlib.sha1(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:10]}"
        for k, v in sorted(settings.items())
    )


def _save_atomically(dataset, cache: Path) -> None:
    """Saves `dataset` beside `cache` and renames it into place, so no process ever loads a half-written cache
    (two training runs building one cache at once crashed a reader with SIGBUS); the first complete copy stays."""
    partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
    dataset.save_to_disk(str(partial))
    try:
        partial.rename(cache)
    except OSError:  # another process finished first: its copy holds the same clips
        shutil.rmtree(partial, ignore_errors=True)


def _cached_clips(build: Callable[..., Any], data: dict[str, Any], source: str) -> tuple[torch.Tensor, list[str]]:
    """`build(**data)` as one uint8 tensor (N, F, H, W, 3) plus captions, the dataset saved under `data["cache_dir"]`
    (default `~/.cache/chronos_video/{source}`) in a folder named by the settings, so it is built once."""
    data = dict(data)
    cache = Path(data.pop("cache_dir", None) or Path.home() / ".cache" / "chronos_video" / source) / _settings_key(data)
    if (cache / "dataset_info.json").exists():
        from datasets import load_from_disk

        dataset = load_from_disk(str(cache))
    else:
        dataset = build(**data)
        _save_atomically(dataset, cache)
    # `datasets` hands Array4D back as int64; copy in chunks into uint8 so memory stays at 1 byte/pixel.
    frames = np.empty((len(dataset), *dataset.features["frames"].shape), dtype=np.uint8)
    reader = dataset.with_format("numpy", columns=["frames"])
    for start in range(0, len(dataset), 1024):
        frames[start : start + 1024] = reader[start : start + 1024]["frames"]
    return torch.from_numpy(frames), list(dataset["caption"])


def load_shapes_frames(data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """The clips `build_shapes_dataset(**data)` describes as one uint8 tensor (N, F, H, W, 3) plus captions.

    The dataset is saved under `data["cache_dir"]` (default `~/.cache/chronos_video/shapes`) in a
    folder named by the settings, so a second run with the same settings does not render again.
    """
    return _cached_clips(build_shapes_dataset, data, "shapes")


def load_moving_fashion_frames(data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """Moving Fashion-MNIST clips (`build_moving_fashion_dataset(**data)`) as uint8 (N, F, H, W, 3) plus captions,
    cached like `load_shapes_frames` (default `~/.cache/chronos_video/moving_fashion`)."""
    from .moving_fashion import build_moving_fashion_dataset

    data = {k: v for k, v in data.items() if k != "type"}
    unknown = sorted(set(data) - _MOVING_FASHION_OPTIONS)
    if unknown:
        raise ValueError(f"`data.type: moving_fashion` has no option(s) {unknown}; known: {sorted(_MOVING_FASHION_OPTIONS)}.")
    return _cached_clips(build_moving_fashion_dataset, data, "moving_fashion")


def is_shapes_data(data: dict[str, Any]) -> bool:
    """Whether `data` is the procedural shapes clips (the only data the oracle can score)."""
    return data.get("type", "shapes") == "shapes"


def load_training_clips(data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """A training config's `data`: `type: shapes` (default; `load_shapes_frames`), `moving_fashion`
    (`load_moving_fashion_frames`), `videofolder` or `hub` (`load_video_clips`), as uint8 clips (N, F, H, W, 3)
    and their captions."""
    kind = data.get("type", "shapes")
    if kind == "shapes":
        return load_shapes_frames({k: v for k, v in data.items() if k != "type"})
    if kind == "moving_fashion":
        return load_moving_fashion_frames(data)
    if kind in ("videofolder", "hub"):
        from .video_files import load_video_clips

        return load_video_clips(data)
    raise ValueError(f"`data.type` must be one of {list(DATA_TYPES)}, got {kind!r}.")
