"""ChronosMambaModel (omni-directional complex Mamba + wavelet gate), its Haar helpers and ChronosPipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chronos_video import ChronosFlowMatchScheduler, ChronosMambaModel, ChronosPipeline, build_text_encoder
from chronos_video.models.mamba_chronos import invert_permutation, scan_orders
from chronos_video.models.wavelet_gate import WaveletGate
from chronos_video.ops.wavelet import GAUSSIAN_DETAIL_ENERGY, haar_dwt2d, haar_idwt2d, patch_detail_energy
from chronos_video.registry import get_architecture
from conftest import backbone_inputs, perturb_zero_init

PROMPT = "a small red circle moving left to right slowly"


def tiny_model(**kwargs) -> ChronosMambaModel:
    torch.manual_seed(0)
    config = dict(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_layers=2, state_size=4,
                  num_attention_heads=4, num_kv_heads=2, text_embed_dim=24)
    config.update(kwargs)
    return perturb_zero_init(ChronosMambaModel(**config), std=0.05)


inputs = backbone_inputs


# ---------------------------------------------------------------------------------------------- model



def test_scan_orders_are_distinct_permutations_with_inverses():
    grid = (3, 4, 5)
    orders = scan_orders(grid, 4)
    length = math.prod(grid)
    assert orders.shape == (4, length)
    for order in orders:
        assert torch.equal(order.sort().values, torch.arange(length))
    assert len({tuple(order.tolist()) for order in orders}) == 4
    tokens = torch.randn(2, length, 7)
    for order, inverse in zip(orders, invert_permutation(orders)):
        assert torch.equal(tokens[:, order][:, inverse], tokens)
    raster = torch.arange(length).view(grid)
    assert torch.equal(orders[1], raster.flatten().flip(0))
    assert orders[2][:4].tolist() == [raster[0, 0, 0], raster[0, 1, 0], raster[0, 2, 0], raster[0, 3, 0]]  # down a column
    assert orders[3][:3].tolist() == [raster[0, 0, 0], raster[1, 0, 0], raster[2, 0, 0]]  # through time
    assert torch.equal(scan_orders(grid, 2), orders[:2])
    with pytest.raises(ValueError, match="num_scan_orders"):
        scan_orders(grid, 3)


@pytest.mark.parametrize("complex_state, num_scan_orders", [(True, 4), (False, 2), (False, 1)])
def test_complex_and_real_state_train_with_finite_gradients(complex_state, num_scan_orders):
    model = tiny_model(complex_state=complex_state, num_scan_orders=num_scan_orders, state_size=6)
    mixer = model.blocks[0].mixer
    A = mixer.state_matrix()
    assert A.is_complex() == complex_state and A.shape == (64, 6)
    assert (A.real < 0).all()
    video, timestep, text, mask = inputs()
    model(video, timestep, text, mask).sample.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert mixer.log_lambda.grad.abs().sum() > 0
    if complex_state:
        assert mixer.omega.grad.abs().sum() > 0



def test_rope_flag_changes_output_and_rope_is_relative():
    video, timestep, text, mask = inputs()
    # Large steps delta, so the scan's C h term (where RoPE acts) is not dwarfed by the D u skip at init.
    with_rope = tiny_model(use_rope=True, time_step_min=0.5, time_step_max=1.0)
    without = tiny_model(use_rope=False, time_step_min=0.5, time_step_max=1.0)
    assert not torch.allclose(with_rope(video, timestep, text, mask).sample, without(video, timestep, text, mask).sample, atol=1e-4)

    # Shifting every position by the same 3D offset rotates B and C by opposite phases that cancel in C_t^T ... B_s.
    for complex_state in (True, False):
        model = tiny_model(complex_state=complex_state, state_size=6, use_wavelet_gate=False, time_step_min=0.5, time_step_max=1.0)
        mixer = model.blocks[0].mixer
        grid = (2, 4, 4)
        route = model._build_route(video, timestep, grid, torch.ones(2, 5, dtype=torch.bool))
        tokens = torch.randn(2, 32, 32)
        base = mixer(tokens, route)
        offset = torch.randn(route.rotation.shape[-1] if complex_state else route.angles.shape[-1])
        if complex_state:
            route.rotation = route.rotation * torch.polar(torch.ones_like(offset), offset)
        else:
            route.angles = route.angles + offset
        torch.testing.assert_close(mixer(tokens, route), base, rtol=1e-4, atol=1e-5)
        if complex_state:  # a position-dependent change is not invisible
            route.rotation = route.rotation * torch.polar(torch.ones(32, 1), torch.linspace(0, 3, 32)[:, None]).repeat(8, 1, 1)
            assert not torch.allclose(mixer(tokens, route), base, atol=1e-4)


def gated_inputs():
    """Videos whose left half (batch 0) / left quarter (batch 1) is black: those tubelets carry no detail."""
    video, _, text, mask = inputs()
    video = video.clamp(-1, 1)
    video[0, :, :, :, :8] = -1.0
    video[1, :, :, :, :4] = -1.0
    return video, torch.tensor([0.0, 0.0]), text, mask


def record_mixer_lengths(model):
    lengths = []
    hooks = [block.mixer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1])) for block in model.blocks]
    return lengths, hooks


@pytest.mark.parametrize("text_conditioning", ["cross_attention", "scan_prefix"])
def test_wavelet_gate_skips_tokens_by_gather_scatter(text_conditioning):
    video, timestep, text, mask = gated_inputs()
    energy = patch_detail_energy(video, (2, 4, 4)).flatten(1)
    assert (energy[0].view(2, 4, 4)[..., :2] == 0).all()  # black tubelets have zero detail energy
    model = tiny_model(conv_kernel_size=0, gate_threshold=0.05, text_conditioning=text_conditioning).eval()
    lengths, hooks = record_mixer_lengths(model)
    with torch.no_grad():
        gathered = model(video, timestep, text, mask).sample
        stats = dict(model.last_gate_stats)
        model.gate_gather = False  # same hard mask, full-length sequence
        masked = model(video, timestep, text, mask).sample
    for hook in hooks:
        hook.remove()
    # batch 0 drops half of its 32 tubelets, batch 1 a quarter; the mixer sees the longest kept row (24).
    assert stats["mode"] == "gather" and stats["skipped_fraction"] == pytest.approx((16 + 8) / 64)
    assert stats["mixer_video_tokens"] == 24
    prefix = 5 if text_conditioning == "scan_prefix" else 0
    assert lengths == [prefix + 24, prefix + 24, prefix + 32, prefix + 32]
    # A token with delta = 0 is transparent to the scan, so dropping it is exact.
    torch.testing.assert_close(gathered, masked, rtol=1e-4, atol=1e-5)


def test_wavelet_gate_training_mask_matches_inference_and_keep_all_is_ungated():
    video, timestep, text, mask = gated_inputs()
    # With a sharp soft mask, the differentiable training path computes what inference computes.
    model = tiny_model(gate_temperature=1e-4)
    video.requires_grad_(True)
    soft = model.train()(video, timestep, text, mask).sample
    assert model.last_gate_stats["mode"] == "soft" and model.last_gate_stats["skipped_fraction"] == pytest.approx(24 / 64)
    soft.square().mean().backward()
    assert torch.isfinite(video.grad).all()
    model.eval().gate_gather = False
    with torch.no_grad():
        hard = model(video, timestep, text, mask).sample
    torch.testing.assert_close(soft.detach(), hard, rtol=1e-4, atol=1e-5)

    # A threshold below every energy keeps all tokens: identical to the model without the gate.
    video = video.detach()
    keep_all = tiny_model(gate_threshold=-1.0).eval()
    ungated = tiny_model(use_wavelet_gate=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(keep_all(video, timestep, text, mask).sample, ungated(video, timestep, text, mask).sample)
    assert keep_all.last_gate_stats["skipped_fraction"] == 0.0 and ungated.last_gate_stats["mode"] == "off"


def test_wavelet_gate_all_skipped_and_noise_floor():
    model = tiny_model().eval()
    _, _, text, mask = inputs()
    black = -torch.ones(2, 3, 4, 16, 16)
    lengths, hooks = record_mixer_lengths(model)
    with torch.no_grad():
        out = model(black, torch.tensor([0.0, 0.0]), text, mask).sample
    assert torch.isfinite(out).all() and lengths == [] and model.last_gate_stats["skipped_fraction"] == 1.0
    # Pure noise at sigma = 1: the noise floor is subtracted, so most noise-only tubelets do not count as detail.
    noise = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    assert model.wavelet_energy(noise, torch.tensor([1000.0, 1000.0])).abs().mean() < 0.1
    assert model.wavelet_energy(noise, torch.tensor([0.0, 0.0])).mean() > 0.7
    for hook in hooks:
        hook.remove()


def test_gate_relaxation_follows_gradients_not_the_training_flag():
    video, timestep, text, mask = gated_inputs()
    model = tiny_model().train()
    with torch.no_grad():  # sampling in train mode: the hard (gathered) gate, as in eval mode
        train_no_grad = model(video, timestep, text, mask).sample
        assert model.last_gate_stats["mode"] == "gather"
        torch.testing.assert_close(model.eval()(video, timestep, text, mask).sample, train_no_grad, rtol=0, atol=0)
    model.eval()(video, timestep, text, mask).sample.sum().backward()  # eval mode with gradients: still hard
    assert model.last_gate_stats["mode"] == "gather"
    model.train()(video, timestep, text, mask)
    assert model.last_gate_stats["mode"] == "soft"  # a training step: the differentiable relaxation
    model.wavelet_gate.relaxation = "hard"  # a training loop may force either one
    model(video, timestep, text, mask)
    assert model.last_gate_stats["mode"] == "gather"
    model.wavelet_gate.relaxation = "soft"
    with torch.no_grad():
        model.eval()(video, timestep, text, mask)
    assert model.last_gate_stats["mode"] == "soft"
    model.wavelet_gate.relaxation = "sometimes"
    with pytest.raises(ValueError, match="relaxation"):
        model(video, timestep, text, mask)


def test_wavelet_gate_returns_its_decision_and_keeps_no_state():
    video, timestep, _, _ = gated_inputs()
    gate = WaveletGate((2, 4, 4), threshold=0.05, temperature=0.01, noise_floor=True)
    before = dict(vars(gate))
    decision = gate(video, timestep)
    assert vars(gate) == before  # nothing stored as a side effect
    assert decision.mode == "gather" and decision.stats["skipped_fraction"] == pytest.approx(24 / 64)
    assert decision.kept_index.shape == (2, 24) and decision.stats["mixer_video_tokens"] == 24
    assert decision.kept_valid[0].sum() == 16 and decision.kept_valid[1].sum() == 24  # batch 0 is padded
    soft = gate(video.requires_grad_(True), timestep, training=True)
    assert soft.mode == "soft" and soft.token_scale.shape == (2, 32) and soft.token_scale.requires_grad
    with pytest.raises(ValueError, match="gate_temperature"):
        WaveletGate((2, 4, 4), threshold=0.05, temperature=0.0, noise_floor=True)


def test_mixer_is_built_from_the_model_config():
    model = tiny_model(complex_state=False, state_size=6, num_scan_orders=2)
    mixer = type(model.blocks[0].mixer)(model.config)
    assert {k: v.shape for k, v in mixer.state_dict().items()} == {k: v.shape for k, v in model.blocks[0].mixer.state_dict().items()}
    assert mixer.rope_dim == 6 and mixer.order_gate.out_features == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_scan_orders": 3}, "num_scan_orders"), ({"text_conditioning": "prefix"}, "text_conditioning"),
     ({"state_size": 2}, "use_rope"), ({"complex_state": False, "state_size": 5}, "use_rope"),
     ({"gate_temperature": 0.0}, "gate_temperature"), ({"hidden_size": 30, "num_attention_heads": 4}, "divisible by `num_heads`"),
     ({"patch_size": (0, 4, 4)}, "patch_size"), ({"conv_kernel_size": -1}, "conv_kernel_size")],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)



# ---------------------------------------------------------------------------------------------- wavelet


def test_haar_transform_is_orthonormal_and_invertible():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    bands = haar_dwt2d(x)
    torch.testing.assert_close(haar_idwt2d(*bands), x)
    torch.testing.assert_close(sum(b.square().sum() for b in bands), x.square().sum())  # energy preserved
    constant = torch.full((1, 4, 4), 0.3)
    assert all(b.abs().max() == 0 for b in haar_dwt2d(constant)[1:])
    with pytest.raises(ValueError, match="even"):
        haar_dwt2d(torch.zeros(3, 5))


def test_patch_detail_energy_is_mean_coefficient_magnitude():
    video = torch.randn(1, 2, 2, 8, 8, dtype=torch.float64)
    energy = patch_detail_energy(video, (2, 4, 4))
    assert energy.shape == (1, 1, 2, 2)
    _, rows, cols, diag = haar_dwt2d(video[:, :, :, :4, 4:])  # tubelet (0, 0, 1)
    expected = torch.stack([rows.abs(), cols.abs(), diag.abs()]).mean()
    torch.testing.assert_close(energy[0, 0, 0, 1].double(), expected, rtol=1e-5, atol=1e-6)
    noise = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    assert patch_detail_energy(noise, (8, 64, 64)).item() == pytest.approx(GAUSSIAN_DETAIL_ENERGY, rel=0.02)
    odd = patch_detail_energy(torch.randn(1, 1, 1, 5, 5), (1, 5, 5))  # odd sizes are padded, not rejected
    assert odd.shape == (1, 1, 1, 1) and odd.item() > 0
    with pytest.raises(ValueError, match="divisible"):
        patch_detail_energy(video, (2, 3, 4))


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.fixture
def chronos_pipeline(tiny_tokenizer) -> ChronosPipeline:
    torch.manual_seed(0)
    text_encoder = build_text_encoder(len(tiny_tokenizer), d_model=32, num_layers=1, num_heads=2)
    transformer = tiny_model(text_embed_dim=32)
    pipe = ChronosPipeline(tiny_tokenizer, text_encoder, transformer.eval(), ChronosFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs)


def test_pipeline_output_does_not_depend_on_the_training_flag(chronos_pipeline):
    """A pipeline built around a backbone in train mode (validation during training) samples as the saved one."""
    evaluated = run(chronos_pipeline, prompt=PROMPT).frames
    chronos_pipeline.transformer.train()
    np.testing.assert_array_equal(run(chronos_pipeline, prompt=PROMPT).frames, evaluated)
    assert chronos_pipeline.transformer.last_gate_stats["mode"] == "gather"


def test_pipeline_generates_and_round_trips(chronos_pipeline, tmp_path):
    assert get_architecture("chronos-v").pipeline_class is ChronosPipeline
    frames = run(chronos_pipeline, prompt=PROMPT).frames
    assert frames.shape == (1, 4, 16, 16, 3) and np.isfinite(frames).all() and 0 <= frames.min() <= frames.max() <= 1
    assert chronos_pipeline.transformer.last_gate_stats["mode"] == "gather"
    assert not np.allclose(frames, run(chronos_pipeline, prompt="a large blue square moving top to bottom quickly").frames)
    chronos_pipeline.save_pretrained(tmp_path)
    loaded = ChronosPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, ChronosMambaModel)
    np.testing.assert_array_equal(run(loaded, prompt=PROMPT).frames, frames)


@pytest.mark.parametrize("overrides, message", [({"height": 18}, "`height`"), ({"num_frames": 3}, "temporal patch size"),
                                                ({"prompt_embeds": torch.zeros(1, 3, 16), "prompt": None}, "text_embed_dim")])
def test_pipeline_bad_inputs_raise_value_error(chronos_pipeline, overrides, message):
    with pytest.raises(ValueError, match=message):
        chronos_pipeline(**{"prompt": PROMPT, "num_inference_steps": 1, **overrides})


def test_input_skip_is_zero_initialised():
    from chronos_video import ChronosMambaModel

    torch.manual_seed(0)
    kwargs = dict(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_layers=1, state_size=8,
                  num_attention_heads=2, text_embed_dim=16, use_wavelet_gate=False)
    plain = ChronosMambaModel(**kwargs)
    skip = ChronosMambaModel(**kwargs, input_skip=True)
    skip.load_state_dict(plain.state_dict(), strict=False)
    video, text = torch.randn(1, 3, 4, 16, 16), torch.randn(1, 3, 16)
    torch.testing.assert_close(skip(video, 500.0, text).sample, plain(video, 500.0, text).sample)
    with torch.no_grad():
        skip.skip_scale.bias.fill_(2.0)
    torch.testing.assert_close(skip(video, 500.0, text).sample, plain(video, 500.0, text).sample + 2 * video)


def test_absolute_pos_embed_is_shared_with_nano_sora():
    plain = tiny_model(use_wavelet_gate=False)
    positioned = tiny_model(use_wavelet_gate=False, absolute_pos_embed=True)
    positioned.load_state_dict(plain.state_dict())  # the flag adds no parameters
    video, timestep, text, mask = inputs()
    assert not torch.allclose(plain(video, timestep, text, mask).sample, positioned(video, timestep, text, mask).sample)
    with pytest.raises(ValueError, match="absolute_pos_embed"):
        tiny_model(hidden_size=40, absolute_pos_embed=True)


# ---------------------------------------------------------------------------------------------- SSD scan form


def tiny_ssd(**kwargs) -> ChronosMambaModel:
    """A tiny SSD-form model: 64 mixer channels in 4 heads of 16, large steps so the scan (not D) dominates."""
    return tiny_model(scan_type="ssd", scan_head_dim=16, scan_chunk_size=8, time_step_min=0.3, time_step_max=1.0, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(complex_state=False, state_size=6), dict(num_scan_orders=1, use_rope=False),
     dict(text_conditioning="scan_prefix", num_scan_orders=2), dict(scan_rotation="shared")],
)
def test_ssd_mixer_trains_with_finite_gradients(kwargs):
    model = tiny_ssd(**kwargs)
    mixer = model.blocks[0].mixer
    assert mixer.scan_type == "ssd" and mixer.num_heads == 4 and mixer.dt_proj.out_features == 4
    assert mixer.log_lambda.shape == (4,) and (mixer.omega is None) == (not model.config.complex_state)
    A = mixer.state_matrix()
    assert A.shape == (4, model.config.state_size) and (A.real < 0).all() and A.is_complex() == model.config.complex_state
    video, timestep, text, mask = inputs()
    out = model(video, timestep, text, mask).sample
    assert out.shape == video.shape
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert mixer.log_lambda.grad.abs().sum() > 0 and mixer.dt_proj.weight.grad.abs().sum() > 0
    if mixer.omega is not None:
        assert mixer.omega.grad.abs().sum() > 0


def test_ssd_mixer_equals_the_selective_scan_with_decays_tied_per_head():
    """The SSD mixer computes the selective mixer's function when that one's decays, rotations and steps are per head."""
    ssd = tiny_ssd(use_wavelet_gate=False)
    selective = tiny_model(use_wavelet_gate=False, time_step_min=0.3, time_step_max=1.0)
    m_ssd, m_sel = ssd.blocks[0].mixer, selective.blocks[0].mixer
    heads, head_dim = m_ssd.num_heads, m_ssd.head_dim
    n = m_ssd.state_size
    with torch.no_grad():
        for name in ("in_proj", "conv1d", "order_gate", "out_proj"):
            getattr(m_sel, name).load_state_dict(getattr(m_ssd, name).state_dict())
        m_sel.D.copy_(m_ssd.D)
        # x_proj: the selective mixer reads B/C as blocked (re..., im...), the SSD one as interleaved pairs.
        rank = m_ssd.time_step_rank
        weight = m_ssd.x_proj.weight
        pairs = weight[rank:].view(2, n, 2, -1)  # (B/C, state, re/im, in)
        m_sel.x_proj.weight.copy_(torch.cat([weight[:rank], pairs.permute(0, 2, 1, 3).reshape(4 * n, -1)]))
        m_sel.dt_proj.weight.copy_(m_ssd.dt_proj.weight.repeat_interleave(head_dim, 0))
        m_sel.dt_proj.bias.copy_(m_ssd.dt_proj.bias.repeat_interleave(head_dim, 0))
        m_sel.log_lambda.copy_(m_ssd.log_lambda[:, None].expand(heads, n).repeat_interleave(head_dim, 0))
        m_sel.omega.copy_(m_ssd.omega.repeat_interleave(head_dim, 0))
    video, timestep, text, mask = inputs()
    route = ssd._build_route(video, timestep, (2, 4, 4), torch.ones(2, 5, dtype=torch.bool))
    tokens = torch.randn(2, 32, 32)
    torch.testing.assert_close(m_ssd(tokens, route), m_sel(tokens, route), rtol=1e-4, atol=1e-5)


def test_ssd_rope_is_relative_and_matters():
    video, timestep, _, _ = inputs()
    model = tiny_ssd(use_wavelet_gate=False)
    mixer = model.blocks[0].mixer
    route = model._build_route(video, timestep, (2, 4, 4), torch.ones(2, 5, dtype=torch.bool))
    tokens = torch.randn(2, 32, 32)
    base = mixer(tokens, route)
    route.angles = route.angles + torch.randn(route.angles.shape[-1])  # the same offset everywhere cancels
    torch.testing.assert_close(mixer(tokens, route), base, rtol=1e-4, atol=1e-5)
    route.angles = route.angles + torch.linspace(0, 3, 32)[:, None]  # a position-dependent change does not
    assert not torch.allclose(mixer(tokens, route), base, atol=1e-4)


@pytest.mark.parametrize("text_conditioning, scan_rotation", [("cross_attention", "per_head"), ("scan_prefix", "per_head"),
                                                              ("cross_attention", "shared")])
def test_ssd_with_wavelet_gate_gather_equals_mask_and_soft_equals_hard(text_conditioning, scan_rotation):
    video, timestep, text, mask = gated_inputs()
    model = tiny_ssd(conv_kernel_size=0, text_conditioning=text_conditioning, gate_temperature=1e-4,
                     scan_rotation=scan_rotation).eval()
    lengths, hooks = record_mixer_lengths(model)
    with torch.no_grad():
        gathered = model(video, timestep, text, mask).sample
        model.gate_gather = False
        masked = model(video, timestep, text, mask).sample
    for hook in hooks:
        hook.remove()
    prefix = 5 if text_conditioning == "scan_prefix" else 0
    assert lengths == [prefix + 24, prefix + 24, prefix + 32, prefix + 32]  # skipped tokens never reach the scan
    torch.testing.assert_close(gathered, masked, rtol=1e-4, atol=1e-5)
    soft = model.train()(video, timestep, text, mask).sample
    assert model.last_gate_stats["mode"] == "soft"
    torch.testing.assert_close(soft.detach(), masked, rtol=1e-4, atol=1e-5)


def test_ssd_training_step_reduces_the_loss():
    model = tiny_ssd().train()
    video, timestep, text, mask = inputs()
    target = torch.randn_like(video) * 0.5
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = (model(video, timestep, text, mask).sample - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_shared_rotation_turns_b_and_c_once_and_round_trips(tmp_path):
    """scan_rotation="shared": one frequency ladder (1, N) for all heads, and a model that saves and loads exactly."""
    model = tiny_ssd(scan_rotation="shared").eval()
    mixer = model.blocks[0].mixer
    assert mixer.omega.shape == (1, model.config.state_size) and mixer.state_matrix().shape == (4, model.config.state_size)
    video, timestep, text, mask = inputs()
    with torch.no_grad():
        expected = model(video, timestep, text, mask).sample
        per_head = tiny_ssd().eval()
        per_head.load_state_dict({k: v.expand(4, -1) if k.endswith("mixer.omega") else v for k, v in model.state_dict().items()})
        assert not torch.allclose(per_head(video, timestep, text, mask).sample, expected, atol=1e-5)  # the clocks differ
    model.save_pretrained(tmp_path / "shared")
    loaded = ChronosMambaModel.from_pretrained(tmp_path / "shared").eval()
    assert loaded.config.scan_rotation == "shared"
    with torch.no_grad():
        torch.testing.assert_close(loaded(video, timestep, text, mask).sample, expected, rtol=0, atol=0)


def test_ssd_model_round_trips_and_old_configs_load_as_selective(tmp_path):
    model = tiny_ssd().eval()
    video, timestep, text, mask = inputs()
    with torch.no_grad():
        expected = model(video, timestep, text, mask).sample
    model.save_pretrained(tmp_path / "ssd")
    loaded = ChronosMambaModel.from_pretrained(tmp_path / "ssd").eval()
    assert loaded.config.scan_type == "ssd" and loaded.blocks[0].mixer.scan_type == "ssd"
    with torch.no_grad():
        torch.testing.assert_close(loaded(video, timestep, text, mask).sample, expected, rtol=0, atol=0)

    # A config written before the SSD form has no scan keys: it must build (and load) the selective scan.
    old = tiny_model()
    old.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("scan_type", "scan_head_dim", "scan_chunk_size"):
        config.pop(key)
    config_path.write_text(json.dumps(config))
    reloaded = ChronosMambaModel.from_pretrained(tmp_path / "old").eval()
    assert reloaded.config.scan_type == "selective" and reloaded.blocks[0].mixer.log_lambda.shape == (64, 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(video, timestep, text, mask).sample, old.eval()(video, timestep, text, mask).sample,
                                   rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"scan_type": "mamba3"}, "scan_type"), ({"scan_type": "ssd", "scan_head_dim": 24}, "scan_head_dim"),
     ({"scan_chunk_size": 0}, "scan_chunk_size"), ({"scan_rotation": "per_token"}, "scan_rotation")],
)
def test_bad_scan_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)
