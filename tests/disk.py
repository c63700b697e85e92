"""A full disk, simulated at the writer's one store write (``gdn_dump.store.writer.store_write``)."""

from __future__ import annotations

import errno
import os

from gdn_dump.store import writer as writer_module

# what TensorStore raises when a chunk write meets a full disk (seen on a small tmpfs)
TS_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing local file "x/c/3/0": Failed writing: '
             '"x/c/3/0.__lock": No space left on device [os_error_code=\'28\']')


class _FailedWrite:
    """A TensorStore write future whose write hit a full disk."""

    def result(self):
        raise ValueError(TS_ENOSPC)


def fill_disk_at(monkeypatch, n: int) -> list[int]:
    """From the ``n``-th store write on, every write fails as on a full disk; returns the sizes
    of the writes that succeeded."""
    real, done = writer_module.store_write, []

    def store_write(engine, target, where, block):
        if len(done) + 1 >= n:
            if engine == "zarr":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _FailedWrite()
        done.append(block.nbytes)
        return real(engine, target, where, block)

    monkeypatch.setattr(writer_module, "store_write", store_write)
    return done
