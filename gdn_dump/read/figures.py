"""The data behind ``gdn-dump plot``: functions of a store that return numpy arrays and dicts
(testable without drawing); :mod:`gdn_dump.read.plots` draws them, one figure per command.

``store`` is a :class:`~gdn_dump.read.reader.Store`, a path or URL, or an open zarr group (opened
as a ``Store``). Everything is read through the ``Store``: only the rows of finished prompts
(all of them on a complete store; on one still ``in_progress``, those its progress ledger
records as written), through ``prompt_start`` / ``prompt_length`` (gap rows between regions are
never read as data); asking for another prompt is an error. Rows are read a bounded block at a
time: the norm profile keeps only per-position sums, the decay / beta statistics keep at most
``max_rows`` rows per layer (an evenly strided sample of the owned rows when a store has more;
the figure says so).
"""

from __future__ import annotations

import math

import numpy as np

from ..catalogue import MATRIX_SUFFIX, matrix_layers, matrix_name, state_name, stored_layers
from ..errors import GdnDumpError
from ..ops.state_replay import effective_rank, frobenius_norm, singular_values
from . import states
from .matrices import stored_heads
from .reader import Store

KINDS = ("decay", "beta", "attn", "norms", "state", "contrib", "logit")  # contrib, logit: read.attribution
LN_HALF = math.log(0.5)
G_CEILING = -1e-30  # g >= 0 (no decay) is read as this: a finite, huge half-life (~7e29 tokens)
MAX_SAMPLE_ROWS = 1 << 19  # rows per layer kept for quantiles (x heads x 8 bytes: 200 MB at 48 heads)
BLOCK_BYTES = 32 << 20  # bytes of one read


# ---------------------------------------------------------------------------------------------
# reading


def as_store(store) -> Store:
    """``store`` as a :class:`Store` (itself if it is one)."""
    return store if isinstance(store, Store) else Store(store)


def _check_prompt(store: Store, prompt: int | None) -> None:
    n = store.n_prompts
    if prompt is None:
        return
    if not 0 <= prompt < n:
        raise GdnDumpError(f"--prompt {prompt} is out of range: the store has {n} prompts (0-{n - 1})")
    if not store.is_visible(prompt):
        raise GdnDumpError(f"--prompt {prompt} is not finished: {store.path} is {store.status} and "
                           f"{len(store.visible)} of its {n} prompts are written (finish the run "
                           "with --resume)")


def _lengths(store: Store, prompt: int | None) -> np.ndarray:
    """Stored tokens of each finished prompt (or of ``prompt`` alone)."""
    return store.prompt_length[store.visible if prompt is None else [prompt]]


def owned_blocks(store, name: str, prompt: int | None = None, block_bytes: int = BLOCK_BYTES):
    """Yield ``(values, prompt_index, position)`` for the rows of array ``name`` that finished
    prompts own, a block at a time (blocks aligned to the array's chunks / shards), in row order;
    only ``prompt`` if given."""
    store = as_store(store)
    _check_prompt(store, prompt)
    arr = store[name]
    owners = store.owners(prompt)
    if not len(owners.prompts):
        return
    unit = int(arr.chunks[0])  # inner chunks: a sharded array is read part of a shard at a time
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    block = max(unit, (block_bytes // row_bytes) // unit * unit)
    # contiguous runs of owned rows, cut at block boundaries
    breaks = np.flatnonzero(owners.starts[1:] != owners.ends[:-1]) + 1
    for run in np.split(np.arange(len(owners.prompts)), breaks):
        a, stop = int(owners.starts[run[0]]), int(owners.ends[run[-1]])
        while a < stop:
            b = min(stop, (a // block + 1) * block)
            owner, position = owners.at(np.arange(a, b))
            yield arr[a:b], owner, position
            a = b


def hook_arrays(store, hook: str) -> dict[int, str]:
    """``{layer: array name}`` of a hook given by short name (``recurrence_out``, ``hook_beta``)
    or a layer-relative name (``hook_resid_post``, ``attn.hook_z``); a full name gives one layer."""
    return stored_layers(as_store(store), hook)


def _layers_with(store: Store, hook: str, layer: int | None, option: str = "--layer") -> dict[int, str]:
    found = hook_arrays(store, hook)
    if not found:
        raise GdnDumpError(f"the store has no {hook} array (store more hooks with extract --hooks)")
    if layer is not None:
        if layer not in found:
            raise GdnDumpError(f"{option} {layer} has no {hook} in this store; layers with it: "
                               f"{', '.join(map(str, found))}")
        return {layer: found[layer]}
    return found


def _check_head(head: int | None, n_heads: int, what: str) -> None:
    if head is not None and not 0 <= head < n_heads:
        raise GdnDumpError(f"--head {head} is out of range: {what} has {n_heads} heads (0-{n_heads - 1})")


# ---------------------------------------------------------------------------------------------
# data


def half_life(g) -> np.ndarray:
    """Half-life in tokens of a log decay g (< 0): ln(0.5) / g; g >= 0 is clipped to G_CEILING."""
    return LN_HALF / np.minimum(np.asarray(g, dtype=np.float64), G_CEILING)


def _values(kind: str, block) -> np.ndarray:
    return half_life(block) if kind == "decay" else np.asarray(block, dtype=np.float64)


def _hook_of(kind: str) -> str:
    if kind not in ("decay", "beta"):
        raise GdnDumpError(f"unknown statistic {kind!r}: decay or beta")
    return "log_decay" if kind == "decay" else "beta"


def layer_sample(store, kind: str, layer: int, prompt: int | None = None,
                 max_rows: int = MAX_SAMPLE_ROWS) -> tuple[np.ndarray, int]:
    """The owned rows of one layer's half-life (``decay``) or beta, [rows, heads] float64: every
    row, or every k-th owned row (k = ceil(rows / max_rows)) when there are more. Also the
    number of owned rows."""
    store = as_store(store)
    name = _layers_with(store, _hook_of(kind), layer)[layer]
    _check_prompt(store, prompt)
    total = int(_lengths(store, prompt).sum())
    stride = max(1, math.ceil(total / max(1, max_rows)))
    parts, seen = [], 0
    for block, _, _ in owned_blocks(store, name, prompt):
        first = (-seen) % stride
        parts.append(_values(kind, block[first::stride]))
        seen += len(block)
    heads = store[name].shape[1]
    return (np.concatenate(parts) if parts else np.empty((0, heads))), total


def quantile_grid(store, kind: str, prompt: int | None = None, max_rows: int = MAX_SAMPLE_ROWS) -> dict:
    """Per (head, GDN layer): median, 25th and 75th percentiles of the half-life in tokens
    (``kind="decay"``) or of beta (``"beta"``): ``{"layers", "median", "q25", "q75"}`` with the
    arrays [heads, layers]; plus ``rows`` (owned rows) and ``sampled`` (rows used per layer)."""
    store = as_store(store)
    layers = list(_layers_with(store, _hook_of(kind), None))
    stats, sampled, total = [], 0, 0
    for layer in layers:
        values, total = layer_sample(store, kind, layer, prompt, max_rows)
        sampled = len(values)
        stats.append(np.quantile(values, [0.5, 0.25, 0.75], axis=0) if len(values)
                     else np.full((3, values.shape[1]), np.nan))
    grid = np.stack(stats, axis=-1)  # [3, heads, layers]
    return {"kind": kind, "layers": layers, "median": grid[0], "q25": grid[1], "q75": grid[2],
            "rows": total, "sampled": sampled}


def half_life_grid(store, prompt: int | None = None, max_rows: int = MAX_SAMPLE_ROWS) -> dict:
    """:func:`quantile_grid` of the half-life ln(0.5)/g in tokens."""
    return quantile_grid(store, "decay", prompt, max_rows)


def beta_grid(store, prompt: int | None = None, max_rows: int = MAX_SAMPLE_ROWS) -> dict:
    """:func:`quantile_grid` of beta (write strength, 0-1)."""
    return quantile_grid(store, "beta", prompt, max_rows)


def distributions(store, kind: str, layer: int | None = None, head: int | None = None,
                  prompt: int | None = None, max_rows: int = MAX_SAMPLE_ROWS) -> dict:
    """Per-head distributions of one layer (``layer``; only ``head`` if given), or one head's
    distribution in every GDN layer (``head`` alone). Values are log10 half-life in tokens for
    ``decay``, beta for ``beta``: ``{"axis": "head"|"layer", "labels", "values": [1-D arrays]}``."""
    store = as_store(store)
    hook = _hook_of(kind)
    layers = list(_layers_with(store, hook, layer))
    n_heads = store[hook_arrays(store, hook)[layers[0]]].shape[1]
    _check_head(head, n_heads, f"{hook} of layer {layers[0]}")
    transform = np.log10 if kind == "decay" else (lambda x: x)
    if layer is not None:
        values, total = layer_sample(store, kind, layer, prompt, max_rows)
        heads = list(range(n_heads)) if head is None else [head]
        return {"kind": kind, "axis": "head", "layer": layer, "head": head, "labels": heads,
                "values": [transform(values[:, h]) for h in heads], "rows": total, "sampled": len(values)}
    columns = []
    for each in layers:
        values, total = layer_sample(store, kind, each, prompt, max_rows)
        columns.append(transform(values[:, head]))
    return {"kind": kind, "axis": "layer", "layer": None, "head": head, "labels": layers,
            "values": columns, "rows": total, "sampled": len(columns[0]) if columns else 0}


def norm_profile(store, hook: str = "recurrence_out", layer: int | None = None,
                 head: int | None = None, prompt: int | None = None) -> dict:
    """Mean over prompts of ||x[t]|| (L2 over all trailing dims) at each position t: one line per
    layer that has ``hook``, or with ``layer`` one line per head (per-head norms, when the hook has
    a head axis); ``head`` keeps that head's norm only (per layer without ``layer``). Prompts
    shorter than t+1 do not count at t; only finished prompts count.
    Returns ``{"labels", "mean": [lines, L_max], "count": [L_max], "names"}``."""
    store = as_store(store)
    _check_prompt(store, prompt)
    arrays = _layers_with(store, hook, layer)
    lengths = _lengths(store, prompt)
    n_pos = int(lengths.max()) if len(lengths) else 0
    labels, means, count = [], [], np.zeros(n_pos)
    for each, name in arrays.items():
        arr = store[name]
        dims = tuple(arr.metadata.dimension_names or ())
        has_heads = arr.ndim >= 2 and len(dims) >= 2 and dims[1].endswith("head")
        if head is not None and not has_heads:
            raise GdnDumpError(f"--head: {name} has no head axis (its dims: {', '.join(dims)})")
        per_head = has_heads and (layer is not None or head is not None)
        if per_head:
            _check_head(head, arr.shape[1], name)
        heads = ([head] if head is not None else list(range(arr.shape[1]))) if per_head else [None]
        sums, count = np.zeros((len(heads), n_pos)), np.zeros(n_pos)
        for block, _, pos in owned_blocks(store, name, prompt):
            x = block.astype(np.float32)
            sq = (x * x).reshape(len(x), arr.shape[1], -1).sum(-1) if per_head else \
                (x * x).reshape(len(x), -1).sum(-1)[:, None]
            norms = np.sqrt(sq.astype(np.float64))
            for i, h in enumerate(heads):
                sums[i] += np.bincount(pos, norms[:, 0 if h is None else h], minlength=n_pos)
            count += np.bincount(pos, minlength=n_pos)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.extend(sums / count)
        labels.extend(f"layer {each}" if h is None else f"head {h}" if layer is not None
                      else f"layer {each}, head {h}" for h in heads)
    return {"hook": hook, "names": list(arrays.values()), "labels": labels,
            "mean": np.array(means).reshape(len(labels), n_pos), "count": count}


def attention_data(store, layer: int | None = None, head: int = 0, prompt: int = 0) -> dict:
    """One (finished) prompt's attention matrix of one head, [n, n] (n = the prompt's length),
    its tokens."""
    store = as_store(store)
    arrays = {each: matrix_name(each) for each in matrix_layers(store)}
    return head_matrix(store, arrays, MATRIX_SUFFIX, NO_MATRICES, layer, head, prompt)


NO_MATRICES = ("the store has no attention matrices (blocks.<i>.attn_matrix); make them with "
               "attn-matrix or extract --attn-layers")


def head_matrix(store: Store, arrays: dict[int, str], what: str, missing: str, layer: int | None,
                head: int | None, prompt: int) -> dict:
    """One head's ``[n, n]`` block (query, key) of one (finished) prompt of the per-prompt matrix
    arrays ``{layer: name}`` (``what`` is their name in errors, ``missing`` the error when there
    are none): ``layer`` (default: the first), ``head`` (a model head index; default: the first
    stored). ``{"name", "layer", "head", "prompt", "prompt_id", "kind", "matrix", "tokens"}``."""
    if not arrays:
        raise GdnDumpError(missing)
    layer = next(iter(arrays)) if layer is None else layer
    if layer not in arrays:
        raise GdnDumpError(f"--layer {layer} has no {what} in this store; layers with one: "
                           f"{', '.join(map(str, arrays))}")
    name = arrays[layer]
    arr = store[name]
    heads = stored_heads(arr)
    head = heads[0] if head is None else head
    if head not in heads:
        raise GdnDumpError(f"--head {head} is out of range: {name} has heads {_ranges(heads)}")
    _check_prompt(store, prompt)
    rows = store.rows(prompt)
    n = rows.stop - rows.start
    if n == 0:
        raise GdnDumpError(f"--prompt {prompt} has no stored tokens (skipped as too long)")
    return {"name": name, "layer": layer, "head": head, "prompt": prompt, "kind": arr.attrs.get("kind"),
            "prompt_id": str(store["prompt_id"][prompt]),
            "matrix": arr[prompt, heads.index(head), :n, :n],
            "tokens": np.asarray(store["tokens"][rows])}


def state_data(store, layer: int | None = None, head: int | None = None,
               prompt: int | None = None, block_bytes: int = BLOCK_BYTES) -> dict:
    """The recurrent state of one prompt in one GDN layer (default: the first with states) along
    its snapshots: ``{"positions": [n] int64, "norm", "rank": [n, heads]`` (Frobenius norm,
    effective rank), ``"spectrum": [heads, min(d_k, d_v)]`` (singular values of the last
    snapshot, largest first), ``"heads"``, ``"layer"``, ``"prompt"``, ``"prompt_id"``}. The
    prompt is ``prompt`` or the first finished one with snapshots; ``head`` keeps that head only.
    Snapshots are read a bounded block at a time."""
    store = as_store(store)
    if not states.has_states(store):
        raise GdnDumpError(f"--kind state: the store has no recurrent states ({states.NO_STATES_HINT})")
    layer = store.state_layers[0] if layer is None else layer
    if layer not in store.state_layers:
        raise GdnDumpError(f"--layer {layer} has no recurrent states in this store; layers with "
                           f"them: {', '.join(map(str, store.state_layers))}")
    arr = store[state_name(layer)]
    _check_head(head, arr.shape[1], state_name(layer))
    prompt = _state_prompt(store, prompt)
    rows = states.snapshot_rows(store, prompt)
    heads = list(range(arr.shape[1])) if head is None else [head]
    step = max(1, block_bytes // max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize))
    norm, rank = [], []
    for lo in range(rows.start, rows.stop, step):
        block = np.asarray(arr[lo:min(lo + step, rows.stop)])[:, heads]
        norm.append(frobenius_norm(block))
        rank.append(effective_rank(block))
    return {"layer": layer, "prompt": prompt, "prompt_id": store.prompt_ids[prompt], "heads": heads,
            "positions": np.asarray(store[states.STATE_POSITION][rows], dtype=np.int64),
            "norm": np.concatenate(norm), "rank": np.concatenate(rank),
            "spectrum": singular_values(np.asarray(arr[rows.stop - 1])[heads])}


def _state_prompt(store: Store, prompt: int | None) -> int:
    """``prompt`` checked (finished, with snapshots), or the first finished prompt with some."""
    counts = store.state_index.count
    if prompt is None:
        having = [int(p) for p in store.visible if counts[p] > 0]
        if not having:
            raise GdnDumpError("no finished prompt has state snapshots to plot")
        return having[0]
    _check_prompt(store, prompt)
    if counts[prompt] == 0:
        raise GdnDumpError(f"--prompt {prompt} has no state snapshots (it has no stored tokens)")
    return prompt


def _ranges(values: list[int]) -> str:
    return f"{values[0]}-{values[-1]}" if values == list(range(values[0], values[-1] + 1)) \
        else ", ".join(map(str, values))


def store_tokenizer(store):
    """The tokenizer recorded in the store's provenance, loaded offline; None if it cannot be
    (then labels are token ids)."""
    return as_store(store).tokenizer
