"""Tiny random checkpoints of the other model families the tool claims (test-only builders).

Each has tiny's hidden size 64, layers [GDN, GDN, GDN, attention] and conv 4, but other head shapes
(so a listing taken from tiny's config instead of the checkpoint's would show): 2 k-heads of 16 and
6 v-heads of 8 (n_v = 3 n_k, as in the 27B; d_v != d_k), 4 softmax heads over 1 kv-head; a sparse MoE
MLP of 4 experts, top 2, with a shared expert; tiny's gates (:func:`gdn_dump.model.tiny.set_gates`,
half-lives 1 to 1,000 tokens); the tiny tokenizer. Saved with
``save_pretrained`` so a test loads them by path, the way a user's checkpoint is loaded.

- ``qwen3_5_moe_text``: ``Qwen3_5MoeForCausalLM`` (model type ``qwen3_5_moe_text``)
- ``qwen3_5_moe``: ``Qwen3_5MoeForConditionalGeneration`` with a vision tower of depth 1, the
  published multimodal layout (its text config has model type ``qwen3_5_moe_text``)
- ``qwen3_next``: ``Qwen3NextForCausalLM`` (model type ``qwen3_next``); ``mlp_only_layers`` puts a
  dense MLP on chosen layers (Qwen3-Next's ``decoder_sparse_step`` / ``mlp_only_layers``)
"""

from __future__ import annotations

from pathlib import Path

import torch

from gdn_dump.model.tiny import TINY_SEED, TINY_TEXT_CONFIG, set_gates
from gdn_dump.tokenizer import build_tiny_tokenizer

MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
       "shared_expert_intermediate_size": 32}
SHAPES = {"linear_num_value_heads": 6, "linear_value_head_dim": 8, "num_key_value_heads": 1}
FAMILIES = ("qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next")
VISION = {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}


def _text_kwargs(tokenizer) -> dict:
    kwargs = dict(TINY_TEXT_CONFIG, **SHAPES, **MOE)
    kwargs.update(vocab_size=len(tokenizer) + 3, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    return kwargs


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


def build_family(family: str, *, mlp_only_layers: list[int] | None = None):
    """``(hf_model, tokenizer)`` of a tiny random model of ``family`` (one of :data:`FAMILIES`)."""
    tokenizer = build_tiny_tokenizer()
    kwargs = _text_kwargs(tokenizer)
    if family in ("qwen3_5_moe_text", "qwen3_5_moe"):
        from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

        kwargs.pop("intermediate_size")  # the MoE text config has no dense MLP width
        text = _seeded(lambda: Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**kwargs)))
        set_gates(text)
        if family == "qwen3_5_moe_text":
            return text.eval(), tokenizer
        from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

        config = Qwen3_5MoeConfig(text_config=text.config.to_dict(),
                                  vision_config=dict(VISION, out_hidden_size=kwargs["hidden_size"]))
        model = _seeded(lambda: Qwen3_5MoeForConditionalGeneration(config))
        model.model.language_model.load_state_dict(text.model.state_dict())
        model.lm_head.load_state_dict(text.lm_head.state_dict())
        return model.eval(), tokenizer
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        kwargs["mlp_only_layers"] = list(mlp_only_layers or [])
        model = _seeded(lambda: Qwen3NextForCausalLM(Qwen3NextConfig(**kwargs)))
        set_gates(model)
        return model.eval(), tokenizer
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def save_family(family: str, path: str | Path, **kwargs) -> Path:
    """Save :func:`build_family`'s model and the tiny tokenizer as a checkpoint directory."""
    path = Path(path)
    model, tokenizer = build_family(family, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
