"""ChronosFlowMatchScheduler: diffusers' flow-matching Euler scheduler with a Heun option.

The scheduler is only a sampler. Sampling policy (precision schedules, constraint settings)
lives in the pipeline's own config; configs saved before that move still load (see
`LEGACY_PIPELINE_KEYS`).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks for it here)

SOLVERS = ("euler", "heun")
# Pipeline policy that older scheduler_config.json files carry; loaded into
# `legacy_pipeline_config` for the pipeline to adopt, never written back to the scheduler config.
LEGACY_PIPELINE_KEYS = ("precision_schedule", "calibrated_precision_schedule", "precision_backend", "constraint_settings")


def current_sigmas(scheduler) -> tuple[float, float]:
    """(sigma of the model evaluation in progress, the next smaller sigma) for any flow-match scheduler.

    Reads only the public `sigmas` and `step_index` that diffusers' flow-match schedulers share
    (`step_index` is None before the first step: then `begin_index`, else 0). Heun-type schedulers
    repeat sigmas for the corrector evaluation, so the next *smaller* sigma is returned: per-step
    hooks (constraint guidance) always see a step that moves towards the data.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        raise TypeError(f"{type(scheduler).__name__} has no `sigmas`; use a flow-match scheduler and call `set_timesteps` first.")
    index = scheduler.step_index
    if index is None:
        index = getattr(scheduler, "begin_index", None) or 0
    sigma = float(sigmas[index])
    later = [float(s) for s in sigmas[index + 1 :] if float(s) < sigma]
    return sigma, (later[0] if later else 0.0)


class ChronosFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching sampler for velocity predictors (v = noise - x0), Euler or Heun.

    With `solver="heun"` the timestep list repeats every interior timestep once, the same
    contract as diffusers' `FlowMatchHeunDiscreteScheduler`: a pipeline loops over
    `scheduler.timesteps`, calling the model once per entry, and needs no solver-specific code.
    Every parent argument is re-declared so `save_pretrained`/`from_pretrained` round-trips.

    `precision_schedule`, `calibrated_precision_schedule`, `precision_backend` and
    `constraint_settings` are accepted only so configs and code from before they moved to the
    pipeline keep working: they are kept in `legacy_pipeline_config` (not in the config), and a
    pipeline given this scheduler adopts the ones it has not set itself.
    """

    ignore_for_config = list(LEGACY_PIPELINE_KEYS)
    # Drop-in replacements a pipeline samples with unchanged (`scheduler.compatibles` lists them).
    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        solver: Literal["euler", "heun"] = "euler",
        precision_schedule: dict | str | None = None,
        calibrated_precision_schedule: dict | None = None,
        precision_backend: Literal["emulate", "native"] | None = None,
        constraint_settings: dict | None = None,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if stochastic_sampling and solver == "heun":
            raise ValueError("`stochastic_sampling=True` is only defined for `solver='euler'`.")
        legacy = dict(zip(LEGACY_PIPELINE_KEYS, (precision_schedule, calibrated_precision_schedule, precision_backend, constraint_settings)))
        self.legacy_pipeline_config = {key: value for key, value in legacy.items() if value is not None}
        if self.legacy_pipeline_config:  # the pipeline's rules apply to its own policy, wherever it was written
            from ..pipelines.pipeline_flow_video import check_pipeline_policy

            check_pipeline_policy(**self.legacy_pipeline_config)
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        self._reset_heun_state()

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # Old scheduler_config.json files carry pipeline policy: hand it to __init__ (which keeps it
        # out of the config) instead of letting diffusers warn and re-register it as unknown keys.
        config_dict = dict(config_dict)
        legacy = {key: config_dict.pop(key) for key in LEGACY_PIPELINE_KEYS if key in config_dict}
        legacy.update({key: kwargs.pop(key) for key in LEGACY_PIPELINE_KEYS if key in kwargs})
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        return {**init_dict, **legacy}, unused_kwargs, hidden_dict

    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    def _reset_heun_state(self) -> None:
        self._prev_derivative = None
        self._prev_sample = None
        self._prev_dt = None

    @property
    def state_in_first_order(self) -> bool:
        return self._prev_derivative is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device = None, **kwargs) -> None:
        if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        super().set_timesteps(num_inference_steps, device=device, **kwargs)
        self._reset_heun_state()
        if self.config.solver == "heun":
            # sigmas: [s0, s1, ..., s_{n-1}, 0] -> [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]; the last
            # step (to sigma 0) stays first order since the model is never evaluated at sigma 0.
            sigmas = self.sigmas
            self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
            self.timesteps = torch.cat([self.timesteps[:1], self.timesteps[1:].repeat_interleave(2)])

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        if self.config.solver == "euler":
            return super().step(
                model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                generator=generator, per_token_timesteps=per_token_timesteps, return_dict=return_dict,
            )
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("Pass one of `scheduler.timesteps` (float) to `step()`, not an integer index.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        velocity = model_output.to(torch.float32)
        if self.state_in_first_order:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
            dt = sigma_next - sigma
            if sigma_next > 0:  # keep the Euler predictor; the next call evaluates the corrector
                self._prev_derivative, self._prev_sample, self._prev_dt = velocity, sample, dt
            prev_sample = sample + dt * velocity
        else:
            derivative = 0.5 * (self._prev_derivative + velocity)
            prev_sample = self._prev_sample + self._prev_dt * derivative
            self._reset_heun_state()
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    def current_sigmas(self) -> tuple[float, float]:
        """Same as the module's `current_sigmas(scheduler)`, which pipelines use for any scheduler."""
        return current_sigmas(self)
