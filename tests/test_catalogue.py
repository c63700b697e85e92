"""The hook catalogue against the real bridge, and --hooks / --layers parsing."""

from __future__ import annotations

import pytest
import torch

from gdn_dump.catalogue import ATTENTION_MATRIX, DEFAULT_HOOKS, GDN_HOOKS, STATE
from gdn_dump.errors import SelectionError
from gdn_dump.model.load import catalogue as catalogue_of


@pytest.fixture(scope="module")
def catalogue(tiny):
    return catalogue_of(tiny.config)


def test_every_entry_matches_the_bridge(tiny, catalogue):
    ids = torch.arange(7)[None] + 40
    with torch.inference_mode():
        _, cache = tiny.bridge.run_with_cache(ids, use_cache=False)
    for spec in catalogue:
        if spec.kind == STATE:
            continue  # fires only on TransformerLens's eager scan: see the next test
        expected = (1, *spec.shape, 7, 7) if spec.kind == ATTENTION_MATRIX else (1, 7, *spec.shape)
        assert tuple(cache[spec.name].shape) == expected, spec.name
        assert len(spec.dims) == len(spec.shape)
    for name in cache.keys():  # every GDN interior hook of the bridge is in the catalogue
        if ".linear_attn.hook_" in name and "ssm" not in name and "linear_attn_" not in name:
            assert name in catalogue, name


def test_the_state_hook_is_transformer_lens_eager_trajectory(tiny, catalogue):
    """``hook_ssm_state`` fires only with ``eager_scan``: [B, T, H, d_k, d_v], one state per token."""
    ids = torch.arange(7)[None] + 40
    gdn = [tiny.bridge.blocks[layer].linear_attn for layer in catalogue.gdn_layers]
    for component in gdn:
        component.eager_scan = True
    try:
        with torch.inference_mode():
            _, cache = tiny.bridge.run_with_cache(ids, use_cache=False)
    finally:
        for component in gdn:
            component.eager_scan = False
    states = [spec for spec in catalogue if spec.kind == STATE]
    assert [s.layer for s in states] == catalogue.gdn_layers
    for spec in states:
        assert tuple(cache[spec.name].shape) == (1, 7, *spec.shape), spec.name
        assert spec.dims == ("v_head", "d_k", "d_v")
    assert [s.name for s in catalogue.select("ssm_state", "0,2")] == [states[0].name, states[2].name]
    assert "ssm_state" not in {s.short for s in catalogue.select("all", None)}  # all: per-token hooks


def test_dimension_names_have_one_length(catalogue):
    lengths = {}
    for spec in catalogue:
        for dim, size in zip(spec.dims, spec.shape):
            assert lengths.setdefault(dim, size) == size, dim


def test_defaults_are_every_gdn_layer(catalogue):
    specs = catalogue.select(None, None)
    assert catalogue.gdn_layers == [0, 1, 2]
    assert len(specs) == 3 * len(DEFAULT_HOOKS)
    assert {s.short for s in specs} == set(DEFAULT_HOOKS)
    assert [s.layer for s in specs] == sorted(s.layer for s in specs)


def test_layers_lists_and_ranges(catalogue):
    assert catalogue.parse_layers("all") == [0, 1, 2]
    assert catalogue.parse_layers("0,2") == [0, 2]
    assert catalogue.parse_layers("0-2") == [0, 1, 2]
    assert catalogue.parse_layers(" 2, 0-1 ,2") == [2, 0, 1]


@pytest.mark.parametrize("text, match", [
    ("7", "out of range"), ("1-9", "out of range"), ("a", "cannot read"), ("2-1", "cannot read"),
    ("", "no layer"),
])
def test_bad_layers(catalogue, text, match):
    with pytest.raises(SelectionError, match=match):
        catalogue.parse_layers(text)


def test_hooks_short_and_full(catalogue):
    specs = catalogue.select("beta, log_decay,blocks.3.hook_resid_post", "1")
    assert [s.name for s in specs] == ["blocks.1.linear_attn.hook_beta",
                                      "blocks.1.linear_attn.hook_log_decay",
                                      "blocks.3.hook_resid_post"]
    assert all(s.scalar for s in specs[:2]) and not specs[2].scalar
    aliased = catalogue.select("blocks.0.linear_attn.hook_ssm_write", None)
    assert [s.name for s in aliased] == ["blocks.0.linear_attn.hook_beta"]


def test_unknown_hook_lists_close_matches(catalogue):
    with pytest.raises(SelectionError, match="did you mean log_decay"):
        catalogue.select("log_decy", None)
    with pytest.raises(SelectionError, match="did you mean blocks.0.linear_attn.hook_beta"):
        catalogue.select("blocks.0.linear_attn.hook_betta", None)
    with pytest.raises(SelectionError, match="choose from"):
        catalogue.select("zzzz", None)


def test_gdn_hook_on_attention_layer_and_empty_selection(catalogue):
    with pytest.raises(SelectionError, match="layer 3 is a softmax-attention layer"):
        catalogue.select("beta", "2-3")
    with pytest.raises(SelectionError, match="selects nothing"):
        catalogue.select(" , ", None)


def test_short_names_cover_the_bridge_docstring():
    assert set(GDN_HOOKS) == {"in", "q_pre_conv", "k_pre_conv", "v_pre_conv", "q", "k", "v",
                              "beta_logit", "beta", "log_decay", "recurrence_out", "gate_input", "out"}


def test_all_and_default_expand_to_the_gdn_hooks(tiny):
    from gdn_dump.catalogue import DEFAULT_HOOKS, GDN_HOOKS

    catalogue = catalogue_of(tiny.config)
    assert {h.short for h in catalogue.select("all", "0")} == set(GDN_HOOKS)
    assert [h.name for h in catalogue.select("default", None)] == [h.name for h in catalogue.select(None, None)]
    both = catalogue.select("default,blocks.3.hook_resid_post", "1")
    assert {h.short for h in both if h.layer == 1} == set(DEFAULT_HOOKS)
    assert "blocks.3.hook_resid_post" in {h.name for h in both}
