"""The shapes clips a training run reads, rendered once and cached on disk by their settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .shapes import build_shapes_dataset

__all__ = ["DATA_TYPES", "is_shapes_data", "load_shapes_frames", "load_training_clips"]

DATA_TYPES = ("shapes", "videofolder", "hub")


def load_shapes_frames(data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """The clips `build_shapes_dataset(**data)` describes as one uint8 tensor (N, F, H, W, 3) plus captions.

    The dataset is saved under `data["cache_dir"]` (default `~/.cache/chronos_video/shapes`) in a
    folder named by the settings, so a second run with the same settings does not render again.
    """
    data = dict(data)
    cache_root = Path(data.pop("cache_dir", None) or Path.home() / ".cache" / "chronos_video" / "shapes")
    key = "-".join(
        f"{k}{data[k]}" if isinstance(data[k], (int, float, str)) else f"{k}{hashlib.sha1(json.dumps(data[k], sort_keys=True).encode()).hexdigest()[:10]}"
        for k in sorted(data)
    )
    cache = cache_root / key
    if (cache / "dataset_info.json").exists():
        from datasets import load_from_disk

        dataset = load_from_disk(str(cache))
    else:
        dataset = build_shapes_dataset(**data)
        dataset.save_to_disk(str(cache))
    # `datasets` hands Array4D back as int64; copy in chunks into uint8 so memory stays at 1 byte/pixel.
    frames = np.empty((len(dataset), *dataset.features["frames"].shape), dtype=np.uint8)
    reader = dataset.with_format("numpy", columns=["frames"])
    for start in range(0, len(dataset), 1024):
        frames[start : start + 1024] = reader[start : start + 1024]["frames"]
    return torch.from_numpy(frames), list(dataset["caption"])


def is_shapes_data(data: dict[str, Any]) -> bool:
    """Whether `data` is the procedural shapes clips (the only data the oracle can score)."""
    return data.get("type", "shapes") == "shapes"


def load_training_clips(data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """A training config's `data`: `type: shapes` (default; `load_shapes_frames`), `videofolder` or `hub`
    (`load_video_clips`), as uint8 clips (N, F, H, W, 3) and their captions."""
    kind = data.get("type", "shapes")
    if kind == "shapes":
        return load_shapes_frames({k: v for k, v in data.items() if k != "type"})
    if kind in ("videofolder", "hub"):
        from .video_files import load_video_clips

        return load_video_clips(data)
    raise ValueError(f"`data.type` must be one of {list(DATA_TYPES)}, got {kind!r}.")
