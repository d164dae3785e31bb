"""The locally trained text stack: tokenizer framing and the two tiny encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTextModel, T5EncoderModel

from chronos_video import NanoSoraPipeline, build_text_encoder, pretrain_text_encoder, train_caption_tokenizer
from chronos_video.models.embeddings import masked_mean

from conftest import make_tiny_pipeline


def encode(tokenizer, encoder, captions):
    inputs = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        output = encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    return inputs, output


def clip_encoder(tokenizer, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return build_text_encoder(
        len(tokenizer), d_model=32, num_layers=1, num_heads=2, encoder_type="clip", max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def test_tokenizer_frames_every_caption_with_bos_and_eos(tiny_tokenizer):
    inputs = tiny_tokenizer(["a red circle", ""], padding="max_length", max_length=16, return_tensors="pt")
    ids, mask = inputs.input_ids, inputs.attention_mask
    assert mask.sum(1).tolist() == [5, 2]  # the empty prompt is [BOS] [EOS], never an all-padding row
    assert (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert ids[0, 4] == ids[1, 1] == tiny_tokenizer.eos_token_id


def test_encoder_types(tiny_tokenizer):
    assert isinstance(build_text_encoder(len(tiny_tokenizer), d_model=32, num_layers=1, num_heads=2), T5EncoderModel)
    assert isinstance(clip_encoder(tiny_tokenizer), CLIPTextModel)
    with pytest.raises(ValueError, match="`encoder_type` must be one of"):
        build_text_encoder(len(tiny_tokenizer), encoder_type="bert")
    with pytest.raises(ValueError, match="`d_model`=30 must be divisible by `num_heads`=4"):
        build_text_encoder(len(tiny_tokenizer), d_model=30, num_heads=4)


def test_clip_pools_at_eos(tiny_tokenizer):
    encoder = clip_encoder(tiny_tokenizer)
    inputs, output = encode(tiny_tokenizer, encoder, ["a small red circle moving left to right slowly", "a blue square"])
    eos = inputs.attention_mask.sum(1) - 1
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[torch.arange(2), eos])


def test_causal_encoder_tells_word_order_apart_in_the_pooled_states(tiny_tokenizer):
    """"left to right" and "right to left" hold the same words; the backbone's pooled conditioning
    (a masked mean) and its cross-attention (a set of keys) only see their order through the states.
    From initialisation the causal encoder moves the pooled state about as far for swapped words as
    for a changed word (a fresh T5 moves it less than a tenth as far)."""
    captions = [
        "a small red circle moving left to right slowly",
        "a small red circle moving right to left slowly",
        "a small red circle moving left to right quickly",
    ]
    inputs, output = encode(tiny_tokenizer, clip_encoder(tiny_tokenizer), captions)
    pooled = masked_mean(output.last_hidden_state, inputs.attention_mask)
    order_gap, word_gap = (pooled[0] - pooled[1]).norm(), (pooled[0] - pooled[2]).norm()
    assert order_gap > 0.3 * word_gap > 0


def test_pipeline_with_clip_encoder_saves_loads_and_generates(tiny_tokenizer, tmp_path):
    pipe = make_tiny_pipeline(tiny_tokenizer)
    pipe.text_encoder = clip_encoder(tiny_tokenizer)
    pipe.save_pretrained(tmp_path)
    loaded = NanoSoraPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.text_encoder, CLIPTextModel)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a small red circle moving left to right slowly", num_inference_steps=2, output_type="np")
    first = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    second = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert first.shape == (1, 4, 16, 16, 3) and np.isfinite(first).all()
    np.testing.assert_allclose(first, second, atol=1e-5)
    with pytest.raises(ValueError, match="`max_sequence_length`=40 is longer than the text encoder's 16 position embeddings"):
        loaded(**kwargs, max_sequence_length=40)


def test_pretraining_makes_every_word_and_its_order_readable(tiny_tokenizer):
    """`pretrain_text_encoder` leaves the pooled state encoding each word at its position, so two
    captions that differ in one late word (or only in word order) end up as far apart as any."""
    captions = ["a small red circle moving left to right slowly", "a small red circle moving right to left slowly",
                "a small blue circle moving left to right slowly", "a large green triangle moving top to bottom quickly"]
    tokenizer = train_caption_tokenizer(captions, model_max_length=16)
    encoder = clip_encoder(tokenizer)

    def pooled(caption):
        inputs, output = encode(tokenizer, encoder, [caption])
        return masked_mean(output.last_hidden_state, inputs.attention_mask.bool())[0]

    encoder.eval()
    accuracy = pretrain_text_encoder(encoder, tokenizer, captions, num_steps=150, batch_size=8, learning_rate=3e-3)
    assert accuracy == 1.0 and encoder.training is False  # gives the encoder back in the mode it came in
    order_gap = (pooled(captions[0]) - pooled(captions[1])).norm()
    colour_gap = (pooled(captions[0]) - pooled(captions[2])).norm()
    assert order_gap > 0.5 * colour_gap > 0


def test_pretraining_rejects_bad_arguments(tiny_tokenizer):
    encoder = clip_encoder(tiny_tokenizer)
    with pytest.raises(ValueError, match="captions"):
        pretrain_text_encoder(encoder, tiny_tokenizer, [])
    with pytest.raises(ValueError, match="num_steps"):
        pretrain_text_encoder(encoder, tiny_tokenizer, ["a red circle"], num_steps=0)


def test_last_state_pooling_reads_the_eos_state_and_is_saved(tiny_tokenizer, tmp_path):
    from chronos_video.models.embeddings import pool_text_states

    states = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    torch.testing.assert_close(pool_text_states(states, mask, "last"), states[[0, 1], [2, 0]])
    torch.testing.assert_close(pool_text_states(states, mask, "mean"), masked_mean(states, mask))
    with pytest.raises(ValueError, match="text_pooling"):
        make_tiny_pipeline(tiny_tokenizer, text_pooling="max")
    pipe = make_tiny_pipeline(tiny_tokenizer, text_pooling="last")
    pipe.save_pretrained(tmp_path / "p")
    assert NanoSoraPipeline.from_pretrained(tmp_path / "p").transformer.text_embed.text_pooling == "last"
