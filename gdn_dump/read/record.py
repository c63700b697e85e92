"""One finished prompt of a store (:meth:`Store.prompt <gdn_dump.read.reader.Store.prompt>`):
its tokens, text, hook rows and per-prompt matrices cut to its length."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ..catalogue import CONTRIBUTION_NORM, ROW_DOCUMENT, contribution_name
from . import matrices as _matrices

if TYPE_CHECKING:
    from .reader import Store

__all__ = ["PromptRecord"]


class PromptRecord:
    """One finished prompt: ``index``, ``id``, ``token_ids`` ``[n]`` int32, ``text`` (or None).

    ``record[hook]`` reads that hook's rows ``[n, ...]`` (once, then kept);
    ``record.matrix(name)`` reads a per-prompt matrix cut to the prompt: ``[heads, n, n]``
    (attention matrix, contribution norms or logits) or ``[heads, n, n, d_model]`` (contribution
    vectors); ``record.contribution(layer)`` one of a layer's contribution arrays.
    """

    def __init__(self, store: Store, index: int, id: str, token_ids: np.ndarray, rows: slice):
        self.index = index
        self.id = id
        self.token_ids = token_ids
        self.rows = rows
        self._store = store
        self._read: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def __repr__(self) -> str:
        return f"<PromptRecord {self.index} id={self.id!r}: {len(self)} tokens>"

    @property
    def hooks(self) -> list[str]:
        return self._store.hooks

    @cached_property
    def text(self) -> str | None:
        """The token ids decoded with the run's tokenizer (None when it cannot be loaded here)."""
        tokenizer = self._store.tokenizer
        return None if tokenizer is None else tokenizer.decode(self.token_ids.tolist())

    @cached_property
    def documents(self) -> np.ndarray | None:
        """Packed contexts (``--context-size``): each row's source document ``[n]`` int64 (its
        index in the input stream, ``row_document``); None for a store of whole prompts."""
        if ROW_DOCUMENT not in self._store:
            return None
        return np.asarray(self._store[ROW_DOCUMENT][self.rows], dtype=np.int64)

    def __getitem__(self, hook: str) -> np.ndarray:
        if hook not in self._read:
            if hook not in self._store.hooks:
                hint = " (a per-prompt matrix: use .matrix(name))" if hook in self._store.matrices else ""
                raise KeyError(f"{hook!r} is not a per-token hook of {self._store.path}{hint}")
            self._read[hook] = np.asarray(self._store[hook][self.rows])
        return self._read[hook]

    def matrix(self, name: str, head: int | None = None, query: int | None = None) -> np.ndarray:
        """Per-prompt matrix ``name`` of this prompt (n tokens): ``[heads, n, n]`` (query, key),
        ``[heads, n, n, d_model]`` for contribution vectors; ``head`` (a model head index, one of
        the array's ``heads`` attribute) or ``query`` (a position) drop that axis and read only
        its chunks (see :func:`gdn_dump.read.matrices.read_matrix`)."""
        return _matrices.read_matrix(self._store, name, self.index, len(self), head, query)

    def contribution(self, layer: int, what: str = CONTRIBUTION_NORM, head: int | None = None,
                     query: int | None = None) -> np.ndarray:
        """:meth:`matrix` of ``blocks.<layer>.<what>``, ``what`` one of ``CONTRIBUTION_NORM``
        (``||c_{h,i,j}||``), ``CONTRIBUTION_LOGIT`` or ``CONTRIBUTION_VECTORS`` (``c_{h,i,j}``,
        ``[heads, n, n, d_model]``) of :mod:`gdn_dump.catalogue`."""
        return self.matrix(contribution_name(layer, what), head, query)
