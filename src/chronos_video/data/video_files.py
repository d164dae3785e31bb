"""Real videos for training: a `videofolder` (files + metadata.jsonl) or any `datasets` dataset with a video column.

Both go through `datasets` (the `videofolder` builder, or `load_dataset(name_or_path)`), with the video
column read undecoded (`Video(decode=False)`) and decoded here with PyAV: frames are taken every
`frame_stride` frames (or resampled to `fps`), resized so the frame covers the training size and
centre-cropped. Decoded clips are cached as safetensors keyed by the sources and the settings, so the
next run (or epoch) never decodes again. A file that cannot be decoded, a missing caption or a clip
shorter than `num_frames` is reported by name and skipped, or raises with `on_error: raise`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

__all__ = ["VideoDecodeError", "load_video_clips", "read_clip"]

logger = logging.getLogger("chronos_video.data")
ON_ERROR = ("skip", "raise")


class VideoDecodeError(ValueError):
    """A video that cannot become a training clip; the message starts with the file's name."""


def _resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F, h, w, 3) uint8 -> (F, height, width, 3): scale so the frame covers the target, then centre-crop."""
    source_h, source_w = frames.shape[1:3]
    scale = max(height / source_h, width / source_w)
    new_h, new_w = max(height, round(source_h * scale)), max(width, round(source_w * scale))
    pixels = frames.permute(0, 3, 1, 2).float()
    if (new_h, new_w) != (source_h, source_w):
        pixels = torch.nn.functional.interpolate(pixels, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    pixels = pixels[:, :, top : top + height, left : left + width]
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def read_clip(
    source: str | os.PathLike | bytes, num_frames: int, height: int, width: int, frame_stride: int = 1, fps: float | None = None,
    name: str | None = None,
) -> np.ndarray:
    """The first `num_frames` frames of a video file (path or bytes), every `frame_stride`-th one (or
    resampled to `fps`), as uint8 (num_frames, height, width, 3). Raises `VideoDecodeError` naming the file."""
    import av

    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoDecodeError(f"{label}: cannot open the video ({error}).") from error
    frames = []
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{label}: no video stream.")
        stream = container.streams.video[0]
        stride = float(frame_stride)
        if fps is not None:
            native = float(stream.average_rate or 0) or float(fps)
            stride = max(native / float(fps), 1e-6)
        next_index = 0.0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index + 1e-9 >= next_index:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    next_index += stride
                    if len(frames) == num_frames:
                        break
        except (av.error.FFmpegError, ValueError) as error:
            raise VideoDecodeError(f"{label}: decoding failed after {len(frames)} frames ({error}).") from error
    if len(frames) < num_frames:
        raise VideoDecodeError(f"{label}: only {len(frames)} frames at this stride/fps, need `num_frames`={num_frames}.")
    return _resize_and_crop(torch.from_numpy(np.stack(frames)), height, width).numpy()


def _rows(data: dict[str, Any]) -> tuple[Iterable[dict], str, str, str]:
    """(rows, video column, caption column, cache identity) of a `videofolder` or `hub` source."""
    from datasets import Video, load_dataset

    kind, path = data["type"], data.get("path")
    if not path:
        raise ValueError(f"`data.path` is required for `data.type: {kind}` (a folder, dataset name or local dataset path).")
    if kind == "videofolder":
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"`data.path`={path!r} is not a folder.")
        if not (folder / "metadata.jsonl").is_file():
            raise ValueError(f"`data.path`={path!r} has no metadata.jsonl (one {{\"file_name\": ..., \"text\": ...}} per line).")
        dataset = load_dataset("videofolder", data_dir=str(folder), split="train")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        identity = json.dumps([[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
        video_column, caption_column = "video", data.get("caption_column", "text")
    else:
        streaming = bool(data.get("streaming", False))
        dataset = load_dataset(path, split=data.get("hub_split", "train"), streaming=streaming)
        video_column, caption_column = data.get("video_column", "video"), data.get("caption_column", "text")
        identity = json.dumps([path, data.get("hub_split", "train"), getattr(dataset, "_fingerprint", None)])
    names = set(dataset.column_names or [])  # a streamed dataset may not know its columns before the first row
    for label, column in (("video_column", video_column), ("caption_column", caption_column)):
        if names and column not in names:
            raise ValueError(f"`data.{label}`={column!r} is not a column of {path!r}; columns: {sorted(names)}.")
    if isinstance((dataset.features or {}).get(video_column), Video):
        dataset = dataset.cast_column(video_column, Video(decode=False))
    return dataset, video_column, caption_column, identity


def _decode_rows(rows, video_column: str, caption_column: str, data: dict[str, Any], on_error: str) -> Iterator[tuple[np.ndarray, str]]:
    num_frames, height, width = int(data.get("num_frames", 16)), int(data.get("height", 32)), int(data.get("width", 32))
    for position, row in enumerate(rows):
        video = row[video_column]
        source = video.get("bytes") or video.get("path") if isinstance(video, dict) else video
        name = (video.get("path") if isinstance(video, dict) else None) or f"row {position}"
        caption = row.get(caption_column)
        try:
            if not isinstance(caption, str) or not caption.strip():
                raise VideoDecodeError(f"{name}: missing or empty caption (`{caption_column}`).")
            if source is None:
                raise VideoDecodeError(f"{name}: no video data.")
            clip = read_clip(source, num_frames, height, width, int(data.get("frame_stride", 1)), data.get("fps"), name=name)
        except VideoDecodeError as error:
            if on_error == "raise":
                raise
            logger.warning(f"Skipped {error}")
            continue
        yield clip, caption


def load_video_clips(data: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """Clips (N, F, H, W, 3) uint8 and captions from `data` (`type: videofolder` or `hub`), decoded once and cached.

    Keys: `path`, `num_frames`, `height`, `width`, `frame_stride` or `fps`, `num_clips` (the most to take),
    `on_error` (`skip` or `raise`), `cache_dir`; for `hub`: `video_column`, `caption_column`, `hub_split`, `streaming`.
    """
    on_error = data.get("on_error", "skip")
    if on_error not in ON_ERROR:
        raise ValueError(f"`data.on_error` must be one of {list(ON_ERROR)}, got {on_error!r}.")
    rows, video_column, caption_column, identity = _rows(data)
    settings = {k: data.get(k) for k in ("type", "num_frames", "height", "width", "frame_stride", "fps", "num_clips", "caption_column", "video_column")}
    key = hashlib.sha1((identity + json.dumps(settings, sort_keys=True, default=str)).encode()).hexdigest()[:20]
    cache = Path(data.get("cache_dir") or Path.home() / ".cache" / "chronos_video" / "videos") / f"clips-{key}"
    if (cache / "captions.json").is_file():
        from safetensors.torch import load_file

        return load_file(str(cache / "frames.safetensors"))["frames"], json.loads((cache / "captions.json").read_text())
    limit = data.get("num_clips")
    clips, captions = [], []
    for clip, caption in _decode_rows(rows, video_column, caption_column, data, on_error):
        clips.append(clip)
        captions.append(caption)
        if limit and len(clips) >= int(limit):
            break
    if not clips:
        raise ValueError(f"`data.path`={data['path']!r}: no usable clip (see the warnings above for each skipped video).")
    frames = torch.from_numpy(np.stack(clips))
    _write_cache(cache, frames, captions)
    logger.info(f"Decoded {len(clips)} clips from {data['path']} into {cache}.")
    return frames, captions


def _write_cache(cache: Path, frames: torch.Tensor, captions: list[str]) -> None:
    """Writes the decoded clips into a temporary folder renamed into place (a killed run leaves no half cache)."""
    import shutil

    from safetensors.torch import save_file

    staging = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({"frames": frames.contiguous()}, str(staging / "frames.safetensors"))
    (staging / "captions.json").write_text(json.dumps(captions))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(staging, cache)
