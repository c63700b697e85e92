"""Reading and plotting the stores of ``gdn-dump contributions``: the per-prompt matrices cut to
each prompt equal the raw zarr arrays, the xarray view keeps their dims, ``plot --kind contrib``
and ``--kind logit`` draw them and say in one line what is wrong with a request."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump import open_store
from gdn_dump.catalogue import (CONTRIBUTION_LOGIT, CONTRIBUTION_NORM, CONTRIBUTION_RESIDUAL,
                                CONTRIBUTION_VECTORS, contribution_name)
from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError
from gdn_dump.read import attribution
from gdn_dump.read.plots import plot_store
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract

PROMPTS = ["hello world", "x", "the quick brown fox", "ab"]  # "x": one token, nothing to predict
LAYERS = [0, 1, 2, 3]  # GDN, GDN, GDN, softmax attention
HEADS, D_MODEL, TARGET = 4, 64, 7
SUFFIXES = (CONTRIBUTION_NORM, CONTRIBUTION_LOGIT, CONTRIBUTION_VECTORS)


def _contributions(tiny, root, name, **kw):
    out = root / name
    extract(ExtractOptions(model="tiny", prompts=str(root / "p.txt"), out=str(out), command="contributions",
                           hooks="", **kw), model=tiny)
    return out


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    """full: every layer, next-token logits and the vectors; picked: layers 1 and 3, heads 1, 2,
    the logit of token 7; bare: layer 0 without logits; plain: an extract store (no contributions)."""
    root = tmp_path_factory.mktemp("contrib")
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    made = {
        "full": _contributions(tiny, root, "full.zarr", attn_layers="all", contrib_vectors=True),
        "picked": _contributions(tiny, root, "picked.zarr", attn_layers="1,3", attn_heads="1,2",
                                 contrib_logits=str(TARGET)),
        "bare": _contributions(tiny, root, "bare.zarr", attn_layers="0", contrib_logits="none"),
    }
    extract(ExtractOptions(model="tiny", prompts=str(root / "p.txt"), out=str(root / "plain.zarr"),
                           hooks="beta"), model=tiny)
    made["plain"] = root / "plain.zarr"
    return made


def _raw(path):
    return zarr.open_group(str(path), mode="r")


def _plot(*args):
    return CliRunner().invoke(app, ["plot", *map(str, args)])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---- reading ------------------------------------------------------------------------------------

def test_prompt_matrices_are_the_raw_arrays_cut_to_the_prompt(stores):
    store, raw = open_store(stores["full"]), _raw(stores["full"])
    names = [contribution_name(layer, s) for layer in LAYERS for s in SUFFIXES]
    assert store.matrices == sorted(names)  # the 5-d vectors too; never the [prompt] residuals
    assert contribution_name(0, CONTRIBUTION_RESIDUAL) in store
    for p in range(store.n_prompts):
        record = store.prompt(p)
        n = len(record)
        assert n == len(PROMPTS[p])  # the tiny tokenizer: a token a character
        for layer in LAYERS:
            for suffix in SUFFIXES:
                name = contribution_name(layer, suffix)
                block = raw[name][p]
                got = record.contribution(layer, suffix)
                extra = (D_MODEL,) if suffix == CONTRIBUTION_VECTORS else ()
                assert got.shape == (HEADS, n, n) + extra and got.dtype == np.float32
                np.testing.assert_array_equal(got, block[:, :n, :n])
                np.testing.assert_array_equal(record.matrix(name), got)
                assert not block[:, n:].any() and not block[:, :, n:].any()  # nothing outside it
                upper = np.triu(np.ones((n, n), bool), 1)
                assert not got[:, upper].any()  # nor after the query
                np.testing.assert_array_equal(record.matrix(name, head=2), block[2, :n, :n])
                np.testing.assert_array_equal(record.matrix(name, query=n - 1), block[:, n - 1, :n])
                np.testing.assert_array_equal(record.matrix(name, head=3, query=0), block[3, 0, :n])
            vectors = record.contribution(layer, CONTRIBUTION_VECTORS)
            np.testing.assert_allclose(record.contribution(layer), np.linalg.norm(vectors, axis=-1),
                                       rtol=1e-4, atol=1e-7)
            logits = record.contribution(layer, CONTRIBUTION_LOGIT)
            assert not logits[:, n - 1].any()  # the last position has no next token
            assert raw[contribution_name(layer, CONTRIBUTION_LOGIT)].attrs["target"] == "next"


def test_selected_heads_and_matrix_errors(stores):
    store, raw = open_store(stores["picked"]), _raw(stores["picked"])
    assert store.matrices == sorted(contribution_name(layer, s) for layer in (1, 3)
                                    for s in (CONTRIBUTION_NORM, CONTRIBUTION_LOGIT))
    record = store.prompt(2)
    n = len(record)
    name = contribution_name(3, CONTRIBUTION_LOGIT)
    assert raw[name].attrs["heads"] == [1, 2] and raw[name].attrs["target"] == TARGET
    np.testing.assert_array_equal(record.matrix(name, head=2), raw[name][2, 1, :n, :n])  # model head 2
    assert record.contribution(3, CONTRIBUTION_LOGIT)[:, n - 1].any()  # a fixed token: every row has one
    with pytest.raises(ValueError, match="head 0 is not stored in blocks.3.contribution_logit; it has heads 1, 2"):
        record.matrix(name, head=0)
    with pytest.raises(IndexError, match=f"query {n} is out of range"):
        record.matrix(name, query=n)
    with pytest.raises(KeyError, match="not a per-prompt matrix"):
        record.contribution(0)
    with pytest.raises(KeyError, match="use .matrix"):
        record[name]


def test_to_xarray_keeps_the_dims_and_names_the_heads(stores):
    pytest.importorskip("xarray")
    store, raw = open_store(stores["full"]), _raw(stores["full"])
    ds = store.to_xarray()
    for layer in LAYERS:
        head_dim = "v_head" if layer < 3 else "attn_head"
        for suffix in SUFFIXES:
            name = contribution_name(layer, suffix)
            assert ds[name].dims == ("prompt", head_dim, "query", "key") + (
                ("d_model",) if suffix == CONTRIBUTION_VECTORS else ())
            assert ds[name].attrs["kind"] == suffix and ds[name].attrs["layer"] == layer
        residual = contribution_name(layer, CONTRIBUTION_RESIDUAL)
        assert ds[residual].dims == ("prompt",) and ds[residual].dtype == np.float64
        np.testing.assert_array_equal(ds[residual].values, raw[residual][:])
    vectors = contribution_name(1, CONTRIBUTION_VECTORS)
    np.testing.assert_array_equal(ds[vectors].isel(prompt=2).values, raw[vectors][2])
    assert list(ds["v_head"].values) == list(range(HEADS)) and list(ds["attn_head"].values) == list(range(HEADS))
    assert ds.sizes["prompt"] == len(PROMPTS) and list(ds["prompt_length"].values) == list(map(len, PROMPTS))

    picked, raw = open_store(stores["picked"]).to_xarray(), _raw(stores["picked"])
    assert list(picked["selected_v_head"].values) == [1, 2]
    assert list(picked["selected_attn_head"].values) == [1, 2]
    name = contribution_name(3, CONTRIBUTION_NORM)
    np.testing.assert_array_equal(picked[name].sel(selected_attn_head=2).values, raw[name][:, 1])


# ---- figure data --------------------------------------------------------------------------------

def test_contribution_data_is_one_head_of_the_raw_array(stores):
    raw = _raw(stores["picked"])
    data = attribution.contribution_data(stores["picked"], prompt=2)  # first layer, first stored head
    n = len(PROMPTS[2])
    assert (data["layer"], data["head"], data["kind"]) == (1, 1, CONTRIBUTION_NORM)
    np.testing.assert_array_equal(data["matrix"], raw[contribution_name(1, CONTRIBUTION_NORM)][2, 0, :n, :n])
    np.testing.assert_array_equal(data["tokens"], raw["tokens"][raw["prompt_start"][2]:][:n])


def test_logit_data_sums_the_heads_of_one_query_row(stores):
    raw = _raw(stores["full"])
    p, n = 2, len(PROMPTS[2])
    tokens = raw["tokens"][raw["prompt_start"][p]:][:n]
    data = attribution.logit_data(stores["full"], prompt=p)
    q = n - 2  # the last position with a next token
    assert data["query"] == q and data["target"] == "next" and data["target_token"] == tokens[q + 1]
    assert data["axis"] == "layer" and data["layers"] == LAYERS
    assert data["labels"] == ["layer 0", "layer 1", "layer 2", "layer 3 (attention)"]
    expected = np.stack([raw[contribution_name(layer, CONTRIBUTION_LOGIT)][p, :, q, :q + 1].astype(np.float64).sum(0)
                         for layer in LAYERS])
    np.testing.assert_allclose(data["values"], expected, rtol=1e-12)
    np.testing.assert_allclose(data["total"], expected.sum(0), rtol=1e-12)

    one = attribution.logit_data(stores["full"], layer=3, prompt=p, query=4)
    assert one["axis"] == "head" and one["labels"] == [f"head {h}" for h in range(HEADS)]
    np.testing.assert_array_equal(one["values"], raw[contribution_name(3, CONTRIBUTION_LOGIT)][p, :, 4, :5])
    head = attribution.logit_data(stores["full"], head=1, prompt=p, query=0)
    assert head["values"].shape == (len(LAYERS), 1) and head["labels"][0] == "layer 0, head 1"

    fixed = attribution.logit_data(stores["picked"], prompt=p)  # --logits 7: every position has it
    assert fixed["query"] == n - 1 and fixed["target_token"] == TARGET and fixed["layers"] == [1, 3]
    assert fixed["heads"] == {1: [1, 2], 3: [1, 2]}


# ---- plots --------------------------------------------------------------------------------------

@pytest.mark.parametrize("store, extra", [
    ("full", ["--kind", "contrib"]), ("full", ["--kind", "contrib", "--layer", "3", "--head", "2", "--prompt", "2"]),
    ("picked", ["--kind", "contrib", "--head", "2"]),
    ("full", ["--kind", "logit"]), ("full", ["--kind", "logit", "--layer", "1", "--prompt", "2"]),
    ("full", ["--kind", "logit", "--head", "0", "--prompt", "3"]), ("picked", ["--kind", "logit", "--prompt", "1"]),
])
def test_both_kinds_write_a_png(stores, tmp_path, store, extra):
    png = tmp_path / "fig.png"
    result = _plot(stores[store], *extra, "--out", png)
    assert result.exit_code == 0, result.stderr
    assert _png_size(png) == (1000, 600)


def test_plot_store_takes_the_query(stores, tmp_path):
    out = plot_store(stores["full"], "logit", tmp_path / "q.png", prompt=2, query=3, width=5, height=4)
    assert _png_size(out) == (500, 400)
    with pytest.raises(GdnDumpError, match=r"^--query 18 is out of range: prompt 2 has 19 tokens; "
                                           r"the positions with a next token: 0-17$"):
        plot_store(stores["full"], "logit", tmp_path / "r.png", prompt=2, query=18)
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("store, args, message", [
    ("plain", ["--kind", "contrib"], "the store has no contributions (blocks.<i>.contribution_norm); "
                                     "make them with gdn-dump contributions"),
    ("plain", ["--kind", "logit"], "the store has no contributions"),
    ("bare", ["--kind", "logit"], "have no logit attribution (blocks.<i>.contribution_logit; made with "
                                  "--logits none)"),
    ("picked", ["--kind", "contrib", "--layer", "0"],
     "--layer 0 has no contribution_norm in this store; layers with one: 1, 3"),
    ("picked", ["--kind", "logit", "--layer", "2"],
     "--layer 2 has no contribution_logit in this store; layers with one: 1, 3"),
    ("picked", ["--kind", "contrib", "--head", "0"],
     "--head 0 is out of range: blocks.1.contribution_norm has heads 1-2"),
    ("full", ["--kind", "contrib", "--head", "4"], "--head 4 is out of range: blocks.0.contribution_norm has heads 0-3"),
    ("full", ["--kind", "logit", "--head", "-1"], "--head -1 is out of range"),
    ("full", ["--kind", "logit", "--prompt", "1"], "--prompt 1 has 1 token: no position has a next token"),
    ("full", ["--kind", "contrib", "--prompt", "4"], "--prompt 4 is out of range: the store has 4 prompts"),
])
def test_errors_are_one_line_exit_2(stores, tmp_path, store, args, message):
    png = tmp_path / "f.png"
    result = _plot(stores[store], *args, "--out", png)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not png.exists()
