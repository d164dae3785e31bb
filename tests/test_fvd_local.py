"""FVD-local: the shipped feature network, the torchmetrics-backed distance and `chronos-video evaluate --fvd`."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chronos_video.cli import main
from chronos_video.data import heldout_prompts, sample_attributes
from chronos_video.evaluation.fvd_local import (
    FVD_LOCAL_WEIGHTS,
    FVD_LOCAL_WEIGHTS_SHA256,
    FrechetVideoDistanceLocal,
    VideoFeatureNet,
    attribute_accuracy,
    fvd_local,
    fvd_local_with_floor,
    load_video_feature_net,
    render_real_clips,
    videos_to_tensor,
)
from conftest import make_tiny_pipeline

NUM_CLIPS = 128  # at 64 clips the floor (covariance noise of 64-d features) is already 4x larger


@pytest.fixture(scope="module")
def net():
    return load_video_feature_net()


@pytest.fixture(scope="module")
def real_sets():
    """Two independent sets of real clips (training-split attributes, paths anywhere), uint8 (N, 16, 32, 32, 3)."""
    rng = np.random.default_rng(0)
    first = [sample_attributes(rng) for _ in range(NUM_CLIPS)]
    second = [sample_attributes(rng) for _ in range(NUM_CLIPS)]
    return render_real_clips(first, seed=1), render_real_clips(second, seed=2)


def test_shipped_weights_are_small_hashed_and_load(net, tmp_path):
    assert FVD_LOCAL_WEIGHTS.is_file() and FVD_LOCAL_WEIGHTS.stat().st_size < 512 * 1024
    assert hashlib.sha256(FVD_LOCAL_WEIGHTS.read_bytes()).hexdigest() == FVD_LOCAL_WEIGHTS_SHA256
    assert net.num_features == 64 and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    own = tmp_path / "own.safetensors"  # e.g. retrained weights: a different file, so a different hash
    save_file(VideoFeatureNet(channels=(4, 8, 8, 16)).state_dict(), str(own))
    with pytest.raises(ValueError, match="own.safetensors.*SHA-256"):
        load_video_feature_net(own)
    assert load_video_feature_net(own, sha256=None).num_features == 16
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_video_feature_net(tmp_path / "missing.safetensors")


def test_features_are_deterministic_and_accept_uint8_or_float(net, real_sets):
    clips = real_sets[0][:8]
    pixels = videos_to_tensor(clips)
    first = net.features(pixels)
    assert first.shape == (8, 64)
    assert torch.equal(first, load_video_feature_net().features(pixels))
    assert torch.allclose(net.features(videos_to_tensor(clips.astype(np.float32) / 255.0)), first)
    with pytest.raises(ValueError, match="videos"):
        videos_to_tensor(clips[0])


def test_shipped_network_reads_attributes_of_held_out_clips(net):
    prompts = heldout_prompts(96, seed=5)
    attributes = [attrs for _, attrs in prompts]
    scores = attribute_accuracy(net, render_real_clips(attributes, seed=5), attributes)
    assert min(scores.values()) > 0.85, scores  # combinations the network never saw either


def test_fvd_separates_real_from_frozen_shuffled_and_noisy_clips(net, real_sets):
    real, other = real_sets
    metric = FrechetVideoDistanceLocal(net, reset_real_features=False)
    assert type(metric).__name__ == "FrechetInceptionDistance"  # torchmetrics does the Fréchet distance
    metric.update(torch.from_numpy(real), real=True)

    def score(videos: np.ndarray) -> float:
        metric.reset()
        metric.update(torch.from_numpy(videos), real=False)
        return float(metric.compute())

    itself, floor = score(real), score(other)
    assert abs(itself) < 1e-6 * max(floor, 1.0)
    assert floor > 0
    frozen = np.repeat(other[:, :1], other.shape[1], axis=1)  # the first frame held still
    shuffled = other[:, np.random.default_rng(0).permutation(other.shape[1])]
    noise = np.random.default_rng(1).normal(0.0, 0.2, other.shape)
    noisy = np.clip(other / 255.0 + noise, 0.0, 1.0).astype(np.float32)
    # Measured with the shipped weights: floor 1014, frozen 6334, shuffled 6365, noisy 3392.
    assert score(frozen) > 4 * floor and score(shuffled) > 4 * floor
    assert score(noisy) > 2 * floor
    assert fvd_local(real, other, net) == pytest.approx(floor, rel=1e-6)


def test_fvd_with_floor_checks_its_arguments(net, real_sets):
    attributes = [sample_attributes(i) for i in range(4)]
    with pytest.raises(ValueError, match="`attributes` has 3 entries for 4"):
        fvd_local_with_floor(real_sets[0][:4], attributes[:3], feature_net=net)
    scores = fvd_local_with_floor(render_real_clips(attributes, seed=100), attributes, feature_net=net, seed=3)
    assert scores["fvd_local_n"] == 4 and scores["fvd_local"] > 0 and scores["fvd_local_floor"] > 0


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("pipe")
    make_tiny_pipeline(tiny_tokenizer).save_pretrained(path)
    return path


def test_evaluate_fvd_flag_reports_fvd_beside_its_floor(saved_pipeline, tmp_path, capsys):
    base = ["evaluate", "--pipeline", str(saved_pipeline), "--num-prompts", "4", "--steps", "1"]
    assert main([*base, "--json", str(tmp_path / "plain.json")]) == 0
    assert "FVD" not in capsys.readouterr().out
    assert "fvd_local" not in json.loads((tmp_path / "plain.json").read_text())

    assert main([*base, "--fvd", "--json", str(tmp_path / "fvd.json")]) == 0
    printed = capsys.readouterr().out
    assert "| color |" in printed and "not comparable to I3D-FVD" in printed and "real vs real (floor)" in printed
    scores = json.loads((tmp_path / "fvd.json").read_text())
    assert scores["fvd_local_n"] == 4 and scores["fvd_local"] > scores["fvd_local_floor"] >= 0
