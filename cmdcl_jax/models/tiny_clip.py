"""A tiny random CLIP with a word-level tokenizer, written in Hugging Face format.

The CPU demo and the tests need a CLIP without a download. :func:`write_tiny_clip` builds
one and saves it exactly as ``save_pretrained`` would (config.json, model.safetensors,
preprocessor and tokenizer files), so the same ``Clip.from_pretrained`` and
``AutoTokenizer.from_pretrained`` calls serve it and the real ``openai/clip-vit-*`` models.
The vocabulary is the lower-cased words of the texts it will have to encode (class names
and prompt templates); other words map to ``<unk>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from flax import nnx

from cmdcl_jax.models.clip import Clip, ClipConfig, ClipTowerConfig

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3; eos != 2 (see ClipText)
TEXT_LENGTH = 32  # tokens the text tower's position table holds


def tiny_clip_config(vocab_size: int, *, image_size: int = 32, width: int = 32) -> ClipConfig:
    """Two-layer towers of ``width`` channels; patch 8 on ``image_size`` frames."""
    tower = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="quick_gelu",
    )
    return ClipConfig(
        vision=ClipTowerConfig(**tower, image_size=image_size, patch_size=8),
        text=ClipTowerConfig(
            **tower,
            vocab_size=vocab_size,
            max_position_embeddings=TEXT_LENGTH,
            pad_token_id=SPECIAL_TOKENS.index("<pad>"),
            bos_token_id=SPECIAL_TOKENS.index("<bos>"),
            eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        ),
        projection_dim=width,
    )


def word_tokenizer(texts: Iterable[str], max_length: int):
    """A word-level ``PreTrainedTokenizerFast`` over the lower-cased words of ``texts``,
    wrapping each text as ``<bos> ... <eos>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def write_tiny_clip(
    directory: str | Path,
    texts: Iterable[str],
    *,
    image_size: int = 32,
    width: int = 32,
    seed: int = 0,
) -> Path:
    """Writes a random tiny CLIP and its tokenizer to ``directory``; returns the path."""
    tokenizer = word_tokenizer(texts, TEXT_LENGTH)
    cfg = tiny_clip_config(len(tokenizer), image_size=image_size, width=width)
    directory = Path(directory)
    Clip(cfg, rngs=nnx.Rngs(seed)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
