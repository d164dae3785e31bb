"""NanoSoraTransformer3DModel and the shared building blocks it imports (what both backbones share: test_backbones.py)."""

from __future__ import annotations

import pytest
import torch

from chronos_video import NanoSoraTransformer3DModel
from chronos_video.models.embeddings import apply_rotary, rope_angles_3d, sincos_position_embedding, unpatchify, TubeletEmbed
from conftest import backbone_inputs, perturb_zero_init


def tiny_model(**kwargs) -> NanoSoraTransformer3DModel:
    torch.manual_seed(0)
    config = dict(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_kv_heads=2, text_embed_dim=24)
    config.update(kwargs)
    return perturb_zero_init(NanoSoraTransformer3DModel(**config), std=0.05)


inputs = backbone_inputs



def test_empty_text_mask_is_safe():
    model = tiny_model()
    video, timestep, text, _ = inputs()
    out = model(video, timestep, text, torch.zeros(2, 5, dtype=torch.long)).sample
    assert torch.isfinite(out).all()


def test_tubelet_roundtrip():
    embed = TubeletEmbed(3, 3 * 2 * 4 * 4, (2, 4, 4))
    video = torch.randn(1, 3, 4, 8, 8)
    tokens, grid = embed(video)
    assert tokens.shape == (1, 2 * 2 * 2, 96) and grid == (2, 2, 2)
    # unpatchify inverts the raster layout of a per-tubelet flatten
    patches = video.reshape(1, 3, 2, 2, 2, 4, 2, 4).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(1, 8, 96)
    assert torch.equal(unpatchify(patches, grid, (2, 4, 4), 3), video)


def test_rope_3d_scores_depend_only_on_relative_offset():
    angles = rope_angles_3d((3, 4, 5), 12).view(3, 4, 5, 6)
    q, k = torch.randn(12), torch.randn(12)

    def score(p, s):
        return (apply_rotary(q[None], angles[p].reshape(1, 6)) * apply_rotary(k[None], angles[s].reshape(1, 6))).sum()

    assert torch.allclose(score((0, 0, 0), (1, 2, 3)), score((1, 1, 1), (2, 3, 4)), atol=1e-5)
    assert not torch.allclose(score((0, 0, 0), (1, 2, 3)), score((0, 0, 0), (2, 2, 3)), atol=1e-3)





@pytest.mark.parametrize(
    "kwargs, message",
    [({"hidden_size": 30, "num_attention_heads": 4}, "divisible by `num_heads`"), ({"num_kv_heads": 3}, "num_kv_heads"),
     ({"patch_size": (0, 4, 4)}, "patch_size"), ({"hidden_size": 40, "absolute_pos_embed": True}, "absolute_pos_embed")],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)



def test_input_skip_starts_as_the_plain_model_and_learns_a_per_channel_scale():
    plain = tiny_model()
    skip = NanoSoraTransformer3DModel(**{**plain.config, "input_skip": True})
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["skip_scale.bias", "skip_scale.weight"] and not unexpected
    video, timestep, text, mask = inputs()
    torch.testing.assert_close(skip(video, timestep, text, mask).sample, plain(video, timestep, text, mask).sample)
    with torch.no_grad():
        skip.skip_scale.bias.fill_(1.0)  # v = F(z) + 1 * z
    torch.testing.assert_close(skip(video, timestep, text, mask).sample, plain(video, timestep, text, mask).sample + video)
    with pytest.raises(ValueError, match="input_skip"):
        tiny_model(input_skip=True, out_channels=4)


def test_sincos_position_embedding_follows_the_raster_token_order():
    frames, height, width, dim = 3, 4, 5, 32
    table = sincos_position_embedding((frames, height, width), dim).reshape(frames, height, width, dim)
    temporal, spatial = table[..., : dim // 4], table[..., dim // 4 :]  # diffusers: [temporal | spatial]
    # the temporal part depends on t only, the spatial part on (h, w) only
    assert torch.equal(temporal, temporal[:, :1, :1].expand_as(temporal))
    assert torch.equal(spatial, spatial[:1].expand_as(spatial))
    # every token has its own embedding, and h and w are not confused (the grid is not square)
    flat = table.reshape(-1, dim)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 1e-3
    # the spatial part is [f(one axis) | g(other axis)]: each half is constant along one grid axis,
    # which only holds if the (height, width) order given to diffusers is right
    first, second = spatial[0, ..., : spatial.shape[-1] // 2], spatial[0, ..., spatial.shape[-1] // 2 :]
    halves_constant_along = {
        (torch.equal(half, half[:1].expand_as(half)), torch.equal(half, half[:, :1].expand_as(half))) for half in (first, second)
    }
    assert halves_constant_along == {(True, False), (False, True)}


def test_absolute_pos_embed_tells_the_model_where_and_when_a_token_is():
    plain = tiny_model()
    positioned = tiny_model(absolute_pos_embed=True)
    positioned.load_state_dict(plain.state_dict())  # the flag adds no parameters
    video, timestep, text, mask = inputs()
    out_plain, out_positioned = plain(video, timestep, text, mask).sample, positioned(video, timestep, text, mask).sample
    assert not torch.allclose(out_plain, out_positioned)
    # Without absolute positions a constant video gives the same output at every frame (RoPE and the
    # tubelet convolution only see relative offsets); with them, frames can differ.
    constant = torch.ones_like(video)
    frames_plain = plain(constant, timestep, text, mask).sample
    frames_positioned = positioned(constant, timestep, text, mask).sample
    assert torch.allclose(frames_plain[:, :, :2], frames_plain[:, :, 2:], atol=1e-5)
    assert not torch.allclose(frames_positioned[:, :, :2], frames_positioned[:, :, 2:], atol=1e-3)
