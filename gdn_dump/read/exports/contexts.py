"""Contexts of N rows cut from a store's prompts: what a trainer's cache holds, one per row.

Each finished prompt of n rows gives ``n // N`` contexts, ``[start + k N, start + (k + 1) N)``; its
last ``n % N`` rows are dropped (counted). The order a cache is written in is a permutation of
these contexts in store order (:func:`export_order`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import StoreError


@dataclass(frozen=True)
class Contexts:
    size: int  #: N, rows of each context
    prompts: np.ndarray  #: [n_contexts] int64, the prompt of each context, in store order
    rows: np.ndarray  #: [n_contexts] int64, its first row in the store
    dropped_rows: int  #: rows of the prompts' remainders shorter than N

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def cut_contexts(store, size: int, option: str = "--context-size") -> Contexts:
    """The contexts of ``size`` rows of every finished prompt of ``store``, in row order."""
    if size < 1:
        raise StoreError(f"{option} must be at least 1, not {size}")
    finished = np.asarray(store.visible, dtype=np.int64)
    lengths = store.prompt_length[finished]
    starts = store.prompt_start[finished]
    if not len(finished) or lengths.max() < size:
        longest = int(lengths.max()) if len(finished) else 0
        raise StoreError(f"{option} {size} is larger than every prompt of {store.path} "
                         f"(the longest has {longest} tokens)")
    per_prompt = lengths // size
    prompts = np.repeat(finished, per_prompt)
    first = np.repeat(starts, per_prompt)
    k = np.arange(len(prompts)) - np.repeat(np.cumsum(per_prompt) - per_prompt, per_prompt)
    rows = first + k * size
    order = np.argsort(rows, kind="stable")
    return Contexts(size, prompts[order].astype(np.int64), rows[order].astype(np.int64),
                    int((lengths % size).sum()))


def export_order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    """Which context (index in store order) the cache's i-th row holds:
    ``numpy.random.default_rng(seed).permutation(n)``, or ``arange(n)`` without shuffling."""
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


def feature_shape(store, hook: str, head: int | None) -> tuple[int, tuple[int, ...]]:
    """``(d_in, the hook's row shape)``; with ``head`` the row is that head's features."""
    shape = tuple(int(n) for n in store[hook].shape[1:])
    if head is None:
        return int(np.prod(shape, dtype=np.int64)), shape
    dims = store._dims[hook][1:]
    if len(shape) < 2 or not dims[0].endswith("head"):
        raise StoreError(f"--head needs a hook with heads and features ([head, d]); {hook} rows "
                         f"are {list(shape)} ({', '.join(dims) or 'a scalar'})")
    if not 0 <= head < shape[0]:
        raise StoreError(f"--head {head} is out of range: {hook} has {shape[0]} heads (0..{shape[0] - 1})")
    return int(np.prod(shape[1:], dtype=np.int64)), shape
