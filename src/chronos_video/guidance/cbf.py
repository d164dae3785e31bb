"""The control-barrier-function (CBF) safety filter of the constraint transport.

CBF safety filter. Per constraint the barrier is ``h = ε² - mean_Ω (D(x̂0) - g)²`` (``ε`` is an RMS
tolerance). In forward time ``t`` (``dt = -dσ``) the latent obeys ``ż = f + u`` with ``f = -v_nominal``
(the velocity after the nominal method's correction); ``u`` is the safety control and the corrected
velocity is ``v_nominal - u``. With ``x̂0 = z - σ·v`` and ``v`` frozen, ``ḣ = aᵀ(f + u) + ∂_t h`` with
``a = ∇h`` and ``∂_t h = aᵀv`` (following the frozen velocity keeps ``x̂0`` fixed, so only the nominal
method's own correction contributes to the drift ``aᵀf + ∂_t h``). The filter solves
``min ½uᵀGu  s.t.  ḣ ≥ -α(h)/σ``, whose closed form for one barrier is ``u* = max(0, b)·G⁻¹a / (aᵀG⁻¹a)`` with ``b = -α(h)/σ - aᵀf - ∂_t h``. The ``1/σ``
makes ``α`` a rate per unit of ``τ = -ln σ``, which runs to infinity as ``σ → 0``, so a finite-time
class-K function ``α(h) = k·ε²·sign(h)·|h/ε²|^ρ`` (``0 < ρ < 1``) asks for convergence well before the
end of sampling. Euler steps are finite, so the per-step demand is capped at reaching the level
``h = cbf_max_level·ε²``, and (``cbf_curvature=True``) the QP fixes only the direction of ``u``; its
length comes from the Gauss–Newton model ``h(x̂0 + δ) ≈ ε² - mean(r + Jδ)²`` over the step, because ``h``
is concave along the correction and its tangent promises about twice the progress a long step delivers.
Several constraints give a small QP in the dual (one variable per barrier), solved exactly by
coordinate ascent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .constraints import RegionConstraint
from .metric import PullbackMetric


def finite_time_alpha(h: torch.Tensor, epsilon: float | torch.Tensor, gain: float = 10.0, exponent: float = 0.5) -> torch.Tensor:
    """Class-K function ``α(h) = k·ε²·sign(h)·|h/ε²|^ρ``; ``0 < ρ < 1`` gives finite-time convergence to
    ``h ≥ 0`` (time ``≤ |h0/ε²|^(1-ρ) / (k(1-ρ))``). Normalising by ``ε²`` makes ``k`` independent of the tolerance."""
    scale = torch.as_tensor(epsilon, dtype=h.dtype, device=h.device) ** 2
    return gain * scale * torch.sign(h) * (h.abs() / scale).pow(exponent)


def cbf_qp(
    a: torch.Tensor, g_inv_a: torch.Tensor, b: torch.Tensor, max_sweeps: int = 500, tol: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``min_u ½uᵀGu  s.t.  a_kᵀu ≥ b_k`` exactly, given ``a`` (B, K, N), ``G⁻¹a`` (B, K, N), ``b`` (B, K).

    The solution is ``u = Σ_k μ_k G⁻¹a_k`` with ``μ ≥ 0`` maximising the dual ``μᵀb - ½μᵀQμ``,
    ``Q = aᵀG⁻¹a``. For ``K = 1`` this is the closed form ``u = max(0, b)·G⁻¹a / (aᵀG⁻¹a)``; for ``K > 1``
    coordinate ascent on the K-dimensional dual converges to the optimum. Barriers with a vanishing
    gradient (``aᵀG⁻¹a ≈ 0``) cannot be influenced and get ``μ = 0``. Returns ``(u, μ)``.
    """
    if a.ndim == 2:
        a, g_inv_a, b = a[:, None], g_inv_a[:, None], b.reshape(-1, 1)
    a64, ga64, b64 = a.double(), g_inv_a.double(), b.double()
    q = a64 @ ga64.transpose(1, 2)  # (B, K, K)
    q = 0.5 * (q + q.transpose(1, 2))
    diag = torch.diagonal(q, dim1=1, dim2=2)
    usable = diag > 1e-30 * diag.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    safe_diag = torch.where(usable, diag, torch.ones_like(diag))
    num_barriers = a.shape[1]
    if num_barriers == 1:
        mu = torch.where(usable, b64.clamp_min(0.0) / safe_diag, torch.zeros_like(b64))
    else:
        mu = torch.zeros_like(b64)
        for _ in range(max_sweeps):
            previous = mu.clone()
            for k in range(num_barriers):
                slack = b64[:, k] - (q[:, k, :] * mu).sum(dim=1)
                update = (mu[:, k] + slack / safe_diag[:, k]).clamp_min(0.0)
                mu[:, k] = torch.where(usable[:, k], update, torch.zeros_like(update))
            if float((mu - previous).abs().max()) <= tol * (1.0 + float(mu.abs().max())):
                break
    u = (mu[:, :, None] * ga64).sum(dim=1)
    return u.to(g_inv_a.dtype), mu.to(g_inv_a.dtype)


def cbf_safety_filter(
    f: torch.Tensor,
    a: torch.Tensor,
    g_inv_a: torch.Tensor,
    h: torch.Tensor,
    alpha: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Single-barrier CBF filter ``u* = max(0, b)·G⁻¹a / (aᵀG⁻¹a)``, ``b = -α(h) - aᵀf``: the least-``G``-norm
    control making ``aᵀ(f + u) ≥ -α(h)``. Shapes: ``f, a, g_inv_a`` (B, N), ``h`` (B,). Returns ``u*`` (B, N)."""
    b = -alpha(h) - (a * f).sum(dim=1)
    return cbf_qp(a, g_inv_a, b)[0]



@dataclass(frozen=True)
class BarrierFilter:
    """The per-step CBF filter of :class:`~chronos_video.guidance.ConstraintTransport` (settings documented there).

    ``gain`` and ``exponent`` are ``k`` and ``ρ`` of :func:`finite_time_alpha`; one step is never asked to push
    ``h`` above ``max_level·ε²``; ``curvature`` sizes the QP direction with the Gauss–Newton model.
    """

    gain: float = 10.0
    exponent: float = 0.5
    max_level: float = 0.5
    curvature: bool = True

    def __call__(
        self,
        metric: PullbackMetric,
        stacked: torch.Tensor,
        solves: Sequence[torch.Tensor],
        barrier: torch.Tensor,
        v_model: torch.Tensor,
        v_nominal: torch.Tensor,
        sigma: torch.Tensor,
        dt: torch.Tensor,
        constraints: Sequence[RegionConstraint],
        blocks: Sequence[slice],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Filtered velocity ``(B, N)`` and ``(B,)`` whether the filter acted.

        ``stacked`` is the weighted residual stack at ``x̂0`` (constraint ``k`` on ``blocks[k]``), ``solves`` the
        ``G⁻¹Jᵀw`` per block (one entry when there is one constraint), ``barrier`` ``(B, K)``; velocities flat.
        """
        grads, g_inv = [], []
        for k, (blk, c) in enumerate(zip(blocks, constraints)):
            w = torch.zeros_like(stacked)
            w[:, blk] = stacked[:, blk]
            scale = -2.0 / (c.num_elements * c.strength)  # a_k = ∇h_k = scale · J_wᵀ(r_w on block k)
            grads.append(scale * metric.vjp(w))
            g_inv.append(scale * (solves[k] if len(blocks) > 1 else solves[0]))
        a = torch.stack(grads, dim=1)  # (B, K, N)
        g_inv_a = torch.stack(g_inv, dim=1)
        eps = torch.tensor([c.epsilon for c in constraints], dtype=barrier.dtype, device=barrier.device)
        alpha = finite_time_alpha(barrier, eps, self.gain, self.exponent)
        required = -alpha / sigma[:, None]  # required ḣ per unit t (α is per unit -ln σ)
        cap_level = self.max_level * eps**2
        capped = torch.minimum(required, (cap_level - barrier) / dt[:, None])
        required = torch.where(barrier < cap_level, capped, required)
        # nominal drift of h: aᵀf + ∂_t h = aᵀ(v_model - v_nominal) with f = -v_nominal, ∂_t x̂0 = v_model
        drift = (a * (v_model - v_nominal)[:, None, :]).sum(dim=2)
        u, mu = cbf_qp(a, g_inv_a, required - drift)
        active = (mu > 0).any(dim=1)
        if self.curvature and bool(active.any()):
            length = gauss_newton_length(
                metric, stacked, barrier, required, v_model - v_nominal, u, dt, constraints, blocks
            )
            u = u * length[:, None]
        return v_nominal - u, active


def gauss_newton_length(
    metric: PullbackMetric,
    stacked: torch.Tensor,
    barrier: torch.Tensor,
    required: torch.Tensor,
    nominal_rate: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    constraints: Sequence[RegionConstraint],
    blocks: Sequence[slice],
) -> torch.Tensor:
    """Smallest ``c >= 0`` such that, with ``x̂0`` moved by ``dt·(nominal_rate + c·u)`` over the step, the
    Gauss–Newton model of every barrier reaches ``h + dt·required``; per constraint this is a scalar
    quadratic inequality in ``c``. Where no ``c`` reaches it, the residual's closest approach is used."""
    start = stacked + dt[:, None] * metric.jvp(nominal_rate)  # weighted residual after the nominal move
    push = dt[:, None] * metric.jvp(u)
    lengths = []
    for k, (blk, c) in enumerate(zip(blocks, constraints)):
        rho, w = start[:, blk], push[:, blk]
        target = barrier[:, k] + dt * required[:, k]
        radius2 = (c.epsilon**2 - target).clamp_min(0.0) * c.num_elements * c.strength  # ‖ρ + c·w‖² <= R²
        ww = (w * w).sum(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        rw = (rho * w).sum(dim=1)
        rr = (rho * rho).sum(dim=1)
        disc = rw * rw - ww * (rr - radius2)
        root = (-rw - disc.clamp_min(0.0).sqrt()) / ww
        closest = -rw / ww
        length = torch.where(rr <= radius2, torch.zeros_like(rr), torch.where(disc >= 0, root, closest))
        lengths.append(length.clamp_min(0.0))
    return torch.stack(lengths, dim=1).amax(dim=1)
