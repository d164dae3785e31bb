"""`data.type: moving_fashion`: IDX parsing, the clips (deterministic, moving the way their captions say),
the missing-package error, and `training/train.py` on the smoke config end to end.

The clip tests read the real Fashion-MNIST files of Debian's `dataset-fashion-mnist` package and skip
when it is not installed (`apt-get install dataset-fashion-mnist`; `.ci/run` installs it where apt exists).
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from chronos_video import NanoSoraPipeline
from chronos_video.data import (
    DIRECTIONS,
    FASHION_CLASSES,
    FASHION_MNIST_DIR,
    build_moving_fashion_dataset,
    is_shapes_data,
    load_fashion_mnist,
    load_training_clips,
    read_idx,
)
from chronos_video.data.motion import velocity
from test_training import SMOKE, load_train_module

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def _write_idx(path, array: np.ndarray, type_code: int) -> None:
    payload = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _centroids(frames: np.ndarray) -> np.ndarray:
    """Intensity-weighted (x, y) centre of each frame (F, H, W, 3), with pixel centres at +0.5."""
    mass = frames.astype(np.float64).sum(axis=-1)
    ys, xs = np.indices(mass.shape[1:]) + 0.5
    total = mass.sum(axis=(1, 2))
    return np.stack([(mass * xs).sum(axis=(1, 2)) / total, (mass * ys).sum(axis=(1, 2)) / total], axis=-1)


def _clips(dataset) -> np.ndarray:
    return dataset.with_format("numpy", columns=["frames"])[:]["frames"].astype(np.uint8)


def test_read_idx_parses_gzip_and_plain_files_and_names_bad_ones(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / "images-idx3-ubyte.gz", images, 0x08)
    np.testing.assert_array_equal(read_idx(tmp_path / "images-idx3-ubyte.gz"), images)
    wide = np.array([[-7, 1 << 20], [3, 0]], dtype=">i4")  # big-endian on disk, native once read
    _write_idx(tmp_path / "wide-idx2-int", wide, 0x0C)
    parsed = read_idx(tmp_path / "wide-idx2-int")
    assert parsed.dtype == np.dtype("int32") and parsed.dtype.isnative and parsed.tolist() == wide.tolist()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad: not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(4))
    with pytest.raises(ValueError, match="short: the header announces"):
        read_idx(tmp_path / "short")


def test_missing_package_error_names_the_type_the_folder_and_the_install_command(tmp_path):
    (tmp_path / "empty").mkdir()
    data = {"type": "moving_fashion", "path": str(tmp_path / "empty"), "num_clips": 2, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ValueError) as error:
        load_training_clips(data)
    message = str(error.value)
    assert "`data.type: moving_fashion`" in message and str(tmp_path / "empty") in message
    assert "apt-get install dataset-fashion-mnist" in message and "`data.path`" in message
    with pytest.raises(ValueError, match=r"no option\(s\) \['video_column'\]"):
        load_training_clips({**data, "video_column": "video"})


def test_config_accepts_moving_fashion_without_a_path():
    config = load_train_module().parse_config(["--config", str(SMOKE), "--data.type", "moving_fashion"])
    assert config.data["type"] == "moving_fashion" and "path" not in config.data and not is_shapes_data(config.data)


def test_a_folder_given_by_data_path_is_read(tmp_path):
    """`data.path` overrides the Debian folder: here two synthetic items (a bag and a sneaker) in plain IDX files."""
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, 4:24, 4:24] = 200
    images[1, 10:18, 2:26] = 255
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([8, 7], dtype=np.uint8), 0x08)
    loaded, labels = load_fashion_mnist("train", tmp_path)
    np.testing.assert_array_equal(loaded, images)
    dataset = build_moving_fashion_dataset(6, num_frames=8, height=16, width=16, path=tmp_path)
    assert {item for items in dataset["items"] for item in items} <= {"bag", "sneaker"}
    assert _clips(dataset).shape == (6, 8, 16, 16, 3)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        build_moving_fashion_dataset(2, split="test", path=tmp_path)


@needs_fashion_mnist
def test_clips_are_deterministic_cached_and_split_by_image_file(tmp_path, monkeypatch):
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    assert load_fashion_mnist("test")[0].shape == (10000, 28, 28)
    data = {"type": "moving_fashion", "num_clips": 12, "num_frames": 16, "height": 32, "width": 32, "split": "train", "seed": 3,
            "cache_dir": str(tmp_path / "cache")}
    frames, captions = load_training_clips(data)
    assert frames.shape == (12, 16, 32, 32, 3) and frames.dtype == torch.uint8 and len(captions) == 12
    monkeypatch.setattr("chronos_video.data.moving_fashion.build_moving_fashion_dataset", lambda **_: pytest.fail("built again"))
    cached, cached_captions = load_training_clips(data)
    assert (cached == frames).all() and cached_captions == captions
    monkeypatch.undo()
    rebuilt, rebuilt_captions = load_training_clips({**data, "cache_dir": str(tmp_path / "other")})
    assert (rebuilt == frames).all() and rebuilt_captions == captions
    other_seed, _ = load_training_clips({**data, "seed": 4})
    assert not (other_seed == frames).all()
    test_split = build_moving_fashion_dataset(12, split="test", seed=3)
    assert max(i for row in test_split["image_indices"] for i in row) < 10000
    test_labels = load_fashion_mnist("test")[1]
    assert [FASHION_CLASSES[test_labels[row[0]]] for row in test_split["image_indices"]] == [items[0] for items in test_split["items"]]


@needs_fashion_mnist
def test_items_move_the_way_their_captions_say():
    dataset = build_moving_fashion_dataset(48, num_frames=16, height=32, width=32, seed=0)
    clips = _clips(dataset)
    steps = np.arange(16)
    for clip, caption, row in zip(clips, dataset["caption"], dataset.select_columns(["items", "directions", "speeds"])):
        direction = [name for name in DIRECTIONS if name in caption]
        speed = "quickly" if "quickly" in caption else "slowly"
        assert direction == row["directions"] and speed == row["speeds"][0] and row["items"][0] in caption
        mass = clip.astype(np.float64).sum(axis=(1, 2, 3))
        np.testing.assert_allclose(mass, mass[0], rtol=0.01)  # the item never leaves the frame
        centroids = _centroids(clip)
        per_frame = np.polyfit(steps, centroids, 1)[0]  # fitted (dx, dy) per frame
        np.testing.assert_allclose(per_frame, velocity(direction[0], speed, 32), atol=0.02, err_msg=caption)
    assert {d for row in dataset["directions"] for d in row} == set(DIRECTIONS)  # 48 clips cover all eight


@needs_fashion_mnist
def test_tinted_items_carry_their_colour_in_the_caption():
    dataset = build_moving_fashion_dataset(8, num_frames=8, height=16, width=16, colors=["red", "blue"], seed=1)
    for clip, caption, colour in zip(_clips(dataset), dataset["caption"], dataset["colors"]):
        assert f"{colour[0]} " in caption
        red, blue = clip[..., 0].astype(int).sum(), clip[..., 2].astype(int).sum()
        assert (red > 3 * blue) if colour[0] == "red" else (blue > 3 * red)
    with pytest.raises(ValueError, match="`colors`"):
        build_moving_fashion_dataset(2, colors=["mauve"])
    with pytest.raises(ValueError, match="`num_frames`=40 is too long"):
        build_moving_fashion_dataset(2, num_frames=40)


@needs_fashion_mnist
@pytest.mark.slow
def test_train_smoke_config_on_moving_fashion(tmp_path):
    train = load_train_module()
    output = train.main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "run"), "--report_to", "null",
                         "--data.type", "moving_fashion", "--data.cache_dir", str(tmp_path / "cache"), "--max_train_steps", "3"])
    assert not (output / "oracle_scores.json").exists()  # the oracle reads shapes clips only; the card says so
    card = (output / "README.md").read_text()
    assert "Not scored" in card and "Moving Fashion-MNIST" in card
    pipe = NanoSoraPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a sandal moving left to right quickly", num_inference_steps=2).frames.shape == (1, 8, 16, 16, 3)
