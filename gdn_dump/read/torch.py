"""The reader's torch side: :class:`TorchBatches`, :meth:`gdn_dump.read.Store.iter_batches` as a
``torch.utils.data.IterableDataset`` split across DataLoader workers, and :func:`sae_batches`,
endless batches for sparse autoencoders. Its own module so that reading a store
(``gdn_dump.read``) never imports torch.

:func:`sae_batches`: bare ``[batch, d_in]`` float32 torch tensors, what SAELens's
``SAETrainer(data_provider=...)`` and most trainers take: the rows of one hook (heads flattened, or one head), shuffled as
:meth:`~gdn_dump.read.Store.iter_batches` shuffles them (chunk-aligned blocks in a permuted order,
rows mixed within windows of blocks), epoch after epoch with a new order each, never running out.
Every batch is full: an epoch's last rows start the next batch, so every owned row comes exactly
once in each span of ``n_rows`` rows of the stream.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .exports.contexts import feature_shape
from .reader import Store, open_store


class TorchBatches(IterableDataset):
    """:meth:`Store.iter_batches` as torch tensors, split across DataLoader workers.

    Holds the store's path, not the open store: it pickles cleanly for spawned workers, and
    each worker process opens its own store (its own connections for ``s3://``).
    """

    def __init__(self, path: str, hooks: list[str] | None = None, batch_tokens: int = 4096,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 shuffle_blocks: int = 4, block_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.path = str(path)
        self.hooks = hooks
        self.batch_tokens, self.shuffle, self.seed = batch_tokens, shuffle, seed
        self.drop_last, self.shuffle_blocks, self.block_tokens = drop_last, shuffle_blocks, block_tokens
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._store: Store | None = None
        self._pid: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None}

    def store(self) -> Store:
        if self._store is None or self._pid != os.getpid():  # never share one across a fork
            self._store, self._pid = open_store(self.path), os.getpid()
        return self._store

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.store().iter_batches(
            self.hooks, batch_tokens=self.batch_tokens, shuffle=self.shuffle, seed=self.seed,
            epoch=self.epoch, drop_last=self.drop_last, worker=self.rank * n + wid,
            num_workers=self.world_size * n, shuffle_blocks=self.shuffle_blocks,
            block_tokens=self.block_tokens)
        for batch in batches:
            yield {k: _tensor(v) for k, v in batch.items()}


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: torch.from_numpy does not know it
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def sae_batches(store, hook: str, batch_tokens: int, head: int | None = None, seed: int = 0,
                shuffle_blocks: int = 4, block_tokens: int | None = None) -> Iterator:
    """``[batch_tokens, d_in]`` float32 tensors of ``hook``, forever (see the module)."""
    (name,) = store.hook_names([hook])
    feature_shape(store, name, head)  # the checks of --head
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be at least 1, not {batch_tokens}")
    if not any(store.prompt_length[store.visible]):
        raise ValueError(f"{store.path} has no finished rows to train on")
    carry = np.zeros((0, 0), np.float32)
    for epoch in itertools.count():
        for batch in store.iter_batches(name, batch_tokens=batch_tokens, shuffle=True, seed=seed,
                                        epoch=epoch, shuffle_blocks=shuffle_blocks,
                                        block_tokens=block_tokens):
            rows = batch[name] if head is None else batch[name][:, head]
            rows = rows.reshape(len(rows), -1).astype(np.float32)
            if len(carry):
                rows = np.concatenate([carry, rows])
            full = len(rows) // batch_tokens * batch_tokens
            for lo in range(0, full, batch_tokens):
                yield torch.from_numpy(np.ascontiguousarray(rows[lo:lo + batch_tokens]))
            carry = rows[full:].copy()
