"""Per-head statistics (issue 7): streamed while writing, equal to numpy over the stored rows,
after a kill and resume, and over two shards; the naive reference equals the accumulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump.cli.app import app
from gdn_dump.errors import RunFailure
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.ops.stats import (
    BETA_EDGES,
    HALF_LIFE_EDGES,
    LN_HALF,
    ArrayStats,
    _bin,
    histogram_median,
)
from gdn_dump.ops.stats_reference import reference_stats as naive

from ..disk import fill_disk_at

RTOL = 1e-9
HOOKS = "v,beta,log_decay,recurrence_out,blocks.0.hook_resid_post"
KEYS = ("count", "nonfinite", "mean", "std", "mean_l2", "min", "max")
# file order, one batch per unit, small chunks: many chunk writes and a record at every unit end
SMALL = dict(hooks=HOOKS, chunk_tokens=32, batch_size=2, sort_window_bytes=0, checkpoint_every=0)


def _prompts(path, n=14):
    words = ["alpha", "b", "gamma delta", "é", "zz", "the quick"]
    rows = [{"id": f"doc-{i:02d}", "text": " ".join(words[(i + j) % len(words)]
                                                    for j in range(2 + 7 * i % 29))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _extract(tiny, prompts, out, **kw):
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **{**SMALL, **kw}),
                   model=tiny)


def _stored(group, name) -> np.ndarray:
    """The rows of every prompt, in prompt order (alignment gaps between regions left out)."""
    arr = group[name][:]
    starts, lengths = group["prompt_start"][:], group["prompt_length"][:]
    return np.concatenate([arr[s:s + n] for s, n in zip(starts, lengths)])


def _close(actual, expected, what):
    a = np.array([np.nan if x is None else x for x in actual], dtype=np.float64)
    b = np.array([np.nan if x is None else x for x in expected], dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-300, equal_nan=True, err_msg=what)


def assert_stats_equal(actual: dict, expected: dict, what: str = "") -> None:
    assert actual["heads_dim"] == expected["heads_dim"], what
    for key in KEYS:
        if key in ("count", "nonfinite"):
            assert actual[key] == expected[key], f"{what} {key}"
        else:
            _close(actual[key], expected[key], f"{what} {key}")
    for key in ("half_life_histogram", "beta_histogram"):
        assert (key in actual) == (key in expected), f"{what} {key}"
        if key in expected:
            assert actual[key] == expected[key], f"{what} {key}"


def assert_store_stats_match_numpy(path) -> dict:
    """Every per-token hook array's ``stats`` equals numpy float64 over its stored rows."""
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    found = {}
    for name in group.array_keys():
        arr = group[name]
        dims = arr.metadata.dimension_names
        if name == "tokens" or dims[0] != "token":
            assert "stats" not in arr.attrs, name
            continue
        stats = arr.attrs["stats"]
        data = _stored(group, name)
        assert_stats_equal(stats, naive(data, dims, name), name)
        # and straight from numpy, without the reference
        x = data.astype(np.float64).reshape(len(data), len(stats["count"]), -1)
        for h in range(x.shape[1]):
            v = x[:, h, :]
            _close([stats["mean"][h], stats["std"][h], stats["min"][h], stats["max"][h],
                    stats["mean_l2"][h]],
                   [v.mean(), v.std(), v.min(), v.max(), np.sqrt((v * v).sum(axis=1)).mean()],
                   f"{name} head {h}")
            assert stats["count"][h] == v.size
        for kind, edges in (("half_life", HALF_LIFE_EDGES), ("beta", BETA_EDGES)):
            if f"{kind}_histogram" in stats:
                hist = stats[f"{kind}_histogram"]
                values = LN_HALF / x[:, :, 0] if kind == "half_life" else x[:, :, 0]
                assert hist["edges"] == edges.tolist()
                for h in range(x.shape[1]):
                    assert hist["counts"][h] == np.histogram(values[:, h], edges)[0].tolist()
                    assert hist["below"][h] + sum(hist["counts"][h]) + hist["above"][h] == len(x)
        found[name] = stats
    summary = group.attrs["gdn_dump"]["stats"]
    assert set(summary) == set(found)
    for name, s in summary.items():
        assert s["count"] == sum(found[name]["count"])
        flat = _stored(group, name).astype(np.float64)
        _close([s["mean"], s["std"], s["min"], s["max"]],
               [flat.mean(), flat.std(), flat.min(), flat.max()], f"summary {name}")
    return found


# --- the accumulator against the reference ---------------------------------------------------

CASES = [
    ("blocks.0.linear_attn.hook_v", ("token", "v_head", "d_v"), (4, 8), np.float16),
    ("blocks.0.linear_attn.hook_log_decay", ("token", "v_head"), (4,), np.float32),
    ("blocks.0.linear_attn.hook_beta", ("token", "v_head"), (4,), np.float32),
    ("blocks.0.hook_resid_post", ("token", "d_model"), (16,), np.float16),
    ("blocks.0.linear_attn.hook_q", ("token", "k_head", "d_k"), (2, 16), "bfloat16"),
]


def _data(name, shape, dtype, n=3000, seed=0):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(seed)
    if name.endswith("log_decay"):
        x = -np.exp(rng.standard_normal((n, *shape)) * 5)
        x[::97] = 0.0  # never halves: above the edges
    elif name.endswith("beta"):
        x = rng.random((n, *shape))
        x[::89] = 1.0  # the closed last bin
    else:
        x = rng.standard_normal((n, *shape)) * 3 + 1.5
    x = x.astype(dtype)
    x[11, 0] = np.nan
    x[12, 1] = np.inf
    x[13, -1] = -np.inf
    return x


@pytest.mark.parametrize("name, dims, shape, dtype", CASES)
def test_naive_reference_equals_the_streaming_accumulator(name, dims, shape, dtype, monkeypatch):
    import gdn_dump.ops.stats as stats_module

    monkeypatch.setattr(stats_module, "BLOCK_ELEMENTS", 256)  # many blocks per call
    x = _data(name, shape, dtype)
    expected = naive(x, dims, name)
    assert sum(expected["nonfinite"]) > 0
    # uneven pieces, streamed; and the same rows split in two, merged through JSON (Chan)
    whole = ArrayStats.for_array(name, dims, shape)
    for lo in range(0, len(x), 137):
        whole.accumulate(x[lo:lo + 137])
    assert_stats_equal(whole.result(), expected, name)
    a, b = ArrayStats.for_array(name, dims, shape), ArrayStats.for_array(name, dims, shape)
    a.accumulate(x[:1234])
    b.accumulate(x[1234:])
    a = ArrayStats.from_json(json.loads(json.dumps(a.to_json(), allow_nan=False)))
    assert_stats_equal(a.merge(b).result(), expected, name)
    assert json.dumps(whole.result(), allow_nan=False)  # attribute JSON stays standard


@pytest.mark.parametrize("name, dims, shape, dtype", CASES)
def test_device_batch_stats_equal_the_reference(name, dims, shape, dtype):
    """The GPU path (per-batch moments reduced where the rows are, merged on the host) gives what
    the reference gives; run here on CPU tensors, the same torch code as on CUDA."""
    import torch

    from gdn_dump.ops.stats_device import batch_stats, merge_packed

    x = _data(name, shape, dtype)
    tensor = (torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16) if dtype == "bfloat16"
              else torch.from_numpy(x))
    stats = ArrayStats.for_array(name, dims, shape)
    for lo in range(0, len(x), 701):  # batches of uneven size
        merge_packed(stats, batch_stats(tensor[lo:lo + 701], stats).numpy())
    assert_stats_equal(stats.result(), naive(x, dims, name), name)


def test_device_histogram_bins_are_np_histogram_bins_at_every_edge():
    import torch

    from gdn_dump.ops.stats_device import batch_stats, merge_packed

    for name, edges in (("blocks.0.linear_attn.hook_beta", BETA_EDGES),
                        ("blocks.0.linear_attn.hook_log_decay", HALF_LIFE_EDGES)):
        values = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
        x = values if name.endswith("beta") else np.log(0.5) / values  # half-lives on the edges
        x = x[:, None]
        stats = ArrayStats.for_array(name, ("token", "v_head"), (1,))
        merge_packed(stats, batch_stats(torch.from_numpy(x), stats).numpy())
        assert_stats_equal(stats.result(), naive(x, ("token", "v_head"), name), name)


def test_an_empty_head_and_no_rows_give_nulls():
    s = ArrayStats.for_array("blocks.0.linear_attn.hook_beta", ("token", "v_head"), (2,))
    s.accumulate(np.zeros((0, 2), np.float32))
    s.accumulate(np.array([[np.nan, 0.5], [np.nan, 0.25]], np.float32))
    r = s.result()
    assert r["count"] == [0, 2] and r["nonfinite"] == [2, 0]
    assert r["mean"][0] is None and r["min"][0] is None and r["mean_l2"][0] is None
    assert r["mean"][1] == 0.375 and r["beta_histogram"]["counts"][1][5] == 1
    assert r["beta_histogram"]["counts"][1][10] == 1 and sum(r["beta_histogram"]["counts"][0]) == 0
    assert json.dumps(s.to_json(), allow_nan=False)
    assert_stats_equal(r, naive(np.array([[np.nan, 0.5], [np.nan, 0.25]], np.float32),
                                ("token", "v_head"), "blocks.0.linear_attn.hook_beta"))


@pytest.mark.parametrize("edges, kind", [(HALF_LIFE_EDGES, "half_life"), (BETA_EDGES, "beta")])
def test_bins_are_np_histogram_bins_at_and_next_to_every_edge(edges, kind):
    values = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf),
                             [np.inf, 0.0, edges[-1] * 10]])
    cat = _bin(kind, values)
    inside = (values >= edges[0]) & (values <= edges[-1])
    assert np.bincount(cat[inside] - 1, minlength=len(edges) - 1).tolist() == \
        np.histogram(values, edges)[0].tolist()
    assert (cat[values < edges[0]] == 0).all() and (cat[values > edges[-1]] == len(edges)).all()


def test_histogram_median():
    hist = {"edges": [1.0, 10.0, 100.0], "counts": [[0, 4], [2, 1], [0, 0], [0, 0]],
            "below": [0, 1, 0, 3], "above": [0, 0, 0, 0]}
    median = histogram_median(hist)
    assert median[0] == pytest.approx(10 * 10 ** 0.5) and median[1] == pytest.approx(10 ** 0.5)
    assert median[2] is None and median[3] == -np.inf


# --- runs of the tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    prompts = _prompts(root / "p.jsonl")
    _extract(tiny, prompts, root / "clean.zarr", writer="zarr")
    return prompts, root / "clean.zarr"


def test_single_run_stats_equal_numpy_over_the_stored_rows(clean):
    _, out = clean
    found = assert_store_stats_match_numpy(out)
    assert {n.rsplit(".", 1)[-1] for n in found} == {
        "hook_v", "hook_beta", "hook_log_decay", "hook_recurrence_out", "hook_resid_post"}
    group = zarr.open_group(str(out), mode="r")
    v = group["blocks.0.linear_attn.hook_v"].attrs["stats"]
    assert v["heads_dim"] == "v_head" and len(v["count"]) == group["blocks.0.linear_attn.hook_v"].shape[1]
    resid = group["blocks.0.hook_resid_post"].attrs["stats"]
    assert resid["heads_dim"] is None and len(resid["count"]) == 1
    assert "half_life_histogram" in group["blocks.0.linear_attn.hook_log_decay"].attrs["stats"]
    assert "beta_histogram" in group["blocks.0.linear_attn.hook_beta"].attrs["stats"]


def _close_to_clean(clean_path, other_path):
    a, b = zarr.open_group(str(clean_path), mode="r"), zarr.open_group(str(other_path), mode="r")
    for name in a.array_keys():
        if "stats" in a[name].attrs:
            assert_stats_equal(b[name].attrs["stats"], a[name].attrs["stats"], name)


def test_run_failed_mid_way_and_resumed_has_the_stats_of_an_uninterrupted_run(tiny, clean,
                                                                               tmp_path, monkeypatch):
    prompts, reference = clean
    out = tmp_path / "s.zarr"
    fill_disk_at(monkeypatch, 40)
    with pytest.raises(RunFailure):
        _extract(tiny, prompts, out, writer="zarr")
    record = json.loads((out / "_progress" / "region-00000" / "zarr.json").read_text())["attributes"]
    assert not record["done"] and 0 < record["resume_from"] < 14
    stats = record["stats"]["blocks.0.linear_attn.hook_v"]
    group = zarr.open_group(str(out), mode="r")
    rows = int(group["prompt_start"][record["resume_from"]])
    assert sum(stats["n"]) == rows * int(np.prod(group["blocks.0.linear_attn.hook_v"].shape[1:]))
    monkeypatch.undo()
    _extract(tiny, prompts, out, writer="zarr", resume=True)
    assert_store_stats_match_numpy(out)
    _close_to_clean(reference, out)


def test_two_shards_merge_to_the_stats_of_one_process(tiny, clean, tmp_path):
    prompts, reference = clean
    out = tmp_path / "shards.zarr"
    first = _extract(tiny, prompts, out, shard="0/2")
    assert first.status == "in_progress" and first.pending_regions == [1]
    second = _extract(tiny, prompts, out, shard="1/2")
    assert second.status == "complete"
    group = zarr.open_group(str(out), mode="r")
    regions = group.attrs["gdn_dump"]["processes"]["regions"]
    assert len(regions) == 2 and all(hi > lo for lo, hi in regions)
    assert_store_stats_match_numpy(out)
    _close_to_clean(reference, out)


def test_inspect_prints_the_stats_table(clean):
    _, out = clean
    result = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "statistics" in result.output and "mean L2" in result.output
    assert "blocks.0.hook_resid_post" in result.output
    assert "median half-life" in result.output


def test_statistics_reduced_on_the_device_path_equal_numpy(tiny, tmp_path, monkeypatch):
    """The path a GPU run takes (per-batch moments next to the capture hooks, merged by the sink),
    forced on the CPU: the store's statistics are the same as from the host accumulator."""
    import gdn_dump.run.pipeline as pipeline
    from gdn_dump.ops.stats import ArrayStats

    merged_on_host = []
    real = ArrayStats.accumulate
    monkeypatch.setattr(ArrayStats, "accumulate", lambda self, rows: merged_on_host.append(1) or real(self, rows))
    monkeypatch.setattr(pipeline, "stats_on_device", lambda device: True)
    out = tmp_path / "d.zarr"
    _extract(tiny, _prompts(tmp_path / "p.jsonl"), out)
    assert not merged_on_host  # nothing accumulated twice
    assert_store_stats_match_numpy(out)


def test_no_stats_writes_none(tiny, tmp_path):
    out = tmp_path / "n.zarr"
    _extract(tiny, _prompts(tmp_path / "p.jsonl"), out, stats=False)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["gdn_dump"]["status"] == "complete"
    assert not any("stats" in group[name].attrs for name in group.array_keys())
