"""Every name of a store: layer and array kinds, hook names by layer, matrix and contribution
array names (a leaf: no torch, no zarr). :mod:`gdn_dump.catalogue` re-exports all of it."""

from __future__ import annotations

import re

# config.layer_types values (kept here, not in models.py, so reading a store needs no torch)
GDN_LAYER_TYPE = "linear_attention"
ATTENTION_LAYER_TYPE = "full_attention"

GDN = "gdn"
ATTENTION = "attention"
MODEL = "model"
PER_TOKEN = "per_token"
ATTENTION_MATRIX = "attention_matrix"
# Per-row arrays that are not hooks: the token ids, and with --context-size each row's source
# document (store contract, DESIGN.md 4)
TOKENS_ARRAY = "tokens"
ROW_DOCUMENT = "row_document"
ROW_ARRAYS = (TOKENS_ARRAY, ROW_DOCUMENT)
STATE = "state"  # rows along the ``state`` axis: snapshots of S_t (store contract, DESIGN.md 4)

# short name -> (hook suffix, dims of the trailing shape, per-head scalar)
GDN_HOOKS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "in": ("hook_in", ("d_model",), False),
    "q_pre_conv": ("hook_q_pre_conv", ("k_head", "d_k"), False),
    "k_pre_conv": ("hook_k_pre_conv", ("k_head", "d_k"), False),
    "v_pre_conv": ("hook_v_pre_conv", ("v_head", "d_v"), False),
    "q": ("hook_q", ("k_head", "d_k"), False),
    "k": ("hook_k", ("k_head", "d_k"), False),
    "v": ("hook_v", ("v_head", "d_v"), False),
    "beta_logit": ("hook_beta_logit", ("v_head",), True),
    "beta": ("hook_beta", ("v_head",), True),
    "log_decay": ("hook_log_decay", ("v_head",), True),
    "recurrence_out": ("hook_recurrence_out", ("v_head", "d_v"), False),
    "gate_input": ("hook_gate_input", ("v_head", "d_v"), False),
    "out": ("hook_out", ("d_model",), False),
}
# The recurrent state: TransformerLens's name, which its bridge fires only with eager_scan (a Python
# loop holding [B, T, H, d_k, d_v]); gdn-dump computes snapshots from the forward's k, v, beta, g.
STATE_HOOK = "ssm_state"
STATE_SUFFIX = "hook_ssm_state"
STATE_DIMS = ("v_head", "d_k", "d_v")
STATE_INPUTS = ("k", "v", "beta", "log_decay")  # what the snapshots are computed (and replayed) from
DEFAULT_HOOKS = ("q_pre_conv", "k_pre_conv", "v_pre_conv", "q", "k", "v", "beta", "log_decay",
                 "recurrence_out")

# ---- names: every hook and matrix name of a store is built here ---------------------------------

_LAYER = re.compile(r"blocks\.(\d+)\.")
MATRIX_SUFFIX = "attn_matrix"
RESIDUAL_SUFFIX = "attn_residual"


def linear_attn_name(layer: int, suffix: str) -> str:
    """``blocks.<layer>.linear_attn.<suffix>``, a hook of a GDN layer."""
    return f"blocks.{layer}.linear_attn.{suffix}"


def gdn_hook_name(layer: int, short: str) -> str:
    """``blocks.<layer>.linear_attn.hook_<short>`` (``short`` is a key of :data:`GDN_HOOKS`)."""
    return linear_attn_name(layer, GDN_HOOKS[short][0])


def state_name(layer: int) -> str:
    """``blocks.<layer>.linear_attn.hook_ssm_state``: the state snapshots of a GDN layer."""
    return linear_attn_name(layer, STATE_SUFFIX)


def is_state(name: str) -> bool:
    return layer_of(name) is not None and name == state_name(layer_of(name))


def state_layers(names) -> list[int]:
    """The layers that have state snapshots among array ``names``, sorted."""
    return sorted(layer_of(name) for name in names if is_state(name))


def attention_hook_name(layer: int, suffix: str) -> str:
    """``blocks.<layer>.attn.<suffix>``, a hook of a softmax-attention layer."""
    return f"blocks.{layer}.attn.{suffix}"


def block_hook_name(layer: int, suffix: str) -> str:
    """``blocks.<layer>.<suffix>``, a hook every layer has (``hook_resid_post``, ``mlp.hook_pre``)."""
    return f"blocks.{layer}.{suffix}"


def matrix_name(layer: int) -> str:
    """The effective-attention array of a layer: ``blocks.<layer>.attn_matrix``."""
    return block_hook_name(layer, MATRIX_SUFFIX)


def residual_name(layer: int) -> str:
    """The per-prompt ``||M V - o|| / ||o||`` of a GDN layer's exact matrix."""
    return block_hook_name(layer, RESIDUAL_SUFFIX)


def layer_of(name: str) -> int | None:
    """The layer an array or hook name belongs to (``blocks.3.attn_matrix`` -> 3), else None."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def is_matrix(name: str) -> bool:
    return layer_of(name) is not None and name == matrix_name(layer_of(name))


def matrix_layers(names) -> list[int]:
    """The layers that have an ``attn_matrix`` among array ``names``, sorted."""
    return sorted(layer_of(name) for name in names if is_matrix(name))


def is_residual(name: str) -> bool:
    return layer_of(name) is not None and name == residual_name(layer_of(name))


def stored_layers(names, hook: str) -> dict[int, str]:
    """``{layer: array name}`` among ``names`` for a hook given by short GDN name
    (``recurrence_out``, ``hook_beta``), by a layer-relative name (``hook_resid_post``,
    ``attn.hook_z``) or by full name (one layer)."""
    names = list(names)
    if hook.startswith("blocks."):
        layer = layer_of(hook)
        return {layer: hook} if layer is not None and hook in names else {}
    short = hook.removeprefix("hook_")
    found: dict[int, str] = {}
    for name in names:
        layer = layer_of(name)
        if layer is None:
            continue
        candidates = [linear_attn_name(layer, f"hook_{short}"), block_hook_name(layer, f"hook_{short}"),
                      block_hook_name(layer, hook)]
        if name in candidates and (layer not in found or
                                   candidates.index(name) < candidates.index(found[layer])):
            found[layer] = name
    return dict(sorted(found.items()))


# Per-source-token contributions (``gdn-dump contributions``, issue 17): the arrays of a layer.
CONTRIBUTION_NORM = "contribution_norm"  # ||c_{h,i,j}||
CONTRIBUTION_LOGIT = "contribution_logit"  # direct logit attribution of c_{h,i,j}
CONTRIBUTION_VECTORS = "contribution"  # c_{h,i,j} itself, [.., d_model] (--vectors)
CONTRIBUTION_RESIDUAL = "contribution_residual"  # max_i ||sum c - out_i|| / ||out_i|| per prompt
CONTRIBUTION_ARRAYS = (CONTRIBUTION_NORM, CONTRIBUTION_LOGIT, CONTRIBUTION_VECTORS)
LOGITS_NEXT, LOGITS_NONE = "next", "none"  # --logits: the next token's, none, or a token id


def contribution_name(layer: int, suffix: str) -> str:
    """``blocks.<layer>.<suffix>``, ``suffix`` one of :data:`CONTRIBUTION_ARRAYS` or
    :data:`CONTRIBUTION_RESIDUAL`."""
    return block_hook_name(layer, suffix)


def is_contribution(name: str) -> bool:
    """A ``[n_prompts, heads, L_max, L_max(, d_model)]`` contribution array (not the residual)."""
    layer = layer_of(name)
    return layer is not None and name in {contribution_name(layer, s) for s in CONTRIBUTION_ARRAYS}
