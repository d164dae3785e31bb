"""The Haar-wavelet information gate of Chronos-V: which tubelets the Mamba mixers may skip.

E(X) = mean |Haar detail| of the *input video* per tubelet (optionally minus the detail energy the
noise contributes at this timestep). Tokens with E below a threshold carry little spatial detail and
skip the sequence mixer; they still receive cross-attention and the MLP.

Two relaxations of the same decision:

* soft: the mask sigmoid((E - threshold) / temperature) multiplies the mixer's step size delta and
  its residual update, so the threshold can be trained through. Used only while gradients are taken
  in training mode (or when asked for explicitly), never by a sampling loop under `torch.no_grad`.
* hard: keep = E > threshold. A token with delta = 0 is transparent to the scan (decay 1, no input),
  so dropping the skipped tokens from the sequence (gather, scan the shorter sequence, scatter back)
  computes what the hard-masked full-length block computes, with less work ("gather"); "mask" runs
  the full length with the hard mask (no saving, useful to check the gather path).

The gate returns its decision and statistics; it stores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.wavelet import GAUSSIAN_DETAIL_ENERGY, patch_detail_energy

GATE_RELAXATIONS: tuple[str, ...] = ("auto", "soft", "hard")


def tubelet_detail_energy(
    hidden_states: torch.Tensor, timestep: torch.Tensor, patch_size: tuple[int, int, int], noise_floor: bool
) -> torch.Tensor:
    """Per-tubelet information energy (B, L) of a (B, C, F, H, W) video, in raster token order.

    With `noise_floor`, subtracts the energy unit Gaussian noise contributes at sigma = timestep / 1000
    (sigma * sqrt(2/pi)), so the gate measures signal rather than noise.
    """
    energy = patch_detail_energy(hidden_states, patch_size).flatten(1)
    if noise_floor:
        sigma = (timestep.float() / 1000.0).clamp(0.0, 1.0).to(energy.device)
        energy = energy - GAUSSIAN_DETAIL_ENERGY * sigma[:, None]
    return energy


@dataclass
class GateDecision:
    """Which video tokens the mixers process, and how the skipped ones are silenced.

    `token_raster` (1 or B, Lv) lists the raster index of every video token of the mixer sequence:
    all of them, or in gather mode the kept ones first (raster order), padded to the longest row.
    """

    mode: str  # "off" | "soft" | "gather" | "mask"
    token_raster: torch.Tensor
    token_scale: torch.Tensor | None = None  # (B, Lv) multiplies delta (soft or hard mask, padding = 0)
    update_scale: torch.Tensor | None = None  # (B, L, 1) multiplies the mixer's residual update
    kept_index: torch.Tensor | None = None  # gather mode: (B, Lk) raster indices of the kept tokens
    kept_valid: torch.Tensor | None = None  # gather mode: (B, Lk, 1) 1 for kept tokens, 0 for padding
    stats: dict[str, Any] = field(default_factory=dict)


def ungated(num_tokens: int, device: torch.device) -> GateDecision:
    """Every token goes through the mixers."""
    raster = torch.arange(num_tokens, device=device)[None]
    return GateDecision("off", raster, stats=_stats("off", 0.0, num_tokens, num_tokens))


def _stats(mode: str, skipped: float, num_tokens: int, mixer_tokens: int) -> dict[str, Any]:
    return {"mode": mode, "skipped_fraction": skipped, "video_tokens": num_tokens, "mixer_video_tokens": mixer_tokens}


class WaveletGate:
    """Decides per tubelet whether the Mamba mixers see it (see the module docstring).

    Holds no parameters (the shipped checkpoints have none for it), only the configured threshold
    and two runtime switches:

    * `relaxation`: "auto" (soft while gradients are taken in training mode, hard otherwise: sampling
      under `torch.no_grad` never depends on `.training`), "soft" or "hard" (forced, e.g. by a
      training loop that wants the hard gate, or a study of the soft one).
    * `gather`: with the hard gate, drop the skipped tokens from the sequence (True) or run the full
      sequence with the hard mask (False). Both compute the same thing; only gathering saves work.
    """

    def __init__(self, patch_size: tuple[int, int, int], threshold: float, temperature: float, noise_floor: bool):
        if temperature <= 0:
            raise ValueError(f"`gate_temperature` must be > 0, got {temperature}.")
        self.patch_size = patch_size
        self.threshold = threshold
        self.temperature = temperature
        self.noise_floor = noise_floor
        self.relaxation = "auto"
        self.gather = True

    def energy(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return tubelet_detail_energy(hidden_states, timestep, self.patch_size, self.noise_floor)

    def uses_soft_mask(self, training: bool) -> bool:
        """The relaxation for this call: "auto" is soft only when a training step takes gradients."""
        if self.relaxation not in GATE_RELAXATIONS:
            raise ValueError(f"`relaxation` must be one of {list(GATE_RELAXATIONS)}, got {self.relaxation!r}.")
        if self.relaxation == "auto":
            return training and torch.is_grad_enabled()
        return self.relaxation == "soft"

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, training: bool = False) -> GateDecision:
        """Decision for a (B, C, F, H, W) input at `timestep` (B,); `training` is the caller's mode."""
        energy = self.energy(hidden_states, timestep)
        num_tokens = energy.shape[1]
        raster = torch.arange(num_tokens, device=energy.device)[None]
        if self.uses_soft_mask(training):
            soft = torch.sigmoid((energy - self.threshold) / self.temperature)
            skipped = float((soft < 0.5).float().mean())
            return GateDecision("soft", raster, soft, soft.unsqueeze(-1), stats=_stats("soft", skipped, num_tokens, num_tokens))
        keep = energy > self.threshold
        skipped = 1.0 - float(keep.float().mean())
        if not self.gather:
            hard = keep.float()
            return GateDecision("mask", raster, hard, hard.unsqueeze(-1), stats=_stats("mask", skipped, num_tokens, num_tokens))
        if bool(keep.all()):
            return GateDecision("gather", raster, stats=_stats("gather", skipped, num_tokens, num_tokens))
        # Kept tokens first (stable, so raster order is preserved), padded to the longest row.
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
        kept_index = order[:, : int(keep.sum(dim=1).max())]
        kept_valid = torch.gather(keep, 1, kept_index)
        stats = _stats("gather", skipped, num_tokens, kept_index.shape[1])
        return GateDecision("gather", kept_index, kept_valid.float(), None, kept_index, kept_valid.unsqueeze(-1), stats)
