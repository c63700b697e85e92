"""The reader (gdn_dump.read): prompts, hook rows, the xarray view and training batches.

Every store here is made by a real ``extract`` on the tiny model; nothing of the reader is mocked.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import zarr

import gdn_dump
from gdn_dump import open_store
from gdn_dump.errors import RunFailure, StoreError
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.run.prompts import open_prompts
from gdn_dump.read.rows import chunk_unit
from gdn_dump.tokenizer import load_tokenizer_offline

from ..helpers import RAGGED_PROMPTS, reference_cache
from ..disk import fill_disk_at
from ..s3server import s3_server, s3_url  # noqa: F401

WORDS = ["alpha", "b", "gamma delta", "é", "zz", "the quick"]
# Small chunks, file order, one batch per unit, a record at every unit boundary: many chunks,
# many regions' worth of cut points, and progress recorded often.
SMALL = dict(chunk_tokens=16, batch_size=2, sort_window_bytes=0, checkpoint_every=0)


def _extract(tiny, prompts, out, **kw):
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **kw), model=tiny)


def _prompt_file(path, n=12):
    rows = [{"id": f"doc-{i:02d}", "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + 7 * i % 19))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ragged(tiny, tmp_path_factory):
    """A complete store of the ragged prompts: float32 hooks and layer 0's attention matrix."""
    root = tmp_path_factory.mktemp("ragged")
    prompts = root / "p.txt"
    prompts.write_text("\n".join(RAGGED_PROMPTS) + "\n", encoding="utf-8")
    _extract(tiny, prompts, root / "s.zarr", hooks="q,v,beta", dtype="float32", chunk_tokens=16,
             attn_layers="0")
    return prompts, root / "s.zarr"


@pytest.fixture(scope="module")
def gapped(tiny, tmp_path_factory):
    """A complete store written as three shards (one after another): rows between regions are
    unowned alignment gaps. bfloat16 hooks, so tensors of that type are covered too."""
    root = tmp_path_factory.mktemp("gapped")
    prompts = _prompt_file(root / "p.jsonl")
    for i in range(3):
        _extract(tiny, prompts, root / "s.zarr", hooks="q,beta", dtype="bfloat16", shard=f"{i}/3", **SMALL)
    group = zarr.open_group(str(root / "s.zarr"), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    assert group["tokens"].shape[0] > group["prompt_length"][:].sum()  # there are gaps
    return prompts, root / "s.zarr"


def _owned_rows(store) -> set[tuple[int, int]]:
    """Every (prompt, position) of the visible prompts, from the index arrays themselves."""
    return {(int(p), i) for p in store.visible for i in range(int(store.prompt_length[p]))}


def _collect(batches, store=None) -> list[tuple[int, int]]:
    """The (prompt, position) of every row yielded, in order; with ``store``, also checks that each
    row's tokens and hook values are the store's (read by direct zarr slicing)."""
    seen = []
    whole = {} if store is None else {name: store[name][:] for name in ["tokens", *store.hooks]}
    for batch in batches:
        prompt, position = np.asarray(batch["prompt"]), np.asarray(batch["position"])
        assert prompt.dtype == np.int64 and position.dtype == np.int64
        assert (prompt >= 0).all() and (position >= 0).all()
        if store is not None:
            rows = store.prompt_start[prompt] + position
            np.testing.assert_array_equal(batch["tokens"], whole["tokens"][rows])
            for name in store.hooks:
                if name in batch:
                    np.testing.assert_array_equal(_numpy(batch[name]), _numpy(whole[name][rows]), err_msg=name)
        seen += list(zip(prompt.tolist(), position.tolist()))
    return seen


def _numpy(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return x.astype(np.float32) if x.dtype.name == "bfloat16" else x


# ---- prompts ------------------------------------------------------------------------------------

def test_prompt_rows_equal_run_with_cache_and_direct_slicing(tiny, ragged):
    prompts, path = ragged
    store = open_store(path)
    texts = [p.text for p in open_prompts(prompts)]
    assert store.status == "complete" and store.n_prompts == len(texts) == 6
    assert store.provenance["model"]["name"] == "tiny"
    assert set(store.hooks) == {f"blocks.{i}.linear_attn.hook_{h}" for i in range(3) for h in ("q", "v", "beta")}
    assert store.matrices == ["blocks.0.attn_matrix"]
    assert store.prompt_ids == ["0", "1", "2", "4", "5", "6"]  # line 3 is blank
    np.testing.assert_array_equal(store.visible, np.arange(6))
    assert "tokens" in store and len(store) == len(list(store)) and store["tokens"].shape == (store.n_rows,)

    group = zarr.open_group(str(path), mode="r")
    for p in range(store.n_prompts):
        record = store.prompt(p)
        start, n = int(group["prompt_start"][p]), int(group["prompt_length"][p])
        assert record.index == p and record.id == store.prompt_ids[p] and len(record) == n
        assert record.token_ids.dtype == np.int32
        np.testing.assert_array_equal(record.token_ids, group["tokens"][start:start + n])
        assert record.text == texts[p]  # the tiny tokenizer round-trips the text
        for name in store.hooks:
            np.testing.assert_array_equal(record[name], group[name][start:start + n], err_msg=name)
        matrix = record.matrix("blocks.0.attn_matrix")
        assert matrix.shape == (4, n, n)
        np.testing.assert_array_equal(matrix, group["blocks.0.attn_matrix"][p, :, :n, :n])

    p = 5  # the longest prompt, against an independent forward pass
    ids, cache = reference_cache(tiny, texts[p])
    record = store.prompt(p)
    np.testing.assert_array_equal(record.token_ids, ids.numpy())
    for name in store.hooks:
        np.testing.assert_allclose(record[name], cache[name][0].numpy(), atol=1e-5, rtol=0, err_msg=name)
    assert store.prompt(-1).index == 5


def test_prompt_errors(ragged):
    store = open_store(ragged[1])
    with pytest.raises(IndexError, match="out of range"):
        store.prompt(6)
    record = store.prompt(0)
    with pytest.raises(KeyError, match="use .matrix"):
        record["blocks.0.attn_matrix"]
    with pytest.raises(KeyError, match="not a per-token hook"):
        record["blocks.9.linear_attn.hook_q"]
    with pytest.raises(StoreError, match="not a per-token hook array"):
        store.iter_batches(hooks=["tokens"])
    with pytest.raises(StoreError, match="no such store"):
        open_store(ragged[1].parent / "nothing.zarr")


def test_tokenizer_is_loaded_offline_or_not_at_all(tmp_path):
    assert load_tokenizer_offline("tiny") is not None
    # Not in the cache (and never downloaded), a directory that is gone: no text, no error.
    assert load_tokenizer_offline("gdn-dump-tests/no-such-model") is None
    assert load_tokenizer_offline(str(tmp_path / "gone")) is None
    assert load_tokenizer_offline(None) is None


def test_import_gdn_dump_stays_light():
    code = "import sys, gdn_dump; assert 'torch' not in sys.modules; assert callable(gdn_dump.open_store)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_tokens,block_tokens", [(7, 16), (64, None), (1000, 32)])
def test_iter_batches_covers_every_owned_row_once(gapped, shuffle, batch_tokens, block_tokens):
    store = open_store(gapped[1])
    batches = list(store.iter_batches(batch_tokens=batch_tokens, shuffle=shuffle, block_tokens=block_tokens,
                                      shuffle_blocks=2))
    assert all(len(b["tokens"]) == batch_tokens for b in batches[:-1])
    assert all(set(b) == {"tokens", "prompt", "position", *store.hooks} for b in batches)
    seen = _collect(batches, store)
    assert len(seen) == len(set(seen)) == int(store.prompt_length.sum())
    assert set(seen) == _owned_rows(store)  # gap rows never appear
    if not shuffle:
        assert seen == sorted(seen)


def test_iter_batches_orders_by_seed_and_epoch(gapped):
    store = open_store(gapped[1])

    def order(**kw):
        return _collect(store.iter_batches(hooks="blocks.0.linear_attn.hook_beta", batch_tokens=10,
                                           block_tokens=16, **kw))

    first = order(seed=0, epoch=0)
    assert first == order(seed=0, epoch=0)
    assert first != order(seed=0, epoch=1) and first != order(seed=1, epoch=0)
    assert sorted(first) == sorted(order(seed=0, epoch=1)) == sorted(_owned_rows(store))
    assert first != sorted(first)


def test_iter_batches_drop_last_and_one_hook(gapped):
    store = open_store(gapped[1])
    hook = "blocks.1.linear_attn.hook_q"
    batches = list(store.iter_batches(hooks=hook, batch_tokens=9, drop_last=True, block_tokens=16))
    assert all(len(b["tokens"]) == 9 for b in batches)
    assert set(batches[0]) == {"tokens", "prompt", "position", hook}
    assert len(batches) == int(store.prompt_length.sum()) // 9
    _collect(batches, store)


def test_workers_split_the_blocks_without_overlap(gapped):
    store = open_store(gapped[1])
    shares = [_collect(store.iter_batches(batch_tokens=5, block_tokens=16, worker=w, num_workers=3,
                                          seed=3, epoch=2)) for w in range(3)]
    assert all(shares)
    together = [row for share in shares for row in share]
    assert len(together) == len(set(together)) and set(together) == _owned_rows(store)
    with pytest.raises(ValueError, match="worker"):
        store.iter_batches(worker=3, num_workers=3)


def test_block_rows_are_whole_chunks():
    assert chunk_unit([16, 64, 32], row_bytes=100) == 64
    assert chunk_unit([48, 64], row_bytes=100) == 192
    # q-like rows get small chunks, beta-like rows big ones: their lcm would be too many bytes
    assert chunk_unit([1024, 32768], row_bytes=4096 + 128, budget_bytes=64 << 20) == 1024
    assert chunk_unit([1 << 20, 1 << 20], row_bytes=1 << 10, budget_bytes=1 << 20) == 1 << 20


def test_torch_dataset_across_dataloader_workers(gapped):
    import torch
    from torch.utils.data import DataLoader

    store = open_store(gapped[1])
    ds = store.torch_dataset(batch_tokens=6, seed=1, block_tokens=16)
    assert isinstance(ds, torch.utils.data.IterableDataset)
    assert isinstance(pickle.loads(pickle.dumps(ds)), type(ds))  # what a spawned worker gets
    assert not hasattr(ds, "_store") or ds._store is None  # only the path travels

    def epoch(e):
        ds.set_epoch(e)
        loader = DataLoader(ds, batch_size=None, num_workers=2,
                            multiprocessing_context="fork" if sys.platform == "linux" else None)
        batches = list(loader)
        assert batches[0]["blocks.0.linear_attn.hook_q"].dtype == torch.bfloat16
        assert batches[0]["tokens"].dtype == torch.int32 and batches[0]["prompt"].dtype == torch.int64
        return _collect(batches, store)

    first, second = epoch(0), epoch(1)
    for seen in (first, second):
        assert len(seen) == len(set(seen)) and set(seen) == _owned_rows(store)
    assert first != second
    single = _collect(iter(ds), store)  # in the main process: one worker, everything
    assert sorted(single) == sorted(first)


# ---- xarray -------------------------------------------------------------------------------------

def test_to_xarray_aligns_prompts_and_tokens(gapped):
    store = open_store(gapped[1])
    ds = store.to_xarray()
    assert ds.sizes["token"] == store.n_rows and ds.sizes["prompt"] == store.n_prompts
    assert ds["prompt"].dims == ("token",) and ds["position"].dims == ("token",)
    np.testing.assert_array_equal(ds["prompt_start"].values, store.prompt_start)
    np.testing.assert_array_equal(ds["prompt_length"].values, store.prompt_length)
    assert [str(v) for v in ds["prompt_id"].values] == store.prompt_ids
    assert ds["finished"].values.all()

    prompt, position = ds["prompt"].values, ds["position"].values
    gaps = prompt == -1
    assert gaps.any() and (position[gaps] == -1).all()
    assert int((~gaps).sum()) == int(store.prompt_length.sum())
    for p in range(store.n_prompts):
        record = store.prompt(p)
        mine = ds.isel(token=prompt == p)
        np.testing.assert_array_equal(mine["position"].values, np.arange(len(record)))
        np.testing.assert_array_equal(mine["tokens"].values, record.token_ids)
        for name in store.hooks:
            np.testing.assert_array_equal(mine[name].values, record[name], err_msg=name)
    hook = "blocks.2.linear_attn.hook_beta"
    where = ds[hook].where(ds["prompt"] == 4, drop=True)
    np.testing.assert_array_equal(where.values, store.prompt(4)[hook])
    # lazy: a slice computes only its own rows' coordinates
    np.testing.assert_array_equal(ds["prompt"][10:20].values, prompt[10:20])


def test_to_xarray_without_xarray_says_what_to_install(ragged, monkeypatch):
    store = open_store(ragged[1])
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(ImportError, match=r"pip install 'gdn-dump\[xarray\]'"):
        store.to_xarray()


# ---- stores still in progress -------------------------------------------------------------------

def _record(out, region):
    path = out / "_progress" / f"region-{region:05d}" / "zarr.json"
    return json.loads(path.read_text())["attributes"] if path.exists() else None


def test_in_progress_store_shows_only_finished_prompts(tiny, gapped, tmp_path, monkeypatch):
    prompts, complete = gapped
    out = tmp_path / "s.zarr"
    fill_disk_at(monkeypatch, 100)
    with pytest.raises(RunFailure):
        _extract(tiny, prompts, out, hooks="q,beta", dtype="bfloat16", writer="zarr", **SMALL)
    monkeypatch.undo()

    resume_from = _record(out, 0)["resume_from"]
    store = open_store(out)
    assert store.status == "in_progress" and 0 < resume_from < store.n_prompts
    np.testing.assert_array_equal(store.visible, np.arange(resume_from))
    reference = open_store(complete)
    for p in range(resume_from):
        for name in store.hooks:
            np.testing.assert_array_equal(store.prompt(p)[name], reference.prompt(p)[name], err_msg=name)
    with pytest.raises(StoreError, match=f"prompt {resume_from} .* not finished"):
        store.prompt(resume_from)
    seen = _collect(store.iter_batches(batch_tokens=8, block_tokens=16), store)
    assert len(seen) == len(set(seen)) and set(seen) == _owned_rows(store)
    assert {p for p, _ in seen} == set(range(resume_from))
    ds = store.to_xarray()
    assert set(np.unique(ds["prompt"].values)) == {-1, *range(resume_from)}
    np.testing.assert_array_equal(ds["finished"].values, np.arange(store.n_prompts) < resume_from)


def test_a_region_without_a_record_shows_nothing(tiny, tmp_path):
    prompts = _prompt_file(tmp_path / "p.jsonl")
    out = tmp_path / "s.zarr"
    for i in (0, 2):  # process 1 never ran
        _extract(tiny, prompts, out, hooks="beta", shard=f"{i}/3", **SMALL)
    store = open_store(out)
    regions = store.provenance["processes"]["regions"]
    assert store.status == "in_progress" and _record(out, 1) is None
    shown = [p for lo, hi in (regions[0], regions[2]) for p in range(lo, hi)]
    np.testing.assert_array_equal(store.visible, shown)
    lo, hi = regions[1]
    assert hi > lo
    with pytest.raises(StoreError, match="not finished"):
        store.prompt(lo)
    seen = _collect(store.iter_batches(batch_tokens=8), store)
    assert {p for p, _ in seen} == set(shown)


# ---- s3 -----------------------------------------------------------------------------------------

def test_s3_store_reads_like_the_local_one(tiny, ragged, s3_url):
    prompts, local_path = ragged
    # Fewer hooks and default chunks than the local store: fewer objects, a quicker test.
    _extract(tiny, prompts, s3_url, hooks="q,beta", dtype="float32")
    local, remote = open_store(local_path), open_store(s3_url)
    assert remote.path == s3_url and remote.status == "complete"
    assert remote.hooks and set(remote.hooks) < set(local.hooks)
    for p in range(local.n_prompts):
        a, b = local.prompt(p), remote.prompt(p)
        assert a.text == b.text and a.id == b.id
        for name in remote.hooks:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    hook = "blocks.1.linear_attn.hook_q"
    seen = _collect(remote.iter_batches(hooks=hook, batch_tokens=32, seed=5), remote)
    assert len(seen) == len(set(seen)) and set(seen) == _owned_rows(local)
    ds = remote.to_xarray()
    np.testing.assert_array_equal(ds[hook].isel(token=ds["prompt"].values == 2).values, local.prompt(2)[hook])
    torch_rows = _collect(iter(remote.torch_dataset(hooks=hook, batch_tokens=16)), remote)
    assert sorted(torch_rows) == sorted(seen)


def test_open_store_is_exported():
    assert gdn_dump.open_store is open_store and "open_store" in gdn_dump.__all__
