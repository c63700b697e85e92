"""Files of lines: ``.txt`` (a prompt per line) and JSON Lines, plain or compressed.

Nothing here holds a whole file: it is read line by line in binary (so line numbers are exact and
``\\r\\n`` is handled the same way everywhere), each line decoded on its own. Opening a file makes
one cheap pass (the sha256 of its bytes and the number of non-blank lines, nothing decoded); the
records are decoded and checked when they are read, from any record on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import PromptFileError
from .compression import open_lines
from .fields import TEXT, Document, Fields, json_type, one_line

TXT, JSONL = "txt", "jsonl"
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})

#: Longest line accepted, newline included. Without a cap, a file with no newline at all (a binary
#: file passed by mistake) would be read into memory in one piece; no real prompt comes close.
MAX_LINE_BYTES = 64 * 1024 * 1024

_UTF8_BOM = b"\xef\xbb\xbf"
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())


@dataclass(frozen=True, slots=True)
class LineOptions:
    """How to parse a file of lines; bundled so the scanning functions take one argument."""

    display: str
    format: str
    fields: Fields
    encoding_errors: str


@dataclass(frozen=True, slots=True)
class Summary:
    sha256: str
    n_bytes: int
    count: int  #: non-blank lines: the records of the file
    n_lines: int


class LineFile:
    """One file of lines, opened: its hash and record count are known, its records are read on
    demand (:meth:`documents`)."""

    unit = "line"

    def __init__(self, path: Path, options: LineOptions):
        self.path, self.options = path, options
        self.display, self.format = options.display, options.format
        summary = summarize(path, options.display)
        if summary.n_bytes == 0:
            raise PromptFileError(f"{self.display}: the file is empty")
        if summary.count == 0:
            raise PromptFileError(f"{self.display}: no prompts, all {summary.n_lines} line(s) are blank")
        if options.format == TXT and options.fields.mode != TEXT:
            flag = "--chat" if options.fields.chat else "--tokens-field"
            raise PromptFileError(f"{self.display}: {flag} needs records with fields (.jsonl, "
                                  ".parquet or a datasets directory), not lines of text")
        self.sha256, self.size, self.count = summary.sha256, summary.n_bytes, summary.count
        self.digest = self.sha256  # read whole to count its lines anyway
        self.read = True
        self.n_lines = summary.n_lines
        self.replaced_lines = 0  # counted as records are read

    def documents(self, first_index: int, first_line: int, start: int = 0) -> Iterator[Document]:
        """The records from the ``start``-th on (``first_index`` / ``first_line``: the stream's
        index and line index of this file's first record / line); lines before are skipped
        without decoding. A whole read checks the file is still the one that was opened."""
        index = first_index
        replaced = 0
        for line_no, raw, hashing in _raw_lines(self.path, self.options.display):
            if _blank(raw, line_no):
                continue
            if index - first_index < start:
                index += 1
                continue
            text, was_replaced = _decode(raw, line_no, self.options)
            replaced += was_replaced
            yield _document(text, line_no, index, first_line + line_no - 1, self.options)
            index += 1
        self.replaced_lines = max(self.replaced_lines, replaced)
        if start == 0 and (hashing.sha.hexdigest() != self.sha256 or index - first_index != self.count):
            raise PromptFileError(f"{self.display}: the file changed after it was opened; run again")


def summarize(path: Path, display: str) -> Summary:
    """The file's sha256 and size (of the bytes on disk) and its non-blank lines, undecoded."""
    count = n_lines = 0
    hashing = None
    for _, raw, hashing in _raw_lines(path, display):
        n_lines += 1
        count += not _blank(raw, n_lines)
    if hashing is None:
        import hashlib

        return Summary(hashlib.sha256(b"").hexdigest(), path.stat().st_size, 0, 0)
    return Summary(hashing.sha.hexdigest(), hashing.n_bytes, count, n_lines)


def _raw_lines(path: Path, display: str) -> Iterator[tuple[int, bytes, Any]]:
    """Yield (1-based line number, raw bytes with the newline, hasher) with a cap on line size;
    after the last line the hasher has seen the whole file."""
    try:
        with open_lines(path, display) as (stream, hashing):
            line_no = 0
            while True:
                raw = stream.readline(MAX_LINE_BYTES)
                if not raw:
                    while hashing.read(1 << 16):  # compressed: trailing bytes still count
                        pass
                    if line_no == 0:
                        yield 0, b"", hashing
                    return
                line_no += 1
                if len(raw) >= MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise PromptFileError(
                        f"{display}, line {line_no}: line is longer than {MAX_LINE_BYTES} bytes"
                        " (is this really a prompt file?)"
                    )
                yield line_no, raw, hashing
    except FileNotFoundError:
        raise PromptFileError(f"{display}: the file disappeared while it was open") from None
    except OSError as exc:
        raise PromptFileError(f"{display}: cannot read ({exc.strerror or exc})") from None


def _blank(raw: bytes, line_no: int) -> bool:
    """A line of only whitespace (and, first, a byte-order mark) holds no record."""
    body = _strip_newline(raw)
    if line_no == 1 and body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM):]
    body = body.strip(_ASCII_SPACE)
    if not body:
        return True
    # Python's str.strip() also removes Unicode spaces (U+00A0, U+3000, ...): the same rule
    return not body.isascii() and not body.decode("utf-8", "replace").strip()


def _decode(raw: bytes, line_no: int, options: LineOptions) -> tuple[str, bool]:
    """Decode one line as UTF-8 without its newline; returns (text, whether U+FFFD was substituted)."""
    body = _strip_newline(raw)
    if line_no == 1 and body.startswith(_UTF8_BOM):
        body = body[len(_UTF8_BOM):]  # editors on Windows add it; it is not part of the prompt
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


def _document(text: str, line_no: int, index: int, stream_line: int,
              options: LineOptions) -> Document:
    """The document of one non-blank line; the default id is the line's 0-based index in the stream."""
    if options.format == TXT:
        return Document(index=index, id=str(stream_line), line=line_no, file=options.display,
                        text=text)
    where = f"{options.display}, line {line_no}"
    record = _load_json(text, where)
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {json_type(record)}")
    return options.fields.document(record, index, line_no, options.display, "line", str(stream_line))


def _load_json(line: str, where: str) -> Any:
    """json.loads with its failure modes (syntax, nesting depth, huge ints) as PromptFileError."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise PromptFileError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise PromptFileError(f"{where}: invalid JSON ({one_line(str(exc))})") from None


__all__ = ["JSONL", "JSONL_SUFFIXES", "LineFile", "LineOptions", "MAX_LINE_BYTES", "TXT"]
