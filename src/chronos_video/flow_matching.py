"""The rectified-flow objective, written once for training, evaluation, benchmarks and sampling.

Conventions (diffusers' flow-matching ones): a clean clip `x0` in [-1, 1] and Gaussian `noise`
are mixed as `x_t = (1 - sigma) x0 + sigma * noise`, the backbone sees `timestep = 1000 * sigma`
and predicts the velocity `noise - x0`; a backbone configured to predict the clean sample returns
a velocity too (`sample_to_velocity`), so nothing downstream branches on the prediction type.
Classifier-free guidance combines the two velocities as `uncond + scale * (cond - uncond)`.

Users: `training/train.py` (sigmas, inputs, loss), `evaluation.denoising` (held-out loss and caption
swap gap), `benchmarks/train_throughput.py` (the training batch) and the pipelines (guidance).
"""

from __future__ import annotations

from typing import Any

import torch

# `timestep = NUM_TRAIN_TIMESTEPS * sigma`: the scale of `ChronosFlowMatchScheduler` and diffusers'
# `FlowMatchEulerDiscreteScheduler` defaults, which `sample_to_velocity` divides back out.
NUM_TRAIN_TIMESTEPS = 1000

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "SAMPLE_PREDICTION_MIN_SIGMA",
    "classifier_free_guidance",
    "flow_matching_loss",
    "frames_to_model_input",
    "rectified_flow_inputs",
    "sample_flow_sigmas",
    "sample_to_velocity",
    "sigmas_to_timesteps",
    "velocity_mse",
]


def __getattr__(name: str) -> Any:
    """`sample_to_velocity` and its sigma floor live with the backbones' output heads (`models.embeddings`);
    they are re-exported here on first access, so this module imports torch only and the models may
    import it without a cycle."""
    if name in ("sample_to_velocity", "SAMPLE_PREDICTION_MIN_SIGMA"):
        from .models import embeddings

        return getattr(embeddings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sample_flow_sigmas(
    batch_size: int,
    generator: torch.Generator,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
) -> torch.Tensor:
    """Training noise levels in (0, 1) from diffusers' timestep densities, with the sampler's shift.

    diffusers' helper draws from the global RNG; we fork it under `generator`'s seed so each
    training step's noise levels are a pure function of (seed, step) and resume is exact.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = compute_density_for_timestep_sampling(
            weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
        )
    u = u.clamp(1e-4, 1.0 - 1e-4)
    return shift * u / (1 + (shift - 1) * u)


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The backbone's `timestep` argument for noise levels `sigmas`."""
    return sigmas * NUM_TRAIN_TIMESTEPS


def rectified_flow_inputs(x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - sigma) x0 + sigma * noise and the velocity target noise - x0 (diffusers' convention)."""
    view = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - view) * x0 + view * noise, noise - x0


def frames_to_model_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 clips (..., F, H, W, C) in [0, 255] -> float (..., C, F, H, W) in [-1, 1], the backbones' range."""
    if frames.ndim < 4:
        raise ValueError(f"`frames` must end in (frames, height, width, channels), got shape {tuple(frames.shape)}.")
    order = (*range(frames.ndim - 4), frames.ndim - 1, frames.ndim - 4, frames.ndim - 3, frames.ndim - 2)
    return frames.permute(order).float().div(127.5).sub(1.0)


def velocity_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared velocity error, shape (batch,), computed in float32."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def flow_matching_loss(
    prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor | None = None, weighting_scheme: str = "logit_normal"
) -> torch.Tensor:
    """The training loss: mean squared velocity error, weighted per sample by diffusers' SD3 loss
    weighting for `weighting_scheme` ("sigma_sqrt", "cosmap"; uniform for every other scheme)."""
    squared = (prediction.float() - target) ** 2
    if sigmas is None:
        return squared.mean()
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).to(prediction.device)
    return (weights.view(-1, *([1] * (prediction.ndim - 1))) * squared).mean()


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Guided velocity `uncond + guidance_scale * (cond - uncond)`; a scale of 1 returns `cond`."""
    return uncond + guidance_scale * (cond - uncond)
