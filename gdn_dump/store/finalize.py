"""The end of a run: once every region is done, sum what the regions recorded and mark the store.

Run by the last process to finish its region, or by ``gdn-dump finalize STORE`` (idempotent).
Everything comes from the store itself (the ledger's records, the attention residuals), never
from one process's memory, so any process can finalize.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from ..catalogue import (CONTRIBUTION_NORM, CONTRIBUTION_RESIDUAL, contribution_name, is_residual,
                         layer_of, matrix_name)
from ..dtypes import EPSILON
from ..errors import RunFailure
from ..ops.stats import merged, split_stat_key
from .create import ATTR, COMPLETE, FAILED, set_status
from .ledger import ready_info, region_status
from .provenance import now_iso
from .tally import Tally, summed

# An exact GDN matrix must reproduce the layer's output: ||M V - o|| / ||o|| at most this (and
# the contributions must sum to it), for a float32 or float64 model; see limit_for.
RESIDUAL_LIMIT = 1e-3


def limit_for(model_dtype: str | None) -> float:
    """The check's limit for a model run in ``model_dtype``: :data:`RESIDUAL_LIMIT`, or twice the
    dtype's epsilon when that is larger (bfloat16: 0.0156; float16: 0.002). The hooks the
    decompositions are checked against (``v``, ``recurrence_out``, ``hook_out``) are rounded to
    the model dtype: bfloat16 alone puts them ~2e-3 (matrices) to ~8e-3 (contributions, per
    token) from the exact sums."""
    return max(RESIDUAL_LIMIT, 2 * EPSILON.get(model_dtype or "float32", 0.0))


def finalize(group: zarr.Group, residual_limit: float | None = None) -> str:
    """Mark the store ``complete`` (or ``failed``) once every region is done; idempotent.

    ``residual_limit``: by default that of the model dtype the store was written with
    (:func:`limit_for`). Returns the status, or raises :class:`RunFailure` listing
    unfinished regions.
    """
    records, pending = region_status(group)
    if pending:
        regions = ready_info(group)["regions"]
        listed = ", ".join(f"{r} (prompts {regions[r][0]}-{regions[r][1] - 1})" for r in pending[:8])
        raise RunFailure(f"{len(pending)} region(s) not finished: {listed}; run those processes "
                         "(with --resume) first")
    done = [r for r in records if r]
    total = summed([Tally.from_json(r.get("tally")) for r in done])
    common: dict[str, Any] = dict(
        finished=now_iso(), overflow=total.overflow, nonfinite=total.nonfinite,
        seconds=round(total.seconds, 3), oom_retries=total.oom_retries,
        peak_rss_bytes=max((r.get("peak_rss", 0) for r in done), default=0),
        padding=round(total.padding, 4), stats=_write_stats(group, done),
    )
    if residual_limit is None:
        residual_limit = _limit_of(group)
    failures = _check_residuals(group, residual_limit)
    if failures:
        message = "; ".join(
            f"{_FAILED[what]} (limit {residual_limit:g}): "
            f"{'; '.join(failure for w, failure in failures if w == what)}"
            for what in dict.fromkeys(what for what, _ in failures))
        set_status(group, FAILED, failure=message, **common)
        return FAILED
    set_status(group, COMPLETE, **common)
    return COMPLETE


def _limit_of(group: zarr.Group) -> float:
    return limit_for((group.attrs[ATTR].get("model") or {}).get("dtype"))


def finalize_store(group: zarr.Group) -> str:
    """``gdn-dump finalize``: :func:`finalize`, with a failed check as a one-line failure."""
    status = finalize(group)
    if status == FAILED:
        raise RunFailure(group.attrs[ATTR]["failure"])
    return status


_FAILED = {"effective attention": "the effective attention does not reproduce the layer output",
           "contributions": "the contributions do not sum to the layer output"}


def _residual_target(name: str) -> tuple[str, str, str] | None:
    """For a residual array: (what it checks, the array whose attributes get its summary, the
    quantity); None for other arrays."""
    layer = layer_of(name)
    if is_residual(name):
        return "effective attention", matrix_name(layer), "||M V - o|| / ||o||"
    if layer is not None and name == contribution_name(layer, CONTRIBUTION_RESIDUAL):
        return ("contributions", contribution_name(layer, CONTRIBUTION_NORM),
                "max_i ||sum c - out_i|| / ||out_i||")
    return None


def _check_residuals(group: zarr.Group, residual_limit: float) -> list[tuple[str, str]]:
    """Each residual array read back from the store (written by every process) into the
    attributes of what it checks; ``(what, message)`` for those over the limit."""
    failures = []
    for name, arr in group.arrays():
        target = _residual_target(name)
        if target is None:
            continue
        what, checked, quantity = target
        values = np.asarray(arr[:], dtype=np.float64)
        worst = float(values.max()) if values.size else 0.0
        matrix = group[checked]
        matrix.attrs.update({"residual_max": worst,
                             "residual_mean": float(values.mean()) if values.size else 0.0,
                             "residual_limit": residual_limit})
        if worst > residual_limit:
            failures.append((what, f"{matrix.basename}: {quantity} = {worst:.2e}"))
    return failures


def _write_stats(group: zarr.Group, records: list[dict]) -> dict[str, dict]:
    """Merge the regions' statistics into each array's attribute ``stats``; returns the
    all-heads summary per array for the provenance. An array some region with rows has no
    statistics for (a record from before statistics, resumed) gets none."""
    with_rows = [r for r in records if (r.get("rows") or [0, 0])[1] > (r.get("rows") or [0, 0])[0]]
    states = [r.get("stats") or {} for r in with_rows]
    names = set.intersection(*(set(s) for s in states)) if states else set()
    total = merged({name: state[name] for name in names} for state in states)
    summary, state_stats = {}, {}
    for key, stats in sorted(total.items()):
        name, statistic = split_stat_key(key)
        if name not in group:
            continue
        if statistic is None:
            group[name].attrs.update({"stats": stats.result()})
        else:  # a state array: per head, over its snapshots
            state_stats.setdefault(name, {})[statistic] = stats.result()
        summary[key] = stats.summary()
    for name, values in state_stats.items():
        group[name].attrs.update({"state_stats": values})
    return summary
