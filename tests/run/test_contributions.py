"""gdn-dump contributions on ``tiny`` and on a checkpoint with n_v = 4 n_k, d_k != d_v and a
softmax-attention layer in the middle, against TransformerLens's ``run_with_cache`` of each prompt
alone (the independent reference): the vectors sum to the layer's ``hook_out``, the norms are
their norms, the logits their direct logit attribution, and all layers' logits with the embedding's
and the MLPs' give the model's own next-token logit (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError, RunFailure
from gdn_dump.model import weights
from gdn_dump.ops.attention import expand_kv_heads
from gdn_dump.ops.contributions import final_norm_unembed, gated_rmsnorm_gate, softmax_gate
from gdn_dump.ops.contributions_reference import contribution_vectors_naive
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.store.verify import verify_store

from ..helpers import Killed, kill_at, reference_cache

TOLERANCE = 1e-5  # relative, float32 (the acceptance)
PROMPTS = ["hello world", "x", "The quick brown fox jumps over the lazy dog, again and again.",
           "naïve café — ünïcødé " * 2]


def _prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def _contributions(name, model, prompts, out, **kw):
    kw = {"hooks": "", "attn_layers": "all", "batch_size": 3, "command": "contributions", **kw}
    return extract(ExtractOptions(model=name, prompts=str(prompts), out=str(out), **kw), model=model)


def _layer_out(cache, layer):
    """The layer's output to the residual stream: ``linear_attn.hook_out`` or ``attn.hook_out``."""
    name = f"blocks.{layer}.linear_attn.hook_out"
    return cache[name if name in cache else f"blocks.{layer}.attn.hook_out"][0].double().numpy()


def _relative(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(params=["tiny", "mixed"])
def run(request, tiny, mixed, tmp_path):
    name, model = ("tiny", tiny) if request.param == "tiny" else mixed
    out = tmp_path / "c.zarr"
    _contributions(name, model, _prompts(tmp_path), out, contrib_vectors=True)
    return model, zarr.open_group(str(out), mode="r")


def test_vectors_sum_to_the_layer_output_and_norms_and_logits_are_theirs(run):
    model, group = run
    n_layers = model.config.num_hidden_layers
    assert group.attrs["gdn_dump"]["status"] == "complete"
    unembed = weights.unembed(model.bridge)
    for p, text in enumerate(PROMPTS):
        ids, cache = reference_cache(model, text)
        n = int(group["prompt_length"][p])
        assert n == len(ids)
        x = cache[f"blocks.{n_layers - 1}.hook_resid_post"][0]
        targets = torch.cat([ids[1:], torch.tensor([-1])])
        u = final_norm_unembed(x, unembed.norm_weight, unembed.w_u, targets, unembed.eps).double().numpy()
        for layer in range(n_layers):
            vectors = group[f"blocks.{layer}.contribution"][p]
            assert not vectors[:, n:].any() and not vectors[:, :, n:].any()
            vectors = vectors[:, :n, :n].astype(np.float64)
            assert not np.triu(np.abs(vectors).sum(-1), k=1).any()
            out = _layer_out(cache, layer)
            assert _relative(vectors.sum(axis=(0, 2)), out) < TOLERANCE
            norms = group[f"blocks.{layer}.contribution_norm"][p][:, :n, :n]
            np.testing.assert_allclose(norms, np.linalg.norm(vectors, axis=-1), rtol=1e-5, atol=1e-7)
            logits = group[f"blocks.{layer}.contribution_logit"][p][:, :n, :n]
            np.testing.assert_allclose(logits, np.einsum("hijd,id->hij", vectors, u), rtol=1e-4, atol=1e-6)
            assert not logits[:, n - 1].any()  # no next token after the last
            assert group[f"blocks.{layer}.contribution_residual"][p] < TOLERANCE


def test_the_logit_attribution_of_every_component_gives_the_model_logit(run):
    """Embedding + every layer's contributions + every MLP, through the final norm frozen at each
    position, is the model's own logit of the next token (a full direct logit attribution)."""
    model, group = run
    n_layers = model.config.num_hidden_layers
    unembed = weights.unembed(model.bridge)
    for p, text in enumerate(PROMPTS):
        ids, cache = reference_cache(model, text)
        n = len(ids)
        if n < 2:
            continue
        with torch.inference_mode():
            logits = model.bridge(ids[None], use_cache=False)[0].double()
        model_logit = logits[torch.arange(n - 1), ids[1:]].numpy()
        x = cache[f"blocks.{n_layers - 1}.hook_resid_post"][0]
        u = final_norm_unembed(x, unembed.norm_weight, unembed.w_u,
                               torch.cat([ids[1:], torch.tensor([-1])]), unembed.eps).double()
        total = (u * cache["hook_embed"][0].double()).sum(-1)
        for layer in range(n_layers):
            total += (u * cache[f"blocks.{layer}.hook_mlp_out"][0].double()).sum(-1)
            total += torch.as_tensor(group[f"blocks.{layer}.contribution_logit"][p][:, :n, :n]
                                     .astype(np.float64)).sum(dim=(0, 2))
        np.testing.assert_allclose(total[:n - 1].numpy(), model_logit, rtol=1e-4, atol=1e-4)
        assert abs(float(total[n - 1])) == 0.0


def test_stored_vectors_equal_the_reference_loops(mixed, tmp_path):
    """One GDN and the softmax layer of one prompt: the stored vectors are the reference's loops
    (over h, i, j) fed the hooks of run_with_cache and the model's weights."""
    name, model = mixed
    out = tmp_path / "c.zarr"
    _contributions(name, model, _prompts(tmp_path), out, attn_layers="0,1", contrib_vectors=True,
                   contrib_logits="none")
    group = zarr.open_group(str(out), mode="r")
    assert "blocks.0.contribution_logit" not in group
    p = 2
    ids, cache = reference_cache(model, PROMPTS[p])
    n = len(ids)
    w = weights.gdn_output(model.bridge, 0)
    pre = "blocks.0.linear_attn."
    M = torch.as_tensor(zarr.open_group(str(_matrix(name, model, tmp_path)), mode="r")
                        ["blocks.0.attn_matrix"][p][:, :n, :n]).double()
    gate = gated_rmsnorm_gate(cache[pre + "hook_recurrence_out"][0], cache[pre + "hook_gate_input"][0],
                              w.norm_weight, w.eps).double()
    expected = contribution_vectors_naive(M, cache[pre + "hook_v"][0].double(), gate, w.w_out.double())
    np.testing.assert_allclose(group["blocks.0.contribution"][p][:, :n, :n], expected.numpy(),
                               rtol=1e-4, atol=1e-6)
    w = weights.attention_output(model.bridge, 1)
    pre = "blocks.1.attn."
    pattern = cache[pre + "hook_pattern"][0].double()
    heads = pattern.shape[0]
    v = expand_kv_heads(cache[pre + "hook_v"], heads)[0].double()
    gate = softmax_gate(cache[pre + "hook_q_gate"][0].reshape(n, heads, -1), v.shape[-1]).double()
    expected = contribution_vectors_naive(pattern, v, gate, w.w_out.double())
    np.testing.assert_allclose(group["blocks.1.contribution"][p][:, :n, :n], expected.numpy(),
                               rtol=1e-4, atol=1e-6)


def _matrix(name, model, tmp_path):
    """The exact effective attention of layer 0 (attn-matrix), the M the reference is fed."""
    out = tmp_path / "m.zarr"
    extract(ExtractOptions(model=name, prompts=str(_prompts(tmp_path)), out=str(out), hooks="",
                           attn_layers="0", command="attn-matrix"), model=model)
    return out


def test_selected_heads_and_a_fixed_token_id(mixed, tmp_path):
    name, model = mixed
    out = tmp_path / "c.zarr"
    _contributions(name, model, _prompts(tmp_path), out, attn_layers="1,2", attn_heads="1,3",
                   contrib_logits="7", contrib_vectors=True)
    group = zarr.open_group(str(out), mode="r")
    for layer, head_dim in ((1, "selected_attn_head"), (2, "selected_v_head")):
        norm = group[f"blocks.{layer}.contribution_norm"]
        assert norm.metadata.dimension_names == ("prompt", head_dim, "query", "key")
        assert norm.attrs["heads"] == [1, 3] and norm.shape[1] == 2
        assert group[f"blocks.{layer}.contribution_logit"].attrs["target"] == 7
        # the unselected heads' own outputs close the sum: still within the limit
        assert (group[f"blocks.{layer}.contribution_residual"][:] < TOLERANCE).all()
    unembed = weights.unembed(model.bridge)
    p = 2
    ids, cache = reference_cache(model, PROMPTS[p])
    n = len(ids)
    x = cache["blocks.3.hook_resid_post"][0]
    u = final_norm_unembed(x, unembed.norm_weight, unembed.w_u, torch.full((n,), 7), unembed.eps)
    vectors = group["blocks.2.contribution"][p][:, :n, :n].astype(np.float64)
    np.testing.assert_allclose(group["blocks.2.contribution_logit"][p][:, :n, :n],
                               np.einsum("hijd,id->hij", vectors, u.double().numpy()), rtol=1e-4, atol=1e-6)
    assert group["blocks.2.contribution_logit"][p][:, n - 1].any()  # a fixed id: the last row too
    assert all(c.ok for c in verify_store(str(out)))


def test_the_store_verifies_and_reads_its_provenance(tiny, tmp_path):
    out = tmp_path / "c.zarr"
    _contributions("tiny", tiny, _prompts(tmp_path), out, attn_layers="0,3")
    checks = verify_store(str(out))
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks if not c.ok]
    meta = zarr.open_group(str(out), mode="r").attrs["gdn_dump"]
    assert meta["contributions"] == {"layers": [0, 3], "heads": {"0": [0, 1, 2, 3], "3": [0, 1, 2, 3]},
                                     "logits": "next", "vectors": False, "precision": "float32"}
    assert meta["softmax_attention"] == "bridge"


def test_a_residual_over_the_limit_fails_the_store(tiny, tmp_path, monkeypatch):
    real = weights.gdn_output

    def wrong(bridge, layer):  # a gated norm weight off by 1%: the sum misses hook_out
        w = real(bridge, layer)
        return weights.OutputWeights(w.w_out, w.norm_weight * 1.01, w.eps)

    monkeypatch.setattr(weights, "gdn_output", wrong)
    out = tmp_path / "c.zarr"
    with pytest.raises(RunFailure, match="the contributions do not sum to the layer output"):
        _contributions("tiny", tiny, _prompts(tmp_path), out, attn_layers="0")
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "failed"
    assert group["blocks.0.contribution_norm"].attrs["residual_max"] > 1e-3


@pytest.mark.parametrize("args, message", [
    (["--logits", "soon"], "--logits: expected next, none or a token id, not 'soon'"),
    (["--logits", "100000"], "--logits: token id 100000 is out of range"),
    (["--layer", "9"], "--layer: layer 9 is out of range"),
    (["--heads", "4"], "--heads: head 4 is out of range"),
    (["--vectors", "--max-bytes", "1MiB"], "the contributions need"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(app, ["contributions", "--model", "tiny", "--prompts",
                                      str(_prompts(tmp_path)), "--out", str(tmp_path / "c.zarr"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "c.zarr").exists()


def test_max_bytes_counts_the_vectors(tiny, tmp_path):
    plain = _contributions("tiny", tiny, _prompts(tmp_path), tmp_path / "a.zarr", dry_run=True)
    vectors = _contributions("tiny", tiny, _prompts(tmp_path), tmp_path / "b.zarr", dry_run=True,
                             contrib_vectors=True)
    # norms + logits: 2 floats per (head, query, key); with the vectors 2 + d_model
    assert vectors.plan.matrix_bytes == plain.plan.matrix_bytes * (2 + 64) // 2
    with pytest.raises(GdnDumpError, match="the contributions need"):
        _contributions("tiny", tiny, _prompts(tmp_path), tmp_path / "c.zarr", contrib_vectors=True,
                       max_attn_bytes=plain.plan.matrix_bytes)


def test_a_killed_run_resumes_to_the_uninterrupted_store(tiny, tmp_path, monkeypatch):
    """Killed after the second progress record, then --resume: every contribution array and
    residual equals the uninterrupted run's; a resume with another --logits is refused."""
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 3) + "\n", encoding="utf-8")
    kw = dict(attn_layers="1,3", batch_size=2, sort_window_bytes=0, checkpoint_every=0)
    _contributions("tiny", tiny, prompts, tmp_path / "clean.zarr", **kw)
    out = tmp_path / "killed.zarr"
    kill_at(monkeypatch, "after-checkpoint:2")
    with pytest.raises(Killed):
        _contributions("tiny", tiny, prompts, out, **kw)
    monkeypatch.undo()
    with pytest.raises(GdnDumpError, match="--resume"):
        _contributions("tiny", tiny, prompts, out, resume=True, contrib_logits="none", **kw)
    _contributions("tiny", tiny, prompts, out, resume=True, **kw)
    clean, resumed = (zarr.open_group(str(p), mode="r") for p in (tmp_path / "clean.zarr", out))
    assert resumed.attrs["gdn_dump"]["status"] == "complete"
    for layer in (1, 3):
        for suffix in ("contribution_norm", "contribution_logit", "contribution_residual"):
            np.testing.assert_array_equal(resumed[f"blocks.{layer}.{suffix}"][:],
                                          clean[f"blocks.{layer}.{suffix}"][:])


def test_the_worked_example_of_the_readme_runs(tiny, tmp_path):
    """examples/top_contributions.py on a store of the tiny model: the table, and a total that
    is the stored logits' own sum."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "c.zarr"
    _contributions("tiny", tiny, _prompts(tmp_path), out, attn_layers="0-2")
    script = Path(__file__).resolve().parents[2] / "examples" / "top_contributions.py"
    done = subprocess.run([sys.executable, str(script), str(out), "2"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("prompt '2', position") and len(lines) == 2 + 8 + 1
    group = zarr.open_group(str(out), mode="r")
    n = int(group["prompt_length"][2])
    total = sum(group[f"blocks.{layer}.contribution_logit"][2][:, n - 2].sum() for layer in range(3))
    assert lines[-1].endswith(f"{total:+.4f}")


def test_a_bfloat16_model_is_checked_at_its_own_precision(tmp_path):
    """bfloat16 hooks are ~8e-3 from the exact sums per token: the limit is twice bfloat16's
    epsilon there (1e-3 for float32 models), recorded with the residuals."""
    from gdn_dump.model.load import load_model
    from gdn_dump.store.finalize import RESIDUAL_LIMIT, limit_for

    assert limit_for("float32") == limit_for(None) == RESIDUAL_LIMIT
    assert limit_for("bfloat16") == 2 ** -6 and limit_for("float16") == 2 ** -9
    model = load_model("tiny", device="cpu", model_dtype="bfloat16")
    out = tmp_path / "c.zarr"
    _contributions("tiny", model, _prompts(tmp_path), out, attn_layers="0,3")
    norms = zarr.open_group(str(out), mode="r")["blocks.0.contribution_norm"]
    assert norms.attrs["residual_limit"] == 2 ** -6
    assert RESIDUAL_LIMIT < norms.attrs["residual_max"] < 2 ** -6
