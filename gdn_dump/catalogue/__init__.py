"""The hook catalogue: the single source of truth for hook names, shapes and dimension names.

Every name is a TransformerLens ``TransformerBridge`` hook name. Shapes are *per token*: the batch and
position axes are removed. ``tests/test_catalogue.py`` holds every entry against a real
``run_with_cache`` of the bridge.

GDN layers (``blocks.<i>.linear_attn.<hook>``; short names in brackets; Hk = n_k_heads, Hv = n_v_heads):

    hook_in              [in]              [d_model]    input hidden states
    hook_q_pre_conv      [q_pre_conv]      [Hk, d_k]    Q after projection, before the causal conv
    hook_k_pre_conv      [k_pre_conv]      [Hk, d_k]
    hook_v_pre_conv      [v_pre_conv]      [Hv, d_v]
    hook_q               [q]               [Hk, d_k]    Q after conv + SiLU, before L2 norm and GQA
    hook_k               [k]               [Hk, d_k]
    hook_v               [v]               [Hv, d_v]
    hook_beta_logit      [beta_logit]      [Hv]         pre-sigmoid write strength
    hook_beta            [beta]            [Hv]         write strength sigmoid(b)
    hook_log_decay       [log_decay]       [Hv]         g (negative); decay per step exp(g)
    hook_recurrence_out  [recurrence_out]  [Hv, d_v]    output of the gated delta rule
    hook_gate_input      [gate_input]      [Hv, d_v]    z, the gate of the gated RMSNorm
    hook_out             [out]             [d_model]    output to the residual stream
    hook_ssm_state       [ssm_state]       [Hv, d_k, d_v]  the recurrent state S_t, stored as snapshots
                                           (``--state-every``): not per token, kind ``state``

Softmax-attention layers (``blocks.<i>.attn.<hook>``): per-token ``hook_in``, ``hook_out``,
``hook_q`` ([2 H, d_head]: query and gate per head), ``hook_k``/``hook_v``/``hook_rot_k``
([H_kv, d_head]), ``hook_rot_q``/``hook_z`` ([H, d_head]), ``hook_q_gate`` ([H d_head]); and the
attention-matrix hooks ``hook_pattern``/``hook_attn_scores`` ([H, query, key]).
Every layer: ``blocks.<i>.hook_resid_pre|hook_resid_mid|hook_resid_post|hook_mlp_out``,
``ln1``/``ln2`` ``hook_normalized`` ([d_model]), ``mlp.hook_pre|hook_post`` ([d_mlp]).
Model: ``hook_embed`` and ``ln_final.hook_normalized`` ([d_model]), ``unembed.hook_out`` ([d_vocab]).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import SelectionError
from .names import (  # noqa: F401 - re-exported: the catalogue is where names come from
    GDN_LAYER_TYPE, ATTENTION_LAYER_TYPE, GDN, ATTENTION, MODEL, PER_TOKEN, ATTENTION_MATRIX,
    TOKENS_ARRAY, ROW_DOCUMENT, ROW_ARRAYS, STATE, GDN_HOOKS, STATE_HOOK, STATE_SUFFIX,
    STATE_DIMS, STATE_INPUTS, DEFAULT_HOOKS, MATRIX_SUFFIX, RESIDUAL_SUFFIX, linear_attn_name,
    gdn_hook_name, state_name, is_state, state_layers, attention_hook_name, block_hook_name,
    matrix_name, residual_name, layer_of, is_matrix, matrix_layers, is_residual, stored_layers,
    CONTRIBUTION_NORM, CONTRIBUTION_LOGIT, CONTRIBUTION_VECTORS, CONTRIBUTION_RESIDUAL,
    CONTRIBUTION_ARRAYS, LOGITS_NEXT, LOGITS_NONE, contribution_name, is_contribution)
from .products import (  # noqa: F401 - re-exported: the catalogue is where names come from
    MATRIX_MODES, MATRIX_METHODS, MATRIX_KINDS, SOFTMAX_KIND, MatrixSpec, ContributionSpec,
    logit_target)

_ATTENTION_HOOKS: dict[str, tuple[str, ...]] = {
    "hook_in": ("d_model",),
    "hook_out": ("d_model",),
    "hook_q": ("attn_q_gate_head", "d_head"),
    "hook_k": ("kv_head", "d_head"),
    "hook_v": ("kv_head", "d_head"),
    "hook_rot_q": ("attn_head", "d_head"),
    "hook_rot_k": ("kv_head", "d_head"),
    "hook_z": ("attn_head", "d_head"),
    "hook_q_gate": ("attn_gate",),
}
_ATTENTION_MATRIX_HOOKS = ("hook_pattern", "hook_attn_scores")
_BLOCK_HOOKS: dict[str, tuple[str, ...]] = {
    "hook_resid_pre": ("d_model",),
    "hook_resid_mid": ("d_model",),
    "hook_resid_post": ("d_model",),
    "hook_mlp_out": ("d_model",),
    "ln1.hook_normalized": ("d_model",),
    "ln2.hook_normalized": ("d_model",),
    "mlp.hook_pre": ("d_mlp",),
    "mlp.hook_post": ("d_mlp",),
}
_MODEL_HOOKS: dict[str, tuple[str, ...]] = {
    "hook_embed": ("d_model",),
    "ln_final.hook_normalized": ("d_model",),
    "unembed.hook_out": ("d_vocab",),
}


@dataclass(frozen=True)
class HookSpec:
    """One hook of the catalogue. ``shape``/``dims`` leave out batch and position."""

    name: str
    layer: int | None
    layer_type: str  # "gdn" | "attention" | "model"
    shape: tuple[int, ...]
    dims: tuple[str, ...]
    kind: str = PER_TOKEN  # or "attention_matrix" ([heads, query, key] per prompt)
    scalar: bool = False  # per-head scalars stay float32 whatever the storage dtype
    short: str | None = None


# ---- index lists -----------------------------------------------------------------------------


def parse_indices(text: str, count: int, option: str, noun: str, valid: str) -> list[int]:
    """Indices and ranges such as ``0,1,4-6``, each in ``range(count)``, in the order given and
    without repeats. Errors name ``option`` and say what is valid (``valid``)."""
    indices: list[int] = []
    for part in _split(text):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError
        except ValueError:
            raise SelectionError(f"{option}: cannot read {part!r}; use 'all', indices and ranges "
                                 "like 0,1,4-6") from None
        for index in range(first, last + 1):
            if index >= count:
                raise SelectionError(f"{option}: {noun} {index} is out of range; {valid}")
            if index not in indices:
                indices.append(index)
    if not indices:
        raise SelectionError(f"{option} selects no {noun}")
    return indices


def dimension_sizes(config) -> dict[str, int]:
    """Length of every named dimension; one length per name keeps xarray's rule across a store."""
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return {
        "d_model": config.hidden_size,
        "k_head": config.linear_num_key_heads,
        "d_k": config.linear_key_head_dim,
        "v_head": config.linear_num_value_heads,
        "d_v": config.linear_value_head_dim,
        "attn_head": n_heads,
        "attn_q_gate_head": 2 * n_heads,
        "attn_gate": n_heads * head_dim,
        "kv_head": config.num_key_value_heads,
        "d_head": head_dim,
        "d_mlp": getattr(config, "intermediate_size", 0) or 0,
        "d_vocab": config.vocab_size,
    }


class Catalogue:
    """All storable hooks of one model, by full name."""

    def __init__(self, config, aliases: dict[str, str] | None = None):
        # GDN hook aliases (``hook_ssm_decay`` -> ``hook_log_decay``): TransformerLens's table,
        # handed in by the model layer (see gdn_dump.model.load.catalogue), stored canonically.
        self.aliases = dict(aliases or {})
        self.layer_types = [_layer_kind(t) for t in config.layer_types]
        self.sizes = dimension_sizes(config)
        self.specs: dict[str, HookSpec] = {}
        # Sparse-MoE layers have no dense mlp.hook_pre/hook_post (the bridge's MoE ones are d_model
        # copies of its input/output); Qwen3-Next keeps a dense MLP on mlp_only_layers and on the
        # layers decoder_sparse_step skips (transformers' Qwen3NextDecoderLayer rule).
        experts = getattr(config, "num_experts", 0) or 0
        mlp_only = set(getattr(config, "mlp_only_layers", None) or ())
        sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
        for layer, kind in enumerate(self.layer_types):
            dense_mlp = not experts or layer in mlp_only or (layer + 1) % sparse_step != 0
            if kind == GDN:
                for short, (_, dims, scalar) in GDN_HOOKS.items():
                    self._add(gdn_hook_name(layer, short), layer, kind, dims,
                              scalar=scalar, short=short)
                self._add(state_name(layer), layer, kind, STATE_DIMS, short=STATE_HOOK,
                          kind_of_hook=STATE)
            else:
                for suffix, dims in _ATTENTION_HOOKS.items():
                    self._add(attention_hook_name(layer, suffix), layer, kind, dims)
                for suffix in _ATTENTION_MATRIX_HOOKS:
                    self._add(attention_hook_name(layer, suffix), layer, kind, ("attn_head",),
                              kind_of_hook=ATTENTION_MATRIX)
                self._add(block_hook_name(layer, "hook_attn_out"), layer, kind, ("d_model",))
            for suffix, dims in _BLOCK_HOOKS.items():
                if dense_mlp or not suffix.startswith("mlp."):
                    self._add(block_hook_name(layer, suffix), layer, kind, dims)
        for name, dims in _MODEL_HOOKS.items():
            self._add(name, None, MODEL, dims)

    def _add(self, name, layer, layer_type, dims, *, scalar=False, short=None,
             kind_of_hook=PER_TOKEN):
        shape = tuple(self.sizes[d] for d in dims)
        self.specs[name] = HookSpec(name, layer, layer_type, shape, tuple(dims), kind_of_hook,
                                    scalar, short)

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == GDN]

    def __getitem__(self, name: str) -> HookSpec:
        return self.specs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def __iter__(self):
        return iter(self.specs.values())

    def gdn_hook(self, layer: int, short: str) -> HookSpec:
        return self.specs[gdn_hook_name(layer, short)]

    def select(self, hooks: str | list[str] | None, layers: str | None, *,
               allow_empty: bool = False) -> list[HookSpec]:
        """Resolve ``--hooks`` and ``--layers`` to specs, in layer order, without duplicates."""
        items = _split(hooks) if hooks is not None else list(DEFAULT_HOOKS)
        # "all": every GDN hook; "default": the default set (both combine with other names)
        items = [name for item in items for name in
                 (GDN_HOOKS if item == "all" else DEFAULT_HOOKS if item == "default" else [item])]
        if not items and allow_empty:
            return []
        layer_list = self.parse_layers(layers)
        if not items:
            raise SelectionError("--hooks selects nothing; give short names or full hook names")
        selected: dict[str, HookSpec] = {}
        shorts = [item for item in items if "." not in item]
        for item in items:
            if "." in item:
                spec = self._full_name(item)
                selected[spec.name] = spec
            elif item not in GDN_HOOKS and item != STATE_HOOK:
                raise SelectionError(_unknown("hook", item, [*GDN_HOOKS, STATE_HOOK]))
        if shorts:
            attention = [layer for layer in layer_list if self.layer_types[layer] != GDN]
            if attention:
                raise SelectionError(
                    f"layer {attention[0]} is a softmax-attention layer; the GDN hooks "
                    f"({', '.join(shorts)}) exist only on GDN layers {join_indices(self.gdn_layers)}"
                )
            for layer in layer_list:
                for short in shorts:
                    spec = self.specs[state_name(layer) if short == STATE_HOOK else
                                      gdn_hook_name(layer, short)]
                    selected[spec.name] = spec
        order = {name: i for i, name in enumerate(self.specs)}
        return sorted(selected.values(), key=lambda spec: order[spec.name])

    def parse_layers(self, text: str | None, option: str = "--layers", *,
                     all_layers: bool = False) -> list[int]:
        """``all`` (every GDN layer, or every layer with ``all_layers``), or indices and ranges
        such as ``0,1,4-6``; ``option`` names the option in errors."""
        if text is None or text.strip() == "all":
            return list(range(len(self.layer_types))) if all_layers else self.gdn_layers
        n_layers = len(self.layer_types)
        valid = f"the model has layers 0-{n_layers - 1}, GDN layers {join_indices(self.gdn_layers)}"
        return parse_indices(text, n_layers, option, "layer", valid)

    def select_matrices(self, layers: str | None, heads: str | None,
                        option: str = "--attn-layers") -> list[MatrixSpec]:
        """``--layer``/``--attn-layers`` (``all`` = every layer) and ``--heads`` (``all`` or a
        list, the same in every layer) -> the matrices to store."""
        out = []
        for layer in self.parse_layers(layers, option, all_layers=True):
            kind = self.layer_types[layer]
            n_heads = self.sizes["v_head" if kind == GDN else "attn_head"]
            chosen = (range(n_heads) if heads is None or heads.strip() == "all" else
                      parse_indices(heads, n_heads, "--heads", "head",
                                    f"layer {layer} has heads 0-{n_heads - 1}"))
            out.append(MatrixSpec(layer, kind, tuple(chosen), n_heads))
        for group in (GDN, ATTENTION):
            if len({len(a.heads) for a in out if a.layer_type == group}) > 1:
                raise SelectionError("--heads must select the same number of heads in every layer")
        return out

    def select_contributions(self, layers: str | None, heads: str | None, logits: str = LOGITS_NEXT,
                             vectors: bool = False) -> list[ContributionSpec]:
        """``contributions --layer/--heads/--logits/--vectors`` -> the layers to store."""
        target = logit_target(logits, self.sizes["d_vocab"])
        last = len(self.layer_types) - 1
        return [ContributionSpec(a, self.sizes["d_model"], last, target, vectors)
                for a in self.select_matrices(layers, heads, "--layer")]

    def _full_name(self, name: str) -> HookSpec:
        prefix, _, last = name.rpartition(".")
        if ".linear_attn" in prefix and last in self.aliases:  # TransformerLens's other names
            name = f"{prefix}.{self.aliases[last]}"
        if name in self.specs:
            return self.specs[name]
        raise SelectionError(_unknown("hook", name, list(self.specs)))


def _layer_kind(layer_type: str) -> str:
    if layer_type == GDN_LAYER_TYPE:
        return GDN
    if layer_type == ATTENTION_LAYER_TYPE:
        return ATTENTION
    raise SelectionError(f"unsupported layer type {layer_type!r}")


def _split(text: str | list[str]) -> list[str]:
    parts = text if isinstance(text, list) else text.split(",")
    return [p.strip() for item in parts for p in item.split(",") if p.strip()]


def _unknown(what: str, item: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(item, choices, n=3, cutoff=0.6)
    if close:
        return f"unknown {what} {item!r}; did you mean {', '.join(close)}?"
    shown = ", ".join(choices[:13]) + (" ..." if len(choices) > 13 else "")
    return f"unknown {what} {item!r}; choose from {shown} (gdn-dump hooks --model M lists all)"


def join_indices(layers: list[int]) -> str:
    return ",".join(str(x) for x in layers)
