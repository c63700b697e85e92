"""extract into s3:// (a local moto server on 127.0.0.1): the same store, the same guarantees."""

from __future__ import annotations


import numpy as np
import zarr

from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.store.create import open_group

from ..s3server import s3_server, s3_url  # noqa: F401


def _extract(tiny, prompts, out, **kw):
    kw = {"hooks": "q,v,beta,log_decay", "attn_layers": "0", **kw}
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), dtype="float32",
                                  **kw), model=tiny)


def test_extract_to_s3_reads_back_equal_to_a_local_store(tiny, ragged_txt, tmp_path, s3_url):
    _extract(tiny, ragged_txt, tmp_path / "local.zarr")
    result = _extract(tiny, ragged_txt, s3_url)
    assert result.status == "complete"
    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    remote = open_group(s3_url)
    assert remote.attrs["gdn_dump"]["status"] == "complete"
    assert remote.attrs["gdn_dump"]["writer"] == "zarr"  # TensorStore writes local files only
    assert sorted(local.array_keys()) == sorted(remote.array_keys())
    from typer.testing import CliRunner

    from gdn_dump.cli.app import app

    checked = CliRunner().invoke(app, ["verify", s3_url])
    assert checked.exit_code == 0, checked.output
    for name in local.array_keys():
        if name == "prompt_id":
            assert list(local[name][:]) == list(remote[name][:])
        else:
            np.testing.assert_array_equal(local[name][:], remote[name][:], err_msg=name)


def test_existing_s3_store_is_refused_without_overwrite(tiny, ragged_txt, s3_url):
    import pytest

    from gdn_dump.errors import StoreError

    _extract(tiny, ragged_txt, s3_url)
    with pytest.raises(StoreError, match="already exists"):
        _extract(tiny, ragged_txt, s3_url)
    _extract(tiny, ragged_txt, s3_url, overwrite=True)


def test_killed_s3_run_resumes_to_the_same_store(tiny, ragged_txt, s3_url, tmp_path, monkeypatch):
    """Killed after its second progress record (each one object), resumed: the uninterrupted
    store. (Real SIGKILLs: tests/run/test_distributed.py.)"""
    import pytest

    from gdn_dump.store.verify import verify_store

    from ..helpers import Killed, kill_at

    run = dict(hooks="q,beta", checkpoint_every=0, sort_window_bytes=2048)
    _extract(tiny, ragged_txt, tmp_path / "ref.zarr", **run)
    kill_at(monkeypatch, "after-checkpoint:2")
    with pytest.raises(Killed):
        _extract(tiny, ragged_txt, s3_url, **run)
    monkeypatch.undo()
    assert open_group(s3_url).attrs["gdn_dump"]["status"] == "in_progress"
    _extract(tiny, ragged_txt, s3_url, resume=True, **run)
    ref, got = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"), open_group(s3_url)
    assert got.attrs["gdn_dump"]["status"] == "complete"
    for name in ("tokens", "blocks.0.linear_attn.hook_q", "blocks.2.linear_attn.hook_beta"):
        np.testing.assert_array_equal(ref[name][:], got[name][:], err_msg=name)
    assert all(check.ok for check in verify_store(s3_url)), verify_store(s3_url)


def test_s3_sessions_are_closed_when_the_store_is_done(s3_url):
    """Every s3 filesystem gdn-dump opens closes its aiohttp session: no "Unclosed client
    session" at exit (s3fs closes the sessions of its synchronous filesystems itself, not of the
    asynchronous ones zarr's FsspecStore uses)."""
    import subprocess
    import sys

    script = f"""
import zarr
import gdn_dump
from gdn_dump.store.location import locate
group = zarr.open_group(store=locate({s3_url!r}).zarr_store(), mode="w", zarr_format=3,
                        attributes={{"gdn_dump": {{"status": "complete"}}}})
group.create_array("a", shape=(4,), dtype="int32")[:] = 1
from gdn_dump.store.create import open_group
assert open_group({s3_url!r})["a"][:].sum() == 4
locate({s3_url!r}).check_writable()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Unclosed" not in done.stderr, done.stderr
