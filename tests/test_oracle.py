"""Tests for the pixel oracle (chronos_video.evaluation.oracle): its ceiling on real clips (also
after an H.264 round trip), its floor on shuffled captions, and its behaviour on bad input."""

import math

import av
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import export_to_video

from chronos_video.data import COLORS, DIRECTIONS, SHAPES, ShapeAttributes, build_shapes_dataset, render_clip
from chronos_video.evaluation import ShapesOracle, format_oracle_table

ATTRIBUTES = ("color", "shape", "size", "direction", "speed")
SIZES_TESTED = {32: 256, 64: 200}  # frame side -> number of clips


def h264_round_trip(clips: np.ndarray, tmp_path) -> np.ndarray:
    """Encode all clips back to back into one mp4 with diffusers' exporter and decode with PyAV."""
    num_clips, num_frames = clips.shape[:2]
    frames = clips.reshape(num_clips * num_frames, *clips.shape[2:]).astype(np.float32) / 255.0
    path = export_to_video(list(frames), str(tmp_path / "clips.mp4"), fps=8)
    with av.open(path) as container:
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert decoded.shape == (num_clips * num_frames, *clips.shape[2:])
    return decoded.reshape(clips.shape)


@pytest.fixture(scope="module", params=sorted(SIZES_TESTED))
def real_clips(request):
    side = request.param
    dataset = build_shapes_dataset(SIZES_TESTED[side], num_frames=16, height=side, width=side, split="all", seed=1)
    table = dataset.with_format("numpy")[:]
    labels = [{name: str(table[name][i]) for name in ATTRIBUTES} for i in range(dataset.num_rows)]
    return side, table["frames"].astype(np.uint8), labels, table["centers"]


def assert_ceiling(scores: dict, max_error_px: float):
    for name in (*ATTRIBUTES, "all"):
        assert scores[name] >= 0.99, (name, scores)
    assert scores["trajectory_error"] < max_error_px
    assert scores["center_error"] < max_error_px


def test_ceiling_on_real_clips(real_clips):
    side, frames, labels, centers = real_clips
    scores = ShapesOracle(side, side).score(frames, labels, centers=centers)
    assert scores["n"] == len(labels)
    assert_ceiling(scores, max_error_px=0.1)


def test_ceiling_after_h264_round_trip(real_clips, tmp_path):
    side, frames, labels, centers = real_clips
    decoded = h264_round_trip(frames, tmp_path)
    assert not np.array_equal(decoded, frames)  # the codec really changed the pixels
    scores = ShapesOracle(side, side).score(decoded, labels, centers=centers)
    assert_ceiling(scores, max_error_px=0.25)


def test_floor_on_shuffled_captions_is_chance(real_clips):
    side, frames, labels, _ = real_clips
    permutation = np.random.default_rng(0).permutation(len(labels))
    shuffled = [labels[i] for i in permutation]
    scores = ShapesOracle(side, side).score(frames, shuffled)
    n = len(labels)
    for name in ATTRIBUTES:
        values = [label[name] for label in labels]
        # matching a random permutation of the same labels succeeds with prob. sum_v p_v^2
        chance = sum((values.count(v) / n) ** 2 for v in set(values))
        band = 4 * math.sqrt(chance * (1 - chance) / n) + 0.02
        assert abs(scores[name] - chance) <= band, (name, scores[name], chance)
    assert scores["all"] <= 0.03


def test_detect_reports_centres_and_velocity():
    attrs = ShapeAttributes("magenta", "triangle", "large", "diagonally up and right", "quickly")
    frames, centers = render_clip(attrs, num_frames=12, height=48, width=64, rng=4)
    detection = ShapesOracle(48, 64).detect(frames, centers=centers)
    assert {name: detection[name] for name in ATTRIBUTES} == attrs.to_dict()
    np.testing.assert_allclose(detection["centers"], centers, atol=0.05)
    expected_velocity = np.array(DIRECTIONS[attrs.direction]) * 2 * 48 / 64
    np.testing.assert_allclose(detection["velocity"], expected_velocity, atol=0.01)
    assert detection["speed_units"] == pytest.approx(2.0, abs=0.01)
    assert detection["diameter"] == pytest.approx(0.34, abs=0.01)
    assert detection["num_object_frames"] == 12


def test_every_input_layout_gives_the_same_answer():
    attrs = ShapeAttributes("yellow", "circle", "small", "bottom to top", "slowly")
    frames, _ = render_clip(attrs, height=32, width=32, rng=0)
    oracle = ShapesOracle()
    as_float = frames.astype(np.float32) / 255
    layouts = {
        "numpy uint8": frames,
        "numpy float": as_float,
        "numpy channels first": np.moveaxis(as_float, -1, 1),
        "torch uint8": torch.from_numpy(frames),
        "torch float channels first": torch.from_numpy(as_float).permute(0, 3, 1, 2),
        "PIL frames": [PIL.Image.fromarray(frame) for frame in frames],
    }
    for name, video in layouts.items():
        detection = oracle.detect(video)
        assert {key: detection[key] for key in ATTRIBUTES} == attrs.to_dict(), name


def test_bad_arguments_raise():
    oracle = ShapesOracle(32, 32)
    frames, _ = render_clip(ShapeAttributes("red", "circle", "small", "left to right", "slowly"))
    with pytest.raises(ValueError, match="layout"):
        oracle.detect(np.zeros((4, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="4-D"):
        oracle.detect(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle.detect(frames.astype(np.float32))  # 0-255 floats
    with pytest.raises(TypeError, match="video"):
        oracle.detect("video.mp4")
    with pytest.raises(ValueError, match="centers"):
        oracle.detect(frames, centers=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="labels"):
        oracle.score([frames, frames], [ShapeAttributes("red", "circle", "small", "left to right", "slowly")])
    with pytest.raises(ValueError, match="height"):
        ShapesOracle(height=4)
    with pytest.raises(ValueError, match="threshold"):
        ShapesOracle(threshold=1.5)


def test_garbage_never_crashes():
    oracle = ShapesOracle(32, 32)
    empty = oracle.detect(np.zeros((16, 32, 32, 3), dtype=np.uint8))
    assert all(empty[name] == "none" for name in ATTRIBUTES)
    assert np.isnan(empty["centers"]).all() and math.isnan(empty["trajectory_error"])

    vocabulary = {"color": set(COLORS), "shape": set(SHAPES), "direction": set(DIRECTIONS)}
    rng = np.random.default_rng(0)
    for video in (
        rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        np.full((16, 32, 32, 3), np.nan, dtype=np.float32),
        np.ones((16, 32, 32, 3), dtype=np.float32),
        rng.random((1, 32, 32, 3)).astype(np.float32),
    ):
        detection = oracle.detect(video)
        for name, allowed in vocabulary.items():
            assert detection[name] in allowed | {"none"}
        assert detection["centers"].shape == (video.shape[0], 2)

    # a single frame has a shape and colour but no motion
    frames, _ = render_clip(ShapeAttributes("green", "square", "large", "left to right", "quickly"))
    still = oracle.detect(frames[:1])
    assert (still["color"], still["shape"], still["size"]) == ("green", "square", "large")
    assert still["direction"] == still["speed"] == "none"


def test_static_vanishing_and_speckled_objects():
    oracle = ShapesOracle(32, 32)
    attrs = ShapeAttributes("blue", "triangle", "large", "top to bottom", "quickly")
    frames, centers = render_clip(attrs, rng=2)

    static = oracle.detect(np.repeat(frames[:1], 16, axis=0))
    assert static["shape"] == "triangle" and static["direction"] == static["speed"] == "none"

    vanishing = frames.copy()
    vanishing[::2] = 0  # the object is missing from every other frame
    detection = oracle.detect(vanishing, centers=centers)
    assert {name: detection[name] for name in ATTRIBUTES} == attrs.to_dict()
    assert np.isnan(detection["centers"][::2]).all() and detection["num_object_frames"] == 8
    assert detection["center_error"] < 0.1

    speckled = frames.copy()
    far_corner = (0, 31) if centers[:, 0].mean() < 16 else (0, 0)
    speckled[:, far_corner[0], far_corner[1]] = 255  # one stray white pixel away from the object
    detection = oracle.detect(speckled, centers=centers)
    assert {name: detection[name] for name in ATTRIBUTES} == attrs.to_dict()
    assert detection["center_error"] < 0.1


def test_score_accepts_captions_rows_and_tensors():
    attrs = [
        ShapeAttributes("white", "circle", "large", "right to left", "slowly"),
        ShapeAttributes("cyan", "square", "small", "diagonally down and right", "quickly"),
    ]
    rendered = [render_clip(a, rng=i) for i, a in enumerate(attrs)]
    videos = torch.from_numpy(np.stack([frames for frames, _ in rendered]))
    oracle = ShapesOracle()
    by_caption = oracle.score(videos, [a.caption(2) for a in attrs])
    rows = [{**a.to_dict(), "centers": c} for a, (_, c) in zip(attrs, rendered)]
    by_row = oracle.score(videos, rows)
    assert by_caption["all"] == by_row["all"] == 1.0
    assert "center_error" in by_row and "center_error" not in by_caption
    wrong = oracle.score(videos, list(reversed(attrs)))
    assert wrong["all"] == 0.0 and wrong["color"] == 0.0


def test_format_oracle_table():
    good = {"color": 1.0, "shape": 0.995, "size": 1.0, "direction": 1.0, "speed": 1.0, "all": 0.995,
            "trajectory_error": 0.031, "center_error": 0.05, "n": 200}
    floor = {**good, "color": 0.14, "all": 0.0, "trajectory_error": float("nan")}
    floor.pop("center_error")
    table = format_oracle_table({"real clips": good, "shuffled": floor})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| result | n | color |")
    assert "| real clips | 200 | 100.0% | 99.5% |" in lines[2]
    assert "| shuffled | 200 | 14.0% |" in lines[3] and lines[3].rstrip().endswith("| n/a | n/a |")
    single = format_oracle_table(good).splitlines()
    assert len(single) == 3 and single[2].startswith("| oracle | 200 |")
    with pytest.raises(ValueError, match="score"):
        format_oracle_table({"bad": {"color": 1.0}})
