"""FVD-local: a Fréchet video distance over the features of a small 3D CNN we train on shapes clips.

The standard FVD embeds clips with an I3D network trained on Kinetics, whose weights would have to be
downloaded and which has never seen 32 x 32 synthetic shapes. FVD-local instead embeds clips with
`VideoFeatureNet`, four strided 3D convolutions (75k parameters, 64-d pooled features) trained here,
deterministically and without downloads, to predict the five caption attributes (colour, shape,
size, direction, speed) of 8000 training-split shapes clips (`benchmarks/train_fvd_features.py`
rebuilds the shipped file byte for byte in about 4 minutes on one CPU thread). Predicting direction
and speed forces the features to encode motion, not only appearance, so a frozen or shuffled clip
lands far from a moving one. The shape, size, direction and speed heads see the clips recoloured in
random colours and, half of the time, played backwards, so they cannot lean on which colour or
direction each shape had in the training split. The Fréchet distance itself is torchmetrics'
`FrechetInceptionDistance` with this network as its `feature` module.

The shipped weights (`weights/fvd_local_shapes.safetensors`, SHA-256 checked at load) read the
attributes of 1024 clips of held-out combinations (16 x 32 x 32, paths anywhere) with accuracy
colour 95.4%, shape 98.1%, size, direction and speed 100.0% (all five right: 93.8%), and of 1024
unseen training-combination clips with 99.7% all five right.

FVD-local numbers are only comparable with other FVD-local numbers at the same clip count and
geometry, never with I3D-FVD, and they only mean something beside the real-vs-real floor: the
distance between two independent sets of real clips of the same size (`fvd_local_with_floor`).
With 64-d features the floor falls with the number of clips (training-combination clips, paths
anywhere: about 1740 at 64 clips, 1010 at 128, 380 at 256), so compare scores at one clip count.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.motion import check_start_spread, place_starts
from ..data.shapes import ATTRIBUTE_NAMES, _VOCABULARY, ShapeAttributes, _check_geometry, _render_batch, _start_range

__all__ = [
    "FVD_LOCAL_WEIGHTS",
    "FVD_LOCAL_WEIGHTS_SHA256",
    "FrechetVideoDistanceLocal",
    "VideoFeatureNet",
    "attribute_accuracy",
    "format_fvd_table",
    "fvd_local",
    "fvd_local_with_floor",
    "load_video_feature_net",
    "render_real_clips",
    "videos_to_tensor",
]

FVD_LOCAL_WEIGHTS = Path(__file__).with_name("weights") / "fvd_local_shapes.safetensors"
FVD_LOCAL_WEIGHTS_SHA256 = "56eec0f1b4bd6abeebeb973c2e64c5a06a530c0ad55a8644093e639ce6c5626c"
FVD_LOCAL_LABEL = "FVD-local (our shapes 3D-CNN features; not comparable to I3D-FVD)"


class VideoFeatureNet(nn.Module):
    """Four strided 3D convolutions and a global average pool: (N, 3, F, H, W) in [-1, 1] -> (N, 64).

    Fully convolutional, so it accepts any clip geometry, but it was trained on 16 x 32 x 32 clips
    and its features are calibrated for that size. The temporal receptive field spans 17 frames
    (a whole training clip), enough to see a slow object move.
    `forward` returns one logit tensor per caption attribute (the training objective);
    `features` is what FVD-local compares.
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 64)) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"`channels` must be four positive ints, got {channels!r}.")
        strides = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 1, 1))
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip([3, *channels[:-1]], channels, strides):
            layers += [nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.num_features = channels[-1]
        self.heads = nn.ModuleDict({name: nn.Linear(self.num_features, len(_VOCABULARY[name])) for name in ATTRIBUTE_NAMES})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"`pixels` must be (N, 3, F, H, W), got shape {tuple(pixels.shape)}.")
        return self.encoder(pixels).mean(dim=(2, 3, 4))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def _unit_videos(videos: Any) -> torch.Tensor:
    """Clips (N, F, H, W, 3), uint8 in [0, 255] or float in [0, 1] (numpy, torch or a list of clips),
    as float32 in [0, 1] in the same layout."""
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("`videos` is empty.")
        videos = np.stack([v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in videos])
    tensor = videos if isinstance(videos, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(videos))
    if tensor.ndim != 5 or tensor.shape[-1] != 3:
        raise ValueError(f"`videos` must be (N, F, H, W, 3) clips, got shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if tensor.is_floating_point():
        return tensor.float().clamp(0.0, 1.0)
    raise TypeError(f"`videos` must be uint8 in [0, 255] or float in [0, 1], got dtype {tensor.dtype}.")


def videos_to_tensor(videos: Any) -> torch.Tensor:
    """Clips (N, F, H, W, 3), uint8 or float in [0, 1], as the network's float32 (N, 3, F, H, W) in [-1, 1]."""
    return _unit_videos(videos).permute(0, 4, 1, 2, 3).mul(2.0).sub(1.0).contiguous()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_video_feature_net(
    path: str | Path | None = None, sha256: str | None = FVD_LOCAL_WEIGHTS_SHA256
) -> VideoFeatureNet:
    """The frozen feature network from a safetensors file (default: the weights shipped with the package).

    The file's SHA-256 must equal `sha256` (the shipped weights' hash by default; None skips the
    check, for weights you trained yourself), so a changed file can never silently change FVD-local.
    """
    from safetensors.torch import load_file

    path = FVD_LOCAL_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FVD-local weights file {str(path)!r} does not exist.")
    if sha256 is not None:
        digest = _file_sha256(path)
        if digest != sha256:
            raise ValueError(
                f"FVD-local weights file {str(path)!r} has SHA-256 {digest}, expected {sha256}; "
                "rebuild it with benchmarks/train_fvd_features.py or pass `sha256=None` for your own weights."
            )
    state = load_file(str(path))
    if "encoder.0.weight" not in state:
        raise ValueError(f"{str(path)!r} is not a VideoFeatureNet state dict (no 'encoder.0.weight').")
    channels = [state[f"encoder.{2 * i}.weight"].shape[0] for i in range(4)]
    net = VideoFeatureNet(channels)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class _FeatureExtractor(nn.Module):
    """torchmetrics' `feature` module: raw videos in, float64 (N, d) features out (float64 so the
    covariances and the matrix square root run in double precision)."""

    def __init__(self, net: VideoFeatureNet, batch_size: int = 64) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.num_features = net.num_features
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> "_FeatureExtractor":
        return super().train(False)  # always frozen, even inside a metric put in train mode

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        pixels = videos_to_tensor(videos)
        device = next(self.net.parameters()).device
        parts = [self.net.features(pixels[i : i + self.batch_size].to(device)) for i in range(0, len(pixels), self.batch_size)]
        return torch.cat(parts).double()


def _fid_class():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:  # pragma: no cover - torchmetrics is a dependency
        raise ImportError("FVD-local needs torchmetrics: `pip install torchmetrics>=1.4`.") from error
    return FrechetInceptionDistance


def FrechetVideoDistanceLocal(feature_net: VideoFeatureNet | None = None, **kwargs: Any):
    """torchmetrics' `FrechetInceptionDistance` with `VideoFeatureNet` features in place of Inception.

    `update(videos, real=...)` takes clips (N, F, H, W, 3), uint8 or float in [0, 1]; `compute()`
    gives FVD-local. `kwargs` go to `FrechetInceptionDistance` (e.g. `reset_real_features=False`
    to score several generated sets against one real set).
    """
    net = load_video_feature_net() if feature_net is None else feature_net
    return _fid_class()(feature=_FeatureExtractor(net), **kwargs)


def fvd_local(real: Any, generated: Any, feature_net: VideoFeatureNet | None = None) -> float:
    """FVD-local between two sets of clips (N, F, H, W, 3), each with at least two clips."""
    real, generated = _unit_videos(real), _unit_videos(generated)
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FVD-local needs at least 2 clips per set, got {len(real)} real and {len(generated)} generated.")
    metric = FrechetVideoDistanceLocal(feature_net)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def render_real_clips(
    attributes: Sequence[ShapeAttributes],
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    start_spread: float = 1.0,
) -> np.ndarray:
    """Real shapes clips, one per entry of `attributes`, uint8 (N, F, H, W, 3).

    Paths are placed as `build_shapes_dataset` places them with the same `start_spread` (draws
    from `seed`), so real clips match the placement a pipeline was trained on.
    """
    if not attributes:
        raise ValueError("`attributes` is empty.")
    attrs = [a if isinstance(a, ShapeAttributes) else ShapeAttributes.from_dict(a) for a in attributes]
    num_frames, height, width = _check_geometry(num_frames, height, width)
    start_spread = check_start_spread(start_spread)
    bounds = [_start_range(a, num_frames, height, width) for a in attrs]
    low, high = np.stack([b[0] for b in bounds]), np.stack([b[1] for b in bounds])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    fraction = np.random.default_rng(int(seed)).random((len(attrs), 2))
    frames, _ = _render_batch(attrs, place_starts(low, high, fraction, start_spread), num_frames, height, width)
    return frames


def fvd_local_with_floor(
    generated: Any,
    attributes: Sequence[ShapeAttributes],
    reference_attributes: Sequence[ShapeAttributes] | None = None,
    seed: int = 0,
    start_spread: float = 1.0,
    feature_net: VideoFeatureNet | None = None,
) -> dict[str, float]:
    """FVD-local of `generated` (one clip per entry of `attributes`) beside its real-vs-real floor.

    Both are measured against one real reference set: clips of `reference_attributes` (e.g. another
    draw of held-out prompts; default `attributes`) with their own start positions. The score is
    FVD-local(reference, generated); the floor is FVD-local(reference, real clips with the same
    captions as `generated`), i.e. what a generator that draws exactly the real clips would score
    with this many clips. Paths are placed with `start_spread` (use the pipeline's training value).
    Returns {"fvd_local", "fvd_local_floor", "fvd_local_n"}.
    """
    generated = _unit_videos(generated)
    count, num_frames, height, width = generated.shape[:4]
    if len(attributes) != count:
        raise ValueError(f"`attributes` has {len(attributes)} entries for {count} generated clips.")
    reference_attributes = list(attributes) if reference_attributes is None else list(reference_attributes)
    if len(reference_attributes) != count:
        raise ValueError(f"`reference_attributes` has {len(reference_attributes)} entries for {count} generated clips.")
    if count < 2:
        raise ValueError(f"FVD-local needs at least 2 clips, got {count}.")
    reference = render_real_clips(reference_attributes, num_frames, height, width, seed=2 * seed + 2, start_spread=start_spread)
    matched = render_real_clips(attributes, num_frames, height, width, seed=2 * seed + 1, start_spread=start_spread)
    metric = FrechetVideoDistanceLocal(feature_net, reset_real_features=False)
    metric.update(torch.from_numpy(reference), real=True)
    metric.update(generated, real=False)
    score = float(metric.compute())
    metric.reset()  # keeps the reference statistics
    metric.update(torch.from_numpy(matched), real=False)
    return {"fvd_local": score, "fvd_local_floor": float(metric.compute()), "fvd_local_n": count}


def format_fvd_table(scores: Mapping[str, float]) -> str:
    """Markdown line pair for `fvd_local_with_floor` scores, always with the floor beside the score."""
    return (
        f"| {FVD_LOCAL_LABEL} | n | generated vs real | real vs real (floor) |\n|---|---:|---:|---:|\n"
        f"| held-out captions | {int(scores['fvd_local_n'])} | {scores['fvd_local']:.3f} | {scores['fvd_local_floor']:.3f} |"
    )


@torch.no_grad()
def attribute_accuracy(
    net: VideoFeatureNet, videos: Any, attributes: Sequence[ShapeAttributes], batch_size: int = 128
) -> dict[str, float]:
    """Share of clips whose every caption attribute the network's heads predict right ("all": all five)."""
    pixels = videos_to_tensor(videos)
    if len(attributes) != len(pixels):
        raise ValueError(f"`attributes` has {len(attributes)} entries for {len(pixels)} clips.")
    net = net.eval()
    correct = {name: [] for name in ATTRIBUTE_NAMES}
    for start in range(0, len(pixels), batch_size):
        logits = net(pixels[start : start + batch_size])
        for name in ATTRIBUTE_NAMES:
            target = torch.tensor([_VOCABULARY[name].index(getattr(a, name)) for a in attributes[start : start + batch_size]])
            correct[name].append(logits[name].argmax(-1) == target)
    hits = {name: torch.cat(values) for name, values in correct.items()}
    scores = {name: float(h.float().mean()) for name, h in hits.items()}
    scores["all"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return scores
