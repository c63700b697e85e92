"""Recurrent states of a store: the stored snapshots of S, S_t at any position, their xarray
coordinates.

A run with ``--hooks ssm_state --state-every N`` keeps, per GDN layer, snapshots of the state
``blocks.<i>.linear_attn.hook_ssm_state`` [n_snapshots, v_head, d_k, d_v] (DESIGN.md section 4):
snapshot rows ``state_start[p] : state_start[p] + state_count[p]`` belong to prompt p, and
``state_position`` says after which token of its prompt each was taken. Between two snapshots,
S_t is the stored k, v, beta and log_decay rows replayed from the earlier one
(:func:`gdn_dump.ops.state_replay.replay_state`). The states of a prompt are shown exactly when
its rows are (:meth:`Store.rows` refuses unfinished prompts).

The functions take a :class:`~gdn_dump.read.reader.Store`; its methods ``states``, ``state``,
``state_layers`` are the way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..catalogue import STATE, STATE_HOOK, STATE_INPUTS, gdn_hook_name, state_name
from ..errors import StoreError
from ..ops.state_replay import replay_state
from ..store.states import STATE_INDEX_ARRAYS, STATE_POSITION
from .rows import RowOwners, lazy_owner_coordinate

if TYPE_CHECKING:
    from .reader import Store

STATE_DIM = STATE  # the row axis of the state arrays
STATE_START, STATE_COUNT = STATE_INDEX_ARRAYS
NO_STATES_HINT = f"store them with extract --hooks ...,{STATE_HOOK} --state-every N"
SHOWN_POSITIONS = 8  # snapshot positions an error lists before eliding


class StateIndex:
    """Where each prompt's snapshots are: ``start``, ``count`` [n_prompts] int64, read once."""

    def __init__(self, store: Store):
        require_states(store)
        self.start = np.asarray(store[STATE_START][:], dtype=np.int64)
        self.count = np.asarray(store[STATE_COUNT][:], dtype=np.int64)
        self.n_snapshots = int(store[STATE_POSITION].shape[0])

    def owners(self, visible: np.ndarray) -> RowOwners:
        """Which (finished) prompt owns each snapshot row; gap rows and unfinished prompts: -1."""
        return RowOwners(self.start, self.count, visible)


def has_states(store: Store) -> bool:
    return STATE_START in store and bool(store.state_layers)


def require_states(store: Store) -> None:
    if not has_states(store):
        raise StoreError(f"{store.path} holds no recurrent states ({NO_STATES_HINT})")


def check_layer(store: Store, layer: int) -> str:
    """The state array of ``layer``, or one line saying which layers have one."""
    require_states(store)  # a store without any: say that, not "layer 0 has none"
    if int(layer) not in store.state_layers:
        raise StoreError(f"layer {layer} has no recurrent states in {store.path}; layers with "
                         f"them: {', '.join(map(str, store.state_layers))}")
    return state_name(int(layer))


def snapshot_rows(store: Store, p: int) -> slice:
    """Snapshot rows of (finished) prompt ``p`` in every state array."""
    store.rows(p)  # out of range or not finished: refused, with the reader's words
    index = store.state_index
    p = int(p) % store.n_prompts
    start = int(index.start[p])
    return slice(start, start + int(index.count[p]))


def snapshots(store: Store, p: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored snapshots of prompt ``p`` in ``layer``: positions [n] int64 (0-based token
    after which each was taken) and states [n, H, K, V] in the stored dtype."""
    name = check_layer(store, layer)
    rows = snapshot_rows(store, p)
    positions = np.asarray(store[STATE_POSITION][rows], dtype=np.int64)
    return positions, np.asarray(store[name][rows])


def state_at(store: Store, p: int, layer: int, t: int) -> np.ndarray:
    """S_t of prompt ``p`` in ``layer`` after token ``t`` (0 <= t < the prompt's length):
    [H, K, V] float64. The snapshot at t if there is one, else the nearest one before t (or the
    zero state) with the stored rows after it replayed."""
    name = check_layer(store, layer)
    tokens = store.rows(p)
    p, t = int(p) % store.n_prompts, int(t)
    length = tokens.stop - tokens.start
    if not 0 <= t < length:
        raise StoreError(f"position {t} is out of range: prompt {p} has {length} tokens"
                         + (f" (0-{length - 1})" if length else ", so no states"))
    rows = snapshot_rows(store, p)
    positions = np.asarray(store[STATE_POSITION][rows], dtype=np.int64)
    before = int(np.searchsorted(positions, t, side="right")) - 1  # the last snapshot at or before t
    if before >= 0 and positions[before] == t:
        return np.asarray(store[name][rows.start + before], dtype=np.float64)
    hooks = _replay_hooks(store, layer, p, t, positions)
    start = np.asarray(store[name][rows.start + before]) if before >= 0 else None
    first = tokens.start + (int(positions[before]) + 1 if before >= 0 else 0)
    k, v, beta, g = (store[h][first:tokens.start + t + 1] for h in hooks)
    return replay_state(start, k, v, beta, g)


def _replay_hooks(store: Store, layer: int, p: int, t: int, positions: np.ndarray) -> list[str]:
    """The k, v, beta, log_decay arrays of ``layer``, or one line saying what to store."""
    names = [gdn_hook_name(layer, short) for short in STATE_INPUTS]
    missing = [name for name in names if name not in store.hooks]
    if missing:
        raise StoreError(
            f"position {t} of prompt {p} is not a snapshot of layer {layer} (its snapshots are at "
            f"{_positions(positions)}) and {store.path} lacks {', '.join(missing)} to replay from "
            f"one: store the rows to replay: --hooks ...,{','.join(STATE_INPUTS)}")
    return names


def _positions(positions: np.ndarray) -> str:
    shown = [str(int(x)) for x in positions[:SHOWN_POSITIONS]]
    if len(positions) > SHOWN_POSITIONS:
        shown[-1:] = ["...", str(int(positions[-1]))]
    return ", ".join(shown) if shown else "no positions"


def with_state_coordinates(store: Store, ds):
    """``ds`` (the store's xarray view) with coordinates on ``state``: ``state_prompt`` (the
    prompt of each snapshot row, computed lazily; -1 on gap rows and unfinished prompts) and
    ``state_position`` (as stored); ``state_start``, ``state_count`` on ``prompt``. A store
    without states comes back unchanged."""
    import xarray as xr

    if not has_states(store):
        return ds
    index = store.state_index
    owners = index.owners(store.visible)
    ds = ds.set_coords([n for n in (STATE_START, STATE_COUNT, STATE_POSITION) if n in ds])
    return ds.assign_coords(state_prompt=xr.Variable(
        (STATE_DIM,), lazy_owner_coordinate(owners, index.n_snapshots, 0)))
