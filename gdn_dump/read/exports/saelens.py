"""SAELens's activation cache: a ``datasets`` ``save_to_disk`` directory SAELens trains from
without a model (``ActivationsStore(model=None, dataset=None, cached_activations_path=DIR)``).

One row per context of N tokens: a column named as the hook, ``Array2D(shape=(N, d_in))``
(float32 or float16), and ``token_ids``, ``Sequence(Value("int32"), length=N)``. SAELens reads
rows in order, so the contexts are shuffled on disk (seeded; recorded). A hook with heads
(``[v_head, d_v]``) is flattened to ``d_in = v_head * d_v``, or one head is taken.

Bounded memory: the store is read in row order a block at a time; with shuffling each context is
first written to its shuffled place in a temporary file beside the output (so the disk holds the
cache twice for a while), then the files are written in order with ``datasets``' own
``ArrowWriter``, shard by shard. Beside the ``datasets`` files: ``gdn_dump_export.json`` (model,
hook, context size, d_in, head, seed, the source store's provenance) and
``gdn_dump_contexts.npy`` ``[n, 2]`` int64: the (prompt, first row) in the store of each row.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import GdnDumpError, StoreError
from .contexts import Contexts, cut_contexts, export_order, feature_shape

DTYPES = ("float32", "float16")
SIDECAR = "gdn_dump_export.json"
ORDER_FILE = "gdn_dump_contexts.npy"
SHARD_BYTES = 500 << 20  # rows per .arrow file: about save_to_disk's default shard size
READ_BYTES = 64 << 20  # rows read from the store at a time, and contexts written per batch


@dataclass(frozen=True)
class Exported:
    """One exported hook: where, how many contexts, d_in, and what was dropped."""

    hook: str
    path: Path
    contexts: int
    context_size: int
    d_in: int
    dropped_rows: int
    bytes: int


def datasets_module():
    try:
        import datasets
    except ImportError:
        raise GdnDumpError("export --format saelens needs datasets: pip install 'gdn-dump[saelens]'") from None
    return datasets


def export_saelens(store, hooks: list[str], out: str | Path, *, context_size: int | None = None,
                   head: int | None = None, shuffle: bool = True, seed: int = 0,
                   dtype: str = "float32", overwrite: bool = False,
                   progress: Callable[[int, int], None] | None = None,
                   shard_bytes: int = SHARD_BYTES) -> list[Exported]:
    """Write SAELens's cache of ``hooks`` of ``store`` (an open :class:`~gdn_dump.read.Store`)
    under ``out`` (one hook: ``out`` itself; several: ``out/<hook>``). Everything a user can get
    wrong is checked before anything is written."""
    datasets_module()
    if dtype not in DTYPES:
        raise GdnDumpError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    hooks = [_check_hook(store, h) for h in hooks]
    size = _context_size(store, context_size)
    specs = [feature_shape(store, h, head) for h in hooks]
    contexts = cut_contexts(store, size)
    out = Path(out)
    targets = [out] if len(hooks) == 1 else [out / h for h in hooks]
    _check_out(out, overwrite)
    order = export_order(len(contexts), shuffle, seed)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    steps = len(contexts) * len(hooks) * (2 if shuffle else 1)
    counter = _Progress(progress, steps)
    for hook, (d_in, shape), target in zip(hooks, specs, targets):
        target.mkdir(parents=True, exist_ok=True)
        writer = _CacheWriter(target, hook, size, d_in, dtype, len(contexts), shard_bytes)
        _write(store, hook, head, contexts, order, writer, counter)
        nbytes = writer.finish(_fingerprint(store, hook, size, head, seed, shuffle, dtype))
        np.save(target / ORDER_FILE, np.stack([contexts.prompts[order], contexts.rows[order]], 1))
        meta = {"format": "saelens", "hook": hook, "hook_shape": list(shape), "context_size": size,
                "d_in": d_in, "head": head, "dtype": dtype, "shuffle": shuffle, "seed": seed,
                "order": f"{ORDER_FILE}: (prompt, first row) of each row; = numpy.random."
                         f"default_rng(seed).permutation(n_contexts) of the contexts in store order"
                         if shuffle else f"{ORDER_FILE}: (prompt, first row); store order",
                "n_contexts": len(contexts), "dropped_rows": contexts.dropped_rows,
                "model": (store.provenance.get("model") or {}).get("name"),
                "source": {"path": store.path, "provenance": store.provenance}}
        (target / SIDECAR).write_text(json.dumps(meta, indent=2, default=str))
        done.append(Exported(hook, target, len(contexts), size, d_in, contexts.dropped_rows, nbytes))
    return done


def _check_hook(store, hook: str) -> str:
    if hook in store.matrices:
        raise StoreError(f"{hook!r} is a per-prompt matrix [prompt, head, query, key], not rows "
                         "of tokens: an SAE trains on per-token hooks")
    if hook not in store.hooks:
        raise StoreError(f"{hook!r}: not a per-token hook of {store.path}; it has "
                         f"{', '.join(store.hooks) or 'none'}")
    return hook


def _context_size(store, given: int | None) -> int:
    if given is not None:
        return int(given)
    packed = (store.provenance.get("packing") or {}).get("context_size")
    if packed is None:
        raise StoreError(f"{store.path} holds whole prompts, not packed contexts: give "
                         "--context-size (each prompt's rows past a multiple of it are dropped)")
    return int(packed)


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise StoreError(f"--out {out} exists; pass --overwrite to replace it")
    ours = out.is_dir() and ((out / SIDECAR).is_file() or any(out.glob(f"*/{SIDECAR}")))
    if out.is_dir() and not ours and any(out.iterdir()):
        raise StoreError(f"--out {out} exists and is not a gdn-dump export; --overwrite replaces "
                         "only an export: choose another path or remove it yourself")
    shutil.rmtree(out) if out.is_dir() else out.unlink()


class _Progress:
    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, total, 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.report is not None:
            self.report(self.done, self.total)


def _rows(store, hook: str, head: int | None, contexts: Contexts, dtype: str):
    """``(context indices, rows [k, N, d_in] as dtype, token ids [k, N] int32)`` in store order,
    a block of about :data:`READ_BYTES` at a time."""
    array, tokens = store[hook], store["tokens"]
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    per_block = max(1, READ_BYTES // max(row_bytes * contexts.size, 1))
    n = contexts.size
    for lo in range(0, len(contexts), per_block):
        hi = min(lo + per_block, len(contexts))
        first, last = int(contexts.rows[lo]), int(contexts.rows[hi - 1]) + n
        values = np.asarray(array[first:last])
        ids = np.asarray(tokens[first:last], dtype=np.int32)
        offsets = (contexts.rows[lo:hi] - first)[:, None] + np.arange(n)
        block = values[offsets]  # [k, N, *shape]
        if head is not None:
            block = block[:, :, head]
        yield np.arange(lo, hi), block.reshape(hi - lo, n, -1).astype(dtype), ids[offsets]


def _write(store, hook, head, contexts: Contexts, order: np.ndarray, writer: "_CacheWriter",
           counter: _Progress) -> None:
    if np.array_equal(order, np.arange(len(order))):  # store order: straight to the cache
        for _, values, ids in _rows(store, hook, head, contexts, writer.dtype):
            writer.append(values, ids)
            counter.advance(len(ids))
        return
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))  # where each context goes
    with tempfile.TemporaryDirectory(prefix=".gdn_dump_shuffle_", dir=writer.path) as tmp:
        values_file, ids_file = Path(tmp) / "values.bin", Path(tmp) / "ids.bin"
        value_bytes = contexts.size * writer.d_in * np.dtype(writer.dtype).itemsize
        id_bytes = contexts.size * 4
        with open(values_file, "wb") as vf, open(ids_file, "wb") as tf:
            for index, values, ids in _rows(store, hook, head, contexts, writer.dtype):
                for i, v, t in zip(position[index], values, ids):
                    os.pwrite(vf.fileno(), v.tobytes(), int(i) * value_bytes)
                    os.pwrite(tf.fileno(), t.tobytes(), int(i) * id_bytes)
                counter.advance(len(ids))
        per_batch = max(1, READ_BYTES // value_bytes)
        with open(values_file, "rb") as vf, open(ids_file, "rb") as tf:
            for lo in range(0, len(order), per_batch):
                k = min(per_batch, len(order) - lo)
                values = np.fromfile(vf, dtype=writer.dtype, count=k * contexts.size * writer.d_in)
                ids = np.fromfile(tf, dtype=np.int32, count=k * contexts.size)
                writer.append(values.reshape(k, contexts.size, writer.d_in), ids.reshape(k, contexts.size))
                counter.advance(k)


class _CacheWriter:
    """``data-%05d-of-%05d.arrow`` files written in order with ``datasets.arrow_writer.ArrowWriter``,
    then ``dataset_info.json`` and ``state.json`` as ``save_to_disk`` writes them."""

    def __init__(self, path: Path, hook: str, size: int, d_in: int, dtype: str, n: int,
                 shard_bytes: int):
        datasets = datasets_module()
        self.path, self.hook, self.size, self.d_in, self.dtype = path, hook, size, d_in, dtype
        self.features = datasets.Features({
            hook: datasets.Array2D(shape=(size, d_in), dtype=dtype),
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=size)})
        row_bytes = size * (d_in * np.dtype(dtype).itemsize + 4)
        self.per_file = max(1, shard_bytes // row_bytes)
        self.n_files = max(1, -(-n // self.per_file))
        self.files: list[str] = []
        self.writer, self.in_file, self.bytes = None, 0, 0

    def append(self, values: np.ndarray, ids: np.ndarray) -> None:
        """Rows ``[k, N, d_in]`` and token ids ``[k, N]``, split over the files as they fill."""
        while len(values):
            if self.writer is None or self.in_file == self.per_file:
                self._next_file()
            take = min(self.per_file - self.in_file, len(values))
            self.writer.write_table(self._table(values[:take], ids[:take]))
            self.in_file += take
            self.bytes += values[:take].nbytes + ids[:take].nbytes
            values, ids = values[take:], ids[take:]

    def _next_file(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        self._close_file()
        name = f"data-{len(self.files):05d}-of-{self.n_files:05d}.arrow"
        self.files.append(name)
        self.writer = ArrowWriter(features=self.features, path=str(self.path / name))
        self.in_file = 0

    def _close_file(self) -> None:
        if self.writer is not None:
            self.writer.finalize()
            self.writer.close()
            self.writer = None

    def _table(self, values: np.ndarray, ids: np.ndarray):
        """An Arrow table of the features' types, built from the buffers (no Python lists)."""
        import pyarrow as pa
        from datasets.features.features import Array2DExtensionType

        k = len(values)
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, k * self.size * self.d_in + 1,
                                                            self.d_in, dtype=np.int32)), flat)
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, k * self.size + 1, self.size,
                                                            dtype=np.int32)), inner)
        column = pa.ExtensionArray.from_storage(
            Array2DExtensionType(shape=(self.size, self.d_in), dtype=self.dtype), outer)
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(ids).reshape(-1)),
                                                   self.size)
        return pa.table({self.hook: column, "token_ids": tokens})

    def finish(self, fingerprint: str) -> int:
        """Close the last file and write what ``load_from_disk`` reads; the bytes of rows written."""
        datasets = datasets_module()
        self._close_file()
        while len(self.files) < self.n_files:  # no rows left for the last files: none planned
            self.n_files = len(self.files)
        for i, name in enumerate(self.files):  # the count in the names is the files written
            final = f"data-{i:05d}-of-{len(self.files):05d}.arrow"
            if final != name:
                os.replace(self.path / name, self.path / final)
                self.files[i] = final
        datasets.DatasetInfo(features=self.features).write_to_directory(str(self.path))
        state = {"_data_files": [{"filename": f} for f in self.files], "_fingerprint": fingerprint,
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        (self.path / "state.json").write_text(json.dumps(state, indent=2))
        return self.bytes


def _fingerprint(store, hook, size, head, seed, shuffle, dtype) -> str:
    """What ``datasets`` keys its caches by: the export's identity, 16 hex digits."""
    import hashlib

    key = json.dumps([store.path, store.provenance.get("created"), hook, size, head, seed, shuffle,
                      dtype])
    return hashlib.sha256(key.encode()).hexdigest()[:16]
