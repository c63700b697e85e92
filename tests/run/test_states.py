"""Recurrent states S_t: the snapshots an extract run stores, and ``Store.state`` at any position,
against TransformerLens's ``compute_ssm_state`` on each prompt alone (the independent reference),
on ``tiny`` and on a checkpoint with n_v = 4 n_k and d_k != d_v.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from gdn_dump import open_store
from gdn_dump.cli.app import app
from gdn_dump.errors import StoreError
from gdn_dump.model.load import load_model
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.store.verify import verify_store

from ..helpers import RAGGED_PROMPTS, Killed, assert_same_prompts, kill_at

TOLERANCE = 1e-5  # relative, float32 (the acceptance)
HOOKS = "default,ssm_state"
STATE = "blocks.{}.linear_attn.hook_ssm_state"


@pytest.fixture(scope="module")
def gqa4(tmp_path_factory):
    """A tiny random Qwen3.5 with n_v = 4 n_k (1 key head, 4 value heads) and d_k 16 != d_v 8."""
    from transformers import Qwen3_5ForCausalLM

    from gdn_dump.model.tiny import build_tiny_tokenizer, set_gates, tiny_text_config

    tokenizer = build_tiny_tokenizer()
    config = tiny_text_config(tokenizer)
    config.update(dict(linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=8))
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    model = Qwen3_5ForCausalLM(config)
    set_gates(model)
    path = tmp_path_factory.mktemp("gqa4") / "checkpoint"
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), load_model(str(path), device="cpu")


def _models(tiny, gqa4):
    return {"tiny": ("tiny", tiny), "gqa4": gqa4}


def _prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(RAGGED_PROMPTS) + "\n", encoding="utf-8")
    return path


def _extract(name, model, prompts, out, **kw):
    kw = {"hooks": HOOKS, "dtype": "float32", "state_every": 7, "batch_size": 3, **kw}
    return extract(ExtractOptions(model=name, prompts=str(prompts), out=str(out), **kw), model=model)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)


def _reference(model, token_ids, layer):
    """TransformerLens's ``compute_ssm_state`` of the prompt alone: ``[T, H, d_k, d_v]``."""
    ids = torch.as_tensor(np.asarray(token_ids, np.int64))[None]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids, use_cache=False)
        states = model.bridge.blocks[layer].linear_attn.compute_ssm_state(cache, layer)
    return states[0].numpy(), cache


@pytest.mark.parametrize("which", ["tiny", "gqa4"])
def test_snapshots_and_every_state_equal_compute_ssm_state(tiny, gqa4, tmp_path, which):
    name, model = _models(tiny, gqa4)[which]
    out = tmp_path / "s.zarr"
    _extract(name, model, _prompts(tmp_path), out)
    store = open_store(out)
    assert store.status == "complete" and store.state_layers == [0, 1, 2]
    checked = 0
    for p in store.visible:
        record = store.prompt(p)
        if not len(record):
            assert store.states(p, 0)[0].shape == (0,)  # a prompt with no tokens has no snapshots
            continue
        for layer in store.state_layers:
            trajectory, cache = _reference(model, record.token_ids, layer)
            positions, states = store.states(p, layer)
            expected = np.arange(6, len(record), 7).tolist()
            assert positions.tolist() == expected + ([] if expected[-1:] == [len(record) - 1]
                                                     else [len(record) - 1])
            assert _relative(states, trajectory[positions]).max() <= TOLERANCE
            every = np.stack([store.state(p, layer, t) for t in range(len(record))])
            assert _relative(every, trajectory).max() <= TOLERANCE
            # o_t = S_t^T q~_t at every snapshot is the stored recurrence output
            q = torch.as_tensor(record[f"blocks.{layer}.linear_attn.hook_q"][positions], dtype=torch.float64)
            q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) / q.shape[-1] ** 0.5  # q~
            q = q.repeat_interleave(states.shape[1] // q.shape[1], dim=1).numpy()
            o = np.einsum("nhkv,nhk->nhv", states.astype(np.float64), q)
            stored = record[f"blocks.{layer}.linear_attn.hook_recurrence_out"][positions]
            assert _relative(o, stored).max() <= TOLERANCE
            checked += len(positions)
    assert checked > 20
    assert all(check.ok for check in verify_store(str(out))), verify_store(str(out))


def test_batched_equals_unbatched_and_final_only(tiny, tmp_path):
    prompts = _prompts(tmp_path)
    _extract("tiny", tiny, prompts, tmp_path / "one.zarr", batch_size=1)
    _extract("tiny", tiny, prompts, tmp_path / "many.zarr", batch_size=8)
    one, many = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "many.zarr")
    for p in one.visible:
        for layer in one.state_layers:
            (pa, sa), (pb, sb) = one.states(p, layer), many.states(p, layer)
            np.testing.assert_array_equal(pa, pb)
            np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-7)
    _extract("tiny", tiny, prompts, tmp_path / "final.zarr", state_every="final")
    final = open_store(tmp_path / "final.zarr")
    lengths = final.prompt_length
    np.testing.assert_array_equal(final["state_count"][:], (lengths > 0).astype(int))
    for p in np.flatnonzero(lengths):
        positions, states = final.states(p, 1)
        assert positions.tolist() == [lengths[p] - 1]
        np.testing.assert_allclose(states, one.states(p, 1)[1][-1:], rtol=1e-5, atol=1e-7)
    assert final.provenance["states"]["every"] == "final"


def test_killed_and_resumed_run_equals_one_run(tiny, tmp_path, monkeypatch):
    prompts = _prompts(tmp_path)
    kw = dict(checkpoint_every=0, sort_window_bytes=0, batch_size=2)
    _extract("tiny", tiny, prompts, tmp_path / "clean.zarr", **kw)
    kill_at(monkeypatch, "after-checkpoint:2")
    with pytest.raises(Killed):
        _extract("tiny", tiny, prompts, tmp_path / "killed.zarr", **kw)
    monkeypatch.undo()
    _extract("tiny", tiny, prompts, tmp_path / "killed.zarr", resume=True, **kw)
    assert_same_prompts(tmp_path / "clean.zarr", tmp_path / "killed.zarr")
    clean, resumed = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("clean.zarr", "killed.zarr"))
    assert resumed[STATE.format(0)].attrs["state_stats"] == clean[STATE.format(0)].attrs["state_stats"]


def test_two_shards_write_the_store_of_one_run(tiny, tmp_path):
    prompts = _prompts(tmp_path)
    _extract("tiny", tiny, prompts, tmp_path / "one.zarr")
    for shard in ("0/2", "1/2"):  # process 0 creates the store; 1 joins it and finalizes
        _extract("tiny", tiny, prompts, tmp_path / "two.zarr", shard=shard)
    two = zarr.open_group(str(tmp_path / "two.zarr"), mode="r")
    regions = two.attrs["gdn_dump"]["processes"]["regions"]
    assert len(regions) == 2 and regions[0][1] > 0  # both processes had prompts
    assert_same_prompts(tmp_path / "one.zarr", tmp_path / "two.zarr")
    assert all(check.ok for check in verify_store(str(tmp_path / "two.zarr")))


def test_dry_run_shows_the_state_arrays(tiny, tmp_path):
    result = _extract("tiny", tiny, _prompts(tmp_path), tmp_path / "dry.zarr", dry_run=True)
    states = [a for a in result.plan.arrays if a.stream == "state"]
    assert [a.name for a in states] == [STATE.format(i) for i in range(3)]
    n = result.plan.states.n_states
    assert all(a.shape == (n, 4, 16, 16) and a.nbytes == n * 4 * 16 * 16 * 4 for a in states)
    assert not (tmp_path / "dry.zarr").exists()


@pytest.mark.parametrize("args, message", [
    (["--hooks", HOOKS, "--state-every", "0"], "--state-every must be a number of tokens"),
    (["--hooks", HOOKS, "--state-every", "often"], "--state-every must be a number of tokens"),
    (["--state-every", "8"], "--state-every needs the state hook: add ssm_state to --hooks"),
    (["--hooks", "ssm_state", "--layers", "3"], "layer 3 is a softmax-attention layer"),
    (["--hooks", "blocks.3.linear_attn.hook_ssm_state"], "unknown hook"),
])
def test_bad_state_options_are_one_line(tmp_path, args, message):
    prompts = _prompts(tmp_path)
    result = CliRunner().invoke(app, ["extract", "--model", "tiny", "--prompts", str(prompts),
                                      "--out", str(tmp_path / "s.zarr"), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_state_out_of_range_and_without_rows_to_replay(tiny, tmp_path):
    prompts = _prompts(tmp_path)
    _extract("tiny", tiny, prompts, tmp_path / "s.zarr", hooks="beta,ssm_state")
    store = open_store(tmp_path / "s.zarr")
    n = int(store.prompt_length[0])
    with pytest.raises(StoreError, match=f"out of range"):
        store.state(0, 0, n)
    with pytest.raises(StoreError, match="layer 3"):
        store.state(0, 3, 0)
    positions, states = store.states(0, 0)
    np.testing.assert_array_equal(store.state(0, 0, int(positions[0])), states[0])  # a snapshot
    with pytest.raises(StoreError, match="hook_k"):  # between snapshots: the rows are not stored
        store.state(0, 0, int(positions[0]) - 1 if positions[0] else int(positions[0]) + 1)


def test_state_statistics_are_numpy_over_the_stored_snapshots(tiny, tmp_path):
    from gdn_dump.ops.state_replay import effective_rank, frobenius_norm

    out = tmp_path / "s.zarr"
    _extract("tiny", tiny, _prompts(tmp_path), out, state_every=3)
    group = zarr.open_group(str(out), mode="r")
    owned = np.concatenate([np.arange(s, s + n) for s, n in
                            zip(group["state_start"][:], group["state_count"][:])])
    for layer in (0, 2):
        states = group[STATE.format(layer)][:][owned].astype(np.float64)
        stats = group[STATE.format(layer)].attrs["state_stats"]
        for statistic, values in (("norm", frobenius_norm(states)),
                                  ("effective_rank", effective_rank(states))):
            got = stats[statistic]
            assert got["count"] == [len(owned)] * states.shape[1]
            np.testing.assert_allclose(got["mean"], values.mean(0), rtol=1e-5)
            np.testing.assert_allclose(got["min"], values.min(0), rtol=1e-5)
            np.testing.assert_allclose(got["max"], values.max(0), rtol=1e-5)
    result = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{STATE.format(1)} effective_rank" in result.stdout and f"{STATE.format(1)} norm" in result.stdout


def test_full_names_dtype_xarray_and_plot(tiny, tmp_path):
    pytest.importorskip("xarray")
    pytest.importorskip("matplotlib")
    out = tmp_path / "s.zarr"
    result = _extract("tiny", tiny, _prompts(tmp_path), out, state_dtype="bfloat16",
                      hooks="blocks.1.linear_attn.hook_ssm_state,k,v,beta,log_decay", layers="1")
    assert [h.name for h in result.plan.hooks if h.kind == "state"] == [STATE.format(1)]
    store = open_store(out)
    assert store.state_layers == [1] and str(store[STATE.format(1)].dtype) == "bfloat16"
    ds = store.to_xarray()
    assert ds[STATE.format(1)].dims == ("state", "v_head", "d_k", "d_v")
    p = int(np.flatnonzero(store.prompt_length)[1])
    mine = ds.state_prompt.values == p
    np.testing.assert_array_equal(ds.state_position.values[mine], store.states(p, 1)[0])
    png = tmp_path / "state.png"
    plotted = CliRunner().invoke(app, ["plot", str(out), "--kind", "state", "--layer", "1",
                                       "--prompt", str(p), "--out", str(png)])
    assert plotted.exit_code == 0, plotted.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
