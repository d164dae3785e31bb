"""Constraint transport: steer a flow-matching sampler so the decoded video meets region constraints.

Conventions (diffusers flow matching, σ decreasing from ~1 to 0): latents ``z`` are ``(B, C, F, H, W)``,
the model predicts ``v = noise - x0``, the clean estimate is ``x̂0 = z - σ·v`` and an Euler step is
``z_next = z + (σ_next - σ)·v``. ``decode(x̂0)`` returns pixels ``(B, F, C, H, W)`` in ``[0, 1]``.

Every correction is computed on the clean estimate with the model velocity held fixed over the step
(no backpropagation through the network: :meth:`ConstraintTransport.correct` sees the velocity, not
the model), then mapped back to a velocity. A change ``Δ`` of ``x̂0`` at the current ``z`` is the
velocity change ``Δv = -Δ / σ``; after the Euler step the latent has moved by ``Δ·(σ - σ_next)/σ``, i.e.
the whole ``Δ`` on the last step (``σ_next = 0``), where the output *is* the corrected ``x̂0``.

Natural gradient: the step is ``Δ = -λ(σ)·G⁻¹∇L`` for ``L = ½‖r‖²`` of the stacked, strength-weighted
residual ``r``, with the pullback metric ``G = JᵀJ + δI`` of :mod:`.metric` (dense Cholesky or CG solves).

CBF safety filter (:mod:`.cbf`): after the nominal method, the least-``G``-norm velocity change that keeps
every barrier ``h = ε² - mean_Ω (D(x̂0) - g)²`` decaying at a finite-time class-K rate.

Baselines: ``"dps"`` takes the plain gradient step ``z_next -= λ∇L`` (gradient through ``x̂0``, velocity
held fixed); ``"repaint"`` replaces Ω of ``x̂0`` by the encoded target and re-noises to ``σ_next`` with
the model's own noise estimate ``ε̂ = z + (1 - σ)v`` (deterministic).

The guarantees of both corrections hold under the frozen-velocity model; :meth:`ConstraintTransport.finalize`
is the hard check: it projects the final sample onto the constraint set with a few damped Gauss–Newton
steps and reports whether every ``‖D(x0)|Ω - g‖_RMS ≤ ε``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..decoding import default_latent_mask
from .cbf import BarrierFilter, cbf_qp, cbf_safety_filter, finite_time_alpha  # noqa: F401 - re-exported (lived here)
from .constraints import RegionConstraint
from .metric import DENSE_MAX_ELEMENTS, SOLVERS, CGResult, PullbackMetric, conjugate_gradient  # noqa: F401 - re-exported

Decoder = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("natural", "dps", "repaint", "none")


# ---------------------------------------------------------------------------------------------
# strength schedule
# ---------------------------------------------------------------------------------------------
@dataclass
class StrengthSchedule:
    """Guidance strength ``λ(σ) = scale · (1 - σ)^power`` inside ``[sigma_min, sigma_max]``, else 0.

    ``power = 0`` is a constant; ``power > 0`` ramps the guidance up as the sample gets cleaner.
    A dataclass (not a lambda) so it can live in a pipeline config.
    """

    scale: float = 1.0
    power: float = 0.0
    sigma_min: float = 0.0
    sigma_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("scale", "power", "sigma_min", "sigma_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"StrengthSchedule.{name} must be a finite number, got {value!r}.")
            setattr(self, name, float(value))
        if self.scale < 0 or self.power < 0:
            raise ValueError(f"StrengthSchedule needs scale >= 0 and power >= 0, got {self.scale}, {self.power}.")
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"StrengthSchedule needs sigma_min <= sigma_max, got {self.sigma_min} > {self.sigma_max}.")

    def __call__(self, sigma: float) -> float:
        if not self.sigma_min <= sigma <= self.sigma_max:
            return 0.0
        return self.scale * max(0.0, 1.0 - sigma) ** self.power

    def to_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "power": self.power, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


def _as_schedule(strength: Any) -> StrengthSchedule | Callable[[float], float]:
    if isinstance(strength, StrengthSchedule):
        return strength
    if isinstance(strength, dict):
        return StrengthSchedule(**strength)
    if isinstance(strength, (int, float)) and not isinstance(strength, bool):
        return StrengthSchedule(scale=float(strength))
    if callable(strength):
        return strength
    raise TypeError(
        f"`strength` must be a float, a StrengthSchedule (or its dict) or a callable sigma -> float, got {type(strength).__name__}."
    )


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------
@dataclass
class StepInfo:
    """Diagnostics of one :meth:`ConstraintTransport.correct` call, measured at the model's ``x̂0`` (before correction).

    ``residual``: per constraint, ``D(x̂0)|Ω - g`` of shape ``(B, |Ω_k|)``; ``barrier`` and ``violation``:
    ``(B, K)`` (``h = ε² - mean r²`` and RMS error); ``cbf_active``: ``(B,)`` whether the filter changed the
    velocity; ``strength``: ``λ(σ)`` used; ``cg_iterations``: None for dense solves or when no solve ran.
    """

    residual: list[torch.Tensor]
    barrier: torch.Tensor
    violation: torch.Tensor
    cbf_active: torch.Tensor | None = None
    strength: float | list[float] = 0.0
    cg_iterations: int | None = None
    solver: str | None = None

    @property
    def satisfied(self) -> torch.Tensor:
        """``(B,)``: every constraint within its ε at this step's ``x̂0``."""
        return (self.barrier >= 0).all(dim=1)


class ProjectionResult(NamedTuple):
    """``x0`` projected onto the constraint set, whether all samples satisfy every constraint, and the
    RMS violation per sample and constraint ``(B, K)`` after projection."""

    x0: torch.Tensor
    satisfied: bool
    violation: torch.Tensor


def _clean_input(tensor: torch.Tensor) -> torch.Tensor:
    """Detached normal tensor even if created under ``torch.inference_mode`` (autograd refuses those)."""
    return tensor.detach().clone()


class ConstraintTransport:
    """Per-step constraint guidance for flow-matching samplers.

    Args:
        constraints: one or more :class:`RegionConstraint` on the same ``(F, C, H, W)`` video (may be set later).
        method: ``"natural"`` (damped Gauss–Newton/natural gradient, ``-λ G⁻¹∇L``), ``"dps"`` (plain gradient
            ``-λ∇L`` applied to ``z_next`` as in DPS, through ``x̂0`` with the velocity held fixed), ``"repaint"``
            (replace Ω of ``x̂0`` by the encoded target, keep the model's noise estimate) or ``"none"``.
        solver: ``"auto"`` (dense if ``min(|Ω|, latent size) <= dense_threshold`` and the Jacobian has at most
            ``DENSE_MAX_ELEMENTS`` entries), ``"cholesky"`` or ``"cg"``.
        cbf: apply the CBF safety filter after the nominal method.
        strength: ``λ(σ)``: a float, a :class:`StrengthSchedule` (or its dict) or any callable ``σ -> float``.
        cg_iters, cg_tol: conjugate-gradient budget and relative tolerance.
        damping: ``δ`` in ``G = JᵀJ + δI`` (pixel²-per-latent² units; small against the decoder's ``J``).
        dense_threshold: size up to which ``"auto"`` uses Cholesky.
        cbf_gain, cbf_exponent: ``k`` and ``ρ`` of :func:`finite_time_alpha`.
        cbf_max_level: a single step is never asked to push ``h`` above ``cbf_max_level·ε²``.
        cbf_curvature: keep the filter's direction (the QP solution) but choose its length with the
            Gauss–Newton model ``h(x̂0 + δ) ≈ ε² - mean(r + Jδ)²`` over the finite step (two extra jvps).
            ``h`` is concave along the correction, so its linearisation promises about twice the progress a
            long step delivers; ``False`` uses the plain linearised QP.
        finalize_iters: Gauss–Newton iterations in :meth:`finalize`.
        finalize_level: :meth:`finalize` aims at an RMS error of ``finalize_level·ε`` (a margin inside the ball).
    """

    def __init__(
        self,
        constraints: RegionConstraint | Sequence[RegionConstraint] = (),
        method: str = "natural",
        solver: str = "auto",
        cbf: bool = True,
        strength: float | StrengthSchedule | dict | Callable[[float], float] = 1.0,
        cg_iters: int = 30,
        cg_tol: float = 1e-5,
        damping: float = 1e-3,
        dense_threshold: int = 1024,
        cbf_gain: float = 10.0,
        cbf_exponent: float = 0.5,
        cbf_max_level: float = 0.5,
        cbf_curvature: bool = True,
        finalize_iters: int = 10,
        finalize_level: float = 0.5,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if not isinstance(cbf, bool):
            raise TypeError(f"`cbf` must be a bool, got {type(cbf).__name__}.")
        for name, value in (("cg_iters", cg_iters), ("dense_threshold", dense_threshold), ("finalize_iters", finalize_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "finalize_iters" else 1):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for name, value in (("cg_tol", cg_tol), ("damping", damping), ("cbf_gain", cbf_gain)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
        if not 0 < cbf_exponent < 1:
            raise ValueError(f"`cbf_exponent` must lie in (0, 1) for finite-time convergence, got {cbf_exponent}.")
        for name, value in (("cbf_max_level", cbf_max_level), ("finalize_level", finalize_level)):
            if not 0 <= value < 1:
                raise ValueError(f"`{name}` must lie in [0, 1), got {value}.")
        self.method = method
        self.solver = solver
        self.cbf = cbf
        self.strength = _as_schedule(strength)
        self.cg_iters = cg_iters
        self.cg_tol = float(cg_tol)
        self.damping = float(damping)
        self.dense_threshold = dense_threshold
        self.cbf_gain = float(cbf_gain)
        self.cbf_exponent = float(cbf_exponent)
        self.cbf_max_level = float(cbf_max_level)
        if not isinstance(cbf_curvature, bool):
            raise TypeError(f"`cbf_curvature` must be a bool, got {type(cbf_curvature).__name__}.")
        self.cbf_curvature = cbf_curvature
        self.finalize_iters = finalize_iters
        self.finalize_level = float(finalize_level)
        self.constraints = constraints

    # -- configuration ---------------------------------------------------------------------------
    @property
    def constraints(self) -> list[RegionConstraint]:
        return self._constraints

    @constraints.setter
    def constraints(self, constraints: RegionConstraint | Sequence[RegionConstraint]) -> None:
        if isinstance(constraints, RegionConstraint):
            constraints = [constraints]
        constraints = list(constraints)
        for i, c in enumerate(constraints):
            if not isinstance(c, RegionConstraint):
                raise TypeError(f"`constraints[{i}]` must be a RegionConstraint, got {type(c).__name__}.")
        shapes = {tuple(c.shape) for c in constraints}
        if len(shapes) > 1:
            raise ValueError(f"All constraints must describe the same (F, C, H, W) video, got shapes {sorted(shapes)}.")
        self._constraints = constraints

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable settings (not the constraint tensors), e.g. for a pipeline config."""
        if not isinstance(self.strength, StrengthSchedule):
            raise ValueError("`strength` is an arbitrary callable and cannot be serialised; use a StrengthSchedule.")
        return {
            "method": self.method,
            "solver": self.solver,
            "cbf": self.cbf,
            "strength": self.strength.to_dict(),
            "cg_iters": self.cg_iters,
            "cg_tol": self.cg_tol,
            "damping": self.damping,
            "dense_threshold": self.dense_threshold,
            "cbf_gain": self.cbf_gain,
            "cbf_exponent": self.cbf_exponent,
            "cbf_max_level": self.cbf_max_level,
            "cbf_curvature": self.cbf_curvature,
            "finalize_iters": self.finalize_iters,
            "finalize_level": self.finalize_level,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], constraints: RegionConstraint | Sequence[RegionConstraint] = ()
    ) -> "ConstraintTransport":
        if not isinstance(config, dict):
            raise TypeError(f"`config` must be a dict from `to_config()`, got {type(config).__name__}.")
        return cls(constraints, **config)

    def __repr__(self) -> str:
        return f"ConstraintTransport(method={self.method!r}, cbf={self.cbf}, solver={self.solver!r}, constraints={len(self.constraints)})"

    # -- residual stack -----------------------------------------------------------------------
    def _residual_fn(self, decode: Decoder) -> Callable[[torch.Tensor], torch.Tensor]:
        weights = [math.sqrt(c.strength) for c in self.constraints]

        def residual(x0: torch.Tensor) -> torch.Tensor:
            pixels = decode(x0)
            return torch.cat([w * c.residual(pixels) for w, c in zip(weights, self.constraints)], dim=1)

        return residual

    def _blocks(self) -> list[slice]:
        blocks, start = [], 0
        for c in self.constraints:
            blocks.append(slice(start, start + c.num_elements))
            start += c.num_elements
        return blocks

    def _split(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Unweighted per-constraint residuals from the weighted stack."""
        return [stacked[:, blk] / math.sqrt(c.strength) for blk, c in zip(self._blocks(), self.constraints)]

    def _measure(self, residuals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mse = torch.stack([r.pow(2).mean(dim=1) for r in residuals], dim=1)
        eps2 = torch.tensor([c.epsilon**2 for c in self.constraints], dtype=mse.dtype, device=mse.device)
        return eps2 - mse, mse.sqrt()

    def _epsilons(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([c.epsilon for c in self.constraints], dtype=like.dtype, device=like.device)

    # -- per-step correction ------------------------------------------------------------------
    @staticmethod
    def _sigma_tensor(sigma: float | torch.Tensor, batch: int, name: str) -> torch.Tensor:
        value = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().flatten()
        if value.numel() == 1:
            value = value.expand(batch)
        if value.numel() != batch:
            raise ValueError(f"`{name}` must be a scalar or have one value per sample ({batch}), got {value.numel()}.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` must be finite.")
        return value.clone()

    def _check_latents(self, z: torch.Tensor, velocity: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 5:
            raise ValueError(f"`z` must be latents of shape (B, C, F, H, W), got {getattr(z, 'shape', type(z).__name__)}.")
        if not isinstance(velocity, torch.Tensor) or velocity.shape != z.shape:
            raise ValueError(
                f"`velocity` must have the same shape as `z` {tuple(z.shape)}, got {getattr(velocity, 'shape', type(velocity).__name__)}."
            )
        if not z.is_floating_point():
            raise ValueError(f"`z` must be floating point, got {z.dtype}.")

    def correct(
        self,
        z: torch.Tensor,
        velocity: torch.Tensor,
        sigma: float | torch.Tensor,
        sigma_next: float | torch.Tensor,
        decode: Decoder,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, StepInfo]:
        """Return the corrected velocity for the Euler step ``σ → σ_next`` and diagnostics.

        ``decode`` maps clean latents to pixels ``(B, F, C, H, W)`` in ``[0, 1]``; ``encode`` (its inverse)
        is only needed by ``method="repaint"`` and defaults to ``decode.encode`` when the decoder has one.
        """
        self._check_latents(z, velocity)
        if not callable(decode):
            raise TypeError(f"`decode` must be callable latents -> pixels, got {type(decode).__name__}.")
        batch = z.shape[0]
        sig = self._sigma_tensor(sigma, batch, "sigma")
        sig_next = self._sigma_tensor(sigma_next, batch, "sigma_next")
        if bool((sig <= 0).any()):
            raise ValueError(f"`sigma` must be > 0 (x̂0 = z - σ·v maps to the velocity through 1/σ), got {sig.tolist()}.")
        if bool((sig_next >= sig).any()) or bool((sig_next < 0).any()):
            raise ValueError(f"`sigma_next` must satisfy 0 <= sigma_next < sigma, got {sig_next.tolist()} vs {sig.tolist()}.")
        if not self.constraints:
            empty = z.new_zeros(batch, 0)
            return velocity, StepInfo([], empty, empty)

        with torch.inference_mode(False), torch.enable_grad():
            z_in, v_in = _clean_input(z), _clean_input(velocity)
            out_dtype = velocity.dtype
            view = (batch,) + (1,) * (z.ndim - 1)
            sig_b = sig.to(device=z.device, dtype=z.dtype).view(view)
            x0 = z_in - sig_b * v_in
            lam_values = [float(self.strength(float(s))) for s in sig]
            if any(not math.isfinite(l) or l < 0 for l in lam_values):
                raise ValueError(f"`strength` schedule returned invalid values {lam_values}; expected finite >= 0.")
            lam = torch.tensor(lam_values, dtype=torch.float64)

            guiding = bool((lam > 0).any())  # λ(σ) = 0 switches the nominal method off at this σ
            need_metric = (self.method in ("natural", "dps") and guiding) or self.cbf
            metric = None
            if need_metric:
                metric = PullbackMetric(self._residual_fn(decode), x0, self.damping, self.dense_threshold)
                stacked = metric.residual
            else:
                with torch.no_grad():
                    stacked = self._residual_fn(decode)(x0).float()
            residuals = self._split(stacked)
            barrier, violation = self._measure(residuals)
            work = stacked.dtype
            lam_w = lam.to(device=z.device, dtype=work)
            sig_w = sig.to(device=z.device, dtype=work)
            dt_w = (sig - sig_next).to(device=z.device, dtype=work)
            v_flat = v_in.reshape(batch, -1).to(work)

            solves: list[torch.Tensor] | None = None
            cg_iterations = None
            resolved = None
            if metric is not None and ((self.method == "natural" and guiding) or self.cbf):
                resolved = metric._resolve(self.solver)
                blocks = self._blocks()
                cotangents = []
                if self.cbf and len(blocks) > 1:
                    for blk in blocks:
                        w = torch.zeros_like(stacked)
                        w[:, blk] = stacked[:, blk]
                        cotangents.append(w)
                else:
                    cotangents.append(stacked)
                solves = []
                for w in cotangents:
                    s, iters = metric.solve_cotangent(w, self.solver, self.cg_iters, self.cg_tol)
                    solves.append(s)
                    if iters is not None:
                        cg_iterations = iters if cg_iterations is None else max(cg_iterations, iters)

            # nominal method -------------------------------------------------------------------
            if not guiding:
                v_nominal = v_flat
            elif self.method == "natural":
                delta = -lam_w[:, None] * torch.stack(solves).sum(dim=0)  # x̂0 change
                v_nominal = v_flat - delta / sig_w[:, None]
            elif self.method == "dps":
                grad = metric.vjp(stacked)  # ∇L through x̂0, L = ½‖r‖²
                v_nominal = v_flat + lam_w[:, None] * grad / dt_w[:, None]  # z_next -= λ∇L
            elif self.method == "repaint":
                v_nominal = self._repaint(z_in, v_in, x0, sig, sig_next, lam, decode, encode).reshape(batch, -1).to(work)
            else:
                v_nominal = v_flat

            # CBF safety filter -----------------------------------------------------------------
            cbf_active = None
            if self.cbf:
                barrier_filter = BarrierFilter(self.cbf_gain, self.cbf_exponent, self.cbf_max_level, self.cbf_curvature)
                v_nominal, cbf_active = barrier_filter(
                    metric, stacked, solves, barrier, v_flat, v_nominal, sig_w, dt_w, self.constraints, self._blocks()
                )

            corrected = v_nominal.reshape(velocity.shape).to(out_dtype)
        info = StepInfo(
            residual=[r.detach() for r in residuals],
            barrier=barrier.detach(),
            violation=violation.detach(),
            cbf_active=cbf_active,
            strength=lam_values[0] if len(set(lam_values)) == 1 else lam_values,
            cg_iterations=cg_iterations,
            solver=resolved,
        )
        return corrected, info

    def _repaint(
        self,
        z: torch.Tensor,
        velocity: torch.Tensor,
        x0: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        lam: torch.Tensor,
        decode: Decoder,
        encode: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        encoder = encode if encode is not None else getattr(decode, "encode", None)
        if encoder is None or not callable(encoder):
            raise ValueError(
                "method='repaint' replaces the constrained region in latent space and needs an encoder: pass "
                "`encode=` (pixels (B, F, C, H, W) in [0, 1] -> latents) or use a decoder with an `encode` method "
                "(chronos_video.decoding.LatentDecoder)."
            )
        batch = z.shape[0]
        view = (batch,) + (1,) * (z.ndim - 1)
        sig = sigma.to(device=z.device, dtype=z.dtype).view(view)
        sig_next = sigma_next.to(device=z.device, dtype=z.dtype).view(view)
        weight = lam.clamp(0.0, 1.0).to(device=z.device, dtype=z.dtype).view(view)
        noise = z + (1.0 - sig) * velocity  # model's noise estimate ε̂ = z + (1 - σ)v
        latent_shape = tuple(z.shape[1:])
        replaced = x0
        with torch.no_grad():
            for c in self.constraints:
                target = encoder(c.target.to(device=z.device, dtype=z.dtype)[None]).to(z.dtype)
                if tuple(target.shape[1:]) != latent_shape:
                    raise ValueError(f"Encoded target has shape {tuple(target.shape[1:])}, latents have {latent_shape}.")
                mask_fn = getattr(decode, "latent_mask", None) or default_latent_mask
                mask = mask_fn(c.mask.to(z.device), latent_shape).to(z.dtype)[None]
                replaced = replaced + weight * mask * (target - replaced)
        z_next = (1.0 - sig_next) * replaced + sig_next * noise
        return (z_next - z) / (sig_next - sig)

    # -- final projection ---------------------------------------------------------------------
    def finalize(self, x0: torch.Tensor, decode: Decoder, max_iters: int | None = None) -> ProjectionResult:
        """Project the final clean sample into every constraint's ε-ball if it is not already there.

        Damped Gauss–Newton steps ``x ← x - t·G⁻¹Jᵀr`` with ``t`` aimed at an RMS error of
        ``finalize_level·ε`` (a minimal move, not a full solve) and halved until the worst normalised
        violation decreases. Samples already within ε are returned unchanged.
        """
        if not isinstance(x0, torch.Tensor) or x0.ndim != 5:
            raise ValueError(f"`x0` must be clean latents (B, C, F, H, W), got {getattr(x0, 'shape', type(x0).__name__)}.")
        if not callable(decode):
            raise TypeError(f"`decode` must be callable latents -> pixels, got {type(decode).__name__}.")
        if not self.constraints:
            return ProjectionResult(x0, True, x0.new_zeros(x0.shape[0], 0))
        iters = self.finalize_iters if max_iters is None else int(max_iters)
        residual_fn = self._residual_fn(decode)
        batch = x0.shape[0]
        with torch.inference_mode(False), torch.enable_grad():
            x = _clean_input(x0)

            def worst(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                _, viol = self._measure(self._split(stacked))
                return viol, (viol / self._epsilons(viol)).amax(dim=1)

            with torch.no_grad():
                viol, merit = worst(residual_fn(x).float())
            for _ in range(iters):
                todo = merit > 1.0
                if not bool(todo.any()):
                    break
                metric = PullbackMetric(residual_fn, x, self.damping, self.dense_threshold)
                direction, _ = metric.solve_cotangent(metric.residual, self.solver, self.cg_iters, self.cg_tol)
                direction = direction.reshape(x.shape)
                step = (1.0 - self.finalize_level / merit).clamp(0.0, 1.0).where(todo, torch.zeros_like(merit))
                accepted = torch.zeros(batch, dtype=torch.bool, device=merit.device)
                new_x, new_viol, new_merit = x, viol, merit
                for _ in range(6):  # backtracking
                    trial_step = step.where(~accepted, torch.zeros_like(step)).to(x.dtype)
                    trial = x - trial_step.view(-1, *([1] * (x.ndim - 1))) * direction.to(x.dtype)
                    with torch.no_grad():
                        t_viol, t_merit = worst(residual_fn(trial).float())
                    better = (~accepted) & todo & (t_merit < merit)
                    sel = better.view(-1, *([1] * (x.ndim - 1)))
                    new_x = torch.where(sel, trial, new_x)
                    new_viol = torch.where(better[:, None], t_viol, new_viol)
                    new_merit = torch.where(better, t_merit, new_merit)
                    accepted = accepted | better
                    if bool((accepted | ~todo).all()):
                        break
                    step = step * 0.5
                if not bool(accepted.any()):
                    break  # stuck everywhere
                x, viol, merit = new_x.detach(), new_viol, new_merit
        satisfied = bool((merit <= 1.0).all())
        return ProjectionResult(x.to(x0.dtype), satisfied, viol.detach())
