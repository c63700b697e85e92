"""Opening a file of lines for reading, plain or compressed (``.gz``, ``.zst``), while hashing the
bytes on disk: the sha256 recorded in provenance is of the file as it is stored."""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from ...errors import PromptFileError

GZIP, ZSTD = ".gz", ".zst"
COMPRESSIONS = (GZIP, ZSTD)
_BUFFER = 1 << 16
_MAGIC = {GZIP: b"\x1f\x8b", ZSTD: b"\x28\xb5\x2f\xfd"}


def compression_of(path: Path | str) -> str | None:
    """``.gz`` / ``.zst`` from the last suffix; None for a plain file."""
    suffix = Path(str(path)).suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def inner_suffix(path: Path | str) -> str:
    """The suffix that names the format: ``.jsonl`` for ``p.jsonl.gz``."""
    path = Path(str(path))
    return (path.with_suffix("") if compression_of(path) else path).suffix.lower()


class HashingReader(io.RawIOBase):
    """A raw reader that hashes and counts every byte it passes on."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha, self.n_bytes = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.stream.readinto(buffer)
        if n:
            self.sha.update(memoryview(buffer)[:n])
            self.n_bytes += n
        return n or 0


@contextmanager
def open_lines(path: Path, display: str) -> Iterator[tuple[BinaryIO, HashingReader]]:
    """``(stream of decompressed bytes with readline, the hasher of the bytes on disk)``;
    a corrupt compressed file is one PromptFileError line naming it."""
    with path.open("rb", buffering=0) as raw:
        hashing = HashingReader(raw)
        buffered = io.BufferedReader(hashing, _BUFFER)
        compression = compression_of(display) or _sniff(buffered)
        if compression is None:
            yield buffered, hashing
            return
        stream = _decompressed(buffered, compression, display)
        try:
            yield stream, hashing
        except (OSError, EOFError, zlib.error) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            raise PromptFileError(f"{display}: not a valid {compression[1:]} file "
                                  f"({_reason(exc)})") from None
        except Exception as exc:
            if type(exc).__name__ == "ZstdError":
                raise PromptFileError(f"{display}: not a valid zst file ({_reason(exc)})") from None
            raise


def _sniff(buffered: io.BufferedReader) -> str | None:
    """Compressed data without a telling name (stdin, a pipe): known by its magic bytes."""
    head = buffered.peek(4)[:4]
    for compression, magic in _MAGIC.items():
        if head.startswith(magic):
            return compression
    return None


def _decompressed(buffered: io.BufferedReader, compression: str, display: str) -> BinaryIO:
    if compression == GZIP:
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    try:
        import zstandard
    except ImportError:
        raise PromptFileError(f"{display}: reading .zst needs zstandard: pip install zstandard "
                              "(it comes with gdn-dump[extract])") from None
    reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    return io.BufferedReader(reader, _BUFFER)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
