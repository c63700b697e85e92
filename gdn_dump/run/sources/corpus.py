"""The input stream: one or more files (globs expanded, in sorted order), read as one sequence of
documents with indices counted across them.

:func:`open_corpus` opens every file (a cheap pass each: counts and digests from metadata, or for
files of lines an undecoded line count and the sha256 of the bytes) and picks each file's reader
from a small registry (:data:`READERS`): lines (``.txt``, ``.jsonl``, compressed or not), Parquet, a
saved ``datasets`` directory. A reader has ``display``, ``format``, ``count``, ``n_lines`` (what the
stream's default ids count: lines, or rows), ``size``, ``digest`` (what identifies it), ``sha256``,
``read`` and ``documents(first_index, first_line, start)``. Records are decoded and checked when
read, so a process reads only the documents it needs (:meth:`Corpus.documents` starts anywhere).
Standard input and pipes are spooled to a temporary file, since the stream is read more than once.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ...errors import PromptFileError
from .compression import inner_suffix
from .fields import Document, Fields
from .lines import JSONL, JSONL_SUFFIXES, TXT, LineFile, LineOptions
from .tabular import ARROW, PARQUET, TableFile, is_dataset_dir

FORMATS = (TXT, JSONL, PARQUET, ARROW)
ENCODING_ERRORS = ("strict", "replace")
STDIN_NAME = "-"
STDIN_DISPLAY = "<stdin>"
_READ_CHUNK = 1 << 20
_GLOB_CHARS = frozenset("*?[")


def _lines(path: Path, display: str, fields: Fields, fmt: str, encoding_errors: str):
    return LineFile(path, LineOptions(display, fmt, fields, encoding_errors))


def _table(path: Path, display: str, fields: Fields, fmt: str, encoding_errors: str):
    return TableFile(path, display, fields, fmt)


#: format -> reader class factory: the corpus never knows a reader's details.
READERS: dict[str, Callable] = {TXT: _lines, JSONL: _lines, PARQUET: _table, ARROW: _table}


class Corpus:
    """The documents of one or more files, in order, read on demand.

    ``count`` is known on opening; iterating yields every :class:`Document` (re-readable),
    :meth:`documents` yields from any index on.
    """

    def __init__(self, display: str, files: list, spools: Sequence[Path] = ()):
        self.display = display
        self.files = files
        self.count = sum(f.count for f in files)
        self._cleanup = weakref.finalize(self, _unlink_all, list(spools)) if spools else None

    @property
    def path(self) -> Path:
        """The file read (for stdin, its spool); the first one of several."""
        return self.files[0].path

    @property
    def format(self) -> str:
        formats = sorted({f.format for f in self.files})
        return formats[0] if len(formats) == 1 else "+".join(formats)

    @property
    def sha256(self) -> str:
        """What identifies the input, for provenance and for processes to agree on it: a single
        file of lines, its sha256; else the sha256 of every file's name, size and digest (a file of
        lines: its sha256; Parquet or a dataset: the sha256 of its metadata, no full read)."""
        if len(self.files) == 1 and self.files[0].digest == self.files[0].sha256:
            return self.files[0].sha256
        joined = "\n".join(f"{f.display}\t{f.size}\t{f.digest}" for f in self.files)
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def replaced_lines(self) -> int:
        return sum(f.replaced_lines for f in self.files)

    def provenance(self) -> list[dict]:
        """Each file: path, format, size, number of records, its digest, and the sha256 of its
        bytes where this process read documents from it (null: it read none there)."""
        return [{"path": f.display, "format": f.format, "size": f.size, "records": f.count,
                 "digest": f.digest, "sha256": f.sha256 if f.read else None} for f in self.files]

    def documents(self, start: int = 0, stop: int | None = None) -> Iterator[Document]:
        """Documents ``start <= index < stop`` in order; files before ``start`` are not opened."""
        stop = self.count if stop is None else min(stop, self.count)
        first_index = first_line = 0
        for file in self.files:
            end = first_index + file.count
            if end > start and first_index < stop:
                for doc in file.documents(first_index, first_line, max(0, start - first_index)):
                    if doc.index >= stop:
                        break
                    yield doc
            if end >= stop:
                return
            first_index = end
            first_line += file.n_lines

    def __iter__(self) -> Iterator[Document]:
        return self.documents()

    def __len__(self) -> int:
        return self.count

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove stdin / pipe spool files, if any. Safe to call more than once."""
        if self._cleanup is not None:
            self._cleanup()

    def __repr__(self) -> str:
        return f"Corpus({self.display!r}, format={self.format!r}, files={len(self.files)}, count={self.count})"


def open_corpus(sources: str | Path | Sequence[str | Path], *, fields: Fields | None = None,
                format: str | None = None,  # noqa: A002 - the option is called --format
                encoding_errors: str = "strict") -> Corpus:
    """Open every file of ``sources`` (paths, globs, saved-dataset directories, ``-`` for stdin)
    as one stream; PromptFileError (one line) for anything that cannot be read as asked."""
    fields = fields or Fields()
    fields.check()
    if encoding_errors not in ENCODING_ERRORS:
        raise PromptFileError(f"unknown --encoding-errors {encoding_errors!r} "
                              f"(use one of: {', '.join(ENCODING_ERRORS)})")
    if format is not None and format not in FORMATS:
        raise PromptFileError(f"unknown prompt format {format!r} (use one of: {', '.join(FORMATS)})")
    entries = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not entries:
        raise PromptFileError("no prompt files given")
    display = ",".join(str(e) for e in entries)
    spools: list[Path] = []
    files = []
    try:
        for entry in entries:
            for path, name in _expand(str(entry)):
                real, spooled = _resolve(path, name)
                if spooled:
                    spools.append(real)
                fmt = _pick_format(name, real, format)
                files.append(READERS[fmt](real, STDIN_DISPLAY if name == STDIN_NAME else name,
                                          fields, fmt, encoding_errors))
    except BaseException:
        _unlink_all(spools)
        raise
    return Corpus(STDIN_DISPLAY if display == STDIN_NAME else display, files, spools)


def _expand(entry: str) -> list[tuple[Path, str]]:
    """A path as given, or a glob's matches in sorted order (none: an error)."""
    if entry == STDIN_NAME or not (_GLOB_CHARS & set(entry)) or Path(entry).exists():
        return [(Path(entry), entry)]
    matches = sorted(globbing.glob(os.path.expanduser(entry), recursive=True))
    if not matches:
        raise PromptFileError(f"{entry}: no files match")
    return [(Path(m), m) for m in matches]


def _pick_format(name: str, path: Path, requested: str | None) -> str:
    """An explicit format wins; else a datasets directory, .parquet, .jsonl / .ndjson
    (compressed too), and anything else is text."""
    if requested is not None:
        return requested
    if path.is_dir():
        return ARROW
    suffix = inner_suffix(name)
    if suffix == ".parquet":
        return PARQUET
    return JSONL if suffix in JSONL_SUFFIXES else TXT


def _resolve(path: Path, display: str) -> tuple[Path, bool]:
    """Check the path can be read; stdin and pipes (e.g. ``<(zcat f.gz)``) are spooled."""
    if display == STDIN_NAME:
        return _spool_stdin(), True
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PromptFileError(f"{display}: no such file") from None
    except OSError as exc:
        raise PromptFileError(f"{display}: cannot access ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        if is_dataset_dir(path):
            return path, False
        raise PromptFileError(f"{display}: is a directory, not a prompt file (nor a directory "
                              "written by datasets' save_to_disk; for the files in it use a glob)")
    if stat.S_ISREG(mode):
        return path, False
    try:
        with path.open("rb") as stream:
            return _spool(stream), True
    except OSError as exc:
        raise PromptFileError(f"{display}: cannot read ({exc.strerror or exc})") from None


def _spool_stdin() -> Path:
    """Copy stdin to a temp file, because the prompts are read more than once."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise PromptFileError(f"{STDIN_DISPLAY}: standard input is not available as bytes")
    try:
        return _spool(stream)
    except OSError as exc:
        raise PromptFileError(f"{STDIN_DISPLAY}: cannot read ({exc.strerror or exc})") from None


def _spool(stream: BinaryIO) -> Path:
    """Copy a one-shot byte stream to a temp file in fixed-size chunks (never all in memory)."""
    fd, name = tempfile.mkstemp(prefix="gdn-dump-prompts-", suffix=".spool")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, _READ_CHUNK)
    except BaseException:
        _unlink_all([Path(name)])
        raise
    return Path(name)


def _unlink_all(paths: Sequence[Path]) -> None:
    """Remove spool files; one being gone already is fine."""
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
