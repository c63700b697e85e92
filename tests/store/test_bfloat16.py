"""bfloat16 Zarr v3 extension data type: zarr round trips, metadata, TensorStore interop, torch conversion."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr

import gdn_dump.store.bfloat16 as bf
from gdn_dump.run.capture import to_storage_numpy
from gdn_dump.errors import GdnDumpError

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


def _from_bits(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(BF16)


def _special_values(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns (NaNs with payloads, subnormals, ...) plus the named specials."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**16, size=int(np.prod(shape)), dtype=np.uint16)
    specials = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x3F80, 0x7F7F]
    bits[: len(specials)] = specials
    return _from_bits(bits.reshape(shape))


def _meta(path) -> dict:
    return json.loads((path / "zarr.json").read_text())


def test_register_is_idempotent_and_supported():
    bf.register_bfloat16()
    bf.register_bfloat16()
    assert bf.is_bfloat16_supported()
    from zarr.core.dtype import data_type_registry

    assert data_type_registry.get("bfloat16") is bf.BFloat16


def test_storage_dtype_mapping():
    assert bf.zarr_dtype("float32") == np.dtype("float32")
    assert bf.zarr_dtype("float16") == np.dtype("float16")
    assert bf.zarr_dtype("bfloat16") == bf.BFloat16()
    assert bf.zarr_dtype("bfloat16").to_native_dtype() == BF16
    with pytest.raises(GdnDumpError):
        bf.zarr_dtype("int8")


def test_unsupported_zarr_gives_clear_error(monkeypatch):
    monkeypatch.setattr(bf, "BFloat16", None)
    assert not bf.is_bfloat16_supported()
    with pytest.raises(GdnDumpError, match=r"zarr >= 3\.1.*float16 or float32"):
        bf.zarr_dtype("bfloat16")
    assert bf.zarr_dtype("float16") == np.dtype("float16")


@pytest.mark.parametrize("dtype", [bf.BFloat16(), BF16, ml_dtypes.bfloat16, "bfloat16"])
def test_zarr_round_trip_bit_exact(tmp_path, dtype):
    data = _special_values((6, 10))
    arr = zarr.create_array(tmp_path / "a", shape=data.shape, chunks=(4, 4), dtype=dtype, compressors=None)
    arr[:] = data
    out = zarr.open_array(tmp_path / "a", mode="r")[:]
    assert out.dtype == BF16
    np.testing.assert_array_equal(_bits(out), _bits(data))
    meta = _meta(tmp_path / "a")
    assert meta["data_type"] == "bfloat16"
    assert meta["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]


def test_on_disk_bytes_are_little_endian(tmp_path):
    arr = zarr.create_array(tmp_path / "a", shape=(2,), chunks=(2,), dtype="bfloat16", compressors=None)
    arr[:] = np.array([1.0, -2.0], dtype=BF16)
    assert (tmp_path / "a" / "c" / "0").read_bytes() == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_negative_zero_chunk_kept_with_write_empty_chunks(tmp_path):
    # zarr's empty-chunk check compares kind-"V" dtypes by value (-0.0 == 0.0), so an all -0.0
    # chunk is only kept bit-exact when empty chunks are written (see the module docstring).
    arr = zarr.create_array(
        tmp_path / "z", shape=(4,), chunks=(2,), dtype="bfloat16", fill_value=0.0,
        config={"write_empty_chunks": True},
    )
    arr[:2] = np.array([-0.0, -0.0], dtype=BF16)
    np.testing.assert_array_equal(_bits(arr[:]), [0x8000, 0x8000, 0, 0])


def test_sharded_zstd_round_trip(tmp_path):
    data = _special_values((16, 12), seed=1)
    arr = zarr.create_array(
        tmp_path / "s",
        shape=data.shape,
        chunks=(4, 4),
        shards=(8, 12),
        dtype=bf.zarr_dtype("bfloat16"),
        compressors=zarr.codecs.ZstdCodec(level=3),
    )
    arr[:] = data
    out = zarr.open_array(tmp_path / "s", mode="r")
    np.testing.assert_array_equal(_bits(out[:]), _bits(data))
    np.testing.assert_array_equal(_bits(out[3:11, 5]), _bits(data[3:11, 5]))
    meta = _meta(tmp_path / "s")
    assert meta["data_type"] == "bfloat16"
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes", "zstd"]


@pytest.mark.parametrize(
    ("fill", "json_value", "bits"),
    [
        (0.0, 0.0, 0x0000),
        (-0.0, -0.0, 0x8000),
        (1.5, 1.5, 0x3FC0),
        (float("nan"), "NaN", 0x7FC0),
        (float("inf"), "Infinity", 0x7F80),
        (float("-inf"), "-Infinity", 0xFF80),
        (_from_bits(0xFFC1)[()], "0xffc1", 0xFFC1),  # non-canonical NaN keeps its bits as hex
    ],
)
def test_fill_value_round_trip(tmp_path, fill, json_value, bits):
    zarr.create_array(tmp_path / "f", shape=(3,), chunks=(2,), dtype="bfloat16", fill_value=fill)
    stored = _meta(tmp_path / "f")["fill_value"]
    assert stored == json_value and type(stored) is type(json_value)
    arr = zarr.open_array(tmp_path / "f", mode="r")
    assert int(_bits(arr.fill_value)) == bits
    np.testing.assert_array_equal(_bits(arr[:]), np.full(3, bits, dtype=np.uint16))  # unwritten chunks


def test_fill_value_hex_is_bfloat16_bits_not_float16(tmp_path):
    zarr.create_array(tmp_path / "f", shape=(2,), chunks=(2,), dtype="bfloat16")
    meta = _meta(tmp_path / "f")
    meta["fill_value"] = "0x3f80"  # 1.0 in bfloat16 (it would be 1.875 read as float16)
    (tmp_path / "f" / "zarr.json").write_text(json.dumps(meta))
    arr = zarr.open_array(tmp_path / "f", mode="r")
    assert float(arr.fill_value) == 1.0
    assert float(arr[0]) == 1.0


def test_tensorstore_reads_zarr_written(tmp_path):
    ts = pytest.importorskip("tensorstore")
    data = _special_values((8, 6), seed=2)
    arr = zarr.create_array(
        tmp_path / "z", shape=(10, 6), chunks=(2, 3), shards=(4, 6), dtype="bfloat16", fill_value=float("nan")
    )
    arr[:8] = data
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "z")}}).result()
    assert t.dtype == ts.bfloat16
    out = t.read().result()
    assert out.dtype == BF16
    np.testing.assert_array_equal(_bits(out[:8]), _bits(data))
    np.testing.assert_array_equal(_bits(out[8:]), np.full((2, 6), 0x7FC0, dtype=np.uint16))


def test_zarr_reads_tensorstore_written(tmp_path):
    ts = pytest.importorskip("tensorstore")
    data = _special_values((5, 4), seed=3)
    t = ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(tmp_path / "t")},
            "metadata": {
                "shape": [6, 4],
                "data_type": "bfloat16",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 4]}},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd"}],
                "fill_value": "Infinity",
            },
        },
        create=True,
    ).result()
    t[:5] = data
    assert _meta(tmp_path / "t")["data_type"] == "bfloat16"
    out = zarr.open_array(tmp_path / "t", mode="r")[:]
    assert out.dtype == BF16
    np.testing.assert_array_equal(_bits(out[:5]), _bits(data))
    np.testing.assert_array_equal(_bits(out[5]), np.full(4, 0x7F80, dtype=np.uint16))


def test_torch_bfloat16_to_numpy_is_bit_exact():
    bits = _bits(_special_values((7, 9), seed=4)).astype(np.int32)
    t = torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
    out = to_storage_numpy(t, "bfloat16")
    assert out.dtype == BF16
    np.testing.assert_array_equal(_bits(out), bits.astype(np.uint16))
    # non-contiguous input
    out_t = to_storage_numpy(t.T, "bfloat16")
    np.testing.assert_array_equal(_bits(out_t), bits.astype(np.uint16).T)


def test_torch_float32_to_bfloat16_rounds_like_ml_dtypes():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e3
    x[:4] = torch.tensor([float("inf"), float("-inf"), 3.4e38, -1e-40])
    out = to_storage_numpy(x, "bfloat16")
    np.testing.assert_array_equal(_bits(out), _bits(x.numpy().astype(BF16)))
    nan = to_storage_numpy(torch.tensor([float("nan")]), "bfloat16")
    assert np.isnan(nan.astype(np.float32)).all()


def test_torch_other_storage_dtypes():
    x = torch.tensor([1.0, 1e-8, 70000.0, float("nan"), float("-inf")], dtype=torch.float32)
    f16 = to_storage_numpy(x, "float16")
    assert f16.dtype == np.float16
    with np.errstate(over="ignore"):  # 70000 overflows to inf in float16 on both sides
        expected = x.numpy().astype(np.float16)
    np.testing.assert_array_equal(f16.view(np.uint16), expected.view(np.uint16))
    f32 = to_storage_numpy(x.to(torch.bfloat16), "float32")
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, x.to(torch.bfloat16).float().numpy())
    with pytest.raises(GdnDumpError):
        to_storage_numpy(x, "int8")


def test_torch_to_zarr_end_to_end(tmp_path):
    t = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    arr = zarr.create_array(tmp_path / "e", shape=(4, 8), chunks=(2, 8), dtype=bf.zarr_dtype("bfloat16"))
    arr[:] = to_storage_numpy(t, "bfloat16")
    back = zarr.open_array(tmp_path / "e", mode="r")[:]
    np.testing.assert_array_equal(_bits(back), t.view(torch.int16).numpy().view(np.uint16))


# ---- how zarr finds the data type: entry points, not an import-time side effect ----------------

def test_importing_gdn_dump_registers_nothing():
    code = ("import gdn_dump, gdn_dump.store.bfloat16, gdn_dump.read.reader\n"
            "from zarr.core.dtype import data_type_registry\n"
            "assert 'bfloat16' not in data_type_registry.contents, data_type_registry.contents['bfloat16']\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_entry_points_name_the_data_type_and_zarrs_own_buffer():
    from importlib.metadata import entry_points

    from zarr.core.buffer.cpu import Buffer

    (dtype,) = [e for e in entry_points(group="zarr.data_type") if e.value.startswith("gdn_dump.")]
    assert dtype.value == "gdn_dump.store.bfloat16:ZARR_BFLOAT16"
    assert dtype.load() is bf.BFloat16 and dtype.load()._zarr_v3_name == "bfloat16"
    (buffer,) = [e for e in entry_points(group="zarr.buffer") if e.value.startswith("gdn_dump.")]
    assert buffer.load() is Buffer  # zarr registers it again under the name it has: no change
    from zarr.core.dtype import data_type_registry

    assert data_type_registry.contents["bfloat16"] is bf.BFloat16  # loading it registered bfloat16


def test_zarr_opens_bfloat16_groups_in_a_process_that_never_imports_gdn_dump(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    data = _special_values((6, 3), seed=4)
    group.create_array("x", shape=data.shape, chunks=(4, 3), dtype=bf.zarr_dtype("bfloat16"))[:] = data
    code = ("import sys, numpy as np, zarr\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'gdn_dump']\n"
            "x = zarr.open_group(sys.argv[1], mode='r')['x']\n"
            "assert x.dtype.name == 'bfloat16', x.dtype\n"
            "np.save(sys.argv[2], x[:].view(np.uint16))\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.zarr"), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), _bits(data))


class _ZarrsOwn(bf.BFloat16):
    """Stands in for a bfloat16 data type that zarr itself (or another package) registers."""


def test_a_bfloat16_zarr_already_has_is_kept_and_reads_either_way(tmp_path, monkeypatch):
    from zarr.core.dtype import data_type_registry

    data = _special_values((5, 4), seed=5)
    monkeypatch.setitem(data_type_registry.contents, "bfloat16", _ZarrsOwn)
    assert bf.ZARR_BFLOAT16 is _ZarrsOwn  # what the entry point then hands zarr: no conflict
    bf.register_bfloat16()
    assert data_type_registry.contents["bfloat16"] is _ZarrsOwn  # never replaced
    ours = zarr.create_array(tmp_path / "ours", shape=data.shape, dtype=bf.zarr_dtype("bfloat16"))
    ours[:] = data
    theirs = zarr.create_array(tmp_path / "theirs", shape=data.shape, dtype=_ZarrsOwn())
    theirs[:] = data
    assert _meta(tmp_path / "ours")["data_type"] == _meta(tmp_path / "theirs")["data_type"] == "bfloat16"
    for registered in (_ZarrsOwn, bf.BFloat16):  # read by zarr's own, then by gdn-dump's
        monkeypatch.setitem(data_type_registry.contents, "bfloat16", registered)
        for name in ("ours", "theirs"):
            back = zarr.open_array(tmp_path / name, mode="r")
            assert type(back.metadata.data_type) is registered
            np.testing.assert_array_equal(_bits(back[:]), _bits(data))
