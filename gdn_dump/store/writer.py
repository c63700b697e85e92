"""Writing rows into a store: whole, aligned chunks from pooled buffers, on background threads.

:class:`RowWriter` buffers each array's rows until a chunk (or shard) is full and only then
writes it, so no chunk is ever read back and rewritten; the writes run on a thread of their own,
behind a bounded queue, through TensorStore's zarr3 driver (default) or zarr-python.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from pathlib import Path

import numpy as np
import zarr

from ..errors import StoreError
from .layout import ArraySpec
from .create import os_error, write_failure


class BackgroundWorker:
    """A thread that handles queued items in order, behind a bounded queue.

    The bound gives back-pressure (a slow consumer holds the producer back instead of growing
    memory). The first error stops the handling of later items and is raised on the producer's
    thread at its next ``put`` or at ``close``.
    """

    def __init__(self, name: str, max_pending: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def handle(self, item) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def put(self, item) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def close(self) -> None:
        """Wait until every queued item is handled; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Drop what is still queued and stop."""
        self._aborted = True
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._aborted:
                continue
            try:
                self.handle(item)
            except BaseException as exc:  # surfaced on the producer's thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


class RowWriter(BackgroundWorker):
    """Sequential writer of token rows into whole, aligned chunks, on a background thread.

    ``append(name, rows)`` takes the next rows of an array, in row order. Rows wait in a per-array
    buffer until a chunk is full; full chunks are queued to the writer thread (the queue is bounded,
    so a slow disk holds back capture instead of growing memory). ``close()`` writes the last,
    partial chunk of each array and waits for everything.
    """

    def __init__(self, group: zarr.Group, arrays: list[ArraySpec], start_row: int = 0,
                 max_pending: int = 8, engine: str = "zarr", starts: dict[str, int] | None = None):
        """``starts``: the first row to write along each row axis (``token``, ``prompt``,
        ``state``; see :meth:`Plan.start_rows`); ``start_row`` alone: the token axis."""
        starts = {"token": start_row, "prompt": 0, "state": 0, **(starts or {})}
        self._arrays = _open_for_writing(group, [spec.name for spec in arrays], engine)
        self._engine = engine
        self._pending: collections.deque = collections.deque()  # TensorStore write futures
        self._pool = _BufferPool()
        self._buffers: dict[str, _ChunkBuffer] = {
            spec.name: _ChunkBuffer(spec, starts[spec.stream], self._pool)
            for spec in arrays if spec.stream
        }
        self.bytes_written = 0  # bytes of the writes finished so far
        self._doing = "writing the store"  # what the writer thread does: the failure says it
        self._store_name = _store_name(group)
        super().__init__("gdn-dump-writer", max_pending)

    def append(self, name: str, rows: np.ndarray) -> None:
        for start, block, pooled in self._buffers[name].add(rows):
            self.put((name, slice(start, start + len(block)), block, pooled))

    def write_region(self, name: str, selection: tuple, block: np.ndarray) -> None:
        """Queue a write of ``block`` at ``selection`` (for arrays not laid out by rows)."""
        self.put((name, selection, block, None))

    def write_matrix_rows(self, name: str, prompt: int, top: int, block: np.ndarray,
                          heads: slice = slice(None)) -> None:
        """Queue rows ``top : top + r`` of prompt ``prompt``'s matrix in ``name``: ``block``
        ``[heads, r, top + r, ...]``, the causal prefix of those rows (of the ``heads`` of the
        array: all by default). Tiles above the diagonal or past the prompt's length are never
        written (they read back as the fill value 0)."""
        bottom = top + block.shape[1]
        trailing = (slice(None),) * (block.ndim - 3)
        self.write_region(name, (prompt, heads, slice(top, bottom), slice(0, bottom), *trailing),
                          np.ascontiguousarray(block))

    def _flush_tails(self) -> None:
        """Queue the last, partial chunk of each array."""
        for name, buffer in self._buffers.items():
            tail = buffer.flush()
            if tail is not None:
                start, block, pooled = tail
                self.put((name, slice(start, start + len(block)), block, pooled))

    def checkpoint(self, callback) -> None:
        """Make every row appended so far durable, then call ``callback()`` on the writer thread.

        The partial chunk of each array is written as it is (and kept: the whole chunk is written
        again, over it, once full), so a run killed after the callback loses nothing before it.
        """
        for name, buffer in self._buffers.items():
            partial = buffer.peek()
            if partial is not None:
                start, block, pooled = partial
                self.put((name, slice(start, start + len(block)), block, pooled))
        self.put((_CHECKPOINT, callback, None, None))

    def handle(self, item) -> None:
        name, where, block, pooled = item
        if name is _CHECKPOINT:
            self._wait_pending()
            if where is not None:
                self._doing = "recording progress"
                where()
            return
        self._doing = f"writing {name}"
        future = store_write(self._engine, self._arrays[name], where, block)
        if future is None:  # zarr-python: written
            self.bytes_written += block.nbytes
            self._pool.give(pooled)
            return
        # TensorStore writes in its own threads; a few are kept in flight. It may keep the block
        # instead of copying it: the block is not touched (nor given back to the pool) until done.
        self._pending.append((name, future, pooled, block.nbytes))
        while len(self._pending) > _TS_IN_FLIGHT:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        name, future, pooled, nbytes = self._pending.popleft()
        self._doing = f"writing {name}"
        future.result()
        self.bytes_written += nbytes  # counted once on disk: the failure message says how much
        self._pool.give(pooled)

    def close(self) -> None:
        """Write the last, partial chunk of each array and wait for every write."""
        self._flush_tails()
        self.put((_CHECKPOINT, None, None, None))
        BackgroundWorker.close(self)

    def _wait_pending(self) -> None:
        while self._pending:
            self._finish_oldest()

    def _raise_if_failed(self) -> None:
        failure = os_error(self._error)
        if failure is not None:  # disk full, quota, I/O error: one line, the store resumable
            raise write_failure(self._doing, failure, self.bytes_written,
                                self._store_name) from self._error
        super()._raise_if_failed()

    @contextlib.contextmanager
    def failures(self, what: str):
        """Report an operating-system error raised inside as the one-line :class:`RunFailure` of
        a failed write (for store writes made outside the writer thread, e.g. the last record)."""
        try:
            yield
        except Exception as exc:
            failure = os_error(exc)
            if failure is None:
                raise
            raise write_failure(what, failure, self.bytes_written, self._store_name) from exc


def store_write(engine: str, target, where, block: np.ndarray):
    """Write ``block`` at ``where`` of ``target``: the writer's one store write (the seam that the
    fault tests replace to fill the disk). zarr-python writes now and returns None; TensorStore
    returns a future, whose ``result()`` raises what the write raised."""
    if engine == "zarr":
        target[where] = block
        return None
    return target[where].write(block, can_reference_source_data_indefinitely=True)


WRITERS = ("zarr", "tensorstore")
_CHECKPOINT = object()
_TS_IN_FLIGHT = 16


def _store_name(group: zarr.Group) -> str:
    """The store's path or URL, for messages."""
    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return str(store.root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    return fs.unstrip_protocol(path) if fs is not None and path else "the store"


def _open_for_writing(group: zarr.Group, names: list[str], engine: str) -> dict:
    """The arrays to write through: zarr-python's, or TensorStore's zarr3 driver on the same files.

    The arrays are always created by zarr-python (metadata, attributes, dimension names); only the
    chunk writes go through the engine, so both give byte-identical stores.
    """
    if engine == "zarr":
        return {name: group[name] for name in names}
    if engine != "tensorstore":
        raise StoreError(f"--writer must be one of {', '.join(WRITERS)}, not {engine!r}")
    if not isinstance(group.store, zarr.storage.LocalStore):  # resolve() picks zarr for these
        raise StoreError("--writer tensorstore writes local stores only; use --writer zarr")
    try:
        import tensorstore as ts
    except ImportError:
        raise StoreError("--writer tensorstore needs TensorStore: pip install tensorstore") from None
    root = Path(group.store.root) / group.path
    # No fsync per chunk file (TensorStore's default): durability is asked for where it matters, at
    # progress checkpoints (Location.sync), not per chunk; the fsyncs tripled the write cost.
    context = ts.Context({"file_io_sync": False})
    return {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / name)},
                           "open": True, "store_data_equal_to_fill_value": True},
                          context=context).result() for name in names}


class _BufferPool:
    """Chunk-sized arrays reused from chunk to chunk.

    A fresh multi-MB array per chunk costs page faults (a copy into a fresh array measured 2-4x
    slower than into a warm one) and, freed on another thread, fragments the heap over a long run.
    """

    def __init__(self):
        self._free: dict[tuple, list[np.ndarray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype) -> np.ndarray:
        with self._lock:
            free = self._free[(shape, np.dtype(dtype))]
            if free:
                return free.pop()
        return np.empty(shape, dtype)

    def give(self, array: np.ndarray | None) -> None:
        if array is not None:
            with self._lock:
                self._free[(array.shape, array.dtype)].append(array)


class _ChunkBuffer:
    """Rows of one array gathered, in a pooled chunk-sized array, until a chunk boundary.

    Emits ``(start_row, block, pooled)``: ``pooled`` is the array to give back to the pool once
    ``block`` is written (None when ``block`` is the caller's own rows, passed through uncopied
    because they fill a whole chunk by themselves).
    """

    def __init__(self, spec: ArraySpec, start_row: int, pool: _BufferPool):
        self.chunk = spec.write_rows
        self.pool = pool
        self.next_row = start_row  # first row not yet handed out
        self.buffer: np.ndarray | None = None
        self.filled = 0

    def add(self, rows: np.ndarray):
        """Take rows; yield ``(start_row, block, pooled)`` for each chunk they complete."""
        while len(rows):
            room = self.chunk - self.next_row % self.chunk - self.filled
            if self.filled == 0 and len(rows) >= room:  # a whole chunk from the caller's rows
                block, rows = rows[:room], rows[room:]
                start, self.next_row = self.next_row, self.next_row + room
                yield start, np.ascontiguousarray(block), None
                continue
            if self.buffer is None:
                self.buffer = self.pool.take((self.chunk, *rows.shape[1:]), rows.dtype)
            take, rows = rows[:room], rows[room:]
            self.buffer[self.filled:self.filled + len(take)] = take
            self.filled += len(take)
            if len(take) == room:
                yield self._emit()

    def flush(self):
        return self._emit() if self.filled else None

    def peek(self):
        """``(start_row, copy of the rows held, None)`` without handing them out (None if empty)."""
        if not self.filled:
            return None
        return self.next_row, self.buffer[:self.filled].copy(), None

    def _emit(self):
        start, block, pooled = self.next_row, self.buffer[:self.filled], self.buffer
        self.next_row += self.filled
        self.buffer, self.filled = None, 0
        return start, block, pooled
