"""Constraint transport and precision gauges inside every flow pipeline (through the shared base)."""

from __future__ import annotations

import pytest
import torch

from chronos_video import ChronosFlowMatchScheduler, NanoSoraPipeline
from chronos_video.guidance import ConstraintTransport, RegionConstraint
from chronos_video.precision import PrecisionSchedule

PROMPT = "a small red circle moving left to right slowly"


def keyframe_constraint(epsilon: float = 0.05) -> RegionConstraint:
    target = torch.zeros(4, 3, 16, 16)
    target[:, 0, 4:12, 4:12] = 0.9  # a red square
    mask = torch.zeros(4, 3, 16, 16, dtype=torch.bool)
    mask[0] = True  # the whole first frame is a keyframe
    return RegionConstraint(target, mask, epsilon=epsilon)


def sample(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


@pytest.mark.parametrize("method", ["natural", "dps", "repaint"])
def test_constrained_video_satisfies_the_constraint(tiny_pipeline, method):
    constraint = keyframe_constraint()
    out = sample(tiny_pipeline, constraints=[constraint], constraint_settings={"method": method})
    video = out.frames[0]  # (F, C, H, W) in [0, 1]
    rms = (video[constraint.mask] - constraint.target[constraint.mask]).pow(2).mean().sqrt()
    assert out.constraints_satisfied == [True] and rms <= constraint.epsilon
    assert all("constraint_violation" in step and "barrier" in step for step in out.trace)
    free = sample(tiny_pipeline).frames[0]
    assert (free[constraint.mask] - constraint.target[constraint.mask]).pow(2).mean().sqrt() > constraint.epsilon


def test_constraint_settings_come_from_the_pipeline_config(tiny_pipeline, tmp_path):
    settings = ConstraintTransport(method="natural", cbf=False, cg_iters=7).to_config()
    tiny_pipeline.register_to_config(constraint_settings=settings, precision_schedule=PrecisionSchedule.preset("sigma").to_dict())
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = NanoSoraPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.constraint_settings == settings
    assert PrecisionSchedule.from_dict(loaded.config.precision_schedule).to_dict() == PrecisionSchedule.preset("sigma").to_dict()
    a = sample(tiny_pipeline, constraints=[keyframe_constraint()])
    b = sample(loaded, constraints=[keyframe_constraint()])
    torch.testing.assert_close(a.frames, b.frames)
    assert [s["gauge"] for s in a.trace] == [s["gauge"] for s in b.trace]


def test_precision_schedule_switches_gauges_and_restores_weights(tiny_pipeline):
    before = {k: v.clone() for k, v in tiny_pipeline.transformer.state_dict().items()}
    full = sample(tiny_pipeline, precision=None)
    seed = sample(tiny_pipeline, precision="seed")
    assert [s["gauge"] for s in seed.trace] == [PrecisionSchedule.preset("seed").select(s["sigma"]).gauge for s in seed.trace]
    assert len({s["gauge"] for s in seed.trace}) > 1 and "gauge" not in full.trace[0]
    assert not torch.equal(seed.frames, full.frames)
    assert (seed.frames - full.frames).abs().mean() < 0.05  # quantization noise, not a different video
    for key, value in tiny_pipeline.transformer.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.testing.assert_close(sample(tiny_pipeline, precision=None).frames, full.frames, rtol=0, atol=0)


def test_precision_and_constraint_errors(tiny_pipeline):
    with pytest.raises(ValueError, match="calibrated"):
        sample(tiny_pipeline, precision="calibrated")
    with pytest.raises(ValueError):
        sample(tiny_pipeline, precision="fp3")
    wrong = RegionConstraint(torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"constraints\[0\]"):
        sample(tiny_pipeline, constraints=[wrong])
    with pytest.raises(ValueError, match="constraints"):
        sample(tiny_pipeline, constraints=[])
    with pytest.raises(ValueError, match="method"):
        sample(tiny_pipeline, constraints=[keyframe_constraint()], constraint_settings={"method": "magic"})
    with pytest.raises(ValueError, match="precision_backend"):
        ChronosFlowMatchScheduler(precision_backend="gpu")


# ---------------------------------------------------------------------- one latent -> pixel decoder
LTX_MEAN, LTX_STD, LTX_SCALING = [0.3, -0.2, 0.1, 0.0], [1.5, 0.5, 2.0, 1.0], 0.8


def tiny_ltx_vae():
    """A tiny real diffusers LTX video VAE (4 latent channels, no compression) whose latent statistics live in
    buffers, the layout the pipeline's old decode path ignored."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,), layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(False,), decoder_spatio_temporal_scaling=(False,),
        decoder_inject_noise=(False, False), upsample_residual=(False,), upsample_factor=(1,),
        patch_size=1, patch_size_t=1, scaling_factor=LTX_SCALING, spatial_compression_ratio=1, temporal_compression_ratio=1,
    ).eval()
    vae.latents_mean.copy_(torch.tensor(LTX_MEAN))
    vae.latents_std.copy_(torch.tensor(LTX_STD))
    return vae


def test_latent_decoder_matches_the_diffusers_ltx_recipe():
    from chronos_video.decoding import LatentDecoder

    vae = tiny_ltx_vae()
    decoder = LatentDecoder(vae)
    latents = torch.randn(2, 4, 3, 8, 8)
    view = (1, -1, 1, 1, 1)
    raw = latents * torch.tensor(LTX_STD).view(view) / LTX_SCALING + torch.tensor(LTX_MEAN).view(view)
    with torch.no_grad():
        expected = vae.decode(raw, return_dict=False)[0]
        video, pixels = decoder.decode(latents), decoder(latents)
    torch.testing.assert_close(decoder.normalize(decoder.denormalize(latents)), latents)
    torch.testing.assert_close(video, expected.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(pixels, expected.permute(0, 2, 1, 3, 4) * 0.5 + 0.5, rtol=0, atol=0)
    with torch.no_grad():
        assert decoder.encode(pixels.clamp(0, 1)).shape == latents.shape

    pixel_space = LatentDecoder()
    z = 1.5 * torch.randn(1, 3, 2, 4, 4)
    torch.testing.assert_close(pixel_space.decode(z), z.clamp(-1, 1))
    torch.testing.assert_close(pixel_space.encode(pixel_space(z)), z)
    with pytest.raises(ValueError, match="latents"):
        pixel_space(z[0])
    with pytest.raises(ValueError, match="need a `vae`"):
        LatentDecoder(scaling_factor=0.5)
    with pytest.raises(ValueError, match="together"):
        LatentDecoder(vae, latents_mean=[0.0] * 4)


class RecordingDecoder:
    """Delegates to the pipeline's own decoder and keeps every (latents, pixels) pair it is asked to judge
    outside autograd (the constraint checks: measurements and the final projection)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.checked: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, latents):
        pixels = self.decoder(latents)
        if not torch.is_grad_enabled():
            self.checked.append((latents.detach().clone(), pixels.detach().clone()))
        return pixels

    def __getattr__(self, name):
        return getattr(self.decoder, name)


@pytest.mark.parametrize("method", ["natural", "repaint"])
def test_returned_video_is_what_the_constraint_was_checked_on(tiny_tokenizer, method):
    from conftest import make_tiny_pipeline

    from chronos_video.decoding import LatentDecoder

    base = make_tiny_pipeline(tiny_tokenizer, in_channels=4)
    pipe = NanoSoraPipeline(**{**base.components, "vae": tiny_ltx_vae()})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # a reachable keyframe: the decoding of some latent
        target = LatentDecoder(pipe.vae)(torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(3)))[0]
    constraint = RegionConstraint.box(target.clamp(0, 1), top=4, left=4, height=8, width=8, frame_indices=[0], epsilon=0.05)
    settings = {"method": method}

    def run(output_type):
        return pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type=output_type,
                    constraints=[constraint], constraint_settings=settings)

    final_latents = run("latent").frames
    recorder = RecordingDecoder(pipe._constraint_decoder())
    pipe._constraint_decoder = lambda: recorder  # the pipeline's own decoder, only observed
    out = run("pt")

    checked = [pixels for latents, pixels in recorder.checked if torch.equal(latents, final_latents)]
    assert checked, "the final latents were never checked against the constraint"
    torch.testing.assert_close(out.frames, checked[-1].clamp(0, 1), rtol=0, atol=0)
    assert out.constraints_satisfied == [True]
    assert float(constraint.violation(out.frames)) <= float(constraint.violation(checked[-1])) <= constraint.epsilon
    # the LTX latent statistics matter: ignoring them (the old decode path) gives another video
    ignoring = LatentDecoder(pipe.vae, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with torch.no_grad():
        assert (ignoring(final_latents).clamp(0, 1) - out.frames).abs().max() > 0.01
