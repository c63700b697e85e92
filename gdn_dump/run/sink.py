"""From captured batches to the writer, in prompt order, on a thread of its own.

Batches arrive in run order (length-sorted inside a window, see :mod:`gdn_dump.run.schedule`); the
store wants rows in prompt order. :class:`BatchSink` keeps each batch's host rows until every prompt
before them has been handed on, then appends runs of consecutive prompts to the
:class:`~gdn_dump.store.writer.RowWriter`. Since windows are consecutive prompts and a window's
batches all arrive before the next window's, it never holds more than one window of rows. A prompt
that fills a window by itself is a unit of its own and streams: its :class:`RowPiece` s arrive
while it runs, after every earlier prompt was handed on, and go straight to the writer.

The sink thread owns the run's counts (:class:`~gdn_dump.store.tally.Tally`) and statistics: it
snapshots both at every unit end, and a progress record carries the snapshot of its unit.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from ..catalogue import ROW_ARRAYS, ROW_DOCUMENT
from .capture import NONFINITE, OVERFLOW, CapturedBatch, RowPiece
from .session import Clock
from ..errors import RunFailure
from ..store.layout import Plan
from ..ops.stats import STATE_STATISTICS, ArrayStats, for_arrays, snapshot, state_stat_key
from ..ops.stats_device import merge_packed
from ..store.tally import Tally
from ..store.writer import BackgroundWorker, RowWriter


@dataclass(frozen=True)
class UnitEnd:
    """Put after the last batch of a unit: every prompt before ``prompt`` has been captured,
    with ``oom_retries`` out-of-memory retries in this run so far."""

    prompt: int
    oom_retries: int = 0


@dataclass
class _HeldBatch:
    rows: dict[str, np.ndarray]  # array name -> [n_rows, ...] host rows of one batch
    nbytes: int
    remaining: int  # prompts not yet handed to the writer
    stats_done: bool = False  # its statistics came from the device: not accumulated again here


@dataclass
class _Ready:
    held: _HeldBatch | None  # None: a prompt without tokens
    start: int  # first row of the prompt in ``held.rows``
    stop: int
    residuals: dict[str, float]
    states: tuple[int, int] = (0, 0)  # its snapshot rows in ``held.rows`` of the state arrays


class BatchSink(BackgroundWorker):
    """Waits for each batch's device-to-host copies, reorders prompts, feeds the writer.

    The forward loop never waits for copies: this thread does. At most ``max_batches`` batches wait
    in the queue, which holds capture back when writing lags. ``held_bytes`` / ``peak_held_bytes``
    count the rows kept for reordering.
    """

    def __init__(self, writer: RowWriter, plan: Plan, *, start_prompt: int = 0,
                 max_batches: int = 2, recorder=None, checkpoint_every: float = 60.0,
                 fail_on_nonfinite: bool = False, stats: dict[str, ArrayStats] | None = None,
                 tally: Tally | None = None, clock: Clock | None = None,
                 row_documents: dict[int, np.ndarray] | None = None):
        self.writer = writer
        # packed contexts: each prompt's row documents, put here as it is cut, taken when written
        self.row_documents = row_documents
        # recorder.record(prompt, stats, tally) runs on the writer thread once every row before
        # ``prompt`` is durable; ``stats`` and ``tally`` are those of exactly those rows
        self.recorder, self.checkpoint_every = recorder, checkpoint_every
        self.last_unit_end = start_prompt  # the latest unit boundary handed to the writer
        self._last_checkpoint = time.monotonic()
        self.fail_on_nonfinite = fail_on_nonfinite
        self.token_arrays = [a.name for a in plan.arrays
                             if a.stream == "token" and a.name not in ROW_ARRAYS]
        self.state_arrays = [a.name for a in plan.arrays if a.stream == "state"]
        self.state_counts = plan.states.counts if plan.states is not None else None
        self.residual_arrays = {a.name: a.residual_name for a in plan.matrices
                                if a.has_residual(plan.attn_mode)}
        self.residual_arrays.update({c.name: c.residual_name for c in plan.contributions})
        # per-head statistics and counts of the rows handed to the writer (from the region's first
        # prompt: ``stats`` and ``tally`` continue a resumed run's), and their copies at the
        # latest unit boundary
        self.stats = for_arrays(plan.arrays) if stats is None else stats
        self.tally = tally or Tally()
        self.clock = clock or Clock(self.tally.seconds)
        self._oom_before = self.tally.oom_retries
        self.unit_stats, self.unit_tally = snapshot(self.stats), self.tally.snapshot()
        self.next_prompt = start_prompt
        self._ready: dict[int, _Ready] = {}
        self.held_bytes = 0
        self.peak_held_bytes = 0
        super().__init__("gdn-dump-sink", max_batches)

    def handle(self, batch: CapturedBatch | RowPiece | UnitEnd) -> None:
        if isinstance(batch, UnitEnd):
            self._unit_end(batch)
            return
        if isinstance(batch, RowPiece):
            self._write_piece(batch)
            return
        batch.wait()
        self._write_matrices(batch)  # computed as they are read; their residuals are counted next
        self._tally(batch)  # before any of its rows are written: --fail-on-nonfinite stops here
        rows = {"tokens": batch.tokens, **dict(batch.numpy_rows())}
        held = _HeldBatch(rows, sum(r.nbytes for r in rows.values()), len(batch.prompts),
                          stats_done=bool(batch.stat_values))
        for name, moments in batch.stat_values.items():  # the batch's rows: all stored by the
            if name in self.stats:                        # next unit end, before its snapshot
                merge_packed(self.stats[name], moments.numpy())
        self._state_stats(batch.state_stats)
        self.held_bytes += held.nbytes
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        offsets = np.concatenate([[0], np.cumsum(batch.lengths)]).tolist()
        counts = self.state_counts[batch.prompts] if self.state_counts is not None else [0] * len(batch.prompts)
        states = np.concatenate([[0], np.cumsum(counts)]).tolist()
        for i, prompt in enumerate(batch.prompts):
            residuals = {name: values[i] for name, values in batch.residuals.items()}
            self._ready[prompt] = _Ready(held, offsets[i], offsets[i + 1], residuals,
                                         (states[i], states[i + 1]))
        for prompt in batch.empty:  # an empty prompt has nothing to reproduce
            self._ready[prompt] = _Ready(None, 0, 0, {name: 0.0 for name in self.residual_arrays})
        self._hand_on()

    def _write_piece(self, piece: RowPiece) -> None:
        """Rows of a streamed prompt: the next rows of their array, since every prompt before it
        was handed on; its statistics accumulate as the rows do (its batch brings the counts)."""
        if piece.prompt != self.next_prompt or self._ready:
            raise RunFailure(f"internal error: prompt {piece.prompt} streamed while prompt "
                             f"{self.next_prompt} is next")
        piece.wait()
        rows = piece.numpy()
        self.writer.append(piece.name, rows)
        if piece.name in self.stats:
            if piece.moments is not None:
                merge_packed(self.stats[piece.name], piece.moments.numpy())
            else:
                self.stats[piece.name].accumulate(rows)
        if piece.state_stats is not None:
            self._state_stats({piece.name: piece.state_stats})

    def _write_matrices(self, batch: CapturedBatch) -> None:
        """Each prompt's matrices (and contributions), a block of rows at a time (regions: written
        in any order), then the residuals their blocks were checked against."""
        for name, matrices in batch.matrices.items():
            for prompt, matrix in zip(batch.prompts, matrices):
                for array, top, heads, block in matrix.pieces(name):
                    self.writer.write_matrix_rows(array, prompt, top, block, heads)
            if name in self.residual_arrays:
                batch.residuals[name] = [matrix.residual for matrix in matrices]

    def _hand_on(self) -> None:
        """Append every run of consecutive ready prompts; one slice per run within a batch."""
        while self.next_prompt in self._ready:
            first_prompt = self.next_prompt
            first = self._ready.pop(self.next_prompt)
            run = [first]
            self.next_prompt += 1
            while (self.next_prompt in self._ready and self._ready[self.next_prompt].held is first.held
                   and self._ready[self.next_prompt].start == run[-1].stop):
                run.append(self._ready.pop(self.next_prompt))
                self.next_prompt += 1
            held = first.held
            if held is not None:
                rows = slice(first.start, run[-1].stop)
                self.writer.append("tokens", held.rows["tokens"][rows])
                if self.row_documents is not None:
                    self.writer.append(ROW_DOCUMENT, np.concatenate(
                        [self.row_documents.pop(p) for p in range(first_prompt, self.next_prompt)]))
                for name in self.token_arrays:
                    if name not in held.rows:  # streamed: written already
                        continue
                    self.writer.append(name, held.rows[name][rows])
                    if name in self.stats and not held.stats_done:
                        self.stats[name].accumulate(held.rows[name][rows])
                snapshots = slice(first.states[0], run[-1].states[1])
                for name in self.state_arrays:
                    if name in held.rows:
                        self.writer.append(name, held.rows[name][snapshots])
                held.remaining -= len(run)
                if held.remaining == 0:
                    self.held_bytes -= held.nbytes
                    held.rows = {}
            for matrix, residual in self.residual_arrays.items():
                self.writer.append(residual, np.array([r.residuals[matrix] for r in run]))

    def _state_stats(self, state_stats: dict) -> None:
        """Norm and effective rank of each snapshot, per head (``CapturedBatch.state_stats``):
        every snapshot of the batch is stored by the next unit end, before its snapshot of the
        statistics (as for the rows)."""
        for name, values in state_stats.items():
            for statistic, per_head in zip(STATE_STATISTICS, values):
                key = state_stat_key(name, statistic)
                if key in self.stats:
                    self.stats[key].accumulate(per_head.numpy())

    def _unit_end(self, end: UnitEnd) -> None:
        if self.next_prompt != end.prompt or self._ready:
            raise RunFailure(f"internal error: unit ending at prompt {end.prompt} while prompt "
                             f"{self.next_prompt} is next")
        self.last_unit_end = end.prompt
        self.tally.oom_retries = self._oom_before + end.oom_retries
        self.tally.seconds = self.clock.seconds()
        self.unit_stats, self.unit_tally = snapshot(self.stats), self.tally.snapshot()
        now = time.monotonic()
        if self.recorder is not None and now - self._last_checkpoint >= self.checkpoint_every:
            self._last_checkpoint = now
            self.writer.checkpoint(functools.partial(self.recorder.record, end.prompt,
                                                     self.unit_stats, self.unit_tally))

    def _tally(self, batch: CapturedBatch) -> None:
        tally = self.tally
        tally.prompts += len(batch.prompts) + len(batch.empty)
        tally.tokens += sum(batch.lengths)
        tally.padded_tokens += batch.width * len(batch.lengths)
        for name, values in batch.residuals.items():
            tally.add_residuals(name, values)
        nonfinite = batch.counts(NONFINITE)
        tally.add_counts(tally.overflow, batch.counts(OVERFLOW))
        tally.add_counts(tally.nonfinite, nonfinite)
        if self.fail_on_nonfinite and nonfinite:
            name, count = next(iter(nonfinite.items()))
            listed = ", ".join(map(str, batch.prompts[:8])) + (" ..." if len(batch.prompts) > 8 else "")
            raise RunFailure(f"{count:,} NaN/inf values in {name} (batch of prompts {listed}"
                             f"{f'; {len(nonfinite) - 1} more arrays' if len(nonfinite) > 1 else ''}):"
                             " stopped by --fail-on-nonfinite; the store stays in_progress")

    def close(self, end_prompt: int | None = None, strict: bool = True) -> None:
        """Wait for every batch; check that every prompt up to ``end_prompt`` was handed on
        (not ``strict``: after an interruption, prompts may be waiting for earlier ones)."""
        super().close()
        if not strict:
            return
        if self._ready or (end_prompt is not None and self.next_prompt != end_prompt):
            waiting = sorted(self._ready)[:5]
            raise RunFailure(f"internal error: prompts {self.next_prompt}.. were never captured "
                             f"(waiting: {waiting}); the store stays in_progress")
