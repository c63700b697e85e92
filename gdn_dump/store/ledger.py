"""The progress ledger kept in the store: readiness and one record per region.

Layout: the group ``_progress`` (its attributes: the run's fingerprint, the regions, ``ready``)
and one child group per region, ``_progress/region-00003``, whose attributes are that region's
record. Each process writes only its own record (one small ``zarr.json``, replaced atomically), so
processes never write the same object; the creator alone writes ``_progress`` and the status.

A record says from which prompt the region must be recomputed (``resume_from``): everything
before it is on disk. Records are written at unit boundaries after the writer has flushed, so
resuming there recomputes whole units with the same batches and gives bit-identical rows. A record
also carries what its rows took (:class:`gdn_dump.store.tally.Tally`) and their statistics, so
resuming continues the counts. :mod:`gdn_dump.store.finalize` reads all records at the end.
"""

from __future__ import annotations

import socket
import time

import zarr

from ..errors import RunFailure, StoreError
from .provenance import now_iso

PROGRESS = "_progress"


def region_path(region: int) -> str:
    return f"{PROGRESS}/region-{region:05d}"


def mark_ready(group: zarr.Group, fingerprint: dict, regions: list, run_id: str | None) -> None:
    """Written last by the creator: the arrays exist, the other processes may start."""
    progress = group.require_group(PROGRESS)
    progress.attrs.put({"ready": True, "fingerprint": fingerprint, "regions": [list(r) for r in regions],
                        "run_id": run_id, "created": now_iso()})


def ready_info(group: zarr.Group) -> dict | None:
    try:
        attrs = dict(group[PROGRESS].attrs)
    except KeyError:
        return None
    return attrs if attrs.get("ready") else None


def differences(stored: dict, current: dict) -> list[str]:
    """``key: stored -> current`` for every key that differs (the refusal lists them)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if _jsonable(a) != _jsonable(b):
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_record(group: zarr.Group, region: int) -> dict | None:
    try:
        return dict(group[region_path(region)].attrs)
    except KeyError:
        return None


def write_record(group: zarr.Group, region: int, record: dict) -> None:
    node = zarr.open_group(store=group.store, path=region_path(region), mode="a")
    node.attrs.put({**record, "region": region, "host": socket.gethostname(), "updated": now_iso()})


def wait_ready(open_group, fingerprint: dict, run_id: str | None, timeout_s: float,
               resume: bool, poll_s: float = 0.5) -> zarr.Group:
    """For a process that does not create the store: wait until the creator has marked it ready.

    ``open_group()`` opens the store or raises (it may not exist yet). A store made by a
    different run (another fingerprint, or another launch id) is an error, not something to join.
    """
    deadline = time.monotonic() + timeout_s
    last = "the store does not exist yet"
    while True:
        try:
            group = open_group()
            info = ready_info(group)
        except (StoreError, FileNotFoundError, KeyError) as exc:
            info, last = None, str(exc) or last
        if info is not None:
            diff = differences(info.get("fingerprint", {}), fingerprint)
            if diff:
                raise StoreError(f"the store was created for a different run: {'; '.join(diff[:6])}")
            stored_id = info.get("run_id")
            if resume or run_id is None or stored_id is None or stored_id == run_id:
                return group
            last = f"it belongs to launch {stored_id}, this is {run_id}"
        if time.monotonic() > deadline:
            raise RunFailure(f"gave up after {timeout_s:.0f} s waiting for process 0 to create the "
                             f"store ({last}); is shard 0 running? (--wait-timeout)")
        time.sleep(poll_s)


def region_status(group: zarr.Group) -> tuple[list[dict | None], list[int]]:
    """All region records, and the regions not yet done."""
    info = ready_info(group)
    if info is None:
        raise StoreError("the store was never marked ready: process 0 did not finish creating it")
    regions = info["regions"]
    records = [read_record(group, r) for r in range(len(regions))]
    pending = [r for r, (lo, hi) in enumerate(regions)
               if not (records[r] or {}).get("done") and hi > lo]
    return records, pending
