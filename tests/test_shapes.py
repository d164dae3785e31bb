"""Tests for the procedural shapes dataset (chronos_video.data.shapes)."""

import itertools
import math

import datasets
import numpy as np
import pytest

from chronos_video.data import (
    CAPTION_TEMPLATES,
    COLORS,
    DIRECTIONS,
    HELDOUT_COMBINATIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    ShapeAttributes,
    build_shapes_dataset,
    heldout_prompts,
    is_heldout,
    max_num_frames,
    parse_caption,
    render_clip,
    sample_attributes,
    save_shapes_dataset,
)

ATTRIBUTES = ("color", "shape", "size", "direction", "speed")
ALL_COMBINATIONS = [
    ShapeAttributes(*values)
    for values in itertools.product(COLORS, SHAPES, SIZES, DIRECTIONS, SPEEDS)
]


def extents(shape: str, diameter: float) -> tuple[float, float, float, float]:
    """(left, right, top, bottom) distances from the area centroid, restated from the spec."""
    if shape == "triangle":
        return diameter / 2, diameter / 2, 2 * diameter / 3, diameter / 3
    return (diameter / 2,) * 4


def rows_of(dataset) -> list[dict]:
    table = dataset.with_format("numpy")[:]
    return [{key: table[key][i] for key in table} for i in range(len(dataset))]


@pytest.fixture(scope="module")
def small_dataset():
    return build_shapes_dataset(120, num_frames=12, height=32, width=40, split="all", seed=3)


def test_constants_follow_the_spec():
    assert COLORS["red"] == (230, 40, 40) and COLORS["white"] == (245, 245, 245) and len(COLORS) == 7
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == {"small": 0.20, "large": 0.34}
    assert SPEEDS == {"slowly": 1.0, "quickly": 2.0}
    assert len(DIRECTIONS) == 8
    for name, (dx, dy) in DIRECTIONS.items():
        assert math.hypot(dx, dy) == pytest.approx(1.0)
    assert DIRECTIONS["top to bottom"] == (0.0, 1.0)  # image coordinates, y down
    assert DIRECTIONS["diagonally up and left"][0] < 0 and DIRECTIONS["diagonally up and left"][1] < 0
    assert len(CAPTION_TEMPLATES) >= 3
    assert CAPTION_TEMPLATES[0] == "a {size} {color} {shape} moving {direction} {speed}"
    attrs = ShapeAttributes("green", "square", "large", "bottom to top", "quickly")
    assert attrs.caption() == "a large green square moving bottom to top quickly"


def test_parse_caption_inverts_every_template():
    for attrs in ALL_COMBINATIONS:
        for index in range(len(CAPTION_TEMPLATES)):
            assert parse_caption(attrs.caption(index)) == attrs
    messy = "  A Small  RED circle moving diagonally   down and right SLOWLY. "
    assert parse_caption(messy) == ShapeAttributes("red", "circle", "small", "diagonally down and right", "slowly")


@pytest.mark.parametrize(
    "caption",
    [
        "a small purple circle moving left to right slowly",
        "a small red hexagon moving left to right slowly",
        "a small red circle moving in circles slowly",
        "a small red circle moving left to right",
        "hello world",
        "",
    ],
)
def test_parse_caption_rejects_unknown_text(caption):
    with pytest.raises(ValueError, match="matches none"):
        parse_caption(caption)


def test_attributes_are_validated():
    with pytest.raises(ValueError, match="color"):
        ShapeAttributes("purple", "circle", "small", "left to right", "slowly")
    with pytest.raises(ValueError, match="direction"):
        ShapeAttributes("red", "circle", "small", "sideways", "slowly")
    with pytest.raises(ValueError, match="template_index"):
        ShapeAttributes("red", "circle", "small", "left to right", "slowly").caption(len(CAPTION_TEMPLATES))
    with pytest.raises(ValueError, match="missing"):
        ShapeAttributes.from_dict({"color": "red"})


@pytest.mark.parametrize("size", [32, 64])
def test_exact_palette_colour_at_object_centre(size):
    for color, shape, scale in itertools.product(COLORS, SHAPES, SIZES):
        attrs = ShapeAttributes(color, shape, scale, "diagonally down and left", "quickly")
        frames, centers = render_clip(attrs, num_frames=8, height=size, width=size, rng=7)
        for frame, (x, y) in zip(frames, centers):
            assert tuple(frame[int(y), int(x)]) == COLORS[color]
        # anti-aliased: some edge pixels hold a fraction of the colour
        brightness = frames.max(axis=-1)
        assert np.any((brightness > 0) & (brightness < max(COLORS[color]) - 5))


def test_area_matches_the_geometry():
    height = 64
    for shape, scale in itertools.product(SHAPES, SIZES):
        attrs = ShapeAttributes("white", shape, scale, "left to right", "slowly")
        frames, _ = render_clip(attrs, num_frames=4, height=height, width=height, rng=1)
        area = frames[..., 0].astype(np.float64).sum(axis=(1, 2)) / COLORS["white"][0]
        diameter = SIZES[scale] * height
        expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[shape] * diameter**2
        np.testing.assert_allclose(area, expected, rtol=0.02)


def test_centres_move_at_the_stated_velocity():
    height, width = 48, 64
    for direction, speed in itertools.product(DIRECTIONS, SPEEDS):
        attrs = ShapeAttributes("cyan", "triangle", "small", direction, speed)
        _, centers = render_clip(attrs, num_frames=10, height=height, width=width, rng=0)
        expected = np.array(DIRECTIONS[direction]) * SPEEDS[speed] * height / 64
        np.testing.assert_allclose(np.diff(centers, axis=0), np.tile(expected, (9, 1)), atol=1e-4)
        # speed is measured along the path, also for diagonals
        assert np.linalg.norm(expected) == pytest.approx(SPEEDS[speed] * height / 64)


def test_whole_trajectory_stays_inside_the_frame(small_dataset):
    height, width = 32, 40
    for row in rows_of(small_dataset):
        left, right, top, bottom = extents(row["shape"], SIZES[row["size"]] * height)
        x, y = row["centers"][:, 0], row["centers"][:, 1]
        assert np.all(x - left >= -1e-4) and np.all(x + right <= width + 1e-4)
        assert np.all(y - top >= -1e-4) and np.all(y + bottom <= height + 1e-4)
        # nothing is clipped by the border: the drawn area is the same in every frame
        area = row["frames"].max(axis=-1).sum(axis=(1, 2)).astype(np.float64)
        np.testing.assert_allclose(area, area.mean(), rtol=0.03)


def test_start_positions_vary_and_can_be_given():
    attrs = ShapeAttributes("blue", "square", "small", "left to right", "slowly")
    starts = {tuple(render_clip(attrs, rng=seed)[1][0]) for seed in range(10)}
    assert len(starts) == 10
    frames_a, centers_a = render_clip(attrs)
    frames_b, centers_b = render_clip(attrs)
    np.testing.assert_array_equal(frames_a, frames_b)  # no rng and no start: deterministic
    _, centers = render_clip(attrs, start=(5.0, 20.0))
    np.testing.assert_allclose(centers[0], (5.0, 20.0))
    with pytest.raises(ValueError, match="out of the frame"):
        render_clip(attrs, start=(30.0, 20.0))
    with pytest.raises(ValueError, match="either"):
        render_clip(attrs, rng=0, start=(5.0, 20.0))


def test_longest_clip_is_enforced():
    longest = max_num_frames(32, 32)
    worst = ShapeAttributes("white", "square", "large", "top to bottom", "quickly")
    frames, centers = render_clip(worst, num_frames=longest)
    assert frames.shape == (longest, 32, 32, 3)
    with pytest.raises(ValueError, match="num_frames"):
        render_clip(worst, num_frames=longest + 1)
    with pytest.raises(ValueError, match="num_frames"):
        build_shapes_dataset(4, num_frames=longest + 1)


def test_dataset_features_shapes_and_dtypes(small_dataset):
    features = small_dataset.features
    assert features["frames"] == datasets.Array4D(shape=(12, 32, 40, 3), dtype="uint8")
    assert features["centers"] == datasets.Array2D(shape=(12, 2), dtype="float32")
    for name in ("caption", *ATTRIBUTES):
        assert features[name] == datasets.Value("string")
    assert small_dataset.num_rows == 120
    batch = small_dataset.with_format("numpy")[:5]
    assert batch["frames"].shape == (5, 12, 32, 40, 3)
    assert batch["frames"].min() >= 0 and batch["frames"].max() <= 255
    assert batch["centers"].dtype == np.float32


def test_captions_agree_with_the_label_columns(small_dataset):
    templates_seen = set()
    for row in small_dataset.select_columns(["caption", *ATTRIBUTES]):
        attrs = parse_caption(row["caption"])
        assert attrs == ShapeAttributes.from_dict(row)
        templates_seen.update(i for i in range(len(CAPTION_TEMPLATES)) if attrs.caption(i) == row["caption"])
    assert len(templates_seen) == len(CAPTION_TEMPLATES)


def test_dataset_is_deterministic_by_seed():
    first = build_shapes_dataset(40, num_frames=8, seed=11)
    second = build_shapes_dataset(40, num_frames=8, seed=11, chunk_size=7)  # chunking changes nothing
    other = build_shapes_dataset(40, num_frames=8, seed=12)
    a, b, c = (d.with_format("numpy")[:] for d in (first, second, other))
    np.testing.assert_array_equal(a["frames"], b["frames"])
    np.testing.assert_array_equal(a["centers"], b["centers"])
    assert list(a["caption"]) == list(b["caption"])
    assert list(a["caption"]) != list(c["caption"])
    assert not np.array_equal(a["frames"], c["frames"])


def test_heldout_split_is_disjoint_from_training():
    train = build_shapes_dataset(300, num_frames=4, split="train", seed=0).select_columns(list(ATTRIBUTES))
    heldout = build_shapes_dataset(150, num_frames=4, split="heldout", seed=0).select_columns(list(ATTRIBUTES))
    assert not any(is_heldout(row) for row in train)
    assert all(is_heldout(row) for row in heldout)
    # training still sees every single attribute value, only not the held-out pairings
    for name in ATTRIBUTES:
        assert set(train[name]) == {getattr(a, name) for a in ALL_COMBINATIONS}
    for combo in HELDOUT_COMBINATIONS:
        assert any(all(row[k] == v for k, v in combo.items()) for row in heldout)
    assert 0 < sum(map(is_heldout, ALL_COMBINATIONS)) < len(ALL_COMBINATIONS) // 2
    rng = np.random.default_rng(0)
    assert all(is_heldout(sample_attributes(rng, "heldout")) for _ in range(200))
    assert not any(is_heldout(sample_attributes(rng, "train")) for _ in range(200))


def test_heldout_prompts_cover_every_combination():
    prompts = heldout_prompts(12, seed=5)
    assert prompts == heldout_prompts(12, seed=5)
    assert len(prompts) == 12
    for caption, attrs in prompts:
        assert is_heldout(attrs)
        assert parse_caption(caption) == attrs
        assert caption == attrs.caption(0)
    for combo in HELDOUT_COMBINATIONS:
        assert any(all(getattr(a, k) == v for k, v in combo.items()) for _, a in prompts)
    mixed = heldout_prompts(40, seed=5, template_index=None)
    assert len({c for c, a in mixed} - {a.caption(0) for c, a in mixed}) > 0


def test_save_and_reload(tmp_path):
    saved = save_shapes_dataset(tmp_path / "shapes", 10, num_frames=6, height=16, width=16, split="heldout", seed=2)
    loaded = datasets.load_from_disk(str(tmp_path / "shapes"))
    assert loaded.features == saved.features
    np.testing.assert_array_equal(
        loaded.with_format("numpy")[:]["frames"], saved.with_format("numpy")[:]["frames"]
    )
    assert loaded["caption"] == saved["caption"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clips": 0}, "num_clips"),
        ({"num_clips": 2.5}, "num_clips"),
        ({"num_clips": True}, "num_clips"),
        ({"num_clips": 2, "num_frames": 1}, "num_frames"),
        ({"num_clips": 2, "height": 8}, "height"),
        ({"num_clips": 2, "width": 15}, "width"),
        ({"num_clips": 2, "split": "validation"}, "split"),
        ({"num_clips": 2, "seed": -1}, "seed"),
        ({"num_clips": 2, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_shapes_dataset(**kwargs)


def test_bad_arguments_raise_elsewhere():
    attrs = ShapeAttributes("red", "circle", "small", "left to right", "slowly")
    with pytest.raises(ValueError, match="height"):
        render_clip(attrs, height=12)
    with pytest.raises(TypeError, match="attrs"):
        render_clip("a small red circle moving left to right slowly")
    with pytest.raises(TypeError, match="rng"):
        render_clip(attrs, rng="seed")
    with pytest.raises(ValueError, match="split"):
        sample_attributes(0, split="test")
    with pytest.raises(ValueError, match="num_prompts"):
        heldout_prompts(0)
    with pytest.raises(ValueError, match="template_index"):
        heldout_prompts(3, template_index=10)


def test_longest_clip_search_runs_once_per_frame_size():
    """`render_clip` reuses the cached geometry search; the cached answer is the searched one."""
    from chronos_video.data import shapes

    shapes._longest_clip.cache_clear()
    for seed in range(5):
        render_clip(ShapeAttributes("red", "circle", "small", "left to right", "slowly"), 8, 24, 20, rng=seed)
    info = shapes._longest_clip.cache_info()
    assert info.misses == 1 and info.hits >= 4
    for height, width in [(16, 16), (24, 20), (32, 32), (64, 48)]:
        assert max_num_frames(height, width) == shapes._longest_clip.__wrapped__(height, width)


def test_clip_cache_is_renamed_into_place_whole(tmp_path):
    """A cache folder appears only complete, and a second writer (another run that built the same clips) leaves the
    first copy as it was: no process ever reads a half-written cache."""
    from chronos_video.data import load_shapes_frames
    from chronos_video.data.cached import _save_atomically, _settings_key
    from chronos_video.data.shapes import build_shapes_dataset

    settings = {"num_clips": 3, "num_frames": 4, "height": 16, "width": 16, "split": "train", "seed": 0}
    frames, captions = load_shapes_frames({**settings, "cache_dir": str(tmp_path)})
    cache = tmp_path / _settings_key(settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name] and (cache / "dataset_info.json").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    _save_atomically(build_shapes_dataset(**{**settings, "seed": 1}), cache)  # a late writer with other clips
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    again, again_captions = load_shapes_frames({**settings, "cache_dir": str(tmp_path)})
    assert np.array_equal(again.numpy(), frames.numpy()) and again_captions == captions
