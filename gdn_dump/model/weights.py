"""The weights the contributions need, read from the Hugging Face model under the bridge.

Everything after the values of a layer is linear once the per-token normalisation is fixed
(:mod:`gdn_dump.ops.contributions`); these are its matrices and norm parameters. Qwen3.5 and
Qwen3-Next name them alike (``model.layers[i].linear_attn.out_proj``/``.norm``,
``model.layers[i].self_attn.o_proj``, ``model.norm``, ``lm_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OutputWeights:
    """A layer's map from per-head outputs to the residual stream.

    ``w_out`` ``[d_model, H * Dv]`` (float32); for a GDN layer, its gated RMSNorm's ``norm_weight``
    ``[Dv]`` and ``eps`` (None for softmax attention, gated by ``sigmoid(gate)``)."""

    w_out: torch.Tensor
    norm_weight: torch.Tensor | None = None
    eps: float | None = None


@dataclass(frozen=True)
class UnembedWeights:
    """The final RMSNorm (``x rsqrt(mean x^2 + eps) (1 + w)``) and the unembedding ``[vocab, d_model]``."""

    norm_weight: torch.Tensor
    eps: float
    w_u: torch.Tensor


def _layers(bridge):
    return bridge.original_model.model.layers


def gdn_output(bridge, layer: int) -> OutputWeights:
    """``out_proj`` and the gated RMSNorm of GDN layer ``layer``."""
    gdn = _layers(bridge)[layer].linear_attn
    return OutputWeights(gdn.out_proj.weight.detach().float(), gdn.norm.weight.detach().float(),
                         float(_eps(gdn.norm)))


def attention_output(bridge, layer: int) -> OutputWeights:
    """``o_proj`` of softmax-attention layer ``layer``."""
    return OutputWeights(_layers(bridge)[layer].self_attn.o_proj.weight.detach().float())


def unembed(bridge) -> UnembedWeights:
    """The final norm and ``lm_head``."""
    model = bridge.original_model
    return UnembedWeights(model.model.norm.weight.detach().float(), float(_eps(model.model.norm)),
                          model.lm_head.weight.detach())


def _eps(norm) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return getattr(norm, name)
    raise AttributeError(f"{type(norm).__name__} has no epsilon attribute")
