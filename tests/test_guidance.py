"""Tests for chronos_video.guidance: constraints, pullback-metric solvers, CBF filter, transport, baselines."""

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from chronos_video.guidance import (
    ConstraintTransport,
    PullbackMetric,
    RegionConstraint,
    StrengthSchedule,
    cbf_qp,
    cbf_safety_filter,
    finite_time_alpha,
    identity_pixel_decoder,
    vae_decoder,
)

NUM_FRAMES, CHANNELS, HEIGHT, WIDTH = 2, 3, 8, 8
LATENT_SHAPE = (CHANNELS, NUM_FRAMES, HEIGHT, WIDTH)


class TinyDecoder(torch.nn.Module):
    """Small nonlinear decoder: latents (B, C, F, H, W) -> pixels (B, F, C, H, W) in (0, 1)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv3d(CHANNELS, CHANNELS, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(self.conv.weight.shape, generator=generator, dtype=torch.float64))
            self.conv.bias.zero_()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(latents) + latents).permute(0, 2, 1, 3, 4)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def decoder():
    return TinyDecoder()


@pytest.fixture(scope="module")
def toy(decoder):
    """A clean sample x* whose decoding misses a keyframe target by RMS ≈ 0.19."""
    generator = torch.Generator().manual_seed(1)
    x_star = torch.randn(1, *LATENT_SHAPE, generator=generator, dtype=torch.float64)
    x_true = x_star + 0.8 * torch.randn(x_star.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        target = decoder(x_true)[0]
    return x_star, target


def sample_point_mass(transport, decode, x_star, steps=20, batch=2, seed=3):
    """Euler-integrate the exact flow towards the point mass x* (v = (z - x*)/σ), correcting every step."""
    z = torch.randn(batch, *x_star.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=x_star.dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    infos = []
    for i in range(steps):
        velocity = (z - x_star) / sigmas[i]
        if transport is not None:
            velocity, info = transport.correct(z, velocity, float(sigmas[i]), float(sigmas[i + 1]), decode)
            infos.append(info)
        z = z + (sigmas[i + 1] - sigmas[i]) * velocity
    return z, infos


def sample_gaussian_prior(transport, decode, mean, std=0.5, steps=20, batch=2, seed=3):
    """Exact flow for data ~ N(mean, std² I): the model's x̂0 follows changes of z, as a real model's does."""

    def velocity_fn(z, sigma):
        var = (1 - sigma) ** 2 * std**2 + sigma**2
        centred = z - (1 - sigma) * mean
        return sigma / var * centred - (mean + (1 - sigma) * std**2 / var * centred)

    z = torch.randn(batch, *mean.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=mean.dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        velocity = velocity_fn(z, sigmas[i])
        if transport is not None:
            velocity, _ = transport.correct(z, velocity, float(sigmas[i]), float(sigmas[i + 1]), decode)
        z = z + (sigmas[i + 1] - sigmas[i]) * velocity
    return z


# ------------------------------------------------------------------------------------------ constraints
def test_keyframe_and_box_constraints_measure_rms_error():
    video = torch.rand(NUM_FRAMES, CHANNELS, HEIGHT, WIDTH)
    key = RegionConstraint.keyframes(video, [-1], epsilon=0.1)
    assert key.num_elements == CHANNELS * HEIGHT * WIDTH
    assert bool(key.mask[1].all()) and not bool(key.mask[0].any())

    placed = RegionConstraint.keyframes(video[:1], [1], num_frames=NUM_FRAMES)
    assert torch.equal(placed.target[1], video[0]) and placed.num_elements == key.num_elements

    box = RegionConstraint.box(video, top=2, left=3, height=4, width=2, frame_indices=[0], channels=[0, 2])
    assert box.num_elements == 4 * 2 * 2

    pixels = video[None].repeat(2, 1, 1, 1, 1)
    pixels[1] = pixels[1] + 0.2 * key.mask  # sample 1 off by exactly 0.2 on Ω
    assert torch.allclose(key.residual(pixels)[0], torch.zeros(key.num_elements))
    assert torch.allclose(key.violation(pixels), torch.tensor([0.0, 0.2]), atol=1e-6)
    assert torch.allclose(key.barrier(pixels), 0.1**2 - key.violation(pixels) ** 2, atol=1e-6)
    assert key.is_satisfied(pixels).tolist() == [True, False]

    channel_mask = torch.zeros(NUM_FRAMES, 1, HEIGHT, WIDTH, dtype=torch.bool)
    channel_mask[0, :, :2] = True  # broadcast over colour channels
    assert RegionConstraint(video, channel_mask).num_elements == CHANNELS * 2 * WIDTH


@pytest.mark.parametrize(
    "target, mask, kwargs, message",
    [
        (torch.rand(3, 8, 8), None, {}, "shape \\(F, C, H, W\\)"),
        (torch.randint(0, 2, (2, 3, 8, 8)), None, {}, "floating-point"),
        (torch.rand(2, 3, 8, 8) * 2, None, {}, "\\[0, 1\\]"),
        (torch.rand(2, 3, 8, 8), torch.ones(2, 3, 8, 8), {}, "torch.bool"),
        (torch.rand(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.bool), {}, "empty"),
        (torch.rand(2, 3, 8, 8), torch.ones(2, 3, 4, 4, dtype=torch.bool), {}, "does not match"),
        (torch.rand(2, 3, 8, 8), None, {"epsilon": 0.0}, "epsilon"),
        (torch.rand(2, 3, 8, 8), None, {"strength": -1.0}, "strength"),
        (torch.full((2, 3, 8, 8), float("nan")), None, {}, "NaN"),
    ],
)
def test_region_constraint_validation(target, mask, kwargs, message):
    if mask is None:
        mask = torch.ones(target.shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        RegionConstraint(target, mask, **kwargs)


def test_constraint_helpers_and_pixels_validation():
    video = torch.rand(NUM_FRAMES, CHANNELS, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="out of range"):
        RegionConstraint.keyframes(video, [2])
    with pytest.raises(ValueError, match="duplicates"):
        RegionConstraint.keyframes(video, [1, -1])
    with pytest.raises(ValueError, match="one frame per index"):
        RegionConstraint.keyframes(video, [0], num_frames=4)
    with pytest.raises(ValueError, match="outside"):
        RegionConstraint.box(video, top=6, left=0, height=4, width=2)
    with pytest.raises(TypeError, match="target"):
        RegionConstraint([[0.0]], torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="\\(B, F, C, H, W\\)"):
        RegionConstraint.keyframes(video, [0]).residual(torch.rand(1, CHANNELS, NUM_FRAMES, HEIGHT, WIDTH))


# ------------------------------------------------------------------------------------------ pullback metric
def _keyframe_residual_fn(decoder, target, frame=0):
    constraint = RegionConstraint.keyframes(target, [frame])
    return constraint, lambda x: constraint.residual(decoder(x))


def test_metric_product_matches_explicit_jacobian(decoder, toy):
    x_star, target = toy
    _, residual_fn = _keyframe_residual_fn(decoder, target)
    x = torch.cat([x_star, x_star + 0.1])
    metric = PullbackMetric(residual_fn, x, damping=1e-3)
    v = torch.randn(2, metric.num_latents, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for b in range(2):  # independent reference: autograd's full Jacobian per sample
        jac = torch.autograd.functional.jacobian(lambda xb: residual_fn(xb[None])[0], x[b]).reshape(metric.num_residuals, -1)
        expected = jac.T @ (jac @ v[b]) + 1e-3 * v[b]
        assert torch.allclose(metric.matvec(v)[b], expected, atol=1e-12, rtol=1e-10)
        assert torch.allclose(metric.jacobian()[b], jac, atol=1e-12)
    assert metric.jvp_strategy is not None


@pytest.mark.parametrize("frames", [[0], [0, 1]])  # |Ω| = 192 < N = 384 (dual Gram) and 384 = N (primal)
def test_cg_solution_matches_cholesky(decoder, toy, frames):
    x_star, target = toy
    constraint = RegionConstraint.keyframes(target, frames)
    metric = PullbackMetric(lambda x: constraint.residual(decoder(x)), x_star.repeat(2, 1, 1, 1, 1), damping=1e-2)
    w = metric.residual.clone()
    w[1] *= -0.5
    dense, iters_dense = metric.solve_cotangent(w, solver="cholesky")
    cg, iters_cg = metric.solve_cotangent(w, solver="cg", cg_iters=200, cg_tol=1e-10)
    assert iters_dense is None and iters_cg > 0
    assert torch.allclose(cg, dense, rtol=1e-5, atol=1e-5 * float(dense.abs().max()))
    rhs = torch.randn(2, metric.num_latents, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    general_cg, _ = metric.solve(rhs, solver="cg", cg_iters=400, cg_tol=1e-11)
    general_dense, _ = metric.solve(rhs, solver="cholesky")
    assert torch.allclose(general_cg, general_dense, rtol=1e-5, atol=1e-5 * float(general_dense.abs().max()))
    assert torch.allclose(metric.matvec(general_dense), rhs, atol=1e-8)


# ------------------------------------------------------------------------------------------ CBF
def _slsqp(g, a_rows, bounds):
    """min ½uᵀGu s.t. a_kᵀu >= b_k, solved numerically: SLSQP, cross-checked by active-set enumeration.

    SLSQP's line search can stop early on these tiny, tight problems (its success flag then depends
    on BLAS threading), so the reference is the exact KKT solution over every active set, and SLSQP
    must agree with it whenever it reports success.
    """
    a_rows, bounds = np.atleast_2d(np.asarray(a_rows, dtype=float)), np.asarray(bounds, dtype=float)
    best, best_value = None, np.inf
    for size in range(len(bounds) + 1):
        for active in itertools.combinations(range(len(bounds)), size):
            a_active = a_rows[list(active)]
            if size:
                g_inv_at = np.linalg.solve(g, a_active.T)
                mu = np.linalg.solve(a_active @ g_inv_at, bounds[list(active)])
                u = g_inv_at @ mu
                if (mu < -1e-12).any():
                    continue
            else:
                u = np.zeros(g.shape[0])
            if (a_rows @ u - bounds >= -1e-10).all() and 0.5 * u @ g @ u < best_value:
                best, best_value = u, 0.5 * u @ g @ u
    constraints = [
        {"type": "ineq", "fun": (lambda u, a=a, b=b: a @ u - b), "jac": (lambda u, a=a: a)} for a, b in zip(a_rows, bounds)
    ]
    result = minimize(
        lambda u: 0.5 * u @ g @ u, np.zeros(g.shape[0]), jac=lambda u: g @ u, method="SLSQP",
        constraints=constraints, options={"ftol": 1e-15, "maxiter": 500},
    )
    if result.success:
        assert np.allclose(result.x, best, atol=1e-6)
    return best


def test_cbf_closed_form_matches_numerical_qp():
    rng = np.random.default_rng(0)
    checked_active = 0
    for trial in range(12):
        n = 6
        m = rng.normal(size=(n, n))
        g = m @ m.T + 0.1 * np.eye(n)
        a, f = rng.normal(size=n), rng.normal(size=n)
        h = rng.normal(scale=0.01)
        alpha = lambda value: finite_time_alpha(value, 0.05, gain=3.0, exponent=0.5)
        g_inv_a = np.linalg.solve(g, a)
        to_t = lambda arr: torch.tensor(arr)[None]
        u_closed = cbf_safety_filter(to_t(f), to_t(a), to_t(g_inv_a), torch.tensor([h]), alpha)[0].numpy()
        bound = -float(alpha(torch.tensor(h, dtype=torch.float64))) - a @ f  # aᵀu >= -α(h) - aᵀf
        u_qp = _slsqp(g, [a], [bound])
        assert np.allclose(u_closed, u_qp, atol=1e-6), (trial, u_closed, u_qp)
        assert a @ (f + u_closed) >= -float(alpha(torch.tensor(h, dtype=torch.float64))) - 1e-9
        checked_active += int(bound > 0)
    assert 0 < checked_active < 12  # both active and inactive cases were exercised

    for trial in range(6):  # several barriers: dual coordinate ascent vs SLSQP
        n, k = 7, 3
        m = rng.normal(size=(n, n))
        g = m @ m.T + 0.1 * np.eye(n)
        a = rng.normal(size=(k, n))
        b = rng.normal(size=k)
        u, mu = cbf_qp(torch.tensor(a)[None], torch.tensor(np.linalg.solve(g, a.T).T)[None], torch.tensor(b)[None])
        assert np.allclose(u[0].numpy(), _slsqp(g, a, b), atol=1e-6)
        assert bool((mu >= 0).all())


def test_cbf_inactive_when_constraint_comfortably_satisfied(decoder, toy):
    x_star, _ = toy
    with torch.no_grad():
        target = decoder(x_star)[0] + 0.005  # x* itself meets the target to RMS 0.005 < ε = 0.05
    transport = ConstraintTransport(RegionConstraint.keyframes(target.clamp(0, 1), [0]), method="none", cbf=True)
    z = x_star.repeat(2, 1, 1, 1, 1) + 0.3 * torch.randn(2, *LATENT_SHAPE, dtype=torch.float64)
    velocity = (z - x_star) / 0.5
    corrected, info = transport.correct(z, velocity, 0.5, 0.45, decoder)
    assert torch.equal(corrected, velocity)
    assert not bool(info.cbf_active.any())
    assert bool(info.satisfied.all()) and float(info.barrier.min()) > 0


# ------------------------------------------------------------------------------------------ transport on toy flows
def test_corrected_flow_meets_constraint_where_uncorrected_violates(decoder, toy):
    x_star, target = toy
    constraint = RegionConstraint.keyframes(target, [0], epsilon=0.05)
    plain, _ = sample_point_mass(None, decoder, x_star)
    guided, infos = sample_point_mass(ConstraintTransport(constraint, method="natural", cbf=True), decoder, x_star)
    cbf_only, _ = sample_point_mass(ConstraintTransport(constraint, method="none", cbf=True), decoder, x_star)
    with torch.no_grad():
        v_plain, v_guided, v_cbf = (constraint.violation(decoder(z)) for z in (plain, guided, cbf_only))
    print(f"point-mass toy RMS violation (ε=0.05): none {v_plain.tolist()}, natural+cbf {v_guided.tolist()}, cbf only {v_cbf.tolist()}")
    assert bool((v_plain > 3 * constraint.epsilon).all())
    assert bool((v_guided <= constraint.epsilon).all())
    assert bool((v_cbf <= constraint.epsilon).all())
    assert infos[0].solver == "cholesky" and infos[0].violation.shape == (2, 1)


def test_cbf_alone_steers_a_prior_that_follows_the_latent(decoder, toy):
    x_star, target = toy
    constraint = RegionConstraint.keyframes(target, [0], epsilon=0.03)
    plain = sample_gaussian_prior(None, decoder, x_star)
    filtered = sample_gaussian_prior(ConstraintTransport(constraint, method="none", cbf=True), decoder, x_star)
    natural = sample_gaussian_prior(ConstraintTransport(constraint, method="natural", cbf=True), decoder, x_star)
    with torch.no_grad():
        v_plain, v_cbf, v_nat = (constraint.violation(decoder(z)) for z in (plain, filtered, natural))
    print(f"gaussian-prior toy RMS violation (ε=0.03): none {v_plain.tolist()}, cbf only {v_cbf.tolist()}, natural+cbf {v_nat.tolist()}")
    assert bool((v_plain > 3 * constraint.epsilon).all())
    assert bool((v_cbf <= constraint.epsilon).all())
    assert bool((v_nat <= constraint.epsilon).all())


def test_cg_solver_matches_dense_inside_transport(decoder, toy):
    x_star, target = toy
    constraint = RegionConstraint.keyframes(target, [0])
    z = x_star.repeat(2, 1, 1, 1, 1) + 0.5 * torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    velocity = (z - x_star) / 0.6
    out = {}
    for solver in ("cholesky", "cg"):
        transport = ConstraintTransport(constraint, solver=solver, cg_iters=100, cg_tol=1e-10, damping=1e-2)
        out[solver], info = transport.correct(z, velocity, 0.6, 0.55, decoder)
        assert info.solver == solver
    assert torch.allclose(out["cg"], out["cholesky"], rtol=1e-5, atol=1e-6)


def test_finalize_projects_into_epsilon_ball(decoder, toy):
    x_star, target = toy
    constraints = [
        RegionConstraint.keyframes(target, [0], epsilon=0.03),
        RegionConstraint.box(target, top=2, left=2, height=4, width=4, frame_indices=[1], epsilon=0.02),
    ]
    transport = ConstraintTransport(constraints)
    with torch.no_grad():
        inside = x_star + 0.0  # decoder(x_inside) matches a target built from it
        already = RegionConstraint.keyframes(decoder(inside)[0], [0], epsilon=0.03)
    x0 = torch.cat([x_star, x_star + 0.2])
    result = transport.finalize(x0, decoder)
    x_proj, satisfied, violation = result
    with torch.no_grad():
        measured = torch.stack([c.violation(decoder(x_proj)) for c in constraints], dim=1)
    before = torch.stack([c.violation(decoder(x0)) for c in constraints], dim=1)
    print(f"finalize: RMS before {before.tolist()} -> after {measured.tolist()}")
    assert satisfied
    assert torch.allclose(violation.double(), measured, atol=1e-6)
    assert bool((measured <= torch.tensor([0.03, 0.02], dtype=torch.float64)).all())
    assert bool((before > torch.tensor([0.03, 0.02], dtype=torch.float64)).all())

    untouched = ConstraintTransport(already).finalize(inside, decoder)
    assert untouched.satisfied and torch.equal(untouched.x0, inside)


def test_multiple_constraints_stack(decoder, toy):
    x_star, target = toy
    constraints = [
        RegionConstraint.keyframes(target, [0], epsilon=0.05),
        RegionConstraint.box(target, top=0, left=0, height=4, width=8, frame_indices=[1], epsilon=0.05, strength=2.0),
    ]
    guided, infos = sample_point_mass(ConstraintTransport(constraints, method="natural", cbf=True), decoder, x_star)
    with torch.no_grad():
        violations = torch.stack([c.violation(decoder(guided)) for c in constraints], dim=1)
    assert infos[-1].barrier.shape == (2, 2) and len(infos[-1].residual) == 2
    assert infos[-1].residual[1].shape == (2, constraints[1].num_elements)
    assert bool((violations <= 0.05).all()), violations


# ------------------------------------------------------------------------------------------ baselines (pixel space)
def _pixel_problem():
    generator = torch.Generator().manual_seed(7)
    x_star = torch.rand(1, *LATENT_SHAPE, generator=generator) * 2 - 1  # pixel-space clean sample in [-1, 1]
    target = torch.rand(NUM_FRAMES, CHANNELS, HEIGHT, WIDTH, generator=generator)
    return x_star, RegionConstraint.keyframes(target, [0], epsilon=0.05)


@pytest.mark.parametrize("method, strength", [("repaint", 1.0), ("dps", 3.0), ("natural", 1.0)])
def test_baselines_reduce_violation_in_pixel_space(method, strength):
    decode = identity_pixel_decoder()
    x_star, constraint = _pixel_problem()
    plain, _ = sample_point_mass(None, decode, x_star, steps=10)
    guided, _ = sample_point_mass(
        ConstraintTransport(constraint, method=method, cbf=False, strength=strength), decode, x_star, steps=10
    )
    v_plain, v_guided = constraint.violation(decode(plain)), constraint.violation(decode(guided))
    print(f"pixel toy {method}: RMS {v_plain.tolist()} -> {v_guided.tolist()}")
    assert bool((v_guided < 0.5 * v_plain).all())
    if method in ("repaint", "natural"):
        assert bool((v_guided <= constraint.epsilon).all())
    # outside Ω the sample is untouched by every method (the identity decoder's Jacobian is a selection)
    outside = ~constraint.mask
    assert torch.allclose(decode(guided)[:, outside], decode(x_star.expand_as(guided))[:, outside], atol=1e-5)


def test_repaint_without_encoder_is_a_clear_error(decoder, toy):
    _, target = toy
    transport = ConstraintTransport(RegionConstraint.keyframes(target, [0]), method="repaint", cbf=False)
    z = torch.zeros(1, *LATENT_SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs an encoder"):
        transport.correct(z, z, 0.5, 0.4, decoder)


# ------------------------------------------------------------------------------------------ API and config
def test_config_round_trip_and_schedule():
    schedule = StrengthSchedule(scale=2.0, power=1.0, sigma_max=0.8)
    assert schedule(0.9) == 0.0 and schedule(0.5) == pytest.approx(1.0) and schedule(0.0) == pytest.approx(2.0)
    transport = ConstraintTransport(method="dps", solver="cg", cbf=False, strength=schedule, cg_iters=7, damping=1e-4)
    config = json.loads(json.dumps(transport.to_config()))
    clone = ConstraintTransport.from_config(config)
    assert clone.to_config() == transport.to_config()
    assert clone.strength == schedule and clone.method == "dps" and clone.cg_iters == 7
    with pytest.raises(ValueError, match="cannot be serialised"):
        ConstraintTransport(strength=lambda sigma: 1.0).to_config()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"method": "classifier"}, ValueError),
        ({"solver": "lu"}, ValueError),
        ({"cg_iters": 0}, ValueError),
        ({"damping": 0.0}, ValueError),
        ({"cbf_exponent": 1.0}, ValueError),
        ({"cbf": "yes"}, TypeError),
        ({"strength": "high"}, TypeError),
        ({"strength": {"scale": -1.0}}, ValueError),
        ({"constraints": ["not a constraint"]}, TypeError),
    ],
)
def test_transport_settings_validation(kwargs, error):
    with pytest.raises(error):
        ConstraintTransport(**kwargs)


def test_correct_input_validation(decoder, toy):
    _, target = toy
    transport = ConstraintTransport(RegionConstraint.keyframes(target, [0]))
    z = torch.zeros(1, *LATENT_SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma"):
        transport.correct(z, z, 0.0, 0.0, decoder)
    with pytest.raises(ValueError, match="sigma_next"):
        transport.correct(z, z, 0.5, 0.6, decoder)
    with pytest.raises(ValueError, match="velocity"):
        transport.correct(z, z[:, :2], 0.5, 0.4, decoder)
    with pytest.raises(ValueError, match="\\(B, C, F, H, W\\)"):
        transport.correct(z[0], z[0], 0.5, 0.4, decoder)
    with pytest.raises(ValueError, match="decoder's output layout"):
        transport.correct(z, z, 0.5, 0.4, lambda x: x)  # forgot the (B, F, C, H, W) permute
    with pytest.raises(ValueError, match="same \\(F, C, H, W\\)"):
        ConstraintTransport([RegionConstraint.keyframes(target, [0]), RegionConstraint.keyframes(target[:1], [0])])
    empty_velocity, info = ConstraintTransport().correct(z, z + 1, 0.5, 0.4, decoder)
    assert torch.equal(empty_velocity, z + 1) and info.barrier.shape == (1, 0)


def test_correct_runs_inside_inference_mode_and_keeps_dtype(toy):
    _, target = toy
    decode = identity_pixel_decoder()
    transport = ConstraintTransport(RegionConstraint.keyframes(target.float(), [0]), solver="cg")
    with torch.inference_mode():
        z = torch.randn(2, *LATENT_SHAPE)
        velocity = torch.randn(2, *LATENT_SHAPE)
        corrected, info = transport.correct(z, velocity, torch.tensor([0.7, 0.5]), torch.tensor([0.6, 0.4]), decode)
    assert corrected.dtype == torch.float32 and corrected.shape == z.shape
    assert info.cg_iterations is not None and info.cg_iterations <= 3  # G is a scaled mask: CG is exact at once
    x0_new = z - torch.tensor([0.7, 0.5]).view(2, 1, 1, 1, 1) * corrected
    # J = ½·selection, so one damped Gauss–Newton step leaves the fraction δ / (¼ + δ) of the residual
    ratio = transport.constraints[0].violation(decode(x0_new)) / info.violation[:, 0]
    expected = transport.damping / (0.25 + transport.damping)
    assert torch.allclose(ratio, torch.full_like(ratio, expected), rtol=1e-3)


def test_vae_decoder_adapter_with_tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0],
    ).eval()
    decode = vae_decoder(vae)
    latents = torch.randn(1, 4, 3, 8, 8)
    assert torch.allclose(decode.normalize(decode.denormalize(latents)), latents, atol=1e-6)
    expected_raw = latents * torch.tensor([1.5, 2.0, 0.5, 1.0]).view(1, 4, 1, 1, 1) + torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    assert torch.allclose(decode.denormalize(latents), expected_raw)
    with torch.no_grad():
        pixels = decode(latents)
    assert pixels.shape == (1, 5, 3, 16, 16)  # causal VAE: 1 + 2·(3 - 1) frames, 2× spatial
    assert decode.encode(pixels).shape == latents.shape

    z, velocity, sigma = torch.randn_like(latents), torch.randn_like(latents), 0.3
    with torch.no_grad():  # a reachable target: the decoding of a nearby latent
        target = decode(z - sigma * velocity + 0.5 * torch.randn_like(latents))[0].clamp(0, 1)
    constraint = RegionConstraint.keyframes(target, [0])
    transport = ConstraintTransport(constraint, method="natural", cbf=False, solver="cg", cg_iters=8)
    corrected, info = transport.correct(z, velocity, sigma, 0.2, decode)
    with torch.no_grad():
        after = constraint.violation(decode(z - sigma * corrected))
    print(f"tiny Wan VAE: one natural step RMS {info.violation.item():.4f} -> {after.item():.4f} ({info.cg_iterations} CG its)")
    assert float(after) < 0.7 * float(info.violation)

    repainted, _ = ConstraintTransport(constraint, method="repaint", cbf=False).correct(z, velocity, sigma, 0.2, decode)
    assert repainted.shape == z.shape and bool(torch.isfinite(repainted).all())
