"""The progress ledger kept in the store: readiness, one record per region, finalize.

Layout: the group ``_progress`` (its attributes: the run's fingerprint, the regions, ``ready``)
and one child group per region, ``_progress/region-00003``, whose attributes are that region's
record. Each process writes only its own record (one small ``zarr.json``, replaced atomically), so
processes never write the same object; the creator alone writes ``_progress`` and the status.

A record says from which prompt the region must be recomputed (``resume_from``): everything
before it is on disk. Records are written at unit boundaries after the writer has flushed, so
resuming there recomputes whole units with the same batches and gives bit-identical rows.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import zarr

from ..errors import RunFailure, StoreError
from ..ops.stats import merged
from .create import COMPLETE, FAILED, set_status
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


def finalize(group: zarr.Group, residual_limit: float) -> str:
    """Mark the store ``complete`` (or ``failed``) once every region is done; idempotent.

    Returns the status, or raises :class:`RunFailure` listing unfinished regions. The attention
    residuals are read back from the store (they were written by every process), not taken from
    any one process's memory.
    """
    records, pending = region_status(group)
    if pending:
        regions = ready_info(group)["regions"]
        listed = ", ".join(f"{r} (prompts {regions[r][0]}-{regions[r][1] - 1})" for r in pending[:8])
        raise RunFailure(f"{len(pending)} region(s) not finished: {listed}; run those processes "
                         "(with --resume) first")
    done = [r for r in records if r]
    overflow, nonfinite = _summed(done, "overflow"), _summed(done, "nonfinite")
    summary = _write_stats(group, done)
    failures = []
    for name, arr in group.arrays():
        if not name.endswith("attn_residual"):
            continue
        values = np.asarray(arr[:], dtype=np.float64)
        worst = float(values.max()) if values.size else 0.0
        matrix = group[name.replace("attn_residual", "attn_matrix")]
        matrix.attrs.update({"residual_max": worst, "residual_mean": float(values.mean()) if values.size else 0.0,
                             "residual_limit": residual_limit})
        if worst > residual_limit:
            failures.append(f"{matrix.basename}: ||M V - o|| / ||o|| = {worst:.2e}")
    common: dict[str, Any] = dict(
        finished=now_iso(), overflow=overflow, nonfinite=nonfinite,
        seconds=round(max((r.get("seconds", 0.0) for r in done), default=0.0), 3),
        oom_retries=sum(r.get("oom_retries", 0) for r in done),
        peak_rss_bytes=max((r.get("peak_rss", 0) for r in done), default=0),
        padding=round(float(np.mean([r.get("padding", 0.0) for r in done])) if done else 0.0, 4),
        stats=summary,
    )
    if failures:
        message = (f"the effective attention does not reproduce the layer output (limit "
                   f"{residual_limit:g}): {'; '.join(failures)}")
        set_status(group, FAILED, failure=message, **common)
        return FAILED
    set_status(group, COMPLETE, **common)
    return COMPLETE


def _write_stats(group: zarr.Group, records: list[dict]) -> dict[str, dict]:
    """Merge the regions' statistics into each array's attribute ``stats``; returns the
    all-heads summary per array for the provenance. An array some region with rows has no
    statistics for (a record from before statistics, resumed) gets none."""
    with_rows = [r for r in records if (r.get("rows") or [0, 0])[1] > (r.get("rows") or [0, 0])[0]]
    states = [r.get("stats") or {} for r in with_rows]
    names = set.intersection(*(set(s) for s in states)) if states else set()
    total = merged({name: state[name] for name in names} for state in states)
    summary = {}
    for name, stats in sorted(total.items()):
        if name in group:
            group[name].attrs.update({"stats": stats.result()})
            summary[name] = stats.summary()
    return summary


def _summed(records: list[dict], key: str) -> dict[str, int]:
    """Per-array counts (``overflow``, ``nonfinite``) summed over the regions' records."""
    total: dict[str, int] = {}
    for record in records:
        for name, count in (record.get(key) or {}).items():
            total[name] = total.get(name, 0) + count
    return total
