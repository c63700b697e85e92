"""A prompt file opened and checked in full before a run: :func:`open_prompts`.

The reading itself is :mod:`gdn_dump.run.sources`; this module adds what a prompt file promises
beyond a corpus: every record is checked up front (so every mistake is reported before the model
runs, as one :class:`~gdn_dump.errors.PromptFileError` line naming the file, the line and the
field) and ids are unique. The duplicate check keeps 8 bytes per prompt, not every id string.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import PromptFileError
from .sources import ENCODING_ERRORS, FORMATS, Corpus, Document, Fields, open_corpus
from .sources.fields import short

Prompt = Document  # one prompt: index, id, text (or messages, token ids), line, file
PromptSource = Corpus

#: Hash used by the duplicate-id check. Collisions are harmless (candidates are re-checked against
#: the real ids); it is a module attribute so tests can force collisions.
_id_hash: Callable[[str], int] = hash

__all__ = ["ENCODING_ERRORS", "FORMATS", "Prompt", "PromptSource", "IdCheck", "open_prompts"]


def open_prompts(source: str | Path | list, *, text_field: str = "text",
                 format: str | None = None,  # noqa: A002 - the CLI option is called --format
                 encoding_errors: str = "strict", fields: Fields | None = None) -> Corpus:
    """Open and fully validate prompt files ("-" for stdin), raising PromptFileError on any problem."""
    corpus = open_corpus(source, fields=fields or Fields(text=text_field), format=format,
                         encoding_errors=encoding_errors)
    try:
        ids = IdCheck()
        for prompt in corpus:
            ids.add(prompt)
        ids.check(corpus.documents(0, corpus.count))
    except BaseException:
        corpus.close()
        raise
    return corpus


class IdCheck:
    """Duplicate ids among prompts, from one 8-byte hash each (:meth:`add`), then one more read of
    the candidates only (:meth:`check`)."""

    def __init__(self) -> None:
        self.hashes = array("q")

    def add(self, prompt: Document) -> None:
        self.hashes.append(_id_hash(prompt.id))

    def check(self, prompts: Iterable[Document]) -> None:
        """Equal hashes only make prompts *candidates*; the second read compares their real ids
        in order, so the first repeat found is the earliest one and a collision is no error."""
        candidates = _shared_hash_mask(np.frombuffer(self.hashes, dtype=np.int64))
        if candidates is None:
            return
        first: dict[str, Document] = {}
        for n, prompt in enumerate(prompts):
            if n >= len(candidates):
                return
            if not candidates[n]:
                continue
            seen = first.setdefault(prompt.id, prompt)
            if seen is not prompt:
                where = "" if seen.file == prompt.file else f"{seen.file}, "
                raise PromptFileError(f"{prompt.where}: duplicate id {short(prompt.id)} "
                                      f"(first used on {where}{seen.unit} {seen.line})")


def _shared_hash_mask(hashes: np.ndarray) -> np.ndarray | None:
    """Mark the prompts whose id hash is shared with another prompt; None when no hash repeats."""
    if hashes.size < 2:
        return None
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same_as_next = ordered[1:] == ordered[:-1]
    if not same_as_next.any():
        return None
    mask = np.zeros(hashes.size, dtype=bool)
    mask[order[:-1][same_as_next]] = True
    mask[order[1:][same_as_next]] = True
    return mask
