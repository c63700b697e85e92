"""One store from one or many processes: create or join it, resume, survive signals.

Process 0 creates the store (arrays, prompt index, provenance) and marks it ready in the ledger
(:mod:`gdn_dump.ledger`); under torchrun the others pass a barrier, independent ``--shard`` tasks
poll for the marker. Each process then works on its own region from where its record says.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass

import zarr

from ..errors import StoreError, Terminated
from ..store.ledger import differences, mark_ready, read_record, ready_info, wait_ready
from ..store.layout import Plan
from ..store.create import ATTR, COMPLETE, create_store, has_store, open_group
from .split import Barrier, WorkSplit, run_id


@dataclass
class Session:
    """This process's view of the run: the store, its region, and where to start in it."""

    group: zarr.Group
    region: int
    lo: int  # prompts [lo, hi) of the region
    hi: int
    resume_from: int  # first prompt to compute
    region_done: bool = False
    store_complete: bool = False


def fingerprint(opts, plan: Plan, source, split: WorkSplit, model_dtype: str) -> dict:
    """What must be equal for processes to share a store, or for a run to resume it."""
    return {
        "model": opts.model, "revision": opts.revision, "model_dtype": model_dtype,
        "hooks": [h.name for h in plan.hooks],
        "attention": [[a.layer, list(a.heads)] for a in plan.attn_layers],
        "attn_mode": opts.attn_mode, "attn_method": opts.attn_method,
        "attn_precision": opts.attn_precision,
        "storage_dtype": plan.storage_dtype, "compressor": opts.compressor,
        "prompts_sha256": source.sha256, "prompts": source.count, "text_field": opts.text_field,
        "encoding_errors": opts.encoding_errors, "max_length": opts.max_length,
        "on_long": opts.on_long,
        "chunks": {a.name: [list(a.chunks), list(a.shards) if a.shards else None] for a in plan.arrays},
        "batch_size": opts.batch_size, "max_batch_tokens": opts.max_batch_tokens,
        "sort_window_bytes": opts.sort_window_bytes,
        "processes": split.count,
    }


def open_session(opts, plan: Plan, source, split: WorkSplit, fp: dict, provenance: dict,
                 barrier: Barrier) -> Session:
    """Create, join or resume the store; return where this process starts."""
    path = opts.out
    launch = run_id()
    group = None
    if split.creator:
        if opts.resume and has_store(path):
            group = open_group(path, mode="r+")
            info = ready_info(group)
            if info is None:  # killed while creating: nothing in it can be trusted
                group = None
            else:
                diff = differences(info.get("fingerprint", {}), fp)
                if diff:
                    raise StoreError(f"--resume: {opts.out} was written with different settings; "
                                     f"{'; '.join(diff[:8])}")
        if group is None:
            group = create_store(opts.out, plan, provenance, overwrite=opts.overwrite or opts.resume,
                                 compressor=opts.compressor, prompt_ids=(p.id for p in source))
            mark_ready(group, fp, plan.regions, launch)
            fault("after-create")
        barrier.wait()
    else:
        barrier.wait()
        group = wait_ready(lambda: open_group(path, mode="r+"), fp, launch, opts.wait_timeout,
                           opts.resume)
    lo, hi = plan.regions[split.index]
    session = Session(group, split.index, lo, hi, lo,
                      store_complete=group.attrs[ATTR].get("status") == COMPLETE)
    record = read_record(group, split.index)
    if record is not None:
        if not opts.resume:
            raise StoreError(f"region {split.index} of {opts.out} already has progress "
                             f"(up to prompt {record.get('resume_from')}); pass --resume to continue "
                             "it, or --overwrite on process 0 to start over")
        session.resume_from = int(record.get("resume_from", lo))
        session.region_done = bool(record.get("done"))
    return session


@contextlib.contextmanager
def signals_as_exceptions():
    """SIGTERM (Slurm preemption, ``kill``) raises :class:`Terminated` in the main thread, the
    way SIGINT raises KeyboardInterrupt, so both unwind through the same flush-and-record path."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fault(point: str) -> None:
    """Test hook: ``GDN_DUMP_FAULT=<point>`` kills this process with SIGKILL at ``point``
    (``after-create``, ``after-checkpoint:N``, ``before-finalize``), the way a node failure would."""
    if os.environ.get("GDN_DUMP_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
