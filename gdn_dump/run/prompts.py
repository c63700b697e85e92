"""Reading prompt files (plain text or JSON Lines) as a repeatable, memory-bounded stream.

A prompt file may hold millions of lines, so nothing here ever holds the whole file: the file is
read line by line in binary (so line numbers are exact and ``\\r\\n`` is handled the same way
everywhere), each line is decoded on its own, and the only state kept across lines is a running
sha256, a few counters and, for jsonl, one 8-byte hash per id for the duplicate check.

``open_prompts`` makes one validation pass up front, so every mistake in the file is reported
before the (expensive) model run starts, as a single :class:`PromptFileError` line that names the
file, the line and the field. After that, iterating the :class:`PromptSource` re-reads the file as
often as needed (e.g. once to size the store, once to fill it). Standard input cannot be read
twice, so it is first spooled to a temporary file, which :meth:`PromptSource.close` removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import weakref
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import PromptFileError

FORMATS = ("txt", "jsonl")
ENCODING_ERRORS = ("strict", "replace")
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
STDIN_NAME = "-"
STDIN_DISPLAY = "<stdin>"

#: Longest line accepted, newline included. Without a cap, a file with no newline at all (a binary
#: file passed by mistake) would be read into memory in one piece; no real prompt comes close.
MAX_LINE_BYTES = 64 * 1024 * 1024

_READ_CHUNK = 1 << 20
_UTF8_BOM = b"\xef\xbb\xbf"
_MAX_SHOWN_FIELDS = 5
_MAX_SHOWN_CHARS = 40

#: Hash used by the duplicate-id check. Collisions are harmless (candidates are re-checked against
#: the real ids); it is a module attribute so tests can force collisions.
_id_hash: Callable[[str], int] = hash


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt, with where it came from so later errors can point back into the file."""

    index: int  #: 0-based position among the prompts kept (the order they are stored in)
    id: str  #: the jsonl "id" (ints turned to text), else the 0-based line index as text
    text: str
    line: int  #: 1-based line number in the file


@dataclass(frozen=True, slots=True)
class _Options:
    """How to parse a file; bundled so the scanning functions take one argument, not five."""

    display: str
    format: str
    text_field: str
    encoding_errors: str


@dataclass(frozen=True, slots=True)
class _Scanned:
    """One physical line as seen by the scanner: its raw bytes (for the sha256) and its prompt."""

    raw: bytes
    replaced: bool
    prompt: Prompt | None


@dataclass(frozen=True, slots=True)
class _Summary:
    """What the validation pass learned about the file."""

    sha256: str
    count: int
    replaced_lines: int


class PromptSource:
    """A prompt file opened for (repeatable) streaming reads.

    Build it with :func:`open_prompts`, which validates the whole file first; iterating then yields
    the same :class:`Prompt` objects every time without holding the file in memory.
    """

    path: Path  #: the real file read (stdin is spooled to a temp file first, so it can be re-read)
    display: str  #: what the user passed ("-" shows as "<stdin>")
    format: str  #: "txt" or "jsonl"
    sha256: str  #: of the raw file bytes
    count: int  #: number of prompts
    replaced_lines: int  #: lines with invalid UTF-8 decoded with U+FFFD (encoding_errors="replace")

    def __init__(self, path: Path, options: _Options, summary: _Summary, spooled: bool) -> None:
        self.path = path
        self.display = options.display
        self.format = options.format
        self.sha256 = summary.sha256
        self.count = summary.count
        self.replaced_lines = summary.replaced_lines
        self._options = options
        # A finalizer rather than __del__ so the spool goes away even if close() is never called.
        self._cleanup = weakref.finalize(self, _unlink_quietly, path) if spooled else None

    def __iter__(self) -> Iterator[Prompt]:
        """Re-read the file, checking at the end that it is still the file that was validated."""
        sha = hashlib.sha256()
        count = 0
        for scanned in _scan(self.path, self._options):
            sha.update(scanned.raw)
            if scanned.prompt is not None:
                count += 1
                yield scanned.prompt
        if count != self.count or sha.hexdigest() != self.sha256:
            raise PromptFileError(f"{self.display}: the file changed after it was opened; run again")

    def __len__(self) -> int:
        return self.count

    def __enter__(self) -> PromptSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the stdin spool file, if any. Safe to call more than once."""
        if self._cleanup is not None:
            self._cleanup()

    def __repr__(self) -> str:
        return f"PromptSource({self.display!r}, format={self.format!r}, count={self.count})"


def open_prompts(
    source: str | Path,
    *,
    text_field: str = "text",
    format: str | None = None,  # noqa: A002 - the CLI option is called --format
    encoding_errors: str = "strict",
) -> PromptSource:
    """Open and fully validate a prompt file ("-" for stdin), raising PromptFileError on any problem."""
    is_stdin = str(source) == STDIN_NAME
    display = STDIN_DISPLAY if is_stdin else str(source)
    options = _Options(display, _pick_format(source, format, is_stdin), text_field, encoding_errors)
    _check_encoding_errors(encoding_errors)
    path, spooled = _spool_stdin() if is_stdin else _resolve_file(Path(source), display)
    try:
        summary = _validate(path, options)
    except BaseException:
        if spooled:
            _unlink_quietly(path)
        raise
    return PromptSource(path, options, summary, spooled)


# --- opening -----------------------------------------------------------------------------------


def _pick_format(source: str | Path, requested: str | None, is_stdin: bool) -> str:
    """An explicit format wins; otherwise the extension decides, and anything unknown is text."""
    if requested is not None:
        if requested not in FORMATS:
            raise PromptFileError(f"unknown prompt format {requested!r} (use one of: {', '.join(FORMATS)})")
        return requested
    if not is_stdin and Path(source).suffix.lower() in JSONL_SUFFIXES:
        return "jsonl"
    return "txt"


def _check_encoding_errors(value: str) -> None:
    """Only strict and replace make sense: 'ignore' would silently change prompts."""
    if value not in ENCODING_ERRORS:
        raise PromptFileError(
            f"unknown --encoding-errors {value!r} (use one of: {', '.join(ENCODING_ERRORS)})"
        )


def _resolve_file(path: Path, display: str) -> tuple[Path, bool]:
    """Check the path is a readable file; pipes (e.g. ``<(zcat f.gz)``) are spooled like stdin."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PromptFileError(f"{display}: no such file") from None
    except OSError as exc:
        raise PromptFileError(f"{display}: cannot access ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise PromptFileError(f"{display}: is a directory, not a prompt file")
    if stat.S_ISREG(mode):
        return path, False
    try:
        with path.open("rb") as stream:
            return _spool(stream), True
    except OSError as exc:
        raise PromptFileError(f"{display}: cannot read ({exc.strerror or exc})") from None


def _spool_stdin() -> tuple[Path, bool]:
    """Copy stdin to a temp file, because the prompts are read more than once."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise PromptFileError(f"{STDIN_DISPLAY}: standard input is not available as bytes")
    try:
        return _spool(stream), True
    except OSError as exc:
        raise PromptFileError(f"{STDIN_DISPLAY}: cannot read ({exc.strerror or exc})") from None


def _spool(stream: BinaryIO) -> Path:
    """Copy a one-shot byte stream to a temp file in fixed-size chunks (never all in memory)."""
    fd, name = tempfile.mkstemp(prefix="gdn-dump-prompts-", suffix=".spool")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, _READ_CHUNK)
    except BaseException:
        _unlink_quietly(Path(name))
        raise
    return Path(name)


def _unlink_quietly(path: Path) -> None:
    """Remove a spool file; it being gone already is fine."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- validation pass ---------------------------------------------------------------------------


def _validate(path: Path, options: _Options) -> _Summary:
    """Read the whole file once: hash it, count prompts, and let every line-level check run."""
    sha = hashlib.sha256()
    n_bytes = n_lines = count = replaced = 0
    id_hashes = array("q") if options.format == "jsonl" else None
    for scanned in _scan(path, options):
        sha.update(scanned.raw)
        n_bytes += len(scanned.raw)
        n_lines += 1
        replaced += scanned.replaced
        if scanned.prompt is not None:
            count += 1
            if id_hashes is not None:
                id_hashes.append(_id_hash(scanned.prompt.id))
    if n_bytes == 0:
        raise PromptFileError(f"{options.display}: the file is empty")
    if count == 0:
        raise PromptFileError(f"{options.display}: no prompts, all {n_lines} line(s) are blank")
    if id_hashes is not None:
        _check_duplicate_ids(path, options, id_hashes)
    return _Summary(sha.hexdigest(), count, replaced)


def _check_duplicate_ids(path: Path, options: _Options, id_hashes: array) -> None:
    """Find duplicate ids from 8 bytes per prompt instead of a set of every id string.

    Equal hashes only make prompts *candidates*; a second read compares their real ids, in file
    order, so the first repeat found is the earliest one and a hash collision is never an error.
    """
    candidates = _shared_hash_mask(np.frombuffer(id_hashes, dtype=np.int64))
    if candidates is None:
        return
    first_line: dict[str, int] = {}
    for scanned in _scan(path, options):
        prompt = scanned.prompt
        if prompt is None or not candidates[prompt.index]:
            continue
        line = first_line.setdefault(prompt.id, prompt.line)
        if line != prompt.line:
            raise PromptFileError(
                f"{options.display}, line {prompt.line}: duplicate id {_short(prompt.id)}"
                f" (first used on line {line})"
            )


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


# --- scanning (shared by validation and iteration) ---------------------------------------------


def _scan(path: Path, options: _Options) -> Iterator[_Scanned]:
    """Yield every physical line of the file with the prompt it holds (None for blank lines)."""
    index = 0
    try:
        with path.open("rb") as stream:
            for line_no, raw in _raw_lines(stream, options.display):
                text, replaced = _decode(raw, line_no, options)
                parsed = _parse_line(text, line_no, options)
                prompt = None
                if parsed is not None:
                    prompt = Prompt(index=index, id=parsed[0], text=parsed[1], line=line_no)
                    index += 1
                yield _Scanned(raw, replaced, prompt)
    except FileNotFoundError:
        raise PromptFileError(f"{options.display}: the file disappeared while it was open") from None
    except OSError as exc:
        raise PromptFileError(f"{options.display}: cannot read ({exc.strerror or exc})") from None


def _raw_lines(stream: BinaryIO, display: str) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes with the newline) with a cap on each line's size."""
    line_no = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES)
        if not raw:
            return
        line_no += 1
        if len(raw) >= MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise PromptFileError(
                f"{display}, line {line_no}: line is longer than {MAX_LINE_BYTES} bytes"
                " (is this really a prompt file?)"
            )
        yield line_no, raw


def _decode(raw: bytes, line_no: int, options: _Options) -> tuple[str, bool]:
    """Decode one line as UTF-8 without its newline; returns (text, whether U+FFFD was substituted)."""
    body = _strip_newline(raw)
    if line_no == 1 and body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM) :]  # editors on Windows add it; it is not part of the prompt
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError as exc:
        if options.encoding_errors == "replace":
            return body.decode("utf-8", "replace"), True
        raise PromptFileError(
            f"{options.display}, line {line_no}: invalid UTF-8 (byte 0x{body[exc.start]:02x}"
            f" at column {exc.start + 1}); fix the file or pass --encoding-errors replace"
        ) from None


def _strip_newline(raw: bytes) -> bytes:
    """Drop a trailing \\n or \\r\\n (only those: a lone \\r is part of the text)."""
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    if raw.endswith(b"\n"):
        return raw[:-1]
    return raw


def _parse_line(text: str, line_no: int, options: _Options) -> tuple[str, str] | None:
    """Return (id, text) for a prompt line, or None for a blank line."""
    if not text.strip():
        return None
    if options.format == "txt":
        return str(line_no - 1), text
    return _parse_jsonl(text, line_no, options)


def _parse_jsonl(line: str, line_no: int, options: _Options) -> tuple[str, str]:
    """Turn one jsonl line into (id, text), with a precise error for each way it can be wrong."""
    where = f"{options.display}, line {line_no}"
    record = _load_json(line, where)
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {_json_type(record)}")
    field = options.text_field
    if field not in record:
        raise PromptFileError(f"{where}: missing field {_short(field)} ({_describe_fields(record)})")
    text = record[field]
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: field {_short(field)} must be a string, got {_json_type(text)}")
    if not text:
        raise PromptFileError(f"{where}: field {_short(field)} is an empty string")
    _check_encodable(text, f"{where}: field {_short(field)}")
    return _jsonl_id(record, line_no, where), text


def _load_json(line: str, where: str) -> Any:
    """json.loads with its failure modes (syntax, nesting depth, huge ints) as PromptFileError."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise PromptFileError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise PromptFileError(f"{where}: invalid JSON ({_one_line(str(exc))})") from None


def _jsonl_id(record: dict[str, Any], line_no: int, where: str) -> str:
    """The record's id as text; ints are accepted (bools are not, though Python thinks they are ints)."""
    if "id" not in record:
        return str(line_no - 1)
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PromptFileError(f"{where}: field 'id' must be a string or an integer, got {_json_type(value)}")
    if isinstance(value, int):
        return str(value)
    _check_encodable(value, f"{where}: field 'id'")
    return value


def _check_encodable(value: str, what: str) -> None:
    """JSON allows lone surrogate escapes ("\\ud800") that no tokenizer or store can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptFileError(
            f"{what} contains an unpaired surrogate \\u{ord(value[exc.start]):04x}"
        ) from None


# --- message helpers ---------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """Name a parsed JSON value by its JSON type, which is what the user wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _describe_fields(record: dict[str, Any]) -> str:
    """List a record's fields, truncated, so the user sees what the text field is really called."""
    if not record:
        return "the line is an empty object"
    names = [_short(name) for name in list(record)[:_MAX_SHOWN_FIELDS]]
    more = len(record) - len(names)
    suffix = f", ... ({more} more)" if more else ""
    return f"the line has fields: {', '.join(names)}{suffix}"


def _short(value: str) -> str:
    """repr() of a user string, cut short: keeps messages on one line and of sane length."""
    if len(value) > _MAX_SHOWN_CHARS:
        return repr(value[:_MAX_SHOWN_CHARS]) + "..."
    return repr(value)


def _one_line(message: str) -> str:
    """Collapse a library message onto one line."""
    return " ".join(message.split())
