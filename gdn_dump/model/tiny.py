"""The built-in ``tiny`` model: a deterministic random Qwen3.5 with every code path of a real one.

GQA with n_v = 2 n_k, conv kernel 4, gated-q softmax attention; small enough for a test to run it in
milliseconds. No download: the weights come from a fixed seed, the tokenizer from
:mod:`gdn_dump.tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..catalogue import ATTENTION_LAYER_TYPE, GDN_LAYER_TYPE
from ..tokenizer import TINY_NAME, build_tiny_tokenizer  # noqa: F401 - re-exported

TINY_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    layer_types=[GDN_LAYER_TYPE] * 3 + [ATTENTION_LAYER_TYPE],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
TINY_SEED = 0


def tiny_text_config(tokenizer=None):
    from transformers import Qwen3_5TextConfig

    tokenizer = tokenizer or build_tiny_tokenizer()
    return Qwen3_5TextConfig(
        vocab_size=len(tokenizer) + 3,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_TEXT_CONFIG,
    )


def build_tiny_model():
    """The deterministic random-initialised tiny Qwen3.5 text model and its tokenizer."""
    from transformers import Qwen3_5ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = tiny_text_config(tokenizer)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3_5ForCausalLM(config)
    return model.eval(), tokenizer


def save_tiny_checkpoint(path: str | Path, multimodal: bool = True) -> Path:
    """Save ``tiny`` as a checkpoint directory, by default in the published multimodal layout.

    The multimodal form (``Qwen3_5ForConditionalGeneration`` with a vision tower of depth 1) is what
    real Qwen3.5 checkpoints look like, so loading it exercises the text-model extraction path.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    path = Path(path)
    text_model, tokenizer = build_tiny_model()
    if multimodal:
        text_config = text_model.config.to_dict()
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                      out_hidden_size=text_model.config.hidden_size)
        config = Qwen3_5Config(text_config=text_config, vision_config=vision)
        model = Qwen3_5ForConditionalGeneration(config)
        model.model.language_model.load_state_dict(text_model.model.state_dict())
        model.lm_head.load_state_dict(text_model.lm_head.state_dict())
    else:
        model = text_model
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
