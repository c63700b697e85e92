"""Rows and blocks of a store: which (finished) prompt owns each row, the chunk-aligned blocks
reads are made of, and the lazy ``prompt``/``position`` coordinates of the xarray view.
"""

from __future__ import annotations

import math

import numpy as np

GAP = -1  # the prompt and position of a row no (finished) prompt owns
# Most bytes of all selected arrays read in one block (the unit of reading and of shuffling).
BLOCK_BYTES = 64 << 20


class RowOwners:
    """Which prompt owns each row, for the given (finished) prompts; other rows are gaps."""

    def __init__(self, starts: np.ndarray, lengths: np.ndarray, prompts: np.ndarray):
        prompts = prompts[lengths[prompts] > 0]  # a prompt with no tokens owns no row
        self.prompts = prompts[np.argsort(starts[prompts], kind="stable")]
        self.starts = starts[self.prompts]
        self.ends = self.starts + lengths[self.prompts]  # sorted too: prompts never overlap

    def at(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(prompt, position)`` of each of ``rows`` ``[m]``: int64 ``[m]``, -1 on gaps."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.prompts):
            return np.full(rows.shape, GAP, np.int64), np.full(rows.shape, GAP, np.int64)
        i = np.maximum(np.searchsorted(self.starts, rows, side="right") - 1, 0)
        owned = (rows >= self.starts[i]) & (rows < self.ends[i])
        return (np.where(owned, self.prompts[i], GAP),
                np.where(owned, rows - self.starts[i], GAP))

    def blocks(self, rows: int) -> np.ndarray:
        """Sorted indices of the blocks of ``rows`` rows that hold at least one owned row."""
        first, last = self.starts // rows, (self.ends - 1) // rows
        counts = last - first + 1
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.unique(np.repeat(first, counts) + offsets)


def chunk_unit(chunk_rows: list[int], row_bytes: int, budget_bytes: int = BLOCK_BYTES) -> int:
    """The smallest block that is whole chunks of every array: the lcm of their chunk rows.

    Arrays of very different row sizes get very different chunk rows (chunks are ~4 MiB), and
    their lcm can hold far more than ``budget_bytes`` of all arrays: then the largest chunk that
    fits (or the smallest chunk). Arrays with bigger chunks are then read a part of a chunk at a
    time; they are the ones with small rows, so the extra bytes read stay small.
    """
    unit = math.lcm(*chunk_rows)
    if unit * row_bytes <= budget_bytes:
        return unit
    fitting = [c for c in chunk_rows if c * row_bytes <= budget_bytes]
    return max(fitting) if fitting else min(chunk_rows)


def row_bytes(arrays) -> int:
    return sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in arrays)


def concat_blocks(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def block_length(part: dict[str, np.ndarray]) -> int:
    return int(part["tokens"].shape[0])


# ---- lazy coordinates for xarray --------------------------------------------------------------

def lazy_owner_coordinate(owners: RowOwners, n_rows: int, which: int):
    """Coordinate ``prompt`` (``which=0``) or ``position`` (1) ``[n_rows]`` computed per request,
    so a billion-row store does not get two billion-entry coordinates in memory."""
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class OwnerArray(BackendArray):
        def __init__(self):
            self.shape = (n_rows,)
            self.dtype = np.dtype(np.int64)

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC,
                                                      self._raw)

        def _raw(self, key: tuple):
            (k,) = key
            rows = np.arange(*k.indices(n_rows)) if isinstance(k, slice) else np.asarray(k)
            return owners.at(rows)[which]

    return indexing.LazilyIndexedArray(OwnerArray())
