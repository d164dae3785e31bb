"""`text_encoder.pretrained`: train on top of any saved transformers text encoder and its tokenizer (offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import T5EncoderModel

from chronos_video import NanoSoraPipeline, build_text_encoder, train_caption_tokenizer
from chronos_video.training_builders import load_pretrained_text_model
from test_training import SMOKE, load_train_module

CAPTIONS = ["a small red circle moving left to right slowly", "a large blue square moving top to bottom quickly"]


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    """A tiny T5 encoder and its tokenizer saved as a user's pretrained folder would be."""
    folder = tmp_path_factory.mktemp("t5-tiny")
    tokenizer = train_caption_tokenizer(CAPTIONS, model_max_length=512)
    torch.manual_seed(0)
    encoder = build_text_encoder(len(tokenizer), d_model=24, num_layers=1, num_heads=2, encoder_type="t5", pad_token_id=tokenizer.pad_token_id)
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, encoder


def test_load_pretrained_text_model_picks_the_saved_class(saved_encoder):
    folder, encoder = saved_encoder
    tokenizer, loaded = load_pretrained_text_model(str(folder), max_length=12)
    assert isinstance(loaded, T5EncoderModel) and tokenizer.model_max_length == 12
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    with pytest.raises(ValueError, match="`text_encoder.pretrained`"):
        load_pretrained_text_model(str(folder / "missing"), max_length=12)


@pytest.mark.parametrize("trainable", [False, True])
def test_train_on_a_pretrained_encoder(saved_encoder, tmp_path, trainable):
    folder, encoder = saved_encoder
    train = load_train_module()
    output = train.main(["--config", str(SMOKE), "--output_dir", str(tmp_path / "run"), "--report_to", "null",
                         "--data.cache_dir", str(tmp_path / "cache"), "--text_encoder.pretrained", str(folder),
                         "--text_encoder.trainable", str(trainable).lower(), "--max_train_steps", "3"])
    pipe = NanoSoraPipeline.from_pretrained(output)
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert pipe.tokenizer.model_max_length == 16  # the run's tokenizer_max_length, kept in the saved tokenizer
    changed = any(not torch.equal(pipe.text_encoder.state_dict()[n], v) for n, v in encoder.state_dict().items())
    assert changed == trainable  # frozen by default
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a small red circle moving left to right slowly", num_inference_steps=2).frames.shape[1] == 8


def test_pretrained_encoder_config_errors(saved_encoder):
    from chronos_video.training_config import parse_config

    folder, _ = saved_encoder
    with pytest.raises(ValueError, match="`text_encoder_pretrain_steps`"):
        parse_config(["--config", str(SMOKE), "--text_encoder.pretrained", str(folder), "--text_encoder_pretrain_steps", "10"])
