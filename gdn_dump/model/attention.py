"""Softmax attention without an L x L matrix, for runs that store no attention pattern.

TransformerLens's attention bridge (``PositionEmbeddingsAttentionBridge``) recomputes attention
itself so that ``hook_attn_scores`` and ``hook_pattern`` can fire: it always materialises the
``[batch, heads, L, L]`` scores and softmax in float32 (16 GiB per layer for 4 heads at 32k
tokens). When no hook needs them, :func:`memory_efficient_attention` swaps the forward of each
such component for :func:`_sdpa_forward`: the same steps, the same hooks (``hook_in``,
``hook_q``/``k``/``v``, ``hook_q_normed``/``k_normed``, ``hook_cos``/``sin``, ``hook_rot_q``/``k``,
``hook_q_gate``, ``hook_z``, ``hook_out``), with PyTorch's ``scaled_dot_product_attention`` (flash
or memory-efficient kernels on CUDA, a blocked kernel on the CPU) in place of the explicit scores.
Only the gated attention of Qwen3.5 / Qwen3-Next is handled (what :func:`handles` checks); any
other component keeps TransformerLens's own forward. ``tests/model/test_attention.py`` holds every
hook of the two paths together.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

SDPA = "sdpa"  # provenance: PyTorch's scaled_dot_product_attention, no L x L matrix
BRIDGE = "bridge"  # TransformerLens's explicit scores and softmax (patterns can be stored)
_UNSUPPORTED_CONFIG = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "qk_norm_after_rope",
                       "rotary_interleaved_cos_sin", "rotary_adjacent_pairs")
_UNSUPPORTED_HF = ("key_multiplier", "attn_logit_softcapping", "sinks", "sliding_window")


def handles(component) -> bool:
    """Whether :func:`_sdpa_forward` reproduces ``component``'s forward: the gated attention with
    per-layer q/k RMS norms before RoPE, and nothing else the bridge's general forward supports."""
    hf, config = getattr(component, "original_component", None), getattr(component, "config", None)
    return (type(component).__name__ == "PositionEmbeddingsAttentionBridge" and hf is not None
            and bool(getattr(config, "gated_q_proj", False))
            and component._qk_norm_phase == "post_reshape" and not component._qk_norm_per_head
            and {"q_norm", "k_norm"} <= set(component.submodules)
            and not any(getattr(config, name, False) for name in _UNSUPPORTED_CONFIG)
            and all(getattr(hf, name, None) is None for name in _UNSUPPORTED_HF)
            and getattr(getattr(hf, "config", None), "clip_qkv", None) is None)


def attention_components(bridge) -> list:
    """The softmax-attention components of the bridge's blocks."""
    return [block.attn for block in bridge.blocks if hasattr(block, "attn")]


@contextlib.contextmanager
def memory_efficient_attention(bridge):
    """Within: every attention component :func:`handles` runs :func:`_sdpa_forward` (the
    pattern hooks do not fire); on exit, TransformerLens's forward again."""
    swapped = [c for c in attention_components(bridge) if handles(c)]
    for component in swapped:
        # in the instance's own __dict__: the bridge's __setattr__ hands attributes on to the
        # wrapped HF module, whose forward the bridge never calls
        vars(component)["forward"] = types.MethodType(_sdpa_forward, component)
    try:
        yield swapped
    finally:
        for component in swapped:
            vars(component).pop("forward", None)  # the class's forward again


def _sdpa_forward(self, *args, **kwargs):
    """``PositionEmbeddingsAttentionBridge.forward`` for gated attention, with SDPA: hidden states
    ``[B, L, d_model]`` -> ``(out [B, L, d_model], None)`` (no pattern)."""
    hidden_states = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    position_embeddings = kwargs.pop("position_embeddings", None)
    if kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None \
            or position_embeddings is None:
        # a padding mask, a cache or no RoPE: not what extract runs; the bridge's own forward
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  **kwargs)
    hf = self.original_component
    hidden_states = self.hook_in(hidden_states)
    input_shape, head_dim = hidden_states.shape[:-1], hf.head_dim
    query, gate = torch.chunk(self.q(hidden_states).view(*input_shape, -1, head_dim * 2), 2, dim=-1)
    gate = gate.reshape(*input_shape, -1)
    query = query.reshape(*input_shape, -1, head_dim).transpose(1, 2)  # [B, H, L, D]
    key = self.k(hidden_states).view(*input_shape, -1, head_dim).transpose(1, 2)
    value = self.v(hidden_states).view(*input_shape, -1, head_dim).transpose(1, 2)
    query, key = self.hook_q_normed(self.q_norm(query)), self.hook_k_normed(self.k_norm(key))
    query, key = _rotate(self, query, key, self._apply_position_embedding_hooks(position_embeddings))
    query, key = self.hook_rot_q(query), self.hook_rot_k(key)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=hf.scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    out = out.transpose(1, 2).reshape(*input_shape, -1)
    out = out * torch.sigmoid(self.hook_q_gate(gate))
    out = self._pre_output_projection(out)
    weight = getattr(getattr(getattr(self, "o", None), "original_component", None), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and out.dtype != weight.dtype:
        out = out.to(weight.dtype)
    return self.hook_out(self.o(out)), None


def _rotate(self, query, key, position_embeddings):
    """RoPE as the bridge applies it (llama's rotate-half, partial when cos covers part of a head)."""
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = position_embeddings
    rotary, head_dim = cos.shape[-1], query.shape[-1]
    if rotary * 2 == head_dim and get_rotary_pct_from_config(self.config) == 1.0:
        return apply_rotary_pos_emb(query, key, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    if rotary < head_dim:
        q_rot, k_rot = apply_rotary_pos_emb(query[..., :rotary], key[..., :rotary], cos, sin)
        return (torch.cat([q_rot, query[..., rotary:]], -1), torch.cat([k_rot, key[..., rotary:]], -1))
    return apply_rotary_pos_emb(query, key, cos, sin)
