"""Columnar files: Parquet, and a directory written by ``datasets.Dataset.save_to_disk``.

Both are read with pyarrow a record batch at a time, only the columns that matter (the document's
and the id's): never the whole file in memory. Their record counts are metadata (Parquet's footer,
the Arrow batches' headers), so skipping to any record costs no decoding, and so is what tells
two copies apart (:attr:`TableFile.digest`: the sha256 of the footer, or of the schema and batch
sizes, with the size): opening a corpus never reads it whole. The sha256 of a file's bytes is
computed only when asked (:attr:`TableFile.sha256`), for the files a run read documents from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from ...errors import PromptFileError
from .fields import Document, Fields, one_line, short

PARQUET, ARROW = "parquet", "arrow"
READ_ROWS = 1024  # rows per record batch read
DATASET_STATE = "state.json"  # what save_to_disk writes beside its .arrow files
DATASET_DICT = "dataset_dict.json"
_HASH_CHUNK = 1 << 22


def is_dataset_dir(path: Path) -> bool:
    return (path / DATASET_STATE).is_file() or (path / DATASET_DICT).is_file()


class TableFile:
    """One Parquet file or saved dataset, opened: schema checked, records counted, bytes hashed."""

    unit = "row"
    replaced_lines = 0

    def __init__(self, path: Path, display: str, fields: Fields, format: str):  # noqa: A002
        self.path, self.display, self.fields, self.format = path, display, fields, format
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PromptFileError(f"{display}: reading {format} needs pyarrow: pip install pyarrow "
                                  "(it comes with gdn-dump[extract])") from None
        self.parts = _dataset_parts(path, display) if format == ARROW else [path]
        self.read = False  # whether documents were read from it (then its sha256 is recorded)
        sha = hashlib.sha256()
        names, counts = self._metadata(sha)
        if fields.content not in names:
            shown = ", ".join(short(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise PromptFileError(f"{display}: missing field {short(fields.content)} (the columns "
                                  f"are: {shown or 'none'})")
        self.columns = [fields.content] + ([fields.id] if fields.id in names and fields.id != fields.content else [])
        self.part_counts = counts
        self.count = sum(counts)
        self.n_lines = self.count  # a row is a "line" of the stream (default ids count them)
        if self.count == 0:
            raise PromptFileError(f"{display}: no records (the table is empty)")
        self.size = sum(p.stat().st_size for p in self.parts)
        sha.update(str(self.size).encode())
        self.digest = sha.hexdigest()

    @cached_property
    def sha256(self) -> str:
        """Of the bytes on disk (every part, in order, for a dataset): one sequential read."""
        return _sha256(self.parts)

    def _metadata(self, sha) -> tuple[list[str], list[int]]:
        """Column names and record counts; ``sha`` takes the metadata they came from."""
        try:
            if self.format == PARQUET:
                import pyarrow.parquet as pq

                sha.update(_parquet_footer(self.path))
                meta = pq.ParquetFile(self.path).metadata
                return list(meta.schema.to_arrow_schema().names), [meta.num_rows]
            schema, counts = None, []
            for part in self.parts:
                with _arrow_stream(part) as reader:
                    schema = reader.schema
                    sizes = [batch.num_rows for batch in reader]
                    counts.append(sum(sizes))
                    sha.update(schema.serialize().to_pybytes() + json.dumps(sizes).encode())
            return list(schema.names), counts
        except PromptFileError:
            raise
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError: not the format it claims
            raise PromptFileError(f"{self.display}: not a valid {self.format} file "
                                  f"({one_line(str(exc))})") from None

    def documents(self, first_index: int, first_line: int, start: int = 0) -> Iterator[Document]:
        """The records from the ``start``-th on (rows before are skipped by metadata)."""
        self.read = True
        index = first_index + start
        try:
            for row, values in self._rows(start):
                record = dict(zip(self.columns, values))
                yield self.fields.document(record, index, row + 1, self.display, "row",
                                           str(first_line + row))
                index += 1
        except PromptFileError:
            raise
        except Exception as exc:
            raise PromptFileError(f"{self.display}: cannot read ({one_line(str(exc))})") from None

    def _rows(self, start: int) -> Iterator[tuple[int, tuple]]:
        """``(0-based row in this file, column values)`` from row ``start`` on."""
        row = 0
        for batch in self._batches(start):
            columns = [batch.column(name).to_pylist() for name in self.columns]
            for values in zip(*columns):
                if row >= start:
                    yield row, values
                row += 1

    def _batches(self, start: int):
        """Record batches, whole row groups (or Arrow batches) before ``start`` skipped; rows of
        the first batch before ``start`` still come (``_rows`` drops them)."""
        if self.format == PARQUET:
            import pyarrow.parquet as pq

            file = pq.ParquetFile(self.path)
            skipped, groups = 0, []
            for g in range(file.metadata.num_row_groups):
                n = file.metadata.row_group(g).num_rows
                if skipped + n <= start and not groups:
                    skipped += n
                    continue
                groups.append(g)
            yield from _padded(skipped)
            # One row group at a time: given all of them, pyarrow pre-buffers every requested
            # column chunk, i.e. the whole file (measured: RSS grew with the file)
            for g in groups:
                yield from file.iter_batches(batch_size=READ_ROWS, row_groups=[g],
                                             columns=self.columns, use_threads=False)
            return
        for part, n in zip(self.parts, self.part_counts):
            if n <= start:
                start -= n
                yield from _padded(n)
                continue
            with _arrow_stream(part, mapped=False) as reader:  # read, not mapped: RSS stays flat
                for batch in reader:
                    yield batch.select(self.columns)
            start = 0


class _Skipped:
    """Stands in for ``n`` rows skipped without reading them (only their count matters)."""

    def __init__(self, n: int):
        self.num_rows = n

    def column(self, name):
        return _NoValues(self.num_rows)


class _NoValues:
    def __init__(self, n: int):
        self.n = n

    def to_pylist(self):
        return [None] * self.n


def _padded(n: int):
    """Skipped rows in blocks, so counting them never allocates more than a block."""
    while n > 0:
        take = min(n, READ_ROWS)
        yield _Skipped(take)
        n -= take


def _dataset_parts(path: Path, display: str) -> list[Path]:
    """The .arrow files of a saved dataset, in order (``state.json``'s ``_data_files``)."""
    if (path / DATASET_DICT).is_file():
        splits = json.loads((path / DATASET_DICT).read_text()).get("splits", [])
        raise PromptFileError(f"{display}: a DatasetDict with splits {', '.join(map(str, splits))}: "
                              f"pass one split's directory (e.g. {display.rstrip('/')}/{splits[0] if splits else 'train'})")
    try:
        state = json.loads((path / DATASET_STATE).read_text())
        parts = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PromptFileError(f"{display}: not a datasets directory ({DATASET_STATE}: "
                              f"{one_line(str(exc))})") from None
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise PromptFileError(f"{display}: the dataset's file {missing[0]} is missing")
    return parts


class _arrow_stream:
    """An Arrow IPC stream (what ``save_to_disk`` writes): memory-mapped (counting rows touches
    only the batches' headers) or read a batch at a time (the records)."""

    def __init__(self, path: Path, mapped: bool = True):
        self.path, self.mapped = path, mapped

    def __enter__(self):
        import pyarrow as pa

        self.source = pa.memory_map(str(self.path)) if self.mapped else pa.OSFile(str(self.path))
        try:
            return pa.ipc.open_stream(self.source)
        except BaseException:
            self.source.close()
            raise

    def __exit__(self, *exc):
        self.source.close()


def _parquet_footer(path: Path) -> bytes:
    """The footer (schema, row groups, column offsets and statistics) and its length and magic."""
    with path.open("rb") as stream:
        stream.seek(0, 2)
        end = stream.tell()
        if end < 12:
            raise PromptFileError(f"{path}: not a valid parquet file (only {end} bytes)")
        stream.seek(end - 8)
        tail = stream.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length + 8 > end:
            return tail  # pyarrow then says what is wrong
        stream.seek(end - 8 - length)
        return stream.read(length) + tail


def _sha256(parts: list[Path]) -> str:
    """Of the bytes on disk (every part, in order, for a dataset)."""
    sha = hashlib.sha256()
    for part in parts:
        with part.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                sha.update(chunk)
    return sha.hexdigest()
