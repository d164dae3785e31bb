"""ChronosFlowMatchScheduler: diffusers' flow-matching Euler scheduler with a Heun option.

It also stores the constraint-transport sampler's settings (precision schedules, constraint
correction) in its config, so a saved pipeline reproduces its sampling exactly.
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


class ChronosFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching sampler for velocity predictors (v = noise - x0), Euler or Heun.

    With `solver="heun"` the timestep list repeats every interior timestep once, the same
    contract as diffusers' `FlowMatchHeunDiscreteScheduler`: a pipeline loops over
    `scheduler.timesteps`, calling the model once per entry, and needs no solver-specific code.
    Every parent argument is re-declared so `save_pretrained`/`from_pretrained` round-trips.
    """

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
        precision_backend: Literal["emulate", "native"] = "emulate",
        constraint_settings: dict | None = None,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if stochastic_sampling and solver == "heun":
            raise ValueError("`stochastic_sampling=True` is only defined for `solver='euler'`.")
        if precision_backend not in ("emulate", "native"):
            raise ValueError(f"`precision_backend` must be 'emulate' or 'native', got {precision_backend!r}.")
        for name, value in (("precision_schedule", precision_schedule), ("calibrated_precision_schedule", calibrated_precision_schedule)):
            if value is not None and not isinstance(value, (dict, str)):
                raise ValueError(f"`{name}` must be a dict (PrecisionSchedule.to_dict()), a preset name or None, got {type(value).__name__}.")
        if constraint_settings is not None and not isinstance(constraint_settings, dict):
            raise ValueError(f"`constraint_settings` must be a dict (ConstraintTransport.to_config()) or None, got {type(constraint_settings).__name__}.")
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
        """(sigma at which the model is evaluated next, the next smaller sigma), for per-step hooks.

        For Heun's corrector evaluation the sigma list repeats, so the next *smaller* sigma is
        returned: guidance always sees a step that moves towards the data.
        """
        index = self.step_index or 0
        sigma = float(self.sigmas[index])
        later = [float(s) for s in self.sigmas[index + 1 :] if float(s) < sigma]
        return sigma, (later[0] if later else 0.0)
