"""verify: good stores pass every check; each kind of damage fails the check that is about it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from gdn_dump.store import verify
from gdn_dump.errors import StoreError
from gdn_dump.run.options import ExtractOptions
from gdn_dump.run.pipeline import extract
from gdn_dump.cli.render import verify_table
from gdn_dump.store.verify import Check, verify_store

from ..helpers import RAGGED_PROMPTS

NAMES = ["status", "ledger", "arrays", "layout", "rows written", "finite", "provenance"]
Q, BETA = "blocks.0.linear_attn.hook_q", "blocks.0.linear_attn.hook_beta"


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    """One store of each kind, built once; tests that damage a store work on a copy."""
    root = tmp_path_factory.mktemp("verify")
    ragged = root / "ragged.txt"
    ragged.write_text("\n".join(RAGGED_PROMPTS) + "\n", encoding="utf-8")
    even = root / "even.txt"  # lengths close enough for two processes to get a region each
    even.write_text("\n".join(f"prompt number {i} " + "ab " * (i + 3) for i in range(8)) + "\n")

    def run(name, prompts=ragged, **kw):
        kw = {"dtype": "float32", "hooks": "q,beta", "layers": "0", "chunk_tokens": 16, **kw}
        extract(ExtractOptions(model="tiny", prompts=str(prompts), out=str(root / name), **kw), model=tiny)
        return root / name

    out = {"plain": run("plain.zarr"),
           "attn": run("attn.zarr", hooks="beta", attn_layers="0,3"),
           "sharded": run("sharded.zarr", hooks="v,log_decay", dtype="bfloat16", shard_tokens=64)}
    for index in range(2):  # two processes: the second region starts after a gap of rows
        out["two_processes"] = run("two.zarr", prompts=even, shard=f"{index}/2", batch_size=2,
                                   sort_window_bytes=0, wait_timeout=5)
    return out


@pytest.fixture()
def copy_of(stores, tmp_path):
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(stores[kind], tmp_path / f"{kind}.zarr"))
    return copy


def _by_name(checks: list[Check]) -> dict[str, Check]:
    assert [c.name for c in checks] == NAMES
    return {c.name: c for c in checks}


def _failing(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if not c.ok}


def _chunk_files(path: Path, name: str) -> list[Path]:
    return sorted(p for p in (path / name / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["plain", "attn", "sharded", "two_processes"])
def test_good_store_passes_every_check(stores, kind):
    checks = _by_name(verify_store(stores[kind]))
    assert all(c.ok for c in checks.values()), checks
    assert "all finite" in checks["finite"].detail


def test_the_stores_are_what_the_tests_assume(stores):
    group = zarr.open_group(str(stores["two_processes"]), mode="r")
    regions = group.attrs["gdn_dump"]["processes"]["regions"]
    assert len(regions) == 2 and all(hi > lo for lo, hi in regions)
    assert group["prompt_length"][:].sum() < group["tokens"].shape[0]  # there is a gap
    assert "gap rows" in _by_name(verify_store(stores["two_processes"]))["layout"].detail
    attn = zarr.open_group(str(stores["attn"]), mode="r")
    assert {"blocks.0.attn_matrix", "blocks.0.attn_residual", "blocks.3.attn_matrix"} <= set(attn.array_keys())
    assert "blocks.3.attn_residual" not in attn  # softmax layers have no residual
    assert zarr.open_group(str(stores["sharded"]), mode="r")["tokens"].shards == (64,)


def test_missing_rows_of_one_prompt_fail_rows_written(copy_of):
    path = copy_of("plain")
    group = zarr.open_group(str(path), mode="r")
    start, length, chunk = int(group["prompt_start"][2]), int(group["prompt_length"][2]), group[Q].chunks[0]
    indices = range(start // chunk, (start + length - 1) // chunk + 1)
    for i in indices:
        (path / Q / "c" / str(i) / "0" / "0").unlink()
    checks = _by_name(verify_store(path))
    assert _failing(checks.values()) == {"rows written"}
    detail = checks["rows written"].detail
    assert Q in detail and BETA not in detail and "tokens" not in detail
    assert f"{len(indices)} of " in detail and f"rows {indices[0] * chunk}-" in detail


def test_missing_first_chunk_of_the_second_region(copy_of):
    path = copy_of("two_processes")
    group = zarr.open_group(str(path), mode="r")
    lo, _ = group.attrs["gdn_dump"]["processes"]["regions"][1]
    first_row, chunk = int(group["prompt_start"][lo]), group["tokens"].chunks[0]
    assert first_row % chunk == 0 and first_row > group["prompt_start"][lo - 1] + group["prompt_length"][lo - 1]
    (path / "tokens" / "c" / str(first_row // chunk)).unlink()
    detail = _by_name(verify_store(path))["rows written"].detail
    assert detail.startswith("tokens: 1 of ")
    assert f"(first: rows {first_row}-{first_row + chunk - 1}, prompts {lo}-{lo})" in detail


def test_missing_shard_attention_tile_and_residual(copy_of):
    sharded = copy_of("sharded")
    _chunk_files(sharded, "blocks.0.linear_attn.hook_v")[-1].unlink()
    detail = _by_name(verify_store(sharded))["rows written"].detail
    assert "blocks.0.linear_attn.hook_v: 1 of " in detail and "log_decay" not in detail

    attn = copy_of("attn")
    (attn / "blocks.0.attn_matrix" / "c" / "2" / "1" / "0" / "0").unlink()  # prompt 2, head 1
    (attn / "blocks.0.attn_residual" / "c" / "0").unlink()
    checks = _by_name(verify_store(attn))
    assert _failing(checks.values()) == {"rows written"}
    detail = checks["rows written"].detail
    assert "blocks.0.attn_matrix: 1 of " in detail and "prompt 2, head 1, tile 0" in detail
    assert "blocks.0.attn_residual: 1 of 1 chunks missing" in detail
    assert "blocks.3.attn_matrix" not in detail


def test_unfinished_region_fails_status_and_ledger(copy_of):
    path = copy_of("plain")
    record_file = path / "_progress" / "region-00000" / "zarr.json"
    record = json.loads(record_file.read_text())
    record["attributes"].update(done=False, resume_from=3)
    record_file.write_text(json.dumps(record))
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["gdn_dump"]["status"] = "in_progress"
    (path / "zarr.json").write_text(json.dumps(root))
    checks = _by_name(verify_store(path))
    assert _failing(checks.values()) == {"status", "ledger"}
    assert "'in_progress'" in checks["status"].detail
    assert "region 0 (prompts 0-5) not done, resume from prompt 3" in checks["ledger"].detail


def test_nan_fails_finite_unless_allowed(copy_of, monkeypatch):
    path = copy_of("plain")
    group = zarr.open_group(str(path), mode="r+")
    group[Q][5, 1, 3] = np.nan
    group[Q][40, 0, 0] = np.inf
    group[BETA][7, 2] = -np.inf
    checks = _by_name(verify_store(path))
    assert _failing(checks.values()) == {"finite"}
    detail = checks["finite"].detail
    assert f"{Q}: 2 non-finite (first at [5, 1, 3])" in detail and f"{BETA}: 1 non-finite" in detail
    allowed = _by_name(verify_store(path, allow_nonfinite=True))["finite"]
    assert allowed.ok and "allowed" in allowed.detail and f"{Q}: 2 non-finite" in allowed.detail
    monkeypatch.setattr(verify, "BLOCK_ELEMENTS", 64)  # many small blocks: same counts
    assert _by_name(verify_store(path))["finite"].detail == detail


def test_nan_in_bfloat16_is_found(copy_of):
    path = copy_of("sharded")
    zarr.open_group(str(path), mode="r+")["blocks.0.linear_attn.hook_v"][3, 0, 0] = np.nan
    detail = _by_name(verify_store(path))["finite"].detail
    assert "blocks.0.linear_attn.hook_v: 1 non-finite (first at [3, 0, 0])" in detail


def test_wrong_dtype_missing_array_and_extra_array_fail(copy_of):
    path = copy_of("plain")
    group = zarr.open_group(str(path), mode="r+")
    old = group[BETA]
    new = group.create_array(BETA, shape=old.shape, chunks=old.chunks, dtype="float16",
                             dimension_names=["token", "v_head"], overwrite=True)
    new[:] = 0
    shutil.rmtree(path / Q)
    group.create_array("blocks.0.linear_attn.hook_k", shape=(4,), dtype="float32", dimension_names=["token"])
    checks = _by_name(verify_store(path))
    assert {"arrays", "provenance"} <= _failing(checks.values())
    detail = checks["arrays"].detail
    assert f"{Q}: missing" in detail and f"{BETA}: dtype float16, expected float32" in detail
    assert "blocks.0.linear_attn.hook_k" in checks["provenance"].detail


def test_wrong_shape_or_dimension_names_fail_arrays(copy_of):
    path = copy_of("plain")
    group = zarr.open_group(str(path), mode="r+")
    old = group[Q]
    group.create_array(Q, shape=(old.shape[0], 2, 8), chunks=old.chunks[:1] + (2, 8), dtype="float32",
                       dimension_names=["token", "k_head", "d_k"], overwrite=True)
    group.create_array(BETA, shape=group[BETA].shape, dtype="float32", overwrite=True)
    detail = _by_name(verify_store(path))["arrays"].detail
    assert f"{Q}: shape ({old.shape[0]}, 2, 8), expected ({old.shape[0]}, 2, 16)" in detail
    assert f"{BETA}: dimension_names None" in detail


def test_overlapping_prompts_fail_layout(copy_of):
    path = copy_of("plain")
    group = zarr.open_group(str(path), mode="r+")
    group["prompt_start"][3] = int(group["prompt_start"][2])
    checks = _by_name(verify_store(path))
    assert _failing(checks.values()) == {"layout", "rows written"}
    assert "1 prompt(s) with rows before the previous prompt's end (first: prompt 3)" in checks["layout"].detail
    assert "not checked" in checks["rows written"].detail


def test_verify_does_not_modify_the_store(copy_of):
    path = copy_of("attn")
    (path / "blocks.0.attn_residual" / "c" / "0").unlink()  # a failing store too

    def snapshot():  # every path (directories too), with the mtime and bytes of the files
        return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in path.rglob("*")}

    before = snapshot()
    verify_store(path)
    verify_store(path, allow_nonfinite=True)
    assert snapshot() == before


def test_any_zarr_store_through_its_listing(stores):
    """A group on a non-local store (here in memory) is verified the same way, damage included."""
    from zarr.core.buffer import cpu

    path = stores["attn"]
    files = {p.relative_to(path).as_posix(): cpu.Buffer.from_bytes(p.read_bytes())
             for p in path.rglob("*") if p.is_file()}
    memory = zarr.storage.MemoryStore(files)
    assert all(c.ok for c in verify_store(zarr.open_group(memory, mode="r")))
    del files["blocks.0.attn_matrix/c/1/0/0/0"]
    checks = _by_name(verify_store(zarr.open_group(zarr.storage.MemoryStore(files), mode="r")))
    assert _failing(checks.values()) == {"rows written"}
    assert "prompt 1, head 0, tile 0" in checks["rows written"].detail


def test_render_and_not_a_store(stores, tmp_path):
    table = verify_table(verify_store(stores["plain"]))
    assert [c.header for c in table.columns] == ["check", "ok", "detail"] and table.row_count == 7
    with pytest.raises(StoreError):
        verify_store(tmp_path / "nothing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a gdn-dump store"):
        verify_store(tmp_path / "other.zarr")
