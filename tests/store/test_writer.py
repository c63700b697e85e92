"""RowWriter writes whole aligned chunks, in order, whatever the batch sizes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from gdn_dump.errors import RunFailure
from gdn_dump.store.layout import ArraySpec
from gdn_dump.store.writer import RowWriter


def _group(tmp_path, n_rows, chunk):
    group = zarr.open_group(str(tmp_path / "w.zarr"), mode="w", zarr_format=3)
    spec = ArraySpec("x", (n_rows, 3), "float32", (chunk, 3), ("token", "c"))
    group.create_array("x", shape=spec.shape, chunks=spec.chunks, dtype="float32", fill_value=-1)
    return group, spec


@pytest.mark.parametrize("sizes", [[1] * 50, [7, 13, 30], [50], [16, 16, 16, 2], [3, 0, 47]])
def test_rows_land_in_order(tmp_path, sizes):
    group, spec = _group(tmp_path, 50, 16)
    data = np.arange(150, dtype=np.float32).reshape(50, 3)
    writes = []
    original = group["x"].__class__.__setitem__

    writer = RowWriter(group, [spec])
    arr = writer._arrays["x"]
    arr.__class__.__setitem__ = lambda self, key, value: (writes.append(key), original(self, key, value))
    try:
        offset = 0
        for n in sizes:
            writer.append("x", data[offset:offset + n])
            offset += n
        writer.close()
    finally:
        arr.__class__.__setitem__ = original
    np.testing.assert_array_equal(group["x"][:], data)
    # every write is one whole chunk (the last may be the array's edge)
    assert [(k.start, k.stop) for k in writes] == [(0, 16), (16, 32), (32, 48), (48, 50)]


def test_start_row_in_the_middle_of_a_chunk(tmp_path):
    group, spec = _group(tmp_path, 40, 16)
    writer = RowWriter(group, [spec], start_row=10)
    writer.append("x", np.ones((30, 3), np.float32))
    writer.close()
    out = group["x"][:]
    assert (out[:10] == -1).all() and (out[10:] == 1).all()


def test_write_errors_surface_as_run_failure(tmp_path):
    group, spec = _group(tmp_path, 32, 16)
    writer = RowWriter(group, [spec])

    class Full:
        def __setitem__(self, key, value):
            raise OSError(28, "No space left on device")

    writer._arrays["x"] = Full()
    writer.append("x", np.ones((16, 3), np.float32))
    with pytest.raises(RunFailure, match="No space left"):
        writer.append("x", np.ones((16, 3), np.float32))
        writer.close()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensorstore_writer_gives_the_same_store(tiny, ragged_txt, tmp_path, dtype):
    pytest.importorskip("tensorstore")
    xr = pytest.importorskip("xarray")
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    stores = {}
    for writer in ("zarr", "tensorstore"):
        out = tmp_path / f"{writer}.zarr"
        extract(ExtractOptions(model="tiny", prompts=str(ragged_txt), out=str(out), hooks="q,v,beta",
                               attn_layers="0,3", dtype=dtype, chunk_tokens=64, writer=writer),
                model=tiny)
        stores[writer] = out
    files = {w: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()
                 and p.name != "zarr.json"} for w, out in stores.items()}
    assert files["zarr"].keys() == files["tensorstore"].keys()
    assert all(files["zarr"][k] == files["tensorstore"][k] for k in files["zarr"])  # byte for byte
    a, b = (zarr.open_group(str(stores[w]), mode="r") for w in ("zarr", "tensorstore"))
    assert b.attrs["gdn_dump"]["writer"] == "tensorstore" and b.attrs["gdn_dump"]["status"] == "complete"
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:]), name
    ds = xr.open_zarr(str(stores["tensorstore"]), consolidated=False)
    assert ds["blocks.0.linear_attn.hook_q"].dims == ("token", "k_head", "d_k")


@pytest.mark.parametrize("writer", ["tensorstore", "zarr"])
def test_sharded_store_equals_the_unsharded_one(tiny, ragged_txt, tmp_path, writer):
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    def run(out, **kw):
        extract(ExtractOptions(model="tiny", prompts=str(ragged_txt), out=str(out), hooks="v,beta",
                               layers="0", chunk_tokens=32, writer=writer, **kw), model=tiny)
        return zarr.open_group(str(out), mode="r")

    plain = run(tmp_path / "plain.zarr")
    sharded = run(tmp_path / "sharded.zarr", shard_tokens=128)
    v = sharded["blocks.0.linear_attn.hook_v"]
    assert v.chunks == (32, 4, 16) and v.shards == (128, 4, 16)
    n_rows = v.shape[0]
    shard_files = sorted(p.name for p in (tmp_path / "sharded.zarr" / "blocks.0.linear_attn.hook_v" / "c").iterdir())
    assert len(shard_files) == -(-n_rows // 128)  # one file per shard, not per chunk
    for name in plain.array_keys():
        assert np.array_equal(plain[name][:], sharded[name][:]), name
    ts = pytest.importorskip("tensorstore")
    path = str(tmp_path / "sharded.zarr" / "blocks.0.linear_attn.hook_v")
    read = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}).result().read().result()
    assert np.array_equal(read, plain["blocks.0.linear_attn.hook_v"][:])
