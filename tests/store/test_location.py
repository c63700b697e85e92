"""Where a store lives: a local directory or s3:// on a local moto server, asked the same things."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from gdn_dump.errors import StoreError
from gdn_dump.store.location import Location, locate

from ..s3server import s3_server, s3_url  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def any_url(request, tmp_path) -> str:
    """A fresh, empty place for a store: a local path, or a prefix on the local S3 server."""
    if request.param == "local":
        return str(tmp_path / "out" / "store.zarr")
    return request.getfixturevalue("s3_url")


def _put(loc: Location, key: str, data: bytes = b"x") -> None:
    """Write one file/object under ``loc`` without going through zarr."""
    if loc.is_local:
        (loc.path / key).parent.mkdir(parents=True, exist_ok=True)
        (loc.path / key).write_bytes(data)
    else:
        loc.fs.pipe_file(f"{loc.url}/{key}", data)


# --- locate -------------------------------------------------------------------------------------

def test_locate_local_forms(tmp_path):
    for out in (str(tmp_path / "a"), tmp_path / "a", f"file://{tmp_path}/a"):
        loc = locate(out)
        assert loc.is_local and loc.path == tmp_path / "a" and str(loc) == str(tmp_path / "a")
    assert locate("relative/dir").path == Path("relative/dir")


def test_locate_remote_keeps_url_and_options(s3_server):
    loc = locate("s3://bucket/some/prefix/", storage_options={"anon": False})
    assert not loc.is_local and loc.path is None
    assert str(loc) == loc.url == "s3://bucket/some/prefix/"
    assert loc.storage_options["anon"] is False
    assert loc.storage_options["use_listings_cache"] is False


def test_locate_refuses_bad_urls():
    with pytest.raises(StoreError, match="no bucket"):
        locate("s3://")
    with pytest.raises(StoreError, match="not supported"):
        locate("nosuchscheme://x/y")


def test_locate_s3_without_s3fs(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # find_spec sees it as not installed
    with pytest.raises(StoreError, match=r"needs the s3 extra: pip install 'gdn-dump\[s3\]'"):
        locate("s3://bucket/x")


# --- exists / is_file / remove / free_bytes -----------------------------------------------------

def test_exists_is_file_remove(any_url):
    loc = locate(any_url)
    assert not loc.exists() and not loc.is_file()
    loc.remove()  # nothing there: no error
    _put(loc, "zarr.json", b"{}")
    _put(loc, "a/c/0/0")
    assert loc.exists() and not loc.is_file()
    loc.remove()
    assert not loc.exists() and not locate(any_url).exists()


def test_empty_local_directory_is_nothing(tmp_path):
    assert not locate(tmp_path).exists()
    (tmp_path / "f").write_text("x")
    assert locate(tmp_path).exists() and locate(tmp_path / "f").is_file()
    locate(tmp_path / "f").remove()
    assert not (tmp_path / "f").exists()


def test_s3_object_at_the_prefix_is_a_file(s3_url, s3_server):
    s3_server.put(s3_url, b"not a store")
    loc = locate(s3_url)
    assert loc.is_file() and loc.exists()
    assert not locate(s3_url + "-other").exists()  # a sibling key that shares the prefix's text
    loc.remove()
    assert not loc.exists()


def test_s3_bucket_root(s3_server):
    url = s3_server.bucket()
    loc = locate(url)
    assert not loc.exists() and not loc.is_file()
    _put(loc, "zarr.json", b"{}")
    assert loc.exists()
    loc.remove()  # its objects, never the bucket itself
    assert not loc.exists()
    loc.check_writable()


def test_free_bytes(tmp_path):
    free = locate(tmp_path / "not" / "yet" / "there").free_bytes()  # of the nearest that exists
    assert isinstance(free, int) and free > 0


def test_free_bytes_unknown_remote(s3_url):
    assert locate(s3_url).free_bytes() is None


# --- check_writable -----------------------------------------------------------------------------

def test_check_writable_ok(any_url):
    loc = locate(any_url)
    loc.check_writable()
    assert not loc.exists()  # the probe leaves nothing behind


def test_check_writable_missing_bucket(s3_server):
    why = r"^--out s3://no-such-bucket-x/run: bucket 'no-such-bucket-x' does not exist$"
    with pytest.raises(StoreError, match=why):
        locate("s3://no-such-bucket-x/run").check_writable()


def test_check_writable_unreachable_endpoint(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StoreError, match=r"cannot reach the endpoint http://127\.0\.0\.1:9$"):
        locate("s3://bucket/x").check_writable()


def test_check_writable_no_credentials(s3_url, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match=f"^--out {s3_url}: no credentials"):
        locate(s3_url).check_writable()


@pytest.mark.parametrize("exc, why", [(PermissionError("Access Denied"), "access denied"),
                                      (RuntimeError("boom"), "RuntimeError: boom")])
def test_check_writable_other_refusals(s3_url, monkeypatch, exc, why):
    # moto lets every request through, so a refusal is made up at the filesystem.
    import s3fs

    def refuse(*args, **kwargs):
        raise exc

    monkeypatch.setattr(s3fs.S3FileSystem, "pipe_file", refuse)
    with pytest.raises(StoreError, match=f"^--out {s3_url}: {why}$"):
        locate(s3_url).check_writable()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_writable_read_only_parent(tmp_path):
    tmp_path.joinpath("ro").mkdir(mode=0o555)
    with pytest.raises(StoreError, match="is not writable"):
        locate(tmp_path / "ro" / "new" / "store.zarr").check_writable()


def test_check_writable_read_only_parent_as_seen(tmp_path, monkeypatch):
    # The same refusal where the permission bits alone cannot make it (root): os.access says no.
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real(p, mode))
    with pytest.raises(StoreError, match=rf"^--out {ro}/new/store.zarr: {ro} is not writable$"):
        locate(ro / "new" / "store.zarr").check_writable()
    locate(tmp_path / "elsewhere").check_writable()


def test_check_writable_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        locate(tmp_path / "f" / "store.zarr").check_writable()


# --- zarr ---------------------------------------------------------------------------------------

def test_zarr_round_trip(any_url):
    data = np.arange(60, dtype="float32").reshape(12, 5)
    group = zarr.open_group(store=locate(any_url).zarr_store(), mode="w", zarr_format=3)
    group.attrs["gdn_dump"] = {"status": "in_progress"}
    arr = group.create_array("x", shape=data.shape, chunks=(5, 5), dtype="float32",
                             dimension_names=["token", "d"], fill_value=0)
    arr[:] = data
    group.attrs["gdn_dump"] = {"status": "complete"}  # zarr.json rewritten in place

    back = zarr.open_group(store=locate(any_url).zarr_store(read_only=True), mode="r")
    assert back.attrs["gdn_dump"] == {"status": "complete"}
    assert back["x"].metadata.dimension_names == ("token", "d")
    np.testing.assert_array_equal(back["x"][:], data)
    assert sorted(back.array_keys()) == ["x"]
    with pytest.raises(ValueError, match="read-only"):
        back["x"][0, 0] = 1.0


def test_two_locations_see_each_others_writes(any_url):
    # The writer is a Location of its own, as another process would be; the reader has listed the
    # store before each change (what a cached listing would then keep answering).
    reader, writer = locate(any_url), locate(any_url)
    w_group = zarr.open_group(store=writer.zarr_store(), mode="w", zarr_format=3)
    w_group.create_array("a", shape=(3,), dtype="int64")[:] = [1, 2, 3]
    r_group = zarr.open_group(store=reader.zarr_store(read_only=True), mode="r")
    assert list(r_group.array_keys()) == ["a"] and reader.exists()

    w_group.create_array("b", shape=(2,), dtype="int64")[:] = [4, 5]
    w_group.attrs["n"] = 1
    assert sorted(r_group.array_keys()) == ["a", "b"]
    again = zarr.open_group(store=reader.zarr_store(read_only=True), mode="r")
    assert sorted(again.array_keys()) == ["a", "b"] and again.attrs["n"] == 1
    np.testing.assert_array_equal(again["b"][:], [4, 5])

    writer.remove()
    assert not reader.exists()
    assert list(r_group.array_keys()) == []


def test_s3_sees_writes_from_outside(s3_url, s3_server):
    # Another process changes the store with its own client; what this process listed before
    # must not hide that (fsspec shares one filesystem, with its listing cache, per option set).
    loc = locate(s3_url)
    group = zarr.open_group(store=loc.zarr_store(), mode="w", zarr_format=3)
    group.create_array("a", shape=(3,), dtype="int64")[:] = [1, 2, 3]
    assert list(group.array_keys()) == ["a"] and len(loc.fs.ls(s3_url)) == 2  # a/, zarr.json

    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = s3_server.client()
    meta = client.get_object(Bucket=bucket, Key=f"{prefix}/a/zarr.json")["Body"].read()
    client.put_object(Bucket=bucket, Key=f"{prefix}/b/zarr.json", Body=meta)
    assert sorted(group.array_keys()) == ["a", "b"] and len(loc.fs.ls(s3_url)) == 3
    assert sorted(zarr.open_group(store=locate(s3_url).zarr_store(), mode="r").array_keys()) \
        == ["a", "b"]

    client.delete_object(Bucket=bucket, Key=f"{prefix}/a/zarr.json")
    client.delete_object(Bucket=bucket, Key=f"{prefix}/a/c/0")
    assert list(group.array_keys()) == ["b"] and len(loc.fs.ls(s3_url)) == 2


# ---- durability: sync the store's file system, never every file system of the node -------------

def test_sync_flushes_the_file_system_of_the_store_only(tmp_path, monkeypatch):
    """syncfs(2) on the store's directory; os.sync() would flush every file system of a shared
    node (other users' scratch, NFS mounts) before each progress record."""
    import gdn_dump.store.location as location

    def whole_node():
        raise AssertionError("os.sync() flushes every file system of the node")

    monkeypatch.setattr(os, "sync", whole_node)
    assert location._libc_syncfs() is not None  # Linux: the C library has syncfs
    location.locate(tmp_path / "s.zarr").sync()  # the real syncfs, on the nearest existing directory


def test_an_extract_run_syncs_only_its_store(tiny, ragged_txt, tmp_path, monkeypatch):
    import gdn_dump.store.location as location
    from gdn_dump.run.options import ExtractOptions
    from gdn_dump.run.pipeline import extract

    synced = []

    def syncfs(fd):
        synced.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return 0

    def whole_node():
        raise AssertionError("os.sync() flushes every file system of the node")

    monkeypatch.setattr(os, "sync", whole_node)
    monkeypatch.setattr(location, "_libc_syncfs", lambda: syncfs)
    out = tmp_path / "s.zarr"
    extract(ExtractOptions(model="tiny", prompts=str(ragged_txt), out=str(out), hooks="beta",
                           batch_size=2, sort_window_bytes=0, checkpoint_every=0), model=tiny)
    assert len(synced) >= 3  # a record at every unit end, each made durable first
    assert set(synced) == {os.path.realpath(out)}


def test_sync_failure_is_an_os_error(tmp_path, monkeypatch):
    import ctypes
    import errno

    import gdn_dump.store.location as location

    def failing(fd):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(location, "_libc_syncfs", lambda: failing)
    with pytest.raises(OSError) as raised:
        location.locate(tmp_path).sync()
    assert raised.value.errno == errno.EIO
