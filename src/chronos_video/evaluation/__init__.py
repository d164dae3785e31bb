"""Evaluation tools: the pixel oracle that reads shapes attributes back from generated videos, and
the held-out denoising loss used where samples are not yet informative, and the caption-swap
loss gap that tells whether a model uses a caption attribute at all, and FVD-local (a Fréchet video distance over
features of a small network trained on shapes clips; not comparable to I3D-FVD)."""

from .denoising import caption_swap_loss_gap, caption_swap_loss_gaps, heldout_denoising_loss, swapped_attribute
from .fvd_local import FrechetVideoDistanceLocal, VideoFeatureNet, fvd_local, fvd_local_with_floor, load_video_feature_net
from .oracle import ShapesOracle, format_oracle_table

__all__ = [
    "FrechetVideoDistanceLocal",
    "ShapesOracle",
    "VideoFeatureNet",
    "caption_swap_loss_gap",
    "caption_swap_loss_gaps",
    "format_oracle_table",
    "fvd_local",
    "fvd_local_with_floor",
    "heldout_denoising_loss",
    "load_video_feature_net",
    "swapped_attribute",
]
