"""Packing documents into contexts of exactly N tokens (``--context-size``), and where each
context begins in the stream.

Documents (each already ending with EOS, :class:`~gdn_dump.run.tokens.Encoder`) are concatenated in
stream order and cut into consecutive contexts of N tokens; a final partial context is dropped. Each
row also carries the index of the document it came from. :func:`pack_reference` is the readable
definition; :func:`pack` the bounded-memory form the run uses; tests hold them together.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

TOKEN_DTYPE = np.int32
DOCUMENT_DTYPE = np.int64


def pack_reference(documents: Sequence[tuple[int, Sequence[int]]], context_size: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Concatenate every document's ids, cut into ``context_size`` pieces, drop the partial last:
    ``[(tokens [N], row_document [N]), ...]``."""
    tokens = [t for _, ids in documents for t in ids]
    owners = [d for d, ids in documents for _ in ids]
    n = len(tokens) // context_size
    return [(np.array(tokens[k * context_size:(k + 1) * context_size], TOKEN_DTYPE),
             np.array(owners[k * context_size:(k + 1) * context_size], DOCUMENT_DTYPE))
            for k in range(n)]


def pack(documents: Iterable[tuple[int, Sequence[int]]], context_size: int, skip: int = 0
         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The contexts of ``documents`` (``(index, ids)`` in order) as :func:`pack_reference` cuts
    them, the first ``skip`` tokens of the first document left out; holds one context plus one
    document at a time."""
    tokens = np.zeros(0, TOKEN_DTYPE)
    owners = np.zeros(0, DOCUMENT_DTYPE)
    for index, ids in documents:
        ids = np.asarray(ids, TOKEN_DTYPE)[skip:]
        skip = 0
        tokens = np.concatenate([tokens, ids])
        owners = np.concatenate([owners, np.full(len(ids), index, DOCUMENT_DTYPE)])
        start = 0
        while len(tokens) - start >= context_size:
            yield (tokens[start:start + context_size].copy(),
                   owners[start:start + context_size].copy())
            start += context_size
        tokens, owners = tokens[start:], owners[start:]


@dataclass
class ContextStarts:
    """Where contexts begin: the document and the token offset in it, for every context of a
    counted stream (:func:`count_contexts`)."""

    documents: array
    offsets: array
    tokens: int = 0  #: tokens of the documents read
    documents_read: int = 0

    def __len__(self) -> int:
        return len(self.documents)

    def cut(self, n: int) -> None:
        del self.documents[n:]
        del self.offsets[n:]


def count_contexts(lengths: Iterable[tuple[int, int]], context_size: int,
                   limit: int | None = None) -> ContextStarts:
    """From ``(document index, length)`` in stream order: where each whole context begins, up to
    ``limit`` contexts (reading stops as soon as they are complete)."""
    starts = ContextStarts(array("q"), array("q"))
    position = 0  # tokens before the current document
    for index, n in lengths:
        first = -(-position // context_size)
        last = (position + n - 1) // context_size
        for k in range(first, last + 1):
            starts.documents.append(index)
            starts.offsets.append(k * context_size - position)
        position += n
        starts.documents_read += 1
        if limit is not None and position >= limit * context_size:
            break
    starts.tokens = position
    whole = position // context_size
    starts.cut(whole if limit is None else min(whole, limit))
    return starts
