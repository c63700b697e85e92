"""RowWriter writes whole aligned chunks, in order, whatever the batch sizes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from gdn_dump.errors import RunFailure
from gdn_dump.plan import ArraySpec
from gdn_dump.store import RowWriter


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
