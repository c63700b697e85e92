"""The built-in ``tiny`` model: a deterministic random Qwen3.5 with every code path of a real one.

GQA with n_v = 2 n_k, conv kernel 4, gated-q softmax attention; small enough for a test to run it in
milliseconds. No download: the weights come from a fixed seed, the tokenizer from
:mod:`gdn_dump.tokenizer`.

Gates like a trained model's: random initialisation gives every GDN head a per-step log decay of
about -2 to -20 (half-lives well under a token), so every matrix would be a diagonal. After
construction each GDN head's ``A_log`` and ``dt_bias`` are set so that its median half-life
``ln(0.5) / g`` (``g = -exp(A_log) * softplus(a + dt_bias)``) is one of :func:`tiny_half_lives`:
log-spaced from 1 to 1,000 tokens over all GDN heads, interleaved across layers so that every layer
has short and long memory and no two heads share a half-life. ``a = in_proj_a(x)`` stays random
(about N(0, 0.16)), so the decay still varies with the token (over examples/prompts.jsonl
between about 0.7x and 1.45x of a head's median half-life).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..catalogue import ATTENTION_LAYER_TYPE, GDN_LAYER_TYPE
from ..tokenizer import TINY_NAME, build_tiny_tokenizer  # noqa: F401 - re-exported
from .kernels import HF_ATTENTION

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
    max_position_embeddings=262144,  # Qwen3.5's published context: long-prompt tests run on tiny
    tie_word_embeddings=False,
)
TINY_SEED = 0
# the median half-lives (tokens) of the GDN heads: log-spaced over this range, see tiny_half_lives
TINY_HALF_LIFE_RANGE = (1.0, 1000.0)


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
    config._attn_implementation = HF_ATTENTION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3_5ForCausalLM(config)
    set_gates(model)
    return model.eval(), tokenizer


def tiny_half_lives(config) -> dict[int, list[float]]:
    """``{GDN layer: [median half-life in tokens of each value head]}`` that :func:`set_gates` sets.

    All ``n`` GDN heads get ``lo * (hi / lo) ** (k / (n - 1))``, ``k = head * n_layers + layer``:
    with tiny's 3 layers x 4 heads layer 0 has 1, 6.6, 43, 285; layer 1 1.9, 12, 81, 534;
    layer 2 3.5, 23, 152, 1000 tokens.
    """
    lo, hi = TINY_HALF_LIFE_RANGE
    layers = [i for i, t in enumerate(config.layer_types) if t == GDN_LAYER_TYPE]
    n_heads = config.linear_num_value_heads
    n = len(layers) * n_heads
    return {layer: [lo * (hi / lo) ** ((head * len(layers) + rank) / max(n - 1, 1))
                    for head in range(n_heads)]
            for rank, layer in enumerate(layers)}


def set_gates(model) -> None:
    """Give every GDN head of an HF Qwen3.5 / Qwen3-Next text model (``model.model.layers``) its
    half-life of :func:`tiny_half_lives`.

    ``dt_bias`` spreads over [-1, 1] across a layer's heads (so code that drops it is caught) and
    ``A_log = log(ln 2 / (half_life * softplus(dt_bias)))``: where ``a = 0`` the decay is exactly the
    chosen one, so a head's median half-life is close to it (measured within 11% on tiny).
    """
    half_lives = tiny_half_lives(model.config)
    for layer, lives in half_lives.items():
        gdn = model.model.layers[layer].linear_attn
        life = torch.tensor(lives, dtype=torch.float64)
        dt_bias = torch.linspace(-1.0, 1.0, len(lives), dtype=torch.float64)
        a_log = torch.log(math.log(2.0) / (life * torch.nn.functional.softplus(dt_bias)))
        with torch.no_grad():
            gdn.dt_bias.copy_(dt_bias)
            gdn.A_log.copy_(a_log)
