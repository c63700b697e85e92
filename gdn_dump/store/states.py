"""The state axis of a store: which snapshots of S_t a run takes (``--state-every``) and which
rows of the state arrays each prompt owns (the store contract, DESIGN.md section 4).

Prompt p owns rows ``state_start[p] : state_start[p] + state_count[p]`` of every state array, one
per position of :func:`state_positions`, in order; each region's first row is aligned to the
state chunks (:func:`gdn_dump.store.layout.make_plan` lays them out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..dtypes import INDEX_DTYPE
from ..errors import GdnDumpError

if TYPE_CHECKING:
    from .layout import ArraySpec

STATE_FINAL = "final"  # --state-every final: a snapshot after each prompt's last token only
DEFAULT_STATE_EVERY = 64  # one chunk of the chunked kernels (fla's chunk states fall on it)
STATE_INDEX_ARRAYS = {"state_start": INDEX_DTYPE, "state_count": INDEX_DTYPE}  # [n_prompts]
STATE_POSITION = "state_position"  # [n_states] int64, -1 on rows no prompt owns


def state_stride(every: int | str) -> int | None:
    """``--state-every``: a stride ``N >= 1`` (a snapshot after every t with (t + 1) % N == 0 and
    after the last token), or ``final`` (None: after the last token only)."""
    if isinstance(every, str) and every.strip().lower() == STATE_FINAL:
        return None
    try:
        stride = int(every)
    except (TypeError, ValueError):
        stride = 0
    if stride < 1 or str(every).strip() != str(stride):
        raise GdnDumpError(f"--state-every must be a number of tokens (at least 1) or "
                           f"'{STATE_FINAL}', not {every!r}")
    return stride


def state_positions(length: int, stride: int | None) -> np.ndarray:
    """``[n]`` int64: the positions t (0-based) of a prompt of ``length`` tokens after which a
    snapshot is taken; none for an empty prompt."""
    if length <= 0:
        return np.zeros(0, dtype=np.int64)
    if stride is None:
        return np.array([length - 1], dtype=np.int64)
    positions = np.arange(stride - 1, length, stride, dtype=np.int64)
    if not len(positions) or positions[-1] != length - 1:
        positions = np.append(positions, length - 1)
    return positions


def state_counts(lengths: np.ndarray, stride: int | None) -> np.ndarray:
    """``[n_prompts]`` int64: snapshots of each prompt (``len(state_positions(L, stride))``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if stride is None:
        return (lengths > 0).astype(np.int64)
    return -(-lengths // stride)


@dataclass
class StateLayout:
    """The state axis of a store: which snapshot rows each prompt owns, and the state arrays."""

    stride: int | None  # None: the last token only
    dtype: str
    starts: np.ndarray  # [n_prompts] int64 (state_start)
    counts: np.ndarray  # [n_prompts] int64 (state_count)
    n_states: int
    arrays: list[ArraySpec]

    def start_row(self, prompt: int) -> int:
        return int(self.starts[prompt]) if prompt < len(self.starts) else self.n_states

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        """State rows ``[lo_row, hi_row)`` of prompts ``[lo, hi)`` (a region)."""
        if lo >= hi:
            return (0, 0)
        return int(self.starts[lo]), int(self.starts[hi - 1] + self.counts[hi - 1])

    def positions(self, lengths: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``state_position`` of the rows of prompts ``[lo, hi)``, back to back."""
        parts = [state_positions(int(n), self.stride) for n in lengths[lo:hi]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
