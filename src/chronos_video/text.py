"""Small text stack trained with the video model: a word-level tokenizer and a tiny T5 encoder.

The tokenizer is trained locally with `tokenizers` on the captions (nothing is downloaded) and
wrapped as a `PreTrainedTokenizerFast`, so it saves and loads like any Hub tokenizer. Any other
pretrained transformers encoder works in its place; only the backbone's `text_embed_dim` must match.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]"}


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 512, model_max_length: int = 32) -> PreTrainedTokenizerFast:
    """Trains a lower-cased word-level tokenizer on `captions`.

    Every encoding starts with `[BOS]`, so an empty prompt (the unconditional branch of
    classifier-free guidance) is still one real token rather than an all-padding row.
    """
    if vocab_size < 8:
        raise ValueError(f"`vocab_size` must be at least 8, got {vocab_size}.")
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer.train_from_iterator(captions, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, padding_side="right", **SPECIAL_TOKENS)


def build_text_encoder(
    vocab_size: int,
    d_model: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int | None = None,
    pad_token_id: int = 0,
) -> T5EncoderModel:
    """A tiny `T5EncoderModel`, randomly initialised, trained jointly with the video backbone."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff or 4 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=pad_token_id,
        decoder_start_token_id=pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)
