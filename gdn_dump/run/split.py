"""Many processes, one store: who this process is, and which prompts it owns.

The split comes from the engines users already run: ``--shard I/N`` (e.g. a Slurm array task:
``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) or ``torchrun`` (``RANK`` / ``WORLD_SIZE``;
``LOCAL_RANK`` picks the GPU). Every process computes the same plan from the prompt file; process
``i`` owns region ``i``: a run of whole units (see :mod:`gdn_dump.schedule`) whose rows start on a
chunk boundary, so no two processes ever write the same chunk or shard.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import GdnDumpError

SINGLE, SHARD, TORCHRUN = "single", "shard", "torchrun"


@dataclass(frozen=True)
class WorkSplit:
    index: int = 0
    count: int = 1
    launcher: str = SINGLE  # single | shard | torchrun
    local_rank: int | None = None  # torchrun: the GPU of this process on its node

    @property
    def creator(self) -> bool:
        """The one process that creates (and, with --overwrite, first deletes) the store."""
        return self.index == 0


def detect_split(shard: str | None, environ=os.environ) -> WorkSplit:
    """``--shard I/N`` if given, else torchrun's environment, else a single process."""
    torchrun = "RANK" in environ and "WORLD_SIZE" in environ
    if shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not match:
            raise GdnDumpError(f"--shard takes I/N (e.g. 0/4), not {shard!r}")
        index, count = int(match[1]), int(match[2])
        if count < 1 or index >= count:
            raise GdnDumpError(f"--shard {shard}: need 0 <= I < N")
        if torchrun and int(environ["WORLD_SIZE"]) > 1:
            raise GdnDumpError("--shard cannot be combined with torchrun (RANK / WORLD_SIZE are set); "
                               "use one or the other")
        return WorkSplit(index, count, SHARD)
    if torchrun:
        index, count = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", index))
        return WorkSplit(index, count, TORCHRUN if count > 1 else SINGLE, local)
    return WorkSplit()


def run_id(environ=os.environ) -> str | None:
    """What the processes of one launch share (a Slurm array job or a torchrun job), if known."""
    for key in ("GDN_DUMP_RUN_ID", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = environ.get(key)
        if value and value != "none":
            return f"{key}={value}"
    return None


def split_regions(unit_starts: list[int], lengths: np.ndarray, count: int,
                  cut_every: int | None = None) -> list[tuple[int, int]]:
    """Cut the prompts into ``count`` regions ``[lo, hi)`` of about equal tokens.

    Cuts fall on unit starts (and, when ``cut_every`` is given, on multiples of it: the chunk of
    per-prompt arrays). A region may be empty when there are fewer cut points than processes.
    """
    n = len(lengths)
    candidates = np.array([u for u in unit_starts if u and (not cut_every or u % cut_every == 0)],
                          dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    at = cumulative[candidates] if len(candidates) else np.zeros(0, np.int64)
    cuts = [0]
    for r in range(1, count):
        # the first candidate whose start is at or past this share of the tokens
        i = int(np.searchsorted(at, cumulative[-1] * r / count, side="left"))
        cuts.append(max(int(candidates[i]) if i < len(candidates) else n, cuts[-1]))
    cuts.append(n)
    return [(cuts[r], cuts[r + 1]) for r in range(count)]


class Barrier:
    """torch.distributed (gloo) barrier under torchrun; nothing for a single process or shards."""

    def __init__(self, split: WorkSplit, timeout_s: float):
        self.active = split.launcher == TORCHRUN
        if not self.active:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=_dt.timedelta(seconds=timeout_s))
            self._owned = True
        else:
            self._owned = False

    def wait(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.active and self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()

    def __enter__(self) -> Barrier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def device_for(device: str, split: WorkSplit):
    """The torch device of this process: under torchrun, ``--device auto`` means this process's
    GPU (``LOCAL_RANK``)."""
    import torch

    from ..model.load import resolve_device

    if device == "auto" and split.local_rank is not None and torch.cuda.is_available():
        return torch.device("cuda", split.local_rank % torch.cuda.device_count())
    return resolve_device(device)
