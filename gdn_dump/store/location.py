"""Where a store lives: a local directory or an fsspec URL such as ``s3://bucket/prefix``.

:func:`locate` turns ``--out`` into a :class:`Location`, which answers the questions the tool asks
before and while it writes a store (is something there, is it a file, can I write, how much room)
the same way for both kinds, and hands zarr the matching store. For ``s3://`` the endpoint and the
credentials come from the environment, read by botocore as usual (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...); ``storage_options`` can add to or override them.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib.util
import os
import re
import shutil
import uuid
import weakref
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import StoreError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Every Location gets a filesystem of its own, without a listing cache: fsspec otherwise shares one
# instance per set of options, whose cached listings would miss what other processes (or other
# Locations) wrote since; a store is checked, written and read back by different parties.
_FRESH = {"skip_instance_cache": True, "use_listings_cache": False}
# The writability probe fails fast (one retry): botocore's default retries take ~10 s to report a
# dead endpoint. The store's own filesystem keeps the defaults, which ride out a flaky network.
_PROBE_CONFIG = {"retries": {"max_attempts": 1}, "connect_timeout": 10}
_PROBE_NAME = ".gdn-dump-write-probe-"


class Location:
    """Where a store lives: a local directory or an fsspec URL (s3://bucket/prefix)."""

    def __init__(self, url: str, path: Path | None = None, storage_options: dict | None = None):
        self.url = url
        self.path = path
        self.is_local = path is not None
        self.storage_options = {**_FRESH, **(storage_options or {})} if path is None else {}
        self._fs = None

    def __str__(self) -> str:
        return self.url

    def zarr_store(self, read_only: bool = False):
        """A fresh zarr store at this location (``LocalStore`` or ``FsspecStore``)."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        # from_url makes its own asynchronous filesystem (zarr drives it from its event loop).
        store = zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options,
                                                  read_only=read_only)
        # s3fs closes the HTTP session of a synchronous filesystem when it is collected, not of an
        # asynchronous one: without this, every store opened leaves an aiohttp session open and
        # Python reports "Unclosed client session" at exit.
        weakref.finalize(store, _close_session, store.fs)
        return store

    def exists(self) -> bool:
        """Anything at all under it (an empty local directory or an empty prefix is nothing)."""
        if self.is_local:
            return any(self.path.iterdir()) if self.path.is_dir() else self.path.exists()
        with self._explained():
            fs, key = self.fs, self._fs_path
            if "/" in key:  # one HEAD and one list of at most one key
                return fs.exists(key)
            try:  # a bucket's root: exists() would say True for an empty bucket
                return bool(fs.ls(key))
            except FileNotFoundError:
                return False

    def has_group(self) -> bool:
        """Whether a Zarr group is here (a run was at least started here)."""
        if self.is_local:
            return (self.path / "zarr.json").exists()
        with self._explained():
            return self.fs.exists(f"{self._fs_path}/zarr.json")

    def is_file(self) -> bool:
        """Local: something that is not a directory; remote: an object exactly at the prefix."""
        if self.is_local:
            return self.path.exists() and not self.path.is_dir()
        if "/" not in self._fs_path:
            return False
        with self._explained():
            return self.fs.isfile(self._fs_path)

    def read(self, name: str) -> bytes | None:
        """The bytes of the file/object ``name`` under it, or None if there is none."""
        if self.is_local:
            path = self.path / name
            return path.read_bytes() if path.is_file() else None
        with self._explained():
            try:
                return self.fs.cat_file(f"{self._fs_path}/{name}")
            except FileNotFoundError:
                return None

    def remove(self) -> None:
        """Delete everything under it; nothing to delete is fine."""
        if self.is_local:
            if self.path.is_dir() and not self.path.is_symlink():
                shutil.rmtree(self.path)
            elif self.path.exists() or self.path.is_symlink():
                self.path.unlink()
            return
        with self._explained():
            # The listed objects, not rm(prefix, recursive=True): on a bucket's root s3fs would
            # go on to delete the bucket itself.
            try:
                keys = self.fs.find(self._fs_path, withdirs=False)
            except FileNotFoundError:
                return
            if keys:
                self.fs.rm(keys)

    def check_writable(self) -> None:
        """Raise :class:`StoreError` (one line saying why) unless a store can be written here."""
        if self.is_local:
            places = ([self.path] if self.path.is_dir() else []) + [_existing(self.path.parent)]
            for place in places:
                if not place.is_dir():
                    raise StoreError(f"--out {self.url}: {place} is not a directory")
                if not os.access(place, os.W_OK):
                    raise StoreError(f"--out {self.url}: {place} is not writable")
            return
        import fsspec

        options = dict(self.storage_options)
        if self._protocol in ("s3", "s3a"):
            options["config_kwargs"] = {**_PROBE_CONFIG, **options.get("config_kwargs", {})}
        probe = f"{self._fs_path}/{_PROBE_NAME}{uuid.uuid4().hex}"
        with self._explained():
            fs = fsspec.filesystem(self._protocol, **options)
            try:
                fs.pipe_file(probe, b"gdn-dump can write here\n")
                fs.rm_file(probe)
            finally:
                _close_session(fs)

    def sync(self) -> None:
        """Make what was written here durable before a progress record claims it: the file system
        that holds a local store (:func:`sync_filesystem`); nothing for object storage, where a
        written object is already durable."""
        if self.is_local:
            sync_filesystem(_existing(self.path))

    def free_bytes(self) -> int | None:
        """Free space where the store goes, or None where that is unknown (remote)."""
        return shutil.disk_usage(_existing(self.path)).free if self.is_local else None

    @property
    def _protocol(self) -> str:  # the URL's scheme
        return _SCHEME.match(self.url).group(1).lower()

    @property
    def _fs_path(self) -> str:
        """The path within the filesystem: ``bucket/prefix``, no scheme, no trailing slash."""
        return self.url[len(self._protocol) + 3:].strip("/")

    @property
    def fs(self):
        """A synchronous fsspec filesystem for this location (remote only)."""
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem(self._protocol, **self.storage_options)
            weakref.finalize(self, _close_session, self._fs)
        return self._fs

    def _endpoint(self) -> str:
        opts = self.storage_options
        return (opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "(the provider's default)")

    @contextmanager
    def _explained(self):
        """Turn what a remote filesystem raises into a one-line StoreError."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"--out {self.url}: {self._why(exc)}") from exc

    def _why(self, exc: Exception) -> str:
        # By class name: botocore and aiohttp are optional, and only s3fs brings them.
        names = {cls.__name__ for cls in type(exc).__mro__}
        if isinstance(exc, FileNotFoundError):
            return f"bucket {self._fs_path.split('/')[0]!r} does not exist"
        if isinstance(exc, PermissionError):
            return "access denied"
        if names & {"NoCredentialsError", "PartialCredentialsError"}:
            return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ConnectionError"}:
            return f"cannot reach the endpoint {self._endpoint()}"
        return f"{type(exc).__name__}: {exc}"


def locate(out: str | Path, storage_options: dict | None = None) -> Location:
    """The :class:`Location` of ``--out``: a URL with a scheme other than file:// is remote."""
    if isinstance(out, Path):
        return Location(str(out), out)
    match = _SCHEME.match(out)
    if match is None:
        return Location(out, Path(out))
    protocol = match.group(1).lower()
    if protocol == "file":
        path = Path(unquote(urlparse(out).path))
        return Location(str(path), path)
    if not out[len(protocol) + 3:].strip("/"):
        raise StoreError(f"--out {out}: no bucket or path after {protocol}://")
    if protocol in ("s3", "s3a") and importlib.util.find_spec("s3fs") is None:
        raise StoreError(f"--out {out}: needs the s3 extra: pip install 'gdn-dump[s3]'")
    import fsspec
    try:  # an unknown scheme, or one whose package is missing, fails here and not mid-run
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"--out {out}: {protocol}:// is not supported here ({exc})") from exc
    return Location(out, None, storage_options)


def _close_session(fs) -> None:
    """Close the HTTP client of an s3fs filesystem on the event loop it was made on: zarr's for
    the asynchronous filesystems of zarr stores, fsspec's for the synchronous ones. s3fs does not
    close the former at all, and closes the latter with a 0.1 s timeout and a fallback that reaches
    into aiobotocore privates 3.x no longer has: on a busy machine the session stays open and
    Python reports "Unclosed client session". Where the loop is gone (exit), nothing is left to do."""
    creator = getattr(fs, "_s3creator", None)  # set once the filesystem made its first request
    if creator is None or not type(fs).__module__.startswith("s3fs"):
        return
    try:  # collected by the garbage collector on a loop's own thread: close it there, later
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    try:
        if running is not None:
            task = running.create_task(creator.__aexit__(None, None, None))
            _CLOSING.add(task)  # the loop keeps only a weak reference to its tasks
            task.add_done_callback(_CLOSING.discard)
        elif fs.asynchronous:
            from zarr.core.sync import sync

            sync(creator.__aexit__(None, None, None), timeout=10)
        else:
            import fsspec.asyn

            fsspec.asyn.sync(fs.loop, creator.__aexit__, None, None, None, timeout=10)
    except Exception:  # no loop any more (the interpreter exiting): let the process end
        pass


_CLOSING: set = set()


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding ``path`` (Linux ``syncfs``): the chunk files are written
    without an fsync each (the fsyncs tripled the write cost), and a whole-system ``sync`` would
    flush every file system of a shared node. Where the C library has no ``syncfs`` (not Linux),
    the whole system is synced."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs():
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def _existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
