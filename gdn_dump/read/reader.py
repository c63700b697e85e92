"""Reading a store back: prompts, their hook rows, an xarray view, and chunk-aware training batches.

:func:`open_store` opens a store (a local directory or ``s3://...``) read-only as a :class:`Store`.
Everything goes through ``prompt_start`` / ``prompt_length`` (the store contract, DESIGN.md
section 4): rows between regions that no prompt owns (alignment gaps) are never shown.

A store still ``in_progress`` (a run stopped mid-way, or processes still writing) shows only the
prompts its progress ledger says are on disk: in each region, those below the record's
``resume_from`` (a region without a record shows nothing). Other prompts' rows may be zeros or
half written, so reading them raises :class:`StoreError`.

Nothing here loads the whole store: hook arrays stay lazy zarr arrays, the xarray view is lazy,
and :meth:`Store.iter_batches` holds a few chunk-aligned blocks at a time.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from ..catalogue import ROW_ARRAYS, state_layers
from ..errors import StoreError
from ..tokenizer import load_tokenizer_offline
from ..store.ledger import read_record, ready_info
from ..store.create import ATTR, COMPLETE, open_group
from . import matrices as _matrices, states as _states
from .record import PromptRecord
from .rows import BLOCK_BYTES, GAP, RowOwners, concat_blocks, lazy_owner_coordinate, block_length, row_bytes, chunk_unit

TOKEN_DIM = "token"
PROMPT_DIM = "prompt"
_XARRAY_HINT = "pip install 'gdn-dump[xarray]'"

__all__ = ["open_store", "Store", "PromptRecord", "StoreError"]


def open_store(path_or_url: str | Path) -> Store:
    """Open a gdn-dump store read-only: a local directory or a URL such as ``s3://bucket/prefix``
    (or a zarr group already open)."""
    return Store(path_or_url)


class Store:
    """A gdn-dump store opened read-only.

    A mapping of array names to lazy zarr arrays (``store["tokens"]``, ``len(store)``,
    ``name in store``), plus per-prompt access (:meth:`prompt`), an xarray view
    (:meth:`to_xarray`) and training batches (:meth:`iter_batches`, :meth:`torch_dataset`).
    Status and visible prompts are a snapshot taken when the store is opened. ``path_or_url`` may
    also be a zarr group already open on the store.
    """

    def __init__(self, path_or_url: str | Path | zarr.Group):
        if isinstance(path_or_url, zarr.Group):  # already open (figures of a group, old callers)
            self._group, self.path = path_or_url, _group_path(path_or_url)
        else:
            self.path = str(path_or_url)
            self._group = open_group(path_or_url, "r")
        self._arrays: dict[str, Any] = {}  # opened once: on s3 each opening is a metadata request
        self.provenance: dict = dict(self._group.attrs[ATTR])
        self.status: str = self.provenance.get("status", "unknown")
        # [n_prompts] each: small next to the rows (16 bytes a prompt), and needed by every read.
        self.prompt_start = np.asarray(self["prompt_start"][:], dtype=np.int64)
        self.prompt_length = np.asarray(self["prompt_length"][:], dtype=np.int64)
        self.n_prompts = int(self.prompt_start.shape[0])
        self.n_rows = int(self["tokens"].shape[0])
        self.visible = self._finished_prompts()
        self._owners = RowOwners(self.prompt_start, self.prompt_length, self.visible)

    # ---- what the store holds -----------------------------------------------------------------

    @cached_property
    def _dims(self) -> dict[str, tuple[str, ...]]:
        self._arrays.update(self._group.arrays())  # one listing opens them all
        return {name: tuple(arr.metadata.dimension_names or ()) for name, arr in self._arrays.items()}

    @cached_property
    def hooks(self) -> list[str]:
        """Names of the stored per-token hook arrays ``[n_rows, ...]``, in provenance order."""
        listed = self.provenance.get("hooks") or sorted(self._dims)
        return [name for name in listed
                if name not in ROW_ARRAYS and self._dims.get(name, ("",))[0] == TOKEN_DIM]

    @cached_property
    def matrices(self) -> list[str]:
        """Names of the per-prompt matrix arrays (possibly none): attention matrices and
        contribution norms / logits ``[n_prompts, heads, L, L]``, contribution vectors
        ``[n_prompts, heads, L, L, d_model]`` (:mod:`gdn_dump.read.matrices`)."""
        return _matrices.matrix_arrays(self._dims)

    @cached_property
    def state_layers(self) -> list[int]:
        """GDN layers with recurrent-state snapshots (``blocks.<i>.linear_attn.hook_ssm_state``)."""
        return state_layers(self._dims)

    @cached_property
    def state_index(self) -> _states.StateIndex:
        """Each prompt's snapshot rows (``state_start``/``state_count``); StoreError without states."""
        return _states.StateIndex(self)

    @cached_property
    def prompt_ids(self) -> list[str]:
        return [str(v) for v in self["prompt_id"][:]]

    @cached_property
    def tokenizer(self):
        """The tokenizer of the model in the provenance, loaded without any network; None if it
        cannot be loaded here (not in the local cache, a checkpoint directory gone, ...)."""
        model = self.provenance.get("model") or {}
        return load_tokenizer_offline(model.get("name"), model.get("revision"))

    def __getitem__(self, name: str):
        """The lazy zarr array ``name`` (slicing it reads only the chunks it touches)."""
        if name not in self._dims:
            raise KeyError(f"{name!r}: no such array in {self.path}")
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._dims

    def __len__(self) -> int:
        return len(self._dims)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._dims))

    def __repr__(self) -> str:
        return (f"<gdn_dump Store {self.path}: {self.status}, {len(self.visible)}/{self.n_prompts} "
                f"prompts visible, {self.n_rows} rows, {len(self.hooks)} hooks, "
                f"{len(self.matrices)} matrices>")

    # ---- prompts ------------------------------------------------------------------------------

    def _finished_prompts(self) -> np.ndarray:
        """Sorted indices of the prompts whose rows are all on disk."""
        if self.status == COMPLETE:
            return np.arange(self.n_prompts, dtype=np.int64)
        info = ready_info(self._group)
        if info is None:  # the creator never finished creating it: nothing was written
            return np.zeros(0, dtype=np.int64)
        parts = [np.zeros(0, dtype=np.int64)]
        for region, (lo, hi) in enumerate(info.get("regions") or []):
            record = read_record(self._group, region)
            if not record:
                continue  # this region's process never recorded progress: nothing is known on disk
            end = hi if record.get("done") else min(int(record.get("resume_from", lo)), hi)
            parts.append(np.arange(lo, max(lo, end), dtype=np.int64))
        return np.unique(np.concatenate(parts))

    def _index(self, p: int) -> int:
        p = int(p)
        if not -self.n_prompts <= p < self.n_prompts:
            raise IndexError(f"prompt {p} out of range: {self.path} holds {self.n_prompts} prompts")
        return p % self.n_prompts

    def is_visible(self, p: int) -> bool:
        p = self._index(p)
        i = np.searchsorted(self.visible, p)
        return bool(i < len(self.visible) and self.visible[i] == p)

    def rows(self, p: int) -> slice:
        """Rows ``[start, start + length)`` of prompt ``p`` (a finished one)."""
        p = self._index(p)
        if not self.is_visible(p):
            raise StoreError(f"prompt {p} of {self.path} is not finished: the store is "
                             f"{self.status} and its rows are not all written yet "
                             f"({len(self.visible)} of {self.n_prompts} prompts are); "
                             "finish the run with --resume")
        start = int(self.prompt_start[p])
        return slice(start, start + int(self.prompt_length[p]))

    def owners(self, prompt: int | None = None) -> RowOwners:
        """Which prompt owns each row: every finished prompt, or only ``prompt`` (a finished one)."""
        if prompt is None:
            return self._owners
        self.rows(prompt)  # raises for a prompt out of range or not finished
        return RowOwners(self.prompt_start, self.prompt_length, np.array([self._index(prompt)]))

    def prompt(self, p: int) -> PromptRecord:
        """Prompt ``p``: its id, token ids ``[n]`` int32, text, and its rows of every hook."""
        rows = self.rows(p)
        p = self._index(p)
        token_ids = np.asarray(self["tokens"][rows], dtype=np.int32)
        return PromptRecord(self, p, self.prompt_ids[p], token_ids, rows)

    # ---- recurrent states (gdn_dump.read.states) ---------------------------------------------

    def states(self, p: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored state snapshots of prompt ``p`` in GDN layer ``layer``: positions ``[n]``
        int64 (the token after which each was taken) and states ``[n, v_head, d_k, d_v]``."""
        return _states.snapshots(self, p, layer)

    def state(self, p: int, layer: int, t: int) -> np.ndarray:
        """S_t ``[v_head, d_k, d_v]`` float64 of prompt ``p`` in ``layer`` after token ``t``, any
        ``0 <= t < length``: a snapshot, or the stored k, v, beta, log_decay replayed from one."""
        return _states.state_at(self, p, layer, t)

    # ---- views --------------------------------------------------------------------------------

    def hook_names(self, hooks: str | list[str] | tuple[str, ...] | None) -> list[str]:
        """``hooks`` checked against the stored per-token hooks (None: all of them)."""
        if hooks is None:
            return list(self.hooks)
        names = [hooks] if isinstance(hooks, str) else list(hooks)
        unknown = [n for n in names if n not in self.hooks]
        if unknown:
            raise StoreError(f"{', '.join(map(repr, unknown))}: not a per-token hook array of "
                             f"{self.path}; it has {', '.join(self.hooks) or 'none'}")
        return names

    def to_xarray(self, chunks: Any = None):
        """The store as an ``xarray.Dataset``, read lazily (dask is not needed).

        Coordinates on ``token``: ``prompt`` (int64 prompt index of each row) and ``position``
        (0-based position in its prompt), both -1 on rows no finished prompt owns (alignment gaps,
        and on an ``in_progress`` store the rows of unfinished prompts). On ``prompt``:
        ``prompt_id``, ``prompt_start``, ``prompt_length`` and ``finished`` (bool). Select a
        prompt's rows with ``ds[hook].isel(token=ds.prompt.values == p)``. On ``state`` (stores
        with recurrent states): ``state_prompt`` (-1 likewise) and ``state_position``. Per-prompt
        matrices keep their dims (``prompt``, a head axis, ``query``, ``key``, and ``d_model`` for
        contribution vectors; zero past each prompt's length), the head axes get the model's head
        indices as coordinate where their arrays agree; per-prompt scalars (``*_residual``) are on
        ``prompt``. ``chunks`` goes to ``xarray.open_zarr`` (give ``{}`` for dask arrays when dask
        is installed).
        """
        try:
            import xarray as xr
        except ImportError as exc:
            raise ImportError(f"Store.to_xarray needs xarray: {_XARRAY_HINT}") from exc
        # The group's own zarr store: the same (possibly remote) place, already open read-only.
        ds = xr.open_zarr(self._group.store, consolidated=False, chunks=chunks)
        finished = np.zeros(self.n_prompts, dtype=bool)
        finished[self.visible] = True
        ds = ds.set_coords([n for n in ("prompt_id", "prompt_start", "prompt_length") if n in ds])
        ds = ds.assign_coords(
            prompt=xr.Variable((TOKEN_DIM,), lazy_owner_coordinate(self._owners, self.n_rows, 0)),
            position=xr.Variable((TOKEN_DIM,), lazy_owner_coordinate(self._owners, self.n_rows, 1)),
            finished=((PROMPT_DIM,), finished),
        )
        return _matrices.with_head_coordinates(self, _states.with_state_coordinates(self, ds))

    def block_rows(self, names: list[str], batch_tokens: int, block_tokens: int | None = None,
                   budget_bytes: int = BLOCK_BYTES) -> int:
        """Rows of one read block for arrays ``names`` (plus ``tokens``): whole chunks of each (see
        :func:`chunk_unit`), as many as make about ``block_tokens`` (default ``batch_tokens``) rows."""
        arrays = [self[n] for n in ["tokens", *names]]
        unit = chunk_unit([a.chunks[0] for a in arrays], row_bytes(arrays), budget_bytes)
        want = block_tokens or min(batch_tokens, max(1, budget_bytes // max(row_bytes(arrays), 1)))
        return max(unit, want // unit * unit)

    def iter_batches(self, hooks: str | list[str] | None = None, batch_tokens: int = 4096,
                     shuffle: bool = True, seed: int = 0, epoch: int = 0, drop_last: bool = False,
                     worker: int = 0, num_workers: int = 1, shuffle_blocks: int = 4,
                     block_tokens: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the owned rows of the finished prompts, each row exactly once per epoch.

        Yields ``{hook: [b, ...], "tokens": [b] int32, "prompt": [b] int64, "position": [b] int64}``
        with ``b == batch_tokens`` (the last batch may be shorter unless ``drop_last``).

        The store is read in blocks of whole chunks (a multiple of every read array's chunk rows,
        near ``batch_tokens`` rows or ``block_tokens`` if given), so every read is sequential
        within chunks. With ``shuffle`` the order of blocks is permuted (seeded by ``seed`` and
        ``epoch``) and rows are shuffled within windows of ``shuffle_blocks`` blocks: memory stays
        a few blocks, never the store. Worker ``worker`` of ``num_workers`` takes the permuted
        blocks ``worker, worker + num_workers, ...``: workers never overlap and together cover
        every row.
        """
        names = self.hook_names(hooks)
        for what, value in (("batch_tokens", batch_tokens), ("num_workers", num_workers),
                            ("shuffle_blocks", shuffle_blocks), ("block_tokens", block_tokens or 1)):
            if int(value) < 1:
                raise ValueError(f"{what} must be at least 1, not {value}")
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker must be in [0, {num_workers}), not {worker}")
        rows = self.block_rows(names, batch_tokens, block_tokens)
        blocks = self._owners.blocks(rows)
        if shuffle:
            # Every worker permutes the same way (same seed and epoch), so their shares are disjoint.
            blocks = np.random.default_rng([seed, epoch]).permutation(blocks)
        mine = blocks[worker::num_workers]
        rng = np.random.default_rng([seed, epoch, worker + 1]) if shuffle else None
        return self._batches(names, mine, rows, batch_tokens, shuffle_blocks, rng, drop_last)

    def torch_dataset(self, hooks: str | list[str] | None = None, batch_tokens: int = 4096,
                      shuffle: bool = True, seed: int = 0, **options):
        """A ``torch.utils.data.IterableDataset`` of :meth:`iter_batches` as torch tensors.

        Use it with ``DataLoader(ds, batch_size=None, num_workers=...)``: each DataLoader worker
        (and, with ``rank``/``world_size``, each process) reads its own blocks. Call
        ``ds.set_epoch(e)`` before each epoch to reshuffle (workers get a fresh copy of the
        dataset each epoch unless ``persistent_workers=True``, which would keep the old epoch).
        ``options``: ``drop_last``, ``shuffle_blocks``, ``block_tokens``, ``rank``, ``world_size``.
        """
        from .torch import TorchBatches  # torch only when asked for

        return TorchBatches(self.path, hooks=self.hook_names(hooks), batch_tokens=batch_tokens,
                            shuffle=shuffle, seed=seed, **options)

    def sae_batches(self, hook: str, batch_tokens: int = 4096, head: int | None = None,
                    seed: int = 0, **options):
        """An endless, shuffled, epoch-cycling iterator of bare torch ``[batch_tokens, d_in]``
        float32 tensors of one hook (heads flattened, or ``head`` alone): SAELens's
        ``data_provider``, or any trainer's (:func:`gdn_dump.read.torch.sae_batches`). ``options``:
        ``shuffle_blocks``, ``block_tokens`` as for :meth:`iter_batches`. Needs torch."""
        from .torch import sae_batches  # torch only when asked for

        return sae_batches(self, hook, batch_tokens, head=head, seed=seed, **options)

    # ---- reading blocks -----------------------------------------------------------------------

    def _batches(self, names, blocks, rows, batch_tokens, shuffle_blocks, rng, drop_last):
        arrays = {name: self[name] for name in ["tokens", *names]}
        carry: dict[str, np.ndarray] | None = None
        for w in range(0, len(blocks), shuffle_blocks):
            # Within a window the order does not matter (rows are shuffled): read it in row order.
            window = [self._read_block(int(b), rows, arrays) for b in sorted(blocks[w:w + shuffle_blocks])]
            part = concat_blocks(([carry] if carry else []) + window)
            if rng is not None:  # the carried rows join the shuffle: they were never yielded
                order = rng.permutation(block_length(part))
                part = {k: v[order] for k, v in part.items()}
            n = block_length(part)
            full = n // batch_tokens * batch_tokens
            for lo in range(0, full, batch_tokens):
                yield {k: v[lo:lo + batch_tokens] for k, v in part.items()}
            # A copy, so the window's arrays are freed and memory stays bounded.
            carry = {k: v[full:].copy() for k, v in part.items()} if full < n else None
        if carry and not drop_last:
            yield carry

    def _read_block(self, block: int, rows: int, arrays: dict) -> dict[str, np.ndarray]:
        """The owned rows of block ``block`` (rows ``[block * rows, (block + 1) * rows)``)."""
        lo = block * rows
        hi = min(lo + rows, self.n_rows)
        prompt, position = self._owners.at(np.arange(lo, hi, dtype=np.int64))
        keep = np.flatnonzero(prompt != GAP)  # never empty: only blocks with owned rows are read
        out = {"prompt": prompt[keep], "position": position[keep]}
        # Only the span of owned rows: the same chunks, fewer bytes copied at a region's edge.
        first, last = lo + int(keep[0]), lo + int(keep[-1]) + 1
        keep -= int(keep[0])
        for name, arr in arrays.items():  # "tokens" and the hooks
            out[name] = np.asarray(arr[first:last])[keep]
        return out


def _group_path(group: zarr.Group) -> str:
    """Where an open group is, as :func:`open_store` takes it (a directory or a URL)."""
    store = group.store
    if getattr(store, "root", None) is not None:  # LocalStore
        base = str(store.root)
    elif getattr(store, "fs", None) is not None:  # FsspecStore (s3://...)
        base = store.fs.unstrip_protocol(store.path)
    else:
        base = str(store)
    return f"{base.rstrip('/')}/{group.path}" if group.path else base
