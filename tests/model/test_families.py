"""The other families the tool claims, as tiny random checkpoints loaded by path: Qwen3.5-MoE (text
checkpoint and the published multimodal layout) and Qwen3-Next (all-MoE, and with a dense layer).

For each: the bridge loads it, the catalogue matches its run_with_cache entry by entry, ``extract``
equals run_with_cache of every prompt alone, the exact attention matrix reproduces a GDN layer, and
``gdn-dump hooks --model <dir>`` lists the checkpoint's own shapes (which differ from tiny's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from gdn_dump import open_store
from gdn_dump.catalogue import ATTENTION_MATRIX, GDN_HOOKS, STATE, state_name
from gdn_dump.cli.app import app
from gdn_dump.model.load import catalogue as catalogue_of
from gdn_dump.model.load import load_config, load_model
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.prompts import open_prompts

from ..helpers import reference_cache
from .families import save_family

# (family, builder kwargs, expected HF class after loading, expected text model type)
CASES = {
    "qwen3_5_moe_text": ("qwen3_5_moe_text", {}, "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
    "qwen3_5_moe_multimodal": ("qwen3_5_moe", {}, "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
    "qwen3_next": ("qwen3_next", {}, "Qwen3NextForCausalLM", "qwen3_next"),
    "qwen3_next_dense_layer_3": ("qwen3_next", {"mlp_only_layers": [3]}, "Qwen3NextForCausalLM",
                                 "qwen3_next"),
}
GDN_LAYERS = [0, 1, 2]
# block hooks beside every GDN hook: a GDN layer's and the softmax layer's residual, the softmax
# layer's per-token attention hooks, the model's final norm
EXTRA_HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.3.hook_resid_post",
               "blocks.3.attn.hook_z", "blocks.3.attn.hook_rot_k", "ln_final.hook_normalized"]


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    name = request.param
    builder, kwargs, hf_class, model_type = CASES[name]
    path = save_family(builder, tmp_path_factory.mktemp(name), **kwargs)
    loaded = load_model(str(path), device="cpu")
    return name, path, loaded, hf_class, model_type


def test_loads_through_the_bridge_with_its_own_adapter(family):
    _, path, loaded, hf_class, model_type = family
    assert type(loaded.hf_model).__name__ == hf_class
    assert loaded.config.model_type == model_type
    assert load_config(str(path)).model_type == model_type
    assert loaded.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    adapter = type(loaded.bridge.adapter).__name__
    assert adapter == ("Qwen3NextArchitectureAdapter" if model_type == "qwen3_next"
                       else "Qwen3_5MoeArchitectureAdapter"), adapter
    # the MoE MLP is really there (4 experts, top 2), not a dense fallback
    assert _mlp_class(loaded, 0).endswith("SparseMoeBlock"), _mlp_class(loaded, 0)


def test_every_catalogue_entry_matches_run_with_cache(family):
    name, _, loaded, _, _ = family
    catalogue = catalogue_of(loaded.config)
    ids = torch.arange(7)[None] + 40
    with torch.inference_mode():
        _, cache = loaded.bridge.run_with_cache(ids, use_cache=False)
    for spec in catalogue:
        if spec.kind == STATE:  # fires only on TransformerLens's eager scan (tests/test_catalogue.py)
            continue
        expected = (1, *spec.shape, 7, 7) if spec.kind == ATTENTION_MATRIX else (1, 7, *spec.shape)
        assert tuple(cache[spec.name].shape) == expected, spec.name
    for name_ in cache.keys():  # every GDN interior hook of the bridge is in the catalogue
        if ".linear_attn.hook_" in name_ and "ssm" not in name_ and "linear_attn_" not in name_:
            assert name_ in catalogue, name_
    # a dense mlp.hook_pre/hook_post only where the layer has a dense MLP
    dense = [i for i in range(4) if not _mlp_class(loaded, i).endswith("SparseMoeBlock")]
    assert dense == ([3] if name == "qwen3_next_dense_layer_3" else [])
    for layer in range(4):
        for suffix in ("mlp.hook_pre", "mlp.hook_post"):
            assert (f"blocks.{layer}.{suffix}" in catalogue) == (layer in dense), (layer, suffix)
    if dense:
        assert catalogue["blocks.3.mlp.hook_pre"].shape == (loaded.config.intermediate_size,)


def test_extract_equals_run_with_cache_of_each_prompt_alone(family, ragged_txt, tmp_path):
    name, path, loaded, _, _ = family
    hooks = ",".join(["all", "ssm_state", *EXTRA_HOOKS]
                     + (["blocks.3.mlp.hook_pre"] if "dense" in name else []))
    out = tmp_path / "s.zarr"
    result = extract(ExtractOptions(model=str(path), prompts=str(ragged_txt), out=str(out),
                                    hooks=hooks, dtype="float32", batch_size=3, attn_layers="0,3",
                                    stats=False, state_every=9))
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    assert group.attrs["gdn_dump"]["model"]["config"]["model_type"] == loaded.config.model_type
    names = {h.name for h in result.plan.hooks if h.kind != STATE}
    assert names == {f"blocks.{i}.linear_attn.{suffix}" for i in GDN_LAYERS
                     for suffix, _, _ in GDN_HOOKS.values()} | set(hooks.split(",")[2:])
    store = open_store(out)  # the snapshots (n_v = 3 n_k, d_k 16 != d_v 8), against TransformerLens
    assert group["blocks.0.linear_attn.hook_v"].shape[1:] == (6, 8)  # the checkpoint's shapes
    assert (group["blocks.0.attn_residual"][:] < 1e-5).all()  # exact M V = o (measured ~2e-7)
    prompts = list(open_prompts(ragged_txt))
    for p, prompt in enumerate(prompts):
        ids, cache = reference_cache(loaded, prompt.text)
        start, length = int(group["prompt_start"][p]), int(group["prompt_length"][p])
        rows = slice(start, start + length)
        np.testing.assert_array_equal(group["tokens"][rows], ids.numpy())
        for hook in names:
            np.testing.assert_allclose(group[hook][rows], cache[hook][0].numpy(), atol=1e-5, rtol=0,
                                       err_msg=f"{name}: {hook}, prompt {p}")
        for layer in GDN_LAYERS if length else []:
            positions, states = store.states(p, layer)
            reference = loaded.bridge.blocks[layer].linear_attn.compute_ssm_state(cache, layer)[0]
            np.testing.assert_allclose(states, reference.numpy()[positions], rtol=0, atol=1e-6,
                                       err_msg=f"{name}: {state_name(layer)}, prompt {p}")
        pattern = group["blocks.3.attn_matrix"][p, :, :length, :length]
        np.testing.assert_allclose(pattern, cache["blocks.3.attn.hook_pattern"][0].numpy(),
                                   atol=1e-5, rtol=0, err_msg=f"{name}: softmax pattern, prompt {p}")


def _mlp_class(loaded, layer: int) -> str:
    """The HF class of a layer's MLP (the bridge wraps it in its MoEBridge)."""
    mlp = loaded.hf_model.model.layers[layer].mlp
    return type(getattr(mlp, "original_component", None) or mlp).__name__


def _listed(stdout: str) -> dict[str, tuple[str, str, str]]:
    """``{hook: (layer type, per-token shape, dims)}`` from the rows of ``gdn-dump hooks``' table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 7 and cells[0].startswith(("blocks.", "hook_", "ln_final", "unembed")):
            rows[cells[0]] = (cells[3], cells[4], cells[5])
    return rows


def test_hooks_command_lists_the_checkpoints_gdn_hooks_and_shapes(family):
    _, path, loaded, _, _ = family
    result = CliRunner().invoke(app, ["hooks", "--model", str(path)], terminal_width=250)
    assert result.exit_code == 0, result.output
    listed = _listed(result.stdout)
    catalogue = catalogue_of(loaded.config)
    assert set(listed) == {spec.name for spec in catalogue}
    k, v = "[2, 16]", "[6, 8]"  # tiny has [2, 16] and [4, 16]
    for layer in GDN_LAYERS:
        prefix = f"blocks.{layer}.linear_attn."
        for suffix, shape in (("hook_q", k), ("hook_k_pre_conv", k), ("hook_v", v),
                              ("hook_recurrence_out", v), ("hook_gate_input", v), ("hook_beta", "[6]"),
                              ("hook_log_decay", "[6]"), ("hook_in", "[64]")):
            assert listed[prefix + suffix][:2] == ("gdn", shape), prefix + suffix
        assert listed[prefix + "hook_v"][2] == "v_head,d_v"
    assert listed["blocks.3.attn.hook_k"][1] == "[1, 16]"  # one kv-head
    assert not any(".linear_attn." in hook for hook in listed if hook.startswith("blocks.3."))


def test_contributions_sum_to_the_output_and_give_the_model_logit(family, ragged_txt, tmp_path):
    """The weights the contributions need are found in every family (Qwen3-Next's and the MoE
    checkpoints' names): the vectors sum to each layer's hook_out, and all layers' logits with the
    embedding's and the MoE MLPs' give the model's next-token logit."""
    from gdn_dump.model import weights
    from gdn_dump.ops.contributions import final_norm_unembed

    _, path, loaded, _, _ = family
    out = tmp_path / "c.zarr"
    extract(ExtractOptions(model=str(path), prompts=str(ragged_txt), out=str(out), hooks="",
                           command="contributions", attn_layers="all", max_length=40, stats=False),
            model=loaded)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    for layer in range(4):
        assert group[f"blocks.{layer}.contribution_residual"][:].max() < 1e-5
    text = next(p.text for p in open_prompts(ragged_txt) if len(p.text) > 20)
    p = [q.text for q in open_prompts(ragged_txt)].index(text)
    ids, cache = reference_cache(loaded, text)
    ids, n = ids[:40], min(len(ids), 40)
    with torch.inference_mode():
        _, cache = loaded.bridge.run_with_cache(ids[None], use_cache=False)
        model_logits = loaded.bridge(ids[None], use_cache=False)[0].double()
    u = weights.unembed(loaded.bridge)
    rows = final_norm_unembed(cache["blocks.3.hook_resid_post"][0], u.norm_weight, u.w_u,
                              torch.cat([ids[1:], torch.tensor([-1])]), u.eps).double()
    total = (rows * cache["hook_embed"][0].double()).sum(-1)
    for layer in range(4):
        total += (rows * cache[f"blocks.{layer}.hook_mlp_out"][0].double()).sum(-1)
        total += torch.as_tensor(group[f"blocks.{layer}.contribution_logit"][p][:, :n, :n]
                                 .astype(np.float64)).sum(dim=(0, 2))
    np.testing.assert_allclose(total[:n - 1].numpy(), model_logits[torch.arange(n - 1), ids[1:]].numpy(),
                               rtol=1e-4, atol=1e-4)
