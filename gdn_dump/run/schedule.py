"""Which prompts run together: length-sorted windows cut into padded batches, halved on OOM.

Prompts are read in file order in *windows* of at most ``window_tokens`` tokens. Inside a window
they run longest first, so a batch holds prompts of similar length and carries little padding
(ragged prompts batched in file order can waste most of a batch on padding). The store order does
not change: :class:`gdn_dump.sink.BatchSink` puts the rows back in prompt order, and to do so it
holds at most one window of rows, which is what bounds its memory (``--sort-window``).

A batch is a list of ``(prompt_index, token_ids)`` items.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from .capture import Capture, CapturedBatch, pad_batch
from ..errors import RunFailure

Item = tuple[int, list[int]]
# A window also closes after this many batches' worth of prompts, so a file of empty or very short
# prompts still flows through in bounded steps.
MAX_WINDOW_BATCHES = 64


def units(items: Iterable[Item], batch_size: int, max_batch_tokens: int | None = None,
          window_tokens: int | None = None, boundary_every: int | None = None,
          stream_tokens: int | None = None) -> Iterator[list[list[Item]]]:
    """Group ``items`` (in prompt order) into *units*: runs of consecutive prompts, each a list of
    batches. A unit is a sorting window (with ``window_tokens``) or a single batch (without).

    Units are the grain of the work split and of resume: they depend only on the prompt lengths
    and these options, never on the number of processes, so every process batches every prompt
    exactly as a single process would (same padding partners, bit-identical values). No unit
    straddles a multiple of ``boundary_every`` prompts (the chunk of per-prompt arrays, so that
    processes can split there without sharing a chunk).

    A batch holds at most ``batch_size`` prompts and, when ``max_batch_tokens`` is set, at most that
    many padded tokens (a longer prompt goes alone). Inside a window prompts run longest first
    (ties keep file order).

    A prompt of at least ``stream_tokens`` tokens (one that fills a sorting window by itself) is
    a unit of its own: every prompt before it is handed on before it runs, so its rows can go to
    the writer as they are captured (see :func:`streams`).
    """
    window: list[Item] = []
    held = 0
    limit = batch_size * MAX_WINDOW_BATCHES if window_tokens else batch_size
    for item in items:
        if streams([item], stream_tokens):
            if window:
                yield _cut(window, batch_size, max_batch_tokens, window_tokens)
                window, held = [], 0
            yield [[item]]
            continue
        if window and boundary_every and item[0] % boundary_every == 0:
            yield _cut(window, batch_size, max_batch_tokens, window_tokens)
            window, held = [], 0
        if window and not window_tokens and _too_wide(window, item, max_batch_tokens):
            yield [window]
            window, held = [], 0
        window.append(item)
        held += len(item[1])
        if len(window) >= limit or (window_tokens and held >= window_tokens):
            yield _cut(window, batch_size, max_batch_tokens, window_tokens)
            window, held = [], 0
    if window:
        yield _cut(window, batch_size, max_batch_tokens, window_tokens)


def streams(batch: list[Item], stream_tokens: int | None) -> bool:
    """Whether ``batch`` is one prompt long enough to stream (a unit of its own, see :func:`units`)."""
    return stream_tokens is not None and len(batch) == 1 and len(batch[0][1]) >= stream_tokens


def _cut(window: list[Item], batch_size: int, max_batch_tokens: int | None,
         window_tokens: int | None) -> list[list[Item]]:
    if not window_tokens:
        return [window]
    return list(_pack(_longest_first(window), batch_size, max_batch_tokens))


def _too_wide(batch: list[Item], item: Item, max_batch_tokens: int | None) -> bool:
    if max_batch_tokens is None:
        return False
    width = max(len(item[1]), *(len(t) for _, t in batch))
    return width * (len(batch) + 1) > max_batch_tokens


def _longest_first(window: list[Item]) -> list[Item]:
    return sorted(window, key=lambda item: -len(item[1]))  # sorted() is stable


def _pack(items: Iterable[Item], batch_size: int, max_batch_tokens: int | None) -> Iterator[list[Item]]:
    batch: list[Item] = []
    width = 0
    for item in items:
        new_width = max(width, len(item[1]))
        too_many = max_batch_tokens is not None and new_width * (len(batch) + 1) > max_batch_tokens
        if batch and (len(batch) == batch_size or too_many):
            yield batch
            batch, new_width = [], len(item[1])
        batch.append(item)
        width = new_width
    if batch:
        yield batch


class HalvingRunner:
    """Runs batches through the capture; on out-of-memory it halves the batch and retries.

    The smaller size is kept for the rest of the run (a batch that did not fit once will not fit
    the next time either). Only a single prompt that does not fit is a failure. Prompts without
    tokens never reach the model; they ride along as ``CapturedBatch.empty``.
    """

    def __init__(self, capture: Capture, pad_id: int, note=lambda message: None):
        self.capture, self.pad_id, self.note = capture, pad_id, note
        self.limit: int | None = None  # most prompts per forward, once memory ran out
        self.retries = 0

    def run(self, batch: list[Item], stream=None) -> list[CapturedBatch]:
        """``stream``: see :meth:`Capture.run` (a streamed prompt that runs out of memory is not
        retried: its first rows are written already, and a single prompt cannot be halved)."""
        kept = [(p, t) for p, t in batch if t]
        empty = [p for p, t in batch if not t]
        captured = self._run(kept, stream) if kept else [CapturedBatch([], [], np.zeros(0, np.int32))]
        captured[0].empty = empty
        return captured

    def _run(self, kept: list[Item], stream=None) -> list[CapturedBatch]:
        if self.limit is not None and len(kept) > self.limit:
            return self._split(kept)
        ids, lengths = pad_batch([t for _, t in kept], self.pad_id)
        try:
            return [self.capture.run(ids, lengths, [p for p, _ in kept], stream=stream)]
        except torch.OutOfMemoryError:
            pass  # retried below, outside the handler: its traceback holds the failed forward's tensors
        self.capture.reset()
        if self.capture.cuda:
            torch.cuda.empty_cache()
        if len(kept) == 1:
            raise RunFailure(
                f"out of memory on a single prompt of {len(kept[0][1])} tokens; lower "
                "--max-length, select fewer layers, or use a larger device"
            )
        self.limit = len(kept) // 2
        self.retries += 1
        self.note(f"out of memory on a batch of {len(kept)} prompts: retrying with "
                  f"{self.limit} prompts per batch")
        return self._split(kept)

    def _split(self, kept: list[Item]) -> list[CapturedBatch]:
        middle = len(kept) // 2
        return self._run(kept[:middle]) + self._run(kept[middle:])
