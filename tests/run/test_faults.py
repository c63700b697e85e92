"""Faults and hostile inputs: a full disk mid-run, pickles, path-like prompt ids, --overwrite, --out.

A full disk is simulated at the writer's one store write (``gdn_dump.store.writer.store_write``): the
zarr-python writer raises the OSError itself, TensorStore reports it as a ValueError through the
write's future (the text below is what TensorStore 0.1 printed on a full tmpfs). The test at the
end fills a real tmpfs where this machine lets us mount one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gdn_dump.cli.app import app
from gdn_dump.errors import GdnDumpError, RunFailure, StoreError
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.store.layout import ArraySpec, format_bytes
from gdn_dump.store.create import check_out, checked_dtype
from gdn_dump.store.create import _create_array

from ..disk import fill_disk_at
from ..s3server import s3_server, s3_url  # noqa: F401

WRITERS = ["tensorstore", "zarr"]
# Small chunks and one batch per unit (file order), so the run has many chunk writes and, with
# checkpoint_every=0, a progress record at every unit boundary.
SMALL = dict(hooks="beta,v", chunk_tokens=32, batch_size=2, sort_window_bytes=0, checkpoint_every=0)


def _prompts(path, ids=None):
    words = ["alpha", "b", "gamma delta", "é", "zz", "the quick"]
    ids = ids or [f"doc-{i:02d}" for i in range(12)]
    rows = [{"id": pid, "text": " ".join(words[(i + j) % len(words)] for j in range(3 + 5 * i % 23))}
            for i, pid in enumerate(ids)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _extract(tiny, prompts, out, **kw):
    return extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(out), **{**SMALL, **kw}),
                   model=tiny)


def _meta(out) -> dict:
    return zarr.open_group(str(out), mode="r").attrs["gdn_dump"]


def assert_same_store(a_path, b_path) -> None:
    a, b = zarr.open_group(str(a_path), mode="r"), zarr.open_group(str(b_path), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:]), name
    for name in ("prompt_start", "prompt_length"):
        assert dict(a[name].attrs) == dict(b[name].attrs), name
    assert _meta(b_path)["status"] == "complete"


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    """The prompts and the store of a run without faults."""
    root = tmp_path_factory.mktemp("clean")
    prompts = _prompts(root / "p.jsonl")
    _extract(tiny, prompts, root / "clean.zarr", writer="zarr")
    return prompts, root / "clean.zarr"




def _assert_one_line_failure(message: str, what: str, written: int, out) -> None:
    """``what`` is a regular expression; the rest is matched literally."""
    assert re.fullmatch(rf"{what} failed: No space left on device "
                        rf"\({re.escape(format_bytes(written))} written\); {re.escape(str(out))} "
                        r"stays in_progress: free space and rerun with --resume", message), message


# --- 1. disk full during the run ---------------------------------------------------------------

@pytest.mark.parametrize("engine", WRITERS)
def test_disk_full_mid_run_is_one_line_and_resumes_to_the_clean_store(tiny, clean, tmp_path,
                                                                      monkeypatch, engine):
    prompts, reference = clean
    out = tmp_path / "s.zarr"
    written = fill_disk_at(monkeypatch, 9)
    with pytest.raises(RunFailure) as failed:
        _extract(tiny, prompts, out, writer=engine)
    assert failed.value.exit_code == 1
    _assert_one_line_failure(str(failed.value), r"writing blocks\.\d+\.linear_attn\.hook_\w+",
                             sum(written), out)
    assert len(written) == 8 and _meta(out)["status"] == "in_progress"

    monkeypatch.undo()  # space freed
    _extract(tiny, prompts, out, writer=engine, resume=True)
    assert_same_store(reference, out)


@pytest.mark.parametrize("engine", WRITERS)
@pytest.mark.parametrize("where", ["write_record", "sync"])
def test_disk_full_at_a_checkpoint_is_one_line_and_resumes(tiny, clean, tmp_path, monkeypatch,
                                                           engine, where):
    import gdn_dump.run.session as session
    import gdn_dump.store.location as location

    prompts, reference = clean
    out = tmp_path / "s.zarr"
    calls = []
    real = session.write_record if where == "write_record" else location.sync_filesystem

    def full(*args, **kwargs):
        calls.append(args)
        if len(calls) >= 3:  # the third checkpoint of the run
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    if where == "write_record":
        monkeypatch.setattr(session, "write_record", full)
    else:
        monkeypatch.setattr(location, "sync_filesystem", full)
    with pytest.raises(RunFailure) as failed:
        _extract(tiny, prompts, out, writer=engine)
    message = str(failed.value)
    assert "\n" not in message and message.startswith("recording progress failed: No space left")
    assert f"{out} stays in_progress: free space and rerun with --resume" in message
    assert _meta(out)["status"] == "in_progress"

    monkeypatch.undo()
    _extract(tiny, prompts, out, writer=engine, resume=True)
    assert_same_store(reference, out)


def test_disk_full_at_the_last_record_is_one_line(tiny, clean, tmp_path, monkeypatch):
    import gdn_dump.run.session as session

    prompts, reference = clean
    real = session.write_record

    def full_at_done(group, region, record):
        if record.get("done"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(group, region, record)

    monkeypatch.setattr(session, "write_record", full_at_done)
    out = tmp_path / "s.zarr"
    with pytest.raises(RunFailure, match="^recording progress failed: No space left on device"):
        _extract(tiny, prompts, out)
    assert _meta(out)["status"] == "in_progress"


def test_writer_failures_reports_a_write_made_outside_it(tmp_path):
    # What run_region needs around its last record (made on the main thread, not the writer's).
    from gdn_dump.store.writer import RowWriter

    group = zarr.open_group(str(tmp_path / "w.zarr"), mode="w", zarr_format=3)
    writer = RowWriter(group, [])
    writer.close()
    with pytest.raises(RunFailure, match=r"^recording progress failed: No space left on device "
                                         r"\(0 B written\); .*w\.zarr stays in_progress: free space"):
        with writer.failures("recording progress"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(KeyError):  # not an operating-system error: unchanged
        with writer.failures("recording progress"):
            raise KeyError("x")


def test_disk_full_while_creating_the_store(tiny, clean, tmp_path, monkeypatch):
    prompts, reference = clean
    real = zarr.Group.create_array

    def full(self, name, **kwargs):
        if name == "prompt_id":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", full)
    out = tmp_path / "s.zarr"
    with pytest.raises(RunFailure, match=r"^creating the store .* failed: No space left on device; "
                                         r"nothing was extracted yet: free space and rerun with "
                                         r"--resume$"):
        _extract(tiny, prompts, out)
    monkeypatch.undo()
    _extract(tiny, prompts, out, resume=True)  # never marked ready: created again
    assert_same_store(reference, out)


def test_disk_full_through_the_cli_is_one_line_exit_1(clean, tmp_path, monkeypatch):
    prompts, _ = clean
    out = tmp_path / "s.zarr"
    fill_disk_at(monkeypatch, 5)
    result = CliRunner().invoke(app, ["extract", "-m", "tiny", "-p", str(prompts), "-o", str(out),
                                      "--hooks", "beta,v", "-q", "--chunk-tokens", "32"])
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr and result.stdout == ""
    assert re.fullmatch(r"gdn-dump: error: writing blocks\.\S+ failed: No space left on device "
                        rf"\(\S+ \S+ written\); {re.escape(str(out))} stays in_progress: free "
                        r"space and rerun with --resume", line), line
    assert _meta(out)["status"] == "in_progress"


# --- 2. nothing in a store is pickled ----------------------------------------------------------

def test_object_dtype_is_refused_naming_the_array(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    spec = ArraySpec("blocks.0.sneaky", (4, 2), "object", (4, 2), ("token", "c"))
    with pytest.raises(GdnDumpError, match=r"array 'blocks\.0\.sneaky': .* pickled Python objects"):
        _create_array(group, spec, None)
    assert "blocks.0.sneaky" not in group
    for bad in (object, "O", np.dtype(object)):
        with pytest.raises(StoreError, match="'ids'"):
            checked_dtype("ids", bad)
    for good in ("float32", "int64", str):
        assert checked_dtype("ok", good) == good


def test_a_store_holds_no_pickle(tiny, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "s.zarr"
    _extract(tiny, prompts, out, hooks="beta,v,q", dtype="bfloat16", compressor="zstd",
             shard_tokens=64, attn_layers="0")
    allowed_codecs = {"bytes", "vlen-utf8", "zstd", "blosc", "sharding_indexed", "crc32c", "transpose"}
    allowed_types = {"int32", "int64", "float16", "float32", "float64", "bfloat16", "string"}
    metas = list(out.rglob("zarr.json"))
    assert len(metas) > 5
    for path in metas:
        meta = json.loads(path.read_text())
        if meta["node_type"] != "array":
            continue
        assert "pickle" not in json.dumps(meta["codecs"]).lower(), path
        assert meta["data_type"] in allowed_types, (path, meta["data_type"])
        assert set(_codec_names(meta["codecs"])) <= allowed_codecs, path


def _codec_names(codecs):
    for codec in codecs:
        yield codec["name"]
        config = codec.get("configuration") or {}
        yield from _codec_names(config.get("codecs", []))
        yield from _codec_names(config.get("index_codecs", []))


# --- 3. prompt ids are data, never paths -------------------------------------------------------

def test_path_like_prompt_ids_are_only_data(tiny, tmp_path):
    ids = ["../evil", "a/b", "/etc/x", "..\\y", "../../../tmp/gdn-dump-evil", "c:\\z", ".", ""]
    hostile = _prompts(tmp_path / "hostile.jsonl", ids)
    plain = _prompts(tmp_path / "plain.jsonl", [f"p{i}" for i in range(len(ids))])
    before = set(tmp_path.rglob("*"))
    _extract(tiny, hostile, tmp_path / "hostile.zarr")
    _extract(tiny, plain, tmp_path / "plain.zarr")
    group = zarr.open_group(str(tmp_path / "hostile.zarr"), mode="r")
    assert list(group["prompt_id"][:]) == ids
    outside = {p for p in set(tmp_path.rglob("*")) - before
               if not {"hostile.zarr", "plain.zarr"} & set(p.relative_to(tmp_path).parts)}
    assert outside == set()  # nothing new but the two stores
    # The same files as a store of harmless ids: nothing inside is named after an id.
    tree = {root: sorted(str(p.relative_to(tmp_path / root)) for p in (tmp_path / root).rglob("*"))
            for root in ("hostile.zarr", "plain.zarr")}
    assert tree["hostile.zarr"] == tree["plain.zarr"]
    assert not (tmp_path.parent / "evil").exists() and not os.path.exists("/tmp/gdn-dump-evil")


# --- 4. --overwrite replaces only a gdn-dump store ---------------------------------------------

def test_overwrite_refuses_a_directory_that_is_not_a_store(tiny, clean, tmp_path):
    prompts, _ = clean
    out = tmp_path / "data"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match=r"exists and is not a gdn-dump store; --overwrite replaces "
                                         r"only a gdn-dump store") as refused:
        _extract(tiny, prompts, out, overwrite=True)
    assert refused.value.exit_code == 2
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_foreign_zarr_group(tmp_path):
    out = tmp_path / "other.zarr"
    zarr.open_group(str(out), mode="w", zarr_format=3, attributes={"someone": "else"})
    with pytest.raises(StoreError, match="is not a gdn-dump store"):
        check_out(out, overwrite=True)
    assert (out / "zarr.json").exists()


def test_overwrite_replaces_a_gdn_dump_store(tiny, clean, tmp_path):
    prompts, reference = clean
    out = tmp_path / "s.zarr"
    _extract(tiny, _prompts(tmp_path / "other.jsonl", ["only"]), out)
    _extract(tiny, prompts, out, overwrite=True)
    assert_same_store(reference, out)


def test_overwrite_replaces_a_store_left_in_progress(tiny, clean, tmp_path):
    prompts, reference = clean
    out = tmp_path / "s.zarr"
    (out / "blocks.0.linear_attn.hook_v" / "c").mkdir(parents=True)
    (out / "blocks.0.linear_attn.hook_v" / "c" / "0").write_bytes(b"half a chunk")
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                               "attributes": {"gdn_dump": {"status": "in_progress"}}}))
    _extract(tiny, prompts, out, overwrite=True)
    assert_same_store(reference, out)


def test_an_empty_directory_is_used_as_it_is(tiny, clean, tmp_path):
    prompts, reference = clean
    out = tmp_path / "mnt"
    out.mkdir()
    inode = out.stat().st_ino
    _extract(tiny, prompts, out)  # no --overwrite needed, and the directory itself stays
    assert out.stat().st_ino == inode
    assert_same_store(reference, out)


def test_overwrite_on_s3_replaces_only_a_gdn_dump_store(s3_url):
    from gdn_dump.store.location import locate

    loc = locate(s3_url)
    loc.fs.pipe_file(f"{s3_url}/notes.txt", b"keep me")
    with pytest.raises(StoreError, match="is not a gdn-dump store"):
        check_out(s3_url, overwrite=True)
    assert loc.fs.cat_file(f"{s3_url}/notes.txt") == b"keep me"
    loc.fs.rm_file(f"{s3_url}/notes.txt")
    loc.fs.pipe_file(f"{s3_url}/zarr.json", json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"gdn_dump": {}}}).encode())
    check_out(s3_url, overwrite=True)  # ours: may be replaced


# --- 5. --out is an existing file --------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_is_an_existing_file_exit_2_untouched(clean, tmp_path, overwrite):
    prompts, _ = clean
    out = tmp_path / "results.csv"
    out.write_text("a,b\n1,2\n")
    result = CliRunner().invoke(app, ["extract", "-m", "tiny", "-p", str(prompts), "-o", str(out),
                                      "--hooks", "beta", "-q", *overwrite])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"gdn-dump: error: --out {out} is an existing file, not a "
                                     "store; choose another path")
    assert out.read_text() == "a,b\n1,2\n"


# --- a real full disk (a tmpfs), where this machine lets us mount one --------------------------

@pytest.fixture()
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def resize(kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("engine", WRITERS)
def test_a_real_full_disk(tiny, clean, small_tmpfs, engine):
    prompts, reference = clean
    mnt, resize = small_tmpfs
    pages = sum(-(-p.stat().st_size // 4096) for p in reference.rglob("*") if p.is_file())
    resize(pages * 4 // 2)  # room for the metadata and about half the chunks
    out = mnt / "s.zarr"
    with pytest.raises(RunFailure, match=rf"failed: No space left on device \(.* written\); "
                                         rf"{re.escape(str(out))} stays in_progress"):
        _extract(tiny, prompts, out, writer=engine, force=True)
    resize(pages * 4 * 2)  # space freed
    _extract(tiny, prompts, out, writer=engine, resume=True)
    assert_same_store(reference, out)
