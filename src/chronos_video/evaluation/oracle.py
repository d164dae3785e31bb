"""Pixel oracle for shapes clips: reads colour, shape, size, direction, speed and trajectory back
from a video, so a text-to-video model can be scored on whether it drew what the prompt asked.

It uses no labels and no learned weights, only measurements of the single bright object:

- foreground: pixels brighter than a threshold; stray specks far from the object are dropped;
- colour: mean RGB of the object's saturated core, nearest `COLORS` entry;
- coverage: every pixel projected onto that mean colour (after removing the background level),
  inside the foreground dilated by two pixels. Its sum is the object's area, which anti-aliasing
  and blur leave unchanged;
- shape: two centred complex moments of the coverage, `|E[z^3]| / A^1.5` (zero for circle and
  square, 0.068 for the triangle) and `Re E[z^4] / A^2` (0 for the circle, -1/60 for the
  axis-aligned square). Both are scale-free and unchanged by any rotationally symmetric blur
  (all of a symmetric kernel's holomorphic moments vanish), which is what makes them survive
  video compression and soft generator outputs;
- size: diameter `sqrt(area / fill)` with the shape's fill ratio (pi/4, 1, 1/2), split at the
  geometric mean of the two sizes;
- direction and speed: least-squares constant velocity through the per-frame centroids, the
  nearest of the 8 directions and the nearest speed in units of `H / 64` px per frame (below
  half of "slowly" the object counts as standing still and both are "none"; above 1.5x
  "quickly" the speed is "none");
- trajectory error: mean distance from the centroids to that straight line (and to the true
  centres when they are given).

Anything it cannot measure comes back as "none" (attributes) or NaN (numbers); it never raises
on the content of a video, only on a malformed argument.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.shapes import ATTRIBUTE_NAMES, COLORS, DIRECTIONS, SIZES, SPEEDS, ShapeAttributes, parse_caption

__all__ = ["ShapesOracle", "format_oracle_table"]

NONE = "none"

# Moment signatures (|E z^3| / A^1.5, Re E z^4 / A^2) of the continuous shapes drawn by
# `chronos_video.data.shapes`; the triangle has base = height = diameter, apex up.
_SHAPE_SIGNATURES: dict[str, tuple[float, float]] = {
    "circle": (0.0, 0.0),
    "square": (0.0, -1.0 / 60.0),
    "triangle": (0.0681, 0.00185),
}
_SIGNATURE_SCALE = np.array([0.0681, 1.0 / 60.0])
_FILL_RATIO = {"circle": math.pi / 4.0, "square": 1.0, "triangle": 0.5}


def _to_float_video(video: Any, height: int, width: int) -> np.ndarray:
    """Bring a video to float32 (F, H, W, 3) in [0, 1], checking its layout against (height, width)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        torch = None
    if torch is not None and isinstance(video, torch.Tensor):
        is_uint8 = video.dtype == torch.uint8
        array = video.detach().to("cpu", torch.float32).numpy()
    elif isinstance(video, np.ndarray):
        is_uint8 = video.dtype == np.uint8
        array = video
    elif isinstance(video, (list, tuple)) and len(video) > 0:
        # e.g. a pipeline's list of PIL images or per-frame arrays
        frames = [np.asarray(frame) for frame in video]
        if len({f.shape for f in frames}) != 1:
            raise ValueError("All frames of `video` must have the same shape.")
        array = np.stack(frames)
        is_uint8 = array.dtype == np.uint8
    else:
        raise TypeError(
            f"`video` must be a numpy array, a torch tensor or a list of frames, got {type(video).__name__}."
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"`video` must hold numbers, got dtype {array.dtype}.")
    if array.ndim != 4:
        raise ValueError(
            f"`video` must be 4-D, (F, {height}, {width}, 3) or (F, 3, {height}, {width}); "
            f"got shape {tuple(array.shape)}."
        )
    if array.shape[1:] == (height, width, 3):
        pass
    elif array.shape[1:] == (3, height, width):
        array = np.moveaxis(array, 1, -1)
    else:
        raise ValueError(
            f"`video` must have layout (F, {height}, {width}, 3) or (F, 3, {height}, {width}) for this oracle; "
            f"got shape {tuple(array.shape)}. Create `ShapesOracle(height=..., width=...)` for other sizes."
        )
    array = array.astype(np.float32, copy=True)
    if is_uint8:
        array /= 255.0
    else:
        finite = array[np.isfinite(array)]
        if finite.size and finite.max() > 2.0:
            raise ValueError(
                f"Float `video` must be in [0, 1] (max is {finite.max():.3g}); divide 0-255 frames by 255."
            )
    np.nan_to_num(array, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(array, 0.0, 1.0, out=array)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of (F, H, W) masks with a (2r+1)^2 square, separably, without scipy."""
    out = mask.copy()
    for axis in (1, 2):
        grown = out.copy()
        for shift in range(1, radius + 1):
            lead = [slice(None)] * 3
            lag = [slice(None)] * 3
            lead[axis], lag[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(lead)] |= out[tuple(lag)]
            grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def _nearest_direction(velocity: np.ndarray) -> str:
    names = list(DIRECTIONS)
    units = np.array([DIRECTIONS[name] for name in names])
    return names[int(np.argmax(units @ velocity))]


def _nanmean(values: Sequence[float]) -> float:
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else float("nan")


class ShapesOracle:
    """Detects the attributes of the single object in a shapes-style video from its pixels.

    Args:
        height, width: frame size the oracle expects; speeds are measured in `height / 64` px per
            frame and sizes as a fraction of `height`, as in `chronos_video.data.shapes`.
        threshold: brightness (max over RGB, in [0, 1]) above which a pixel is foreground. Every
            palette colour has a channel above 0.86, so 0.3 keeps the object and drops dark noise.
    """

    def __init__(self, height: int = 32, width: int = 32, threshold: float = 0.3):
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 8:
                raise ValueError(f"`{name}` must be an int >= 8, got {value!r}.")
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be a float in (0, 1), got {threshold!r}.")
        self.height = int(height)
        self.width = int(width)
        self.threshold = float(threshold)
        self.speed_unit = self.height / 64.0
        self._palette_names = list(COLORS)
        self._palette = np.array([COLORS[name] for name in self._palette_names], dtype=np.float32) / 255.0
        # Smallest object area (small triangle) sets the least area that counts as an object.
        self._min_area = 0.25 * _FILL_RATIO["triangle"] * (min(SIZES.values()) * self.height) ** 2
        self._size_split = math.sqrt(SIZES["small"] * SIZES["large"])
        self._size_bounds = (min(SIZES.values()) / 1.6, max(SIZES.values()) * 1.6)
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64)
        self._xs, self._ys = xs + 0.5, ys + 0.5

    def __repr__(self) -> str:
        return f"{type(self).__name__}(height={self.height}, width={self.width}, threshold={self.threshold})"

    # ------------------------------------------------------------------------------------------
    def _object_masks(self, bright: np.ndarray) -> np.ndarray:
        """Foreground pixels of the main object per frame, with far-away specks removed.

        Specks are pixels farther than 0.3 H from the per-frame median foreground position (the
        median ignores a few outliers, and every shape fits within 0.3 H of its centre).
        """
        hard = bright > self.threshold
        counts = hard.sum(axis=(1, 2))
        half = (counts[:, None] + 1) // 2
        row_median = np.argmax(np.cumsum(hard.sum(axis=2), axis=1) >= half, axis=1) + 0.5
        col_median = np.argmax(np.cumsum(hard.sum(axis=1), axis=1) >= half, axis=1) + 0.5
        distance2 = (self._ys - row_median[:, None, None]) ** 2 + (self._xs - col_median[:, None, None]) ** 2
        return hard & (distance2 <= (0.3 * self.height) ** 2)

    def detect(self, video: Any, centers: np.ndarray | None = None) -> dict[str, Any]:
        """Attributes, per-frame centres and trajectory error of the object in `video`.

        Args:
            video: (F, H, W, 3) or (F, 3, H, W) numpy array or torch tensor, uint8 or float in
                [0, 1]; or a list of frames (e.g. PIL images).
            centers: optional true (F, 2) `(x, y)` centres, to also report `center_error`.

        Returns a dict with the five attributes ("none" when not measurable), "centers" (F, 2)
        with NaN rows where no object was found, "velocity" (px/frame), "speed_units"
        (|velocity| / (H/64)), "diameter" (fraction of H), "shape_signature",
        "num_object_frames", "trajectory_error" and, with `centers`, "center_error" (px).
        """
        rgb = _to_float_video(video, self.height, self.width)
        num_frames = rgb.shape[0]
        result: dict[str, Any] = {name: NONE for name in ATTRIBUTE_NAMES}
        result.update(
            centers=np.full((num_frames, 2), np.nan, dtype=np.float32),
            velocity=np.full(2, np.nan),
            speed_units=float("nan"),
            diameter=float("nan"),
            shape_signature=(float("nan"), float("nan")),
            num_object_frames=0,
            trajectory_error=float("nan"),
        )
        if centers is not None:
            centers = np.asarray(centers, dtype=np.float64)
            if centers.shape != (num_frames, 2):
                raise ValueError(f"`centers` must have shape ({num_frames}, 2), got {centers.shape}.")
            result["center_error"] = float("nan")

        bright = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
        hard = self._object_masks(bright)
        if not hard.any():
            return result

        # Colour from the saturated core of the object (edges are mixed with the background).
        peak = np.where(hard, bright, 0.0).max(axis=(1, 2), keepdims=True)
        core = hard & (bright >= 0.75 * peak)
        mean_rgb = rgb[core].mean(axis=0)
        result["color"] = self._palette_names[int(np.argmin(((self._palette - mean_rgb) ** 2).sum(axis=1)))]

        # Coverage: projection on the observed colour, background level removed, near the object.
        projection = (rgb @ mean_rgb) / max(float(mean_rgb @ mean_rgb), 1e-6)
        region = _dilate(hard, 2)
        # The object covers at most ~12% of a frame, so the frame median is the background level.
        background = np.median(projection, axis=(1, 2), keepdims=True)
        coverage = np.clip(projection - background, 0.0, 1.0) * region
        area = coverage.sum(axis=(1, 2), dtype=np.float64)
        valid = (area >= self._min_area) & (hard.sum(axis=(1, 2)) >= 2)
        result["num_object_frames"] = int(valid.sum())
        if not valid.any():
            return result

        weights = coverage[valid].astype(np.float64)
        valid_area = area[valid]
        cx = (weights * self._xs).sum(axis=(1, 2)) / valid_area
        cy = (weights * self._ys).sum(axis=(1, 2)) / valid_area
        z = (self._xs - cx[:, None, None]) + 1j * (self._ys - cy[:, None, None])
        z2 = z * z
        moment3 = (weights * z2 * z).sum(axis=(1, 2)) / valid_area
        moment4 = (weights * z2 * z2).sum(axis=(1, 2)) / valid_area
        signature = np.array(
            [np.median(np.abs(moment3) / valid_area**1.5), np.median(moment4.real / valid_area**2)]
        )
        result["shape_signature"] = (float(signature[0]), float(signature[1]))
        distances = {
            name: float(np.sum(((signature - np.array(proto)) / _SIGNATURE_SCALE) ** 2))
            for name, proto in _SHAPE_SIGNATURES.items()
        }
        shape = min(distances, key=distances.get)
        result["shape"] = shape

        diameter = math.sqrt(float(np.median(valid_area)) / _FILL_RATIO[shape]) / self.height
        result["diameter"] = diameter
        if self._size_bounds[0] <= diameter <= self._size_bounds[1]:
            result["size"] = "small" if diameter < self._size_split else "large"

        detected = np.full((num_frames, 2), np.nan)
        detected[valid, 0], detected[valid, 1] = cx, cy
        result["centers"] = detected.astype(np.float32)
        if centers is not None:
            result["center_error"] = float(np.linalg.norm(detected[valid] - centers[valid], axis=1).mean())

        if valid.sum() >= 2:
            times = np.flatnonzero(valid).astype(np.float64)
            design = np.stack([np.ones_like(times), times], axis=1)
            coefficients, *_ = np.linalg.lstsq(design, detected[valid], rcond=None)
            velocity = coefficients[1]
            fitted = design @ coefficients
            result["velocity"] = velocity
            result["trajectory_error"] = float(np.linalg.norm(detected[valid] - fitted, axis=1).mean())
            speed_units = float(np.linalg.norm(velocity)) / self.speed_unit
            result["speed_units"] = speed_units
            slow, fast = SPEEDS["slowly"], SPEEDS["quickly"]
            if speed_units >= 0.5 * slow:  # slower than half "slowly" counts as standing still
                result["direction"] = _nearest_direction(velocity)
                if speed_units < (slow + fast) / 2:
                    result["speed"] = "slowly"
                elif speed_units < 1.5 * fast:
                    result["speed"] = "quickly"
        return result

    # ------------------------------------------------------------------------------------------
    def score(
        self,
        videos: Any,
        labels: Sequence[ShapeAttributes | Mapping[str, Any] | str],
        centers: Sequence[np.ndarray] | None = None,
    ) -> dict[str, float]:
        """Per-attribute accuracy of `videos` against the attributes they were asked to show.

        Args:
            videos: a batch (N, F, ...) array/tensor or a sequence of N videos (see `detect`).
            labels: N `ShapeAttributes`, mappings with the five attribute keys (a dataset row
                works; its "centers" are used when present) or captions.
            centers: optional N true (F, 2) centre arrays.

        Returns accuracies for each attribute and "all" (every attribute right), the mean
        "trajectory_error" in pixels, "center_error" when true centres are known, and "n".
        """
        if isinstance(labels, (str, ShapeAttributes, Mapping)):
            raise TypeError("`labels` must be a sequence with one label per video.")
        labels = list(labels)
        num_videos = len(videos)
        if num_videos != len(labels):
            raise ValueError(f"Got {num_videos} videos but {len(labels)} labels.")
        if centers is not None and len(centers) != num_videos:
            raise ValueError(f"Got {num_videos} videos but {len(centers)} `centers` arrays.")
        if num_videos == 0:
            raise ValueError("`videos` is empty.")

        correct = {name: 0 for name in (*ATTRIBUTE_NAMES, "all")}
        trajectory_errors, center_errors = [], []
        for index in range(num_videos):
            label = labels[index]
            true_centers = None if centers is None else centers[index]
            if isinstance(label, str):
                attrs = parse_caption(label)
            elif isinstance(label, ShapeAttributes):
                attrs = label
            elif isinstance(label, Mapping):
                attrs = ShapeAttributes.from_dict(label)
                if true_centers is None and label.get("centers") is not None:
                    true_centers = label["centers"]
            else:
                raise TypeError(
                    f"Each label must be a ShapeAttributes, a mapping or a caption, got {type(label).__name__}."
                )
            detection = self.detect(videos[index], centers=true_centers)
            hits = [detection[name] == getattr(attrs, name) for name in ATTRIBUTE_NAMES]
            for name, hit in zip(ATTRIBUTE_NAMES, hits):
                correct[name] += int(hit)
            correct["all"] += int(all(hits))
            trajectory_errors.append(detection["trajectory_error"])
            if true_centers is not None:
                center_errors.append(detection["center_error"])

        scores: dict[str, float] = {name: count / num_videos for name, count in correct.items()}
        scores["trajectory_error"] = _nanmean(trajectory_errors)
        if center_errors:
            scores["center_error"] = _nanmean(center_errors)
        scores["n"] = num_videos
        return scores


def format_oracle_table(scores: Mapping[str, Any]) -> str:
    """Markdown table of oracle scores: one row per named result (or a single unnamed result)."""
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("`scores` must be a non-empty dict of scores or a dict of named score dicts.")
    rows = {"oracle": scores} if "n" in scores else dict(scores)
    for name, row in rows.items():
        if not isinstance(row, Mapping) or "n" not in row:
            raise ValueError(f"Result {name!r} is not a `ShapesOracle.score` dict (it has no 'n').")
    accuracy_columns = [*ATTRIBUTE_NAMES, "all"]
    show_center = any("center_error" in row for row in rows.values())
    header = ["result", "n", *accuracy_columns, "traj. err (px)"] + (["centre err (px)"] if show_center else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def number(value: Any, digits: int = 2) -> str:
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    for name, row in rows.items():
        cells = [str(name), str(int(row["n"]))]
        cells += [f"{100.0 * row[column]:.1f}%" if column in row else "n/a" for column in accuracy_columns]
        cells.append(number(row.get("trajectory_error")))
        if show_center:
            cells.append(number(row.get("center_error")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
