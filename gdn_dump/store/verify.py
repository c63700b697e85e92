"""``gdn-dump verify``: check a store against the store contract (DESIGN.md section 4), read-only.

One :class:`Check` per check; one that cannot run fails with the reason. Chunk presence comes from
the key listing (every written chunk is an object); only ``finite`` reads data, in bounded blocks.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import zarr
from zarr.core.sync import sync

from ..catalogue import (CONTRIBUTION_LOGIT, CONTRIBUTION_NORM, CONTRIBUTION_RESIDUAL, CONTRIBUTION_VECTORS,
                         GDN_HOOKS, ROW_DOCUMENT, Catalogue, contribution_name, is_state, matrix_name,
                         residual_name)
from ..dtypes import INDEX_DTYPE, MATRIX_DTYPE, RESIDUAL_DTYPE, hook_dtype
from .states import STATE_INDEX_ARRAYS, STATE_POSITION, state_counts, state_positions, state_stride
from .ledger import ready_info, region_status
from .create import ATTR, COMPLETE, open_group

INDEX_ARRAYS = ("prompt_start", "prompt_length", "prompt_id")
SCALAR_SUFFIXES = {suffix for suffix, _, scalar in GDN_HOOKS.values() if scalar}
REQUIRED = ("tool", "version", "model", "hooks", "storage_dtype", "prompts", "n_rows", "created", "status")
BLOCK_ELEMENTS = 1 << 23  # read at once by the finite check (32 MiB of float32)
POSITION_BLOCK = 1 << 16  # prompts whose state positions are checked at once
WHOLE_AT_CREATION = (STATE_POSITION, *STATE_INDEX_ARRAYS)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def verify_store(path: str | Path | zarr.Group, allow_nonfinite: bool = False) -> list[Check]:
    """Run every check on the store at ``path`` (StoreError if it is not a gdn-dump store), or on a
    group opened read-only by the caller (any zarr store: remote, in memory)."""
    group = path if isinstance(path, zarr.Group) else open_group(path, mode="r")
    meta = dict(group.attrs.get(ATTR) or {})  # a group passed in may not be a gdn-dump store
    ctx = SimpleNamespace(group=group, meta=meta, arrays=dict(group.arrays()), starts=None,
                          lengths=None, layout_ok=False, expected=None, state_rows=None, n_rows=int(meta.get("n_rows") or 0))
    with contextlib.suppress(Exception):  # if not, "arrays" and "layout" say why
        ctx.starts, ctx.lengths = (np.asarray(ctx.arrays[n][:], np.int64) for n in INDEX_ARRAYS[:2])
    steps = [("status", _status), ("ledger", _ledger), ("arrays", _arrays), ("layout", _layout),
             ("rows written", _rows_written), ("finite", lambda c: _finite(c, allow_nonfinite)),
             ("provenance", _provenance)]
    checks = []
    for name, step in steps:
        try:
            ok, detail = step(ctx)
        except Exception as exc:
            ok, detail = False, f"could not check: {type(exc).__name__}: {exc}"
        checks.append(Check(name, ok, detail))
    return checks


def _result(problems: list[str], good: str):
    more = f"; ... ({len(problems)} in all)" if len(problems) > 4 else ""  # the first 4 are shown
    return (False, "; ".join(problems[:4]) + more) if problems else (True, good)


def _status(ctx):
    status, failure = ctx.meta.get("status"), ctx.meta.get("failure")
    return status == COMPLETE, f"status {status!r}" + (f": {failure}" if failure else "")


def _ledger(ctx):
    info = ready_info(ctx.group)
    if info is None:
        return False, "no ready _progress ledger: the creating process never finished"
    records, pending = region_status(ctx.group)
    regions = [list(r) for r in info["regions"]]
    problems = [f"region {r} (prompts {regions[r][0]}-{regions[r][1] - 1}) not done, resume from "
                f"prompt {(records[r] or {}).get('resume_from', regions[r][0])}" for r in pending]
    problems += [f"region {r}: its record says prompts {rec['prompts']}, the ledger {regions[r]}"
                 for r, rec in enumerate(records) if rec and rec.get("prompts", regions[r]) != regions[r]]
    stated = (ctx.meta.get("processes") or {}).get("regions")
    if stated is not None and [list(r) for r in stated] != regions:
        problems.append(f"ledger regions {regions} differ from the provenance's {stated}")
    return _result(problems, f"{len(regions)} region(s), all done")


def _expect(ctx) -> dict:
    """name -> (kind, shape, dtype, dims) of every array the provenance implies; in shape and dims
    None matches anything and a trailing ``...`` any further axes."""
    meta, n_rows, n_prompts = ctx.meta, ctx.n_rows, int(ctx.meta["prompts"]["count"])
    l_max = int(ctx.lengths.max()) if ctx.lengths is not None and len(ctx.lengths) else None
    config = (meta.get("model") or {}).get("config") or {}
    try:
        specs = Catalogue(SimpleNamespace(**config)).specs
    except Exception:  # an unknown config: trailing shapes are not checked
        specs = {}

    def matrix(heads):
        return "matrix", (n_prompts, heads, l_max, l_max), MATRIX_DTYPE, ("prompt", None, "query", "key")

    out = {"tokens": ("token", (n_rows,), "int32", ("token",)),
           "prompt_start": ("index", (n_prompts,), "int64", ("prompt",)),
           "prompt_length": ("index", (n_prompts,), "int64", ("prompt",)),
           "prompt_id": ("index", (n_prompts,), None, ("prompt",))}
    if meta.get("packing"):
        out[ROW_DOCUMENT] = ("token", (n_rows,), INDEX_DTYPE, ("token",))
    states = meta.get("states") or {}
    if states:
        n_states = int(states.get("n_snapshots", 0))
        out.update({index: ("index", (n_prompts,), INDEX_DTYPE, ("prompt",)) for index in STATE_INDEX_ARRAYS})
        out[STATE_POSITION] = ("state_index", (n_states,), INDEX_DTYPE, ("state",))
    for name in meta.get("hooks") or []:
        spec = specs.get(name)
        if is_state(name):
            out[name] = ("state", (n_states, *spec.shape) if spec else (n_states, ...),
                         states.get("dtype"), ("state", *spec.dims) if spec else ("state", ...))
            continue
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            out[name] = matrix(spec.shape[0] if spec else None)
            continue
        scalar = spec.scalar if spec else name.rpartition(".")[2] in SCALAR_SUFFIXES
        out[name] = ("token", (n_rows, *spec.shape) if spec else (n_rows, ...),
                     hook_dtype(scalar, meta.get("storage_dtype")),
                     ("token", *spec.dims) if spec else ("token", ...))
    attention, layer_types = meta.get("attention") or {}, config.get("layer_types") or []
    for layer in attention.get("layers") or []:
        name = matrix_name(layer)
        attrs = ctx.arrays[name].attrs if name in ctx.arrays else {}
        out[name] = matrix(len(attrs["heads"]) if attrs.get("heads") else None)
        gdn = (layer_types[layer] == "linear_attention" if layer < len(layer_types)
               else attrs.get("layer_type") == "gdn")
        if gdn and attention.get("mode") == "exact":
            out[residual_name(layer)] = ("prompt", (n_prompts,), RESIDUAL_DTYPE, ("prompt",))
    contributions = meta.get("contributions") or {}
    for layer in contributions.get("layers") or []:
        heads = len((contributions.get("heads") or {}).get(str(layer)) or []) or None
        out[contribution_name(layer, CONTRIBUTION_NORM)] = matrix(heads)
        if contributions.get("logits") is not None:
            out[contribution_name(layer, CONTRIBUTION_LOGIT)] = matrix(heads)
        if contributions.get("vectors"):
            d_model = config.get("hidden_size")
            out[contribution_name(layer, CONTRIBUTION_VECTORS)] = (
                "matrix", (n_prompts, heads, l_max, l_max, d_model), MATRIX_DTYPE,
                ("prompt", None, "query", "key", "d_model"))
        out[contribution_name(layer, CONTRIBUTION_RESIDUAL)] = ("prompt", (n_prompts,), RESIDUAL_DTYPE,
                                                                ("prompt",))
    return out


def _fits(got: tuple, want: tuple) -> bool:
    if want and want[-1] is Ellipsis:
        want, got = want[:-1], got[:len(want) - 1]
    return len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want))


def _show(want: tuple) -> str:
    return "(" + ", ".join("*" if w is None else "..." if w is Ellipsis else repr(w) for w in want) + ")"


def _arrays(ctx):
    ctx.expected = _expect(ctx)
    problems = []
    for name, (_, shape, dtype, dims) in ctx.expected.items():
        arr = ctx.arrays.get(name)
        if arr is None:
            problems.append(f"{name}: missing")
            continue
        names = tuple(arr.metadata.dimension_names or ())
        if not _fits(tuple(arr.shape), shape):
            problems.append(f"{name}: shape {tuple(arr.shape)}, expected {_show(shape)}")
        if dtype is not None and str(arr.dtype) != dtype:
            problems.append(f"{name}: dtype {arr.dtype}, expected {dtype}")
        if len(names) != arr.ndim or None in names or not _fits(names, dims):
            problems.append(f"{name}: dimension_names {list(names) or None}, expected {_show(dims)}")
    return _result(problems, f"{len(ctx.expected)} arrays of the expected shape, dtype and dimension names")


def _layout(ctx):
    starts, lengths, n_rows = ctx.starts, ctx.lengths, ctx.n_rows
    if starts is None or lengths is None:
        return False, "prompt_start / prompt_length cannot be read"
    n, problems = int(ctx.meta["prompts"]["count"]), []
    if len(starts) != n or len(lengths) != n:
        problems.append(f"{len(starts)} starts and {len(lengths)} lengths for {n} prompts")
    else:
        ends = starts + lengths
        for what, bad in (("a negative start or length", (starts < 0) | (lengths < 0)),
                          (f"rows past n_rows {n_rows}", ends > n_rows),
                          ("rows before the previous prompt's end",
                           np.concatenate([[False], starts[1:] < ends[:-1]]))):
            if bad.any():
                problems.append(f"{np.count_nonzero(bad)} prompt(s) with {what} "
                                f"(first: prompt {np.argmax(bad)})")
        limit = ctx.meta.get("max_length")
        if limit is not None and n and lengths.max() > limit:
            problems.append(f"a prompt of {lengths.max()} rows, past max_length {limit}")
    ids = ctx.arrays.get("prompt_id")
    if ids is None or ids.shape != (n,):
        problems.append(f"prompt_id has shape {None if ids is None else ids.shape}, not ({n},)")
    if ctx.meta.get("states") and not problems:
        problems += _state_layout(ctx)
    ctx.layout_ok = not problems
    owned = int(lengths.sum())
    return _result(problems, f"{n} prompts, {owned} rows owned, {n_rows - owned} gap rows")


def _state_layout(ctx) -> list[str]:
    """``state_start``/``state_count``/``state_position`` against the lengths and the stride: each
    prompt's snapshots after exactly the positions the stride gives, in rows of its own."""
    states, n = ctx.meta["states"], len(ctx.lengths)
    try:
        stride = state_stride(states.get("every"))
        starts, counts = (np.asarray(ctx.arrays[a][:], np.int64) for a in STATE_INDEX_ARRAYS)
    except Exception as exc:
        return [f"the state index cannot be read: {exc}"]
    n_states, problems = int(states.get("n_snapshots", 0)), []
    if starts.shape != (n,) or counts.shape != (n,):
        return [f"state_start / state_count have shapes {starts.shape} / {counts.shape}, not ({n},)"]
    wrong = counts != state_counts(ctx.lengths, stride)
    ends = starts + counts
    for what, bad in (("a snapshot count other than the stride gives", wrong),
                      (f"snapshots past n_snapshots {n_states}", ends > n_states),
                      ("snapshots before the previous prompt's end",
                       np.concatenate([[False], starts[1:] < ends[:-1]]))):
        if bad.any():
            problems.append(f"{np.count_nonzero(bad)} prompt(s) with {what} (first: prompt {np.argmax(bad)})")
    if problems:
        return problems
    ctx.state_rows = (starts, counts)
    positions = ctx.arrays[STATE_POSITION]
    for first in range(0, n, POSITION_BLOCK):  # a block of prompts at a time: memory stays bounded
        last = min(first + POSITION_BLOCK, n)
        lo, hi = (int(starts[first]), int(ends[last - 1])) if counts[first:last].any() else (0, 0)
        if hi <= lo:
            continue
        got = np.asarray(positions[lo:hi], np.int64)
        for p in range(first, last):
            want = state_positions(int(ctx.lengths[p]), stride)
            if not np.array_equal(got[starts[p] - lo:ends[p] - lo], want):
                return [f"state_position of prompt {p} is not the positions the stride gives"]
    return problems


def _keys(group: zarr.Group, arr: zarr.Array, keep=None) -> tuple[np.ndarray, tuple, tuple]:
    """Grid coordinates ``[n, ndim]`` of the stored shards (else chunks) of ``arr``, unit, grid."""
    unit = tuple(arr.shards or arr.chunks)
    grid = tuple(-(-s // u) for s, u in zip(arr.shape, unit))
    encoding, prefix = arr.metadata.chunk_key_encoding, f"{arr.path}/"
    sep, head = encoding.separator, prefix + ("c" + encoding.separator if encoding.name == "default" else "")

    async def collect():
        coords = []
        async for key in group.store.list_prefix(prefix):
            parts = key[len(head):].split(sep) if key.startswith(head) else ()
            if len(parts) == len(grid) and all(p.isdigit() for p in parts):
                c = tuple(map(int, parts))
                if all(i < g for i, g in zip(c, grid)) and (keep is None or keep(c)):
                    coords.append(c)
        return coords

    return np.array(sync(collect()), dtype=np.int64).reshape(-1, len(grid)), unit, grid


def _rows_written(ctx):
    if not ctx.layout_ok:
        return False, "not checked: the prompt layout is inconsistent"
    axes = {"token": (ctx.starts, ctx.lengths)}  # the row axes: (first row, rows) of each prompt
    if ctx.state_rows is not None:
        axes["state"] = ctx.state_rows
    problems, counted = [], 0
    for name, arr in sorted(ctx.arrays.items()):
        dims = arr.metadata.dimension_names or (None,)
        if dims[0] == "prompt" and arr.ndim >= 4:  # matrices, and contribution vectors
            n_missing, total, (p, h, t, _) = _diagonal_missing(ctx, arr)
            counted += total
            if n_missing:
                problems.append(f"{name}: {n_missing} of {total} diagonal tiles missing "
                                f"(first: prompt {p}, head {h}, tile {t})")
            continue
        if name in INDEX_ARRAYS or name in WHOLE_AT_CREATION or dims[0] not in ("prompt", *axes):
            continue  # the index arrays are written whole at creation (all-zero chunks skipped)
        coords, unit, grid = _keys(ctx.group, arr)
        present = np.bincount(coords[:, 0], minlength=grid[0]) == math.prod(grid[1:])
        needed = np.ones(grid[0], dtype=bool)  # per-prompt arrays: all of it
        if dims[0] in axes:  # the units some prompt's rows fall in
            starts, counts = axes[dims[0]]
            s, e = starts[counts > 0], starts[counts > 0] + counts[counts > 0] - 1
            delta = (np.bincount(np.minimum(s // unit[0], grid[0]), minlength=grid[0] + 1)
                     - np.bincount(np.minimum(e // unit[0] + 1, grid[0]), minlength=grid[0] + 1))
            needed = np.cumsum(delta)[:grid[0]] > 0
        missing = np.flatnonzero(needed & ~present)
        counted += int(needed.sum())
        if len(missing):
            lo, hi = missing[0] * unit[0], min((missing[0] + 1) * unit[0], arr.shape[0])
            if dims[0] in axes:
                starts, counts = axes[dims[0]]
                where = (f"{'' if dims[0] == 'token' else 'state '}rows {lo}-{hi - 1}, prompts "
                         f"{np.searchsorted(starts + counts, lo, 'right')}-{np.searchsorted(starts, hi) - 1}")
            else:
                where = f"prompts {lo}-{hi - 1}"
            problems.append(f"{name}: {len(missing)} of {int(needed.sum())} chunks missing (first: {where})")
    return _result(problems, f"{counted} chunks / tiles present")


def _diagonal_missing(ctx, arr: zarr.Array) -> tuple[int, int, tuple]:
    """Diagonal tiles ``(p, h, t, t)`` not stored: how many, of how many, the first one."""
    up, _, uq, uk = tuple(arr.shards or arr.chunks)[:4]
    coords, _, grid = _keys(ctx.group, arr, keep=lambda c: c[3] == c[2] * uq // uk)
    coords, grid = coords[:, :4], grid[:4]  # vectors: their d_model axis is one chunk
    tiles = -(-np.minimum(ctx.lengths[:arr.shape[0]], arr.shape[2]) // uq)  # query tiles of each prompt
    prompt = np.repeat(np.arange(len(tiles)), tiles)
    t = np.arange(len(prompt)) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    rows = (prompt // up)[:, None] * grid[1] + np.arange(grid[1])  # [tiles, heads]: raveled index
    need = np.unique(((rows * grid[2] + t[:, None]) * grid[3] + (t * uq // uk)[:, None]).ravel())
    missing = need[~np.isin(need, np.ravel_multi_index(coords.T, grid))]
    first = np.unravel_index(missing[0], grid) if len(missing) else (0,) * 4
    return len(missing), len(need), tuple(int(i) for i in first)


def _blocks(shape: tuple, unit: tuple):
    """Slices over ``shape`` aligned to ``unit`` of about BLOCK_ELEMENTS elements at most."""
    block = list(shape)
    for ax in range(len(shape)):
        outer, rest = math.prod(block[:ax]), math.prod(shape[ax + 1:])
        fit = BLOCK_ELEMENTS // max(outer * rest, 1)
        block[ax] = shape[ax] if fit >= shape[ax] else max(unit[ax], fit // unit[ax] * unit[ax])
        if block[ax] * outer * rest <= BLOCK_ELEMENTS:
            break
    for corner in itertools.product(*(range(0, s, b) for s, b in zip(shape, block))):
        yield tuple(slice(c, min(c + b, s)) for c, b, s in zip(corner, block, shape))


def _finite(ctx, allow: bool):
    counts, first, checked = {}, {}, 0
    for name, arr in sorted(ctx.arrays.items()):
        if not (arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16") or 0 in arr.shape:
            continue
        checked += 1
        for where in _blocks(tuple(arr.shape), tuple(arr.shards or arr.chunks)):
            bad = ~np.isfinite(arr[where])
            if bad.any():
                index = np.unravel_index(int(np.argmax(bad)), bad.shape)
                first.setdefault(name, [int(w.start + i) for w, i in zip(where, index)])
                counts[name] = counts.get(name, 0) + int(np.count_nonzero(bad))
    problems = [f"{name}: {n} non-finite (first at {first[name]})" for name, n in counts.items()]
    ok, detail = _result(problems, f"{checked} float arrays, all finite")
    return (True, f"allowed: {detail}") if allow and not ok else (ok, detail)


def _provenance(ctx):
    meta = ctx.meta
    missing = [k for k in REQUIRED if k not in meta]
    missing += [f"prompts.{k}" for k in ("sha256", "count") if k not in (meta.get("prompts") or {})]
    problems = [f"missing keys: {', '.join(missing)}"] if missing else []
    expected = ctx.expected or _expect(ctx)
    hooks = {n for n, (kind, *_) in expected.items() if kind == "token"}
    found = {n for n, a in ctx.arrays.items() if (a.metadata.dimension_names or (None,))[0] == "token"}
    if found - hooks:
        problems.append(f"per-token arrays not in the provenance's hooks: {sorted(found - hooks)}")
    if set(ctx.arrays) - set(expected) - found:
        problems.append(f"unexpected arrays: {sorted(set(ctx.arrays) - set(expected) - found)}")
    return _result(problems, f"{meta.get('tool')} {meta.get('version')}, all {len(ctx.arrays)} arrays known")
