"""The Zarr v3 store of a run: check the place, create it from a plan, open it, its status.

The layout (:mod:`gdn_dump.store.layout`) is the store contract of DESIGN.md section 4; rows are
written by :mod:`gdn_dump.store.writer`, progress is kept by :mod:`gdn_dump.store.ledger`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from ..dtypes import INDEX_DTYPE
from ..errors import RunFailure, StoreError
from .bfloat16 import zarr_dtype
from .layout import INDEX_ARRAYS, ArraySpec, Plan, format_bytes, index_chunks
from .states import STATE_INDEX_ARRAYS, STATE_POSITION
from .location import Location, locate

ATTR = "gdn_dump"
IN_PROGRESS = "in_progress"
COMPLETE = "complete"
FAILED = "failed"
COMPRESSORS = ("none", "zstd", "blosc")
_TS_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")


def compressors_for(name: str):
    if name == "none":
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=1)]
    if name == "blosc":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    raise StoreError(f"--compressor must be one of {', '.join(COMPRESSORS)}, not {name!r}")


def check_out(out: str | Path | Location, *, overwrite: bool) -> Location:
    """Refuse an existing ``--out`` unless ``--overwrite``; refuse a file or an unwritable place.

    ``--overwrite`` replaces only a gdn-dump store (or nothing: an empty directory): a typo in
    ``--out`` must not delete someone's data.
    """
    loc = out if isinstance(out, Location) else locate(out)
    if loc.is_file():
        raise StoreError(f"--out {out} is an existing file, not a store; choose another path")
    if loc.exists():
        if not overwrite:
            raise StoreError(f"--out {out} already exists; pass --overwrite to replace it")
        if not is_gdn_dump_store(loc):
            raise StoreError(f"--out {out} exists and is not a gdn-dump store; --overwrite replaces "
                             "only a gdn-dump store: choose another path or remove it yourself")
    loc.check_writable()
    return loc


def is_gdn_dump_store(loc: Location) -> bool:
    """Whether ``loc`` holds a store made by gdn-dump: a Zarr group whose attributes have ours.

    A store left ``in_progress`` (killed, disk full) counts: its group is written with the
    attribute from the start (see :func:`create_store`).
    """
    raw = loc.read("zarr.json")
    if raw is None:
        return False
    try:
        meta = json.loads(raw)
    except ValueError:
        return False
    return isinstance(meta, dict) and ATTR in (meta.get("attributes") or {})


def create_store(out: str | Path | Location, plan: Plan, provenance: dict, *,
                 overwrite: bool = False, compressor: str = "none",
                 prompt_ids: Iterable[str] = ()) -> zarr.Group:
    """Create every array of ``plan`` and the prompt index; the store says ``in_progress``.

    ``out``: a path or URL, checked here with :func:`check_out`, or the :class:`Location` that
    ``check_out`` returned (the place was checked once, when the run decided to create it).
    """
    loc = out if isinstance(out, Location) else check_out(out, overwrite=overwrite)
    compressors = compressors_for(compressor)
    if loc.exists():  # an empty directory stays (it may be a mount point)
        loc.remove()  # a bulk delete (zarr's own mode="w" clear deletes object by object on S3)
    try:
        return _create(loc, plan, provenance, compressors, prompt_ids)
    except OSError as exc:  # the disk filled up (or went away) while creating
        # Never marked ready, so --resume (or --overwrite) creates it again from scratch.
        raise RunFailure(f"creating the store {out} failed: {exc.strerror or exc}; nothing was "
                         f"extracted yet: {remedy(exc)} and rerun with --resume") from exc


def _create(loc: Location, plan: Plan, provenance: dict, compressors, prompt_ids) -> zarr.Group:
    # The attribute is in the group's first zarr.json: a store killed at any point after this is
    # recognisably ours, so --overwrite and --resume may replace it.
    group = zarr.open_group(store=loc.zarr_store(), mode="w", zarr_format=3,
                            attributes={ATTR: {**provenance, "status": IN_PROGRESS}})
    for spec in plan.arrays:
        _create_array(group, spec, compressors)
    n, chunk = plan.n_prompts, index_chunks(plan.n_prompts)
    index = {"prompt_start": plan.prompt_starts, "prompt_length": plan.prompt_lengths}
    if plan.states is not None:
        index.update(state_start=plan.states.starts, state_count=plan.states.counts)
    for name, values in index.items():
        arr = group.create_array(name, shape=(n,), chunks=(chunk,),
                                 dtype=checked_dtype(name, {**INDEX_ARRAYS, **STATE_INDEX_ARRAYS}[name]),
                                 dimension_names=["prompt"], compressors=compressors,
                                 config={"write_empty_chunks": True})
        arr[:] = values
    if plan.states is not None:
        _create_state_positions(group, plan, compressors)
    # Ids are data (vlen-utf8 strings), never paths: nothing is named after them.
    ids = group.create_array("prompt_id", shape=(n,), chunks=(chunk,),
                             dtype=checked_dtype("prompt_id", str),
                             dimension_names=["prompt"], config={"write_empty_chunks": True})
    _write_streamed(ids, prompt_ids, chunk)
    return group


def _create_state_positions(group: zarr.Group, plan: Plan, compressors) -> None:
    """``state_position`` [n_states]: known from the lengths and the stride alone, so written here,
    a block of prompts at a time (memory bounded by the block, not by the store); -1 on gap rows."""
    states = plan.states
    chunk = index_chunks(states.n_states)
    arr = group.create_array(STATE_POSITION, shape=(states.n_states,), chunks=(chunk,),
                             dtype=checked_dtype(STATE_POSITION, INDEX_DTYPE),
                             dimension_names=["state"], compressors=compressors, fill_value=-1,
                             config={"write_empty_chunks": True})
    for lo, hi in plan.regions:
        for first in range(lo, hi, chunk):
            last = min(first + chunk, hi)
            row, stop = states.rows(first, last)
            if stop > row:
                arr[row:stop] = states.positions(plan.prompt_lengths, first, last)


def _create_array(group: zarr.Group, spec: ArraySpec, compressors) -> zarr.Array:
    dtype = zarr_dtype(checked_dtype(spec.name, spec.dtype))
    hook_attrs = {"hook": spec.hook.name, "layer": spec.hook.layer,
                  "layer_type": spec.hook.layer_type} if spec.hook else {}
    return group.create_array(
        spec.name, shape=spec.shape, chunks=spec.chunks, shards=spec.shards, dtype=dtype,
        dimension_names=list(spec.dims), compressors=compressors, fill_value=0,
        attributes={**hook_attrs, **spec.attrs},
        # Every written chunk exists as an object, even if all zeros: `verify` checks that the chunks
        # of every prompt's rows are there.
        config={"write_empty_chunks": True},
    )


def checked_dtype(name: str, dtype):
    """``dtype``, unless it is numpy's object dtype: refused, so nothing in a store is pickled.

    Object arrays need a pickle-like codec to be stored (zarr 2's ``pickle``, numcodecs' object
    codecs), and reading one back runs arbitrary code. Strings are stored as ``vlen-utf8``.
    """
    try:
        kind = np.dtype(dtype).kind
    except TypeError:  # a zarr data type instance (bfloat16): never an object dtype
        return dtype
    if kind == "O":
        raise StoreError(f"array {name!r}: dtype {dtype!r} would store pickled Python objects; "
                         "a gdn-dump store holds only numbers and strings")
    return dtype


def _write_streamed(arr: zarr.Array, values: Iterable[str], chunk: int) -> None:
    buf: list[str] = []
    start = 0
    for value in values:
        buf.append(value)
        if len(buf) == chunk:
            arr[start:start + chunk] = np.array(buf, dtype=object)
            start += chunk
            buf = []
    if buf:
        arr[start:start + len(buf)] = np.array(buf, dtype=object)


def os_error(exc: BaseException | None) -> OSError | None:
    """The operating-system error behind ``exc``, if there is one.

    zarr-python raises the OSError itself; TensorStore raises a ValueError whose text ends with
    the errno, e.g. ``RESOURCE_EXHAUSTED: Error writing local file ...: No space left on device
    [os_error_code='28']``.
    """
    if isinstance(exc, OSError):
        return exc
    match = _TS_ERRNO.search(str(exc)) if isinstance(exc, ValueError) else None
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def remedy(exc: OSError) -> str:
    """What to do before rerunning."""
    return "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"


def write_failure(what: str, exc: OSError, written: int, store: str) -> RunFailure:
    """The one-line failure of a write part-way through a run (the store stays resumable)."""
    return RunFailure(f"{what} failed: {exc.strerror or exc} ({format_bytes(written)} written); "
                      f"{store} stays {IN_PROGRESS}: {remedy(exc)} and rerun with --resume")


def set_status(group: zarr.Group, status: str, **extra: Any) -> None:
    meta = dict(group.attrs[ATTR])
    meta.update(extra, status=status)
    group.attrs[ATTR] = meta


def open_group(path: str | Path | Location, mode: str = "r") -> zarr.Group:
    """Open a gdn-dump store (a local directory or a URL such as ``s3://bucket/prefix``)."""
    loc = path if isinstance(path, Location) else locate(path)
    if not loc.has_group():
        raise StoreError(f"{path}: no such store")
    try:
        group = zarr.open_group(store=loc.zarr_store(read_only=mode == "r"), mode=mode)
    except Exception as exc:
        raise StoreError(f"{path} is not a Zarr v3 store ({exc})") from exc
    if ATTR not in group.attrs:
        raise StoreError(f"{path} is a Zarr group but not a gdn-dump store (no '{ATTR}' attribute)")
    return group


def store_summary(group: zarr.Group) -> list[dict]:
    """Name, shape, dtype, chunks and bytes on disk of every array of the store."""
    rows = []
    for name, arr in sorted(group.arrays()):
        rows.append({
            "name": name,
            "shape": tuple(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": tuple(arr.chunks),
            "dims": tuple(arr.metadata.dimension_names or ()),
            "stored_bytes": arr.nbytes_stored(),
        })
    return rows
